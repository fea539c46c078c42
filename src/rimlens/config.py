"""Configuration dataclasses. Presets are data (``presets.toml``); a configuration is saved next
to every data set and checkpoint so that it alone rebuilds what produced it."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources

from rimlens.errors import RimlensInputError
from rimlens.physics import PixelGrid


@dataclass(frozen=True)
class GridConfig:
    """Image (= convergence) grid and source grid."""

    image_pixels: int = 64
    image_fov_arcsec: float = 7.68
    source_pixels: int = 64
    source_fov_arcsec: float = 3.0

    @property
    def image_grid(self) -> PixelGrid:
        return PixelGrid.from_fov(self.image_pixels, self.image_fov_arcsec)

    @property
    def source_grid(self) -> PixelGrid:
        return PixelGrid.from_fov(self.source_pixels, self.source_fov_arcsec)


@dataclass(frozen=True)
class TruncNormal:
    """Normal(mean, std) truncated to [low, high]."""

    mean: float
    std: float
    low: float
    high: float


# Noise recipes of censai_as_run.md section 1.5 (sources have peak 1, so SNR ~ 1/sigma).
NOISE_RECIPES = {
    "train": TruncNormal(0.01, 0.03, 0.001, 0.1),
    "high": TruncNormal(0.01, 0.03, 0.001, 0.1),
    "medium": TruncNormal(0.02, 0.05, 0.01, 0.1),
    "low": TruncNormal(0.05, 0.1, 0.01, 0.1),
}


@dataclass(frozen=True)
class ValidationConfig:
    """Checks of censai_as_run.md section 2.4, in physical units so they carry across grids.

    A lens is rejected if: its magnification proxy (area of the noiseless image above
    ``brightness_threshold`` over the area of the source above it) is below
    ``min_magnification``; the noiseless image exceeds ``edge_tolerance`` within
    ``edge_width_arcsec`` of the border; the source has less than
    ``min_bright_source_area_arcsec2`` above 0.1; or max kappa < ``min_max_kappa``.
    """

    min_magnification: float = 3.0
    brightness_threshold: float = 0.1
    edge_width_arcsec: float = 0.3
    edge_tolerance: float = 0.2
    min_bright_source_area_arcsec2: float = 0.0055
    min_max_kappa: float = 1.0


@dataclass(frozen=True)
class DataConfig:
    """How lenses are drawn. Mixing fractions need not sum to 1 (they are normalised).

    source_mix keys: ``cosmos`` (real HST galaxies), ``parametric`` (Sersic + clumps).
    kappa_mix keys: ``sie`` (SIE), ``sie_substructure`` (SIE + NFW subhaloes + multipoles),
    ``particles`` (synthetic particle galaxies, smooth-particle lensing). Both mixes accept ``vae``
    (samples of the VAEs in ``source_vae`` / ``kappa_vae``; the paper used 80% VAE, 20% real).
    kappa_mix also accepts ``tng``: the 4 shipped TNG100 maps, for evaluation sets only (refused
    for training data).
    """

    source_mix: dict = field(default_factory=lambda: {"cosmos": 0.5, "parametric": 0.5})
    kappa_mix: dict = field(default_factory=lambda: {"sie": 0.35, "sie_substructure": 0.25, "particles": 0.4})
    psf_fwhm_arcsec: TruncNormal = TruncNormal(0.08, 0.05, 0.06, 0.30)
    noise: str = "train"
    theta_e_range: tuple = (0.5, 2.5)
    validation: ValidationConfig = ValidationConfig()
    particle_bank_size: int = 48
    min_source_peak_snr: float = 10.0
    source_vae: str = ""  # VAE checkpoints for the "vae" families
    kappa_vae: str = ""

    def __post_init__(self):
        if self.noise not in NOISE_RECIPES:
            raise RimlensInputError(f"unknown noise recipe {self.noise!r}; choose from {sorted(NOISE_RECIPES)}")
        for name, mix, allowed in (("source_mix", self.source_mix, {"cosmos", "parametric", "vae"}),
                                   ("kappa_mix", self.kappa_mix, {"sie", "sie_substructure", "particles", "vae", "tng"})):
            bad = set(mix) - allowed
            if bad or not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
                raise RimlensInputError(f"{name} must map {sorted(allowed)} to non-negative weights, got {mix}")


@dataclass(frozen=True)
class Preset:
    """A named configuration: grids and data (model and training added by later sections)."""

    name: str
    grid: GridConfig = GridConfig()
    data: DataConfig = DataConfig()
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def from_dict(cls, data):
    """Build a (nested, frozen) dataclass from plain dicts, rejecting unknown keys."""
    if not dataclasses.is_dataclass(cls):
        return data
    if not isinstance(data, dict):
        raise RimlensInputError(f"expected a table for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise RimlensInputError(f"unknown {cls.__name__} settings: {sorted(unknown)}")
    kwargs = {}
    for k, v in data.items():
        t = hints[k]
        if dataclasses.is_dataclass(t):
            v = from_dict(t, v)
        elif isinstance(v, list):
            v = tuple(v)
        elif t is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        elif t in (int, float, bool, str) and not isinstance(v, t):
            raise RimlensInputError(f"{cls.__name__}.{k} must be {t.__name__}, got {v!r}")
        kwargs[k] = v
    return cls(**kwargs)


def preset_names() -> list[str]:
    return sorted(_load_presets())


def _load_presets() -> dict:
    text = (resources.files("rimlens") / "presets.toml").read_text()
    return tomllib.loads(text)


def get_preset(name: str) -> Preset:
    """The named preset from ``presets.toml`` (tiny, cpu64, paper128)."""
    presets = _load_presets()
    if name not in presets:
        raise RimlensInputError(f"unknown preset {name!r}; available: {', '.join(sorted(presets))}")
    return from_dict(Preset, {"name": name, **presets[name]})


def preset_from_json(text: str) -> Preset:
    """Inverse of :meth:`Preset.to_json`."""
    return from_dict(Preset, json.loads(text))
