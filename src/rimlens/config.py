"""Configuration dataclasses. Presets are data (``presets.toml``); a configuration is saved next
to every data set and checkpoint so that it alone rebuilds what produced it."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources

from rimlens.errors import RimlensInputError
from rimlens.physics import PixelGrid

__all__ = [
    "KAPPA_VAE",
    "NOISE_RECIPES",
    "SOURCE_VAE",
    "DataConfig",
    "GridConfig",
    "LoopConfig",
    "ParametricSourceConfig",
    "Preset",
    "RIMConfig",
    "TrainConfig",
    "TruncNormal",
    "UNetConfig",
    "VAEConfig",
    "VAETrainConfig",
    "ValidationConfig",
    "from_dict",
    "get_preset",
    "preset_from_json",
    "preset_names",
    "with_train_settings",
]

T = typing.TypeVar("T")


@dataclass(frozen=True)
class GridConfig:
    """Image (= convergence) grid and source grid.

    ``supersample`` (integer >= 1) is the number of sub-pixels per side through which the simulator
    traces rays in every image pixel: with ``f > 1`` each pixel is the mean of its ``f x f``
    sub-pixel samples (pixel-integrated surface brightness, as a detector records), at about ``f**2``
    times the simulator's cost; ``1`` samples the pixel centres.
    """

    image_pixels: int = 64
    image_fov_arcsec: float = 7.68
    source_pixels: int = 64
    source_fov_arcsec: float = 3.0
    supersample: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.supersample, int) or isinstance(self.supersample, bool) or self.supersample < 1:
            raise RimlensInputError(f"grid setting supersample must be an integer >= 1, got {self.supersample!r}")

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


# Noise recipes of docs/censai_as_run.md section 1.5 (sources have peak 1, so SNR ~ 1/sigma).
NOISE_RECIPES = {
    "train": TruncNormal(0.01, 0.03, 0.001, 0.1),
    "high": TruncNormal(0.01, 0.03, 0.001, 0.1),
    "medium": TruncNormal(0.02, 0.05, 0.01, 0.1),
    "low": TruncNormal(0.05, 0.1, 0.01, 0.1),
}


@dataclass(frozen=True)
class ValidationConfig:
    """Checks of docs/censai_as_run.md section 2.4, in physical units so they carry across grids.

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


def _check_range(name: str, pair: tuple) -> None:
    """Refuse a ``(low, high)`` setting unless ``0 < low <= high < inf``."""
    if len(pair) != 2 or not 0 < pair[0] <= pair[1] < math.inf:
        raise RimlensInputError(f"{name} must be a range 0 < low <= high, got {pair}")


@dataclass(frozen=True)
class ParametricSourceConfig:
    """The parametric source family: a Sersic bulge/disk plus Gaussian star-forming clumps.

    Ranges are uniform, sizes in arcsec on the source plane. ``max_offset_arcsec`` bounds the Sersic
    centre's distance from the optical axis (drawn uniformly over that disc); clumps lie within
    1.5 ``r_eff`` of it. The source population sets what a learnt model reads as the slope (README,
    "What sets the slope on a peer's lenses"), so it is a setting of the data, saved with every model.
    """

    r_eff_arcsec: tuple[float, float] = (0.08, 0.5)
    sersic_index: tuple[float, float] = (0.7, 4.0)
    axis_ratio: tuple[float, float] = (0.3, 1.0)
    max_offset_arcsec: float = 0.3
    clumps: tuple[int, int] = (0, 6)
    clump_sigma_arcsec: tuple[float, float] = (0.02, 0.08)
    clump_amplitude: tuple[float, float] = (0.1, 1.0)

    def __post_init__(self):
        for name in ("r_eff_arcsec", "sersic_index", "axis_ratio", "clump_sigma_arcsec", "clump_amplitude"):
            _check_range(f"parametric_source.{name}", getattr(self, name))
        if self.axis_ratio[1] > 1:
            raise RimlensInputError(f"parametric_source.axis_ratio must lie in (0, 1], got {self.axis_ratio}")
        if not (0 <= self.clumps[0] <= self.clumps[1]):
            raise RimlensInputError(f"parametric_source.clumps must be 0 <= low <= high, got {self.clumps}")
        if not (0 <= self.max_offset_arcsec < math.inf):
            raise RimlensInputError(f"parametric_source.max_offset_arcsec must be >= 0, got {self.max_offset_arcsec}")


@dataclass(frozen=True)
class DataConfig:
    """How lenses are drawn. Mixing fractions need not sum to 1 (they are normalised).

    source_mix keys: ``cosmos`` (real HST galaxies, augmented by ``cosmos_zoom`` and
    ``cosmos_max_shift_arcsec``), ``parametric`` (Sersic + clumps, drawn as ``parametric_source`` says).
    kappa_mix keys: ``sie`` (SIE), ``sie_substructure`` (SIE + NFW subhaloes + multipoles), ``epl``
    (elliptical power law, log-slope U(1.6, 2.4)),
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
    shear_max: float = 0.0  # external shear magnitude U(0, shear_max), angle uniform (0: none)
    parametric_source: ParametricSourceConfig = ParametricSourceConfig()
    # augmentation of the COSMOS galaxies: zoom log-uniform in this range (> 1 enlarges), and a shift of
    # their centre uniform in +-cosmos_max_shift_arcsec along each axis (arcsec on the source plane)
    cosmos_zoom: tuple = (0.8, 1.25)
    cosmos_max_shift_arcsec: float = 0.3

    def __post_init__(self):
        if self.noise not in NOISE_RECIPES:
            raise RimlensInputError(f"unknown noise recipe {self.noise!r}; choose from {sorted(NOISE_RECIPES)}")
        if not 0 <= self.shear_max < 0.5:
            raise RimlensInputError(f"shear_max must be in [0, 0.5), got {self.shear_max}")
        _check_range("cosmos_zoom", self.cosmos_zoom)
        if not 0 <= self.cosmos_max_shift_arcsec < math.inf:
            raise RimlensInputError(f"cosmos_max_shift_arcsec must be >= 0, got {self.cosmos_max_shift_arcsec}")
        for name, mix, allowed in (
            ("source_mix", self.source_mix, {"cosmos", "parametric", "vae"}),
            ("kappa_mix", self.kappa_mix, {"sie", "sie_substructure", "epl", "particles", "vae", "tng"}),
        ):
            bad = set(mix) - allowed
            if bad or not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
                raise RimlensInputError(f"{name} must map {sorted(allowed)} to non-negative weights, got {mix}")


# ---------------------------------------------------------------- models


@dataclass(frozen=True)
class UNetConfig:
    """Sizes of the U-net.

    Attributes:
        filters: channels of each level (the number of levels is ``len(filters)``); spatial size
            halves at each level, so the grid must be divisible by ``2 ** len(filters)``.
        bottleneck_filters: channels of the bottleneck (and its GRU).
        convs_per_level: convolutions per encoder/decoder level (paper: 2).
        kernel_size, input_kernel_size, gru_kernel_size: convolution kernel sizes (paper: 3, 11, 3).
        activation: ``tanh`` (paper), ``relu``, ``leaky_relu`` or ``silu``.
        in_channels: observation, source, log10 kappa and their two likelihood gradients = 5.
        out_channels: source and log10 kappa updates = 2.
    """

    filters: tuple = (16, 32, 64, 128)
    bottleneck_filters: int = 128
    convs_per_level: int = 2
    kernel_size: int = 3
    input_kernel_size: int = 11
    gru_kernel_size: int = 3
    activation: str = "tanh"
    in_channels: int = 5
    out_channels: int = 2

    @property
    def levels(self) -> int:
        return len(self.filters)


@dataclass(frozen=True)
class RIMConfig:
    """Configuration of a RIM: its U-net, number of steps and gradient normalisation.

    ``external_shear``: the RIM also estimates a constant external shear ``(gamma1, gamma2)`` with
    its likelihood gradient (4 more input channels, 2 more output channels averaged over the image;
    the U-net's ``in_channels`` / ``out_channels`` become 9 / 4). See :mod:`rimlens.nn.rim`.
    """

    unet: UNetConfig = field(default_factory=UNetConfig)
    steps: int = 8
    rmsprop_decay: float = 0.9
    epsilon: float = 1e-8
    external_shear: bool = False


@dataclass(frozen=True)
class VAEConfig:
    """VAE sizes and loss schedule (defaults: the paper's source VAE; kappa VAE in ``KAPPA_VAE``)."""

    image_pixels: int = 64
    levels: int = 3
    convs_per_level: int = 2
    filters: int = 16
    filter_scaling: int = 2
    latent: int = 32
    output: str = "linear"  # or "sigmoid" (the paper's source VAE; see SOURCE_VAE)
    sample_range: tuple | None = None  # clamp decoded samples to this range
    beta_start: float = 0.1
    beta_end: float = 0.1
    beta_warmup_steps: int = 1
    gamma_start: float = 1e-2
    gamma_steps: int = 10_000
    gamma_power: float = 0.5

    def beta(self, step: int) -> float:
        f = min(step, self.beta_warmup_steps) / max(self.beta_warmup_steps, 1)
        return self.beta_start + (self.beta_end - self.beta_start) * f

    def gamma(self, step: int) -> float:
        return self.gamma_start * (1 - min(step, self.gamma_steps) / self.gamma_steps) ** self.gamma_power


# The paper's source VAE ends with a sigmoid. On our data a sigmoid output collapses to all-zero
# images within ~50 steps (the initial 0.5 everywhere is pushed into saturation and its gradient
# vanishes; seen at learning rates 1e-3 and 1e-4), while a linear output learns at once. We train
# with a linear output and clamp samples to [0, 1].
SOURCE_VAE = dict(levels=3, convs_per_level=2, filters=16, latent=32, output="linear", sample_range=(0.0, 1.0))
KAPPA_VAE = dict(
    levels=4,
    convs_per_level=1,
    filters=16,
    latent=16,
    output="linear",
    beta_start=0.1,
    beta_end=0.2,
    beta_warmup_steps=5000,
)


# ---------------------------------------------------------------- training


def _check_int(owner: str, name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise RimlensInputError(f"{owner} setting {name} must be an integer >= {minimum}, got {value!r}")


def _check_positive(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise RimlensInputError(f"{owner} setting {name} must be a number > 0, got {value!r}")


@dataclass(frozen=True)
class LoopConfig:
    """What every training loop shares (rimlens.train.loop): batch, learning-rate schedule, limits,
    evaluation and checkpoint cadence, early stopping and the seed."""

    batch_size: int = 8  # global batch
    learning_rate: float = 1e-4
    decay_rate: float = 0.95
    decay_steps: int = 100_000
    staircase: bool = True
    max_steps: int = 1_000_000
    max_minutes: float = 0.0  # 0 = no limit
    val_size: int = 64
    val_every: int = 200
    checkpoint_every: int = 100
    patience: int = 20  # evaluations without improvement before stopping (0 = never)
    seed: int = 0
    # exponential moving average of the weights (torch.optim.swa_utils), updated after every step with this
    # decay; evaluations, best.pt and early stopping then use the averaged weights (0 = off). The averages
    # damp the step-to-step fluctuation of a validation score that selects checkpoints
    ema_decay: float = 0.0

    # settings a resumed run may change (limits, and the learning rate after a divergence)
    RESUME_OVERRIDES: typing.ClassVar[tuple[str, ...]] = ("max_steps", "max_minutes", "learning_rate")

    def __post_init__(self) -> None:
        owner = "training"
        for name in ("batch_size", "decay_steps", "val_size", "val_every", "checkpoint_every", "max_steps"):
            _check_int(owner, name, getattr(self, name), 1)
        _check_int(owner, "patience", self.patience, 0)
        if (
            isinstance(self.ema_decay, bool)
            or not isinstance(self.ema_decay, (int, float))
            or not (0 <= self.ema_decay < 1)
        ):
            raise RimlensInputError(f"training setting ema_decay must be a number in [0, 1), got {self.ema_decay!r}")
        for name in ("learning_rate", "decay_rate"):
            _check_positive(owner, name, getattr(self, name))
        if (
            isinstance(self.max_minutes, bool)
            or not isinstance(self.max_minutes, (int, float))
            or not self.max_minutes >= 0
        ):
            raise RimlensInputError(f"training setting max_minutes must be a number >= 0, got {self.max_minutes!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate at ``step``: ``learning_rate * decay_rate ** (step / decay_steps)`` (floored
        exponent when ``staircase``)."""
        e = step / self.decay_steps
        return self.learning_rate * self.decay_rate ** (math.floor(e) if self.staircase else e)


@dataclass(frozen=True)
class TrainConfig(LoopConfig):
    """RIM training settings (paper values in docs/censai_as_run.md section 5; CPU presets use a larger
    learning rate and faster decay because they train for hours, not days)."""

    clip_norm: float = 5.0  # per-tensor gradient norm clip
    data_shards: int = 1  # emulate this many DDP ranks in one process
    channels_last: bool = True
    amp: bool = False  # bfloat16 autocast of the U-net on CUDA
    dtype: str = "float32"  # or "float64" (exact comparisons in tests)
    data_workers: int = 0  # DataLoader worker processes drawing batches ahead of the model (0: in the main process)
    # a file of peer-simulated lenses (rimlens.train.peer); when set, best.pt and early stopping follow
    # its peer_score instead of the own validation loss ("" = none)
    peer_validation: str = ""
    # extra weight of the log10 kappa loss in the annulus 0.5-2 theta_E about the field's centre, where the
    # slope is measured (rim_loss's kappa_weight = 1 + annulus_weight there); 0 = the paper's loss
    annulus_weight: float = 0.0

    RESUME_OVERRIDES: typing.ClassVar[tuple[str, ...]] = (*LoopConfig.RESUME_OVERRIDES, "data_workers")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("training", "data_shards", self.data_shards, 1)
        _check_int("training", "data_workers", self.data_workers, 0)
        _check_positive("training", "clip_norm", self.clip_norm)
        if (
            isinstance(self.annulus_weight, bool)
            or not isinstance(self.annulus_weight, (int, float))
            or not (math.isfinite(self.annulus_weight) and self.annulus_weight >= 0)
        ):
            raise RimlensInputError(
                f"training setting annulus_weight must be a number >= 0, got {self.annulus_weight!r}"
            )
        if not isinstance(self.peer_validation, str):
            raise RimlensInputError(
                f"training setting peer_validation must be a file path, got {self.peer_validation!r}"
            )
        if self.dtype not in ("float32", "float64"):
            raise RimlensInputError(f"training dtype must be float32 or float64, got {self.dtype!r}")


@dataclass(frozen=True)
class VAETrainConfig(LoopConfig):
    """VAE training settings (Adam, staircase decay, gradient clipping by value; docs/censai_as_run.md
    section 6). Checkpoints are written at each evaluation; no early stopping by default."""

    batch_size: int = 20
    learning_rate: float = 1e-4
    decay_rate: float = 0.5
    decay_steps: int = 30_000
    max_steps: int = 20_000
    val_every: int = 500
    checkpoint_every: int = 500
    patience: int = 0
    clip_value: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("training", "clip_value", self.clip_value)


@dataclass(frozen=True)
class Preset:
    """A named configuration: grids, data, the RIM and its training. Saved (JSON) with every data
    set and checkpoint."""

    name: str
    grid: GridConfig = GridConfig()
    data: DataConfig = DataConfig()
    model: RIMConfig = RIMConfig()
    train: TrainConfig = TrainConfig()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def from_dict(cls: type[T], data: typing.Any) -> T:
    """Build a (nested, frozen) dataclass from plain dicts, rejecting unknown keys."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
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
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            v = from_dict(t, v)
        elif isinstance(v, list):
            v = tuple(v)
        elif t is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        elif t in (int, float, bool, str) and not isinstance(v, t):
            raise RimlensInputError(f"{cls.__name__}.{k} must be {t.__name__}, got {v!r}")
        kwargs[k] = v
    return cls(**kwargs)


def with_train_settings(preset: Preset, settings: dict) -> Preset:
    """``preset`` with some training settings replaced (unknown names and bad values refused)."""
    if not settings:
        return preset
    return dataclasses.replace(preset, train=from_dict(TrainConfig, {**dataclasses.asdict(preset.train), **settings}))


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
