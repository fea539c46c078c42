"""Background sources: real HST COSMOS galaxies (GalSim RealGalaxy catalogue format), their
preprocessing and augmentation, and a parametric family (Sersic + star-forming clumps).

The 112 COSMOS F814W stamps shipped in ``rimlens/data/cosmos`` (MIT; see PROVENANCE.md there) are
the default real source set; the reader also takes the full GalSim ``COSMOS_23.5_training_sample``
(13,321 galaxies) that users download with GalSim.

All sources are peak-normalised to 1 on the source grid, ``B x 1 x M x M``.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from astropy.io import fits
from astropy.table import Table

from rimlens.config import DataConfig, ParametricSourceConfig
from rimlens.errors import RimlensInputError
from rimlens.physics import PixelGrid, profiles
from rimlens.physics.resample import resample_density

__all__ = [
    "GalaxyStamp",
    "ParametricSourceConfig",
    "SourceBank",
    "parametric_sources",
    "peak_snr_of_stamp",
    "preprocess_stamp",
    "read_real_galaxy_catalog",
    "shipped_cosmos_stamps",
]


@dataclass
class GalaxyStamp:
    """One galaxy image of a RealGalaxy catalogue."""

    ident: int
    image: np.ndarray  # rows = y, row 0 at the bottom
    pixel_scale_arcsec: float
    noise_variance: float
    mag: float = float("nan")


def read_real_galaxy_catalog(
    catalog_path: str | Path, image_dir: str | Path | None = None, hdu_override: dict[int, int] | None = None
) -> list[GalaxyStamp]:
    """Read every galaxy of a GalSim RealGalaxy catalogue (catalogue FITS table + image FITS files).

    Args:
        catalog_path: the catalogue FITS (table with IDENT, GAL_FILENAME, GAL_HDU, PIXEL_SCALE,
            NOISE_VARIANCE; e.g. ``real_galaxy_catalog_23.5.fits``).
        image_dir: folder of the image files (default: the catalogue's folder).
        hdu_override: ``{IDENT: hdu}`` corrections for catalogues with wrong GAL_HDU entries.

    Raises:
        RimlensInputError: unreadable or foreign files, missing columns, missing images.
    """

    catalog_path = Path(catalog_path)
    image_dir = Path(image_dir) if image_dir is not None else catalog_path.parent
    try:
        table = Table.read(catalog_path, hdu=1)
    except Exception as exc:  # astropy raises many types for malformed files
        raise RimlensInputError(f"cannot read RealGalaxy catalogue {catalog_path}: {exc}") from None
    required = {"IDENT", "GAL_FILENAME", "GAL_HDU", "PIXEL_SCALE"}
    missing = required - set(table.colnames)
    if missing:
        raise RimlensInputError(f"{catalog_path} is not a RealGalaxy catalogue (missing columns {sorted(missing)})")
    stamps, open_files = [], {}
    try:
        for row in table:
            name = str(row["GAL_FILENAME"]).strip()
            if name not in open_files:
                path = image_dir / name
                if not path.exists():
                    raise RimlensInputError(f"image file {path} named in {catalog_path.name} does not exist")
                open_files[name] = fits.open(path, memmap=False)
            ident = int(row["IDENT"])
            hdu = (hdu_override or {}).get(ident, int(row["GAL_HDU"]))
            try:
                data = open_files[name][hdu].data
            except IndexError:
                raise RimlensInputError(f"{name} has no HDU {hdu} (galaxy {ident})") from None
            if data is None or data.ndim != 2:
                raise RimlensInputError(f"{name} HDU {hdu} (galaxy {ident}) holds no 2-D image")
            noise = float(row["NOISE_VARIANCE"]) if "NOISE_VARIANCE" in table.colnames else float("nan")
            mag = float(row["MAG"]) if "MAG" in table.colnames else float("nan")
            stamps.append(GalaxyStamp(ident, np.asarray(data, dtype=np.float64), float(row["PIXEL_SCALE"]), noise, mag))
    finally:
        for f in open_files.values():
            f.close()
    return stamps


def shipped_cosmos_stamps() -> list[GalaxyStamp]:
    """The 112 COSMOS stamps shipped with rimlens (three RealGalaxy catalogues; the slsim
    catalogue's wrong GAL_HDU values are corrected from ``index.csv``)."""
    root = resources.files("rimlens.data") / "cosmos"
    with resources.as_file(root) as root:
        with open(root / "index.csv") as fh:
            index = list(csv.DictReader(fh))
        stamps = []
        for subset, catalog in [
            ("btk_cosmos_ext26_example", "real_galaxy_catalog_26_extension_example.fits"),
            ("paltas_cosmos23.5_test", "real_galaxy_catalog_23.5.fits"),
            ("slsim_cosmos23.5_test", "real_galaxy_catalog_23.5.fits"),
        ]:
            override = {int(r["ident"]): int(r["hdu"]) for r in index if r["subset"] == subset}
            stamps += read_real_galaxy_catalog(root / subset / catalog, hdu_override=override)
    return stamps


# ----------------------------------------------------------------------------- preprocessing
def peak_snr_of_stamp(stamp: GalaxyStamp) -> float:
    """Peak brightness over the noise rms of a stamp."""
    return float(stamp.image.max() / np.sqrt(stamp.noise_variance)) if stamp.noise_variance > 0 else float("inf")


def preprocess_stamp(stamp: GalaxyStamp, grid: PixelGrid, background_sigmas: float = 1.0) -> torch.Tensor:
    """Stamp -> source-grid image, as the paper: subtract a background of ``background_sigmas``
    noise rms, clip negatives, centre on the light centroid, resample (area-weighted) to ``grid``,
    peak-normalise to 1.

    Returns:
        ``1 x 1 x M x M`` float64 tensor.
    """
    img = stamp.image.copy()
    if np.isfinite(stamp.noise_variance) and stamp.noise_variance > 0:
        img -= background_sigmas * np.sqrt(stamp.noise_variance)
    img = np.clip(img, 0, None)
    if img.max() <= 0:
        raise RimlensInputError(f"galaxy {stamp.ident} has no flux above the background")
    # integer-pixel recentring on the centroid (no interpolation of the real pixels)
    yy, xx = np.indices(img.shape)
    cy, cx = (img * yy).sum() / img.sum(), (img * xx).sum() / img.sum()
    dy, dx = round(cy - (img.shape[0] - 1) / 2), round(cx - (img.shape[1] - 1) / 2)
    pad = max(abs(dy), abs(dx)) + 1
    # per-axis padding keeps each axis' parity, so the centroid lands on the canvas centre exactly
    # (up to the integer rounding above); the canvas may be non-square, the resampling handles it
    canvas = np.zeros((img.shape[0] + 2 * pad, img.shape[1] + 2 * pad))
    canvas[pad - dy : pad - dy + img.shape[0], pad - dx : pad - dx + img.shape[1]] = img
    t = torch.as_tensor(canvas)[None, None]
    out = resample_density(t, stamp.pixel_scale_arcsec, grid.n_pixels, grid.pixel_scale_arcsec)
    return out / out.max()


def _split_of(ident: int, test_fraction: float) -> str:
    """Deterministic split by galaxy: hash of the identifier."""
    h = int(hashlib.sha256(str(ident).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if h < test_fraction else "train"


class SourceBank:
    """Preprocessed real galaxies on a (2x oversampled) source grid, split by galaxy.

    Args:
        grid: source grid.
        split: ``"train"``, ``"test"`` or ``"all"``.
        stamps: galaxies (default: the shipped COSMOS stamps).
        min_peak_snr: drop stamps whose peak SNR is below this (faint, noise-dominated stamps
            become noise after clipping).
        test_fraction: fraction of galaxies (by identifier hash) in the test split.
    """

    def __init__(
        self,
        grid: PixelGrid,
        split: str = "train",
        stamps: list[GalaxyStamp] | None = None,
        min_peak_snr: float = 10.0,
        test_fraction: float = 0.2,
        oversample: int = 2,
    ):
        if split not in ("train", "test", "all"):
            raise RimlensInputError(f"split must be train, test or all, got {split!r}")
        stamps = shipped_cosmos_stamps() if stamps is None else stamps
        fine = PixelGrid(grid.n_pixels * oversample, grid.pixel_scale_arcsec / oversample)
        keep = [
            s
            for s in stamps
            if peak_snr_of_stamp(s) >= min_peak_snr and (split == "all" or _split_of(s.ident, test_fraction) == split)
        ]
        if not keep:
            raise RimlensInputError(f"no galaxies left in split {split!r} with peak SNR >= {min_peak_snr}")
        self.grid, self.oversample = grid, oversample
        self.idents = [s.ident for s in keep]
        self.images = torch.cat([preprocess_stamp(s, fine) for s in keep]).float()

    def __len__(self) -> int:
        return len(self.idents)

    def draw(
        self,
        rng: np.random.Generator,
        batch: int,
        augment: bool = True,
        dtype=torch.float32,
        zoom: tuple[float, float] = DataConfig.cosmos_zoom,
        max_shift_arcsec: float = DataConfig.cosmos_max_shift_arcsec,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """``batch`` sources on the source grid (``B x 1 x M x M``, peak 1) and the identifiers of the
        galaxies used.

        Augmentation: random rotation (any angle), flip, zoom log-uniform in ``zoom`` (> 1 enlarges)
        and a shift uniform in +-``max_shift_arcsec`` along each axis, applied on the oversampled
        image, then block-averaged to the grid.
        """
        idx = rng.integers(0, len(self), batch)
        imgs = self.images[idx]
        if augment:
            angle = rng.uniform(0, 2 * np.pi, batch)
            flip = np.where(rng.uniform(size=batch) < 0.5, -1.0, 1.0)
            scale = np.exp(rng.uniform(np.log(zoom[0]), np.log(zoom[1]), batch))
            # in normalised units ([-1, 1] spans the field): +-0.2 is +-0.3" on the presets' 3" source field;
            # the ratio is left out when it is 1 so that the default draws the same numbers as before the
            # shift became a setting (exact resume of runs started then)
            ratio = max_shift_arcsec / (0.1 * self.grid.fov_arcsec)
            shift = rng.uniform(-0.1, 0.1, (batch, 2)) * 2
            if not math.isclose(ratio, 1.0, rel_tol=1e-12):
                shift = shift * ratio
            c, s = np.cos(angle) / scale, np.sin(angle) / scale
            theta = np.zeros((batch, 2, 3))
            theta[:, 0, 0], theta[:, 0, 1] = c * flip, -s
            theta[:, 1, 0], theta[:, 1, 1] = s * flip, c
            theta[:, :, 2] = shift
            g = F.affine_grid(torch.as_tensor(theta, dtype=imgs.dtype), list(imgs.shape), align_corners=False)
            imgs = F.grid_sample(imgs, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = F.avg_pool2d(imgs, self.oversample) if self.oversample > 1 else imgs
        out = out.clamp_min(0)
        out = out / out.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        return out.to(dtype), np.asarray(self.idents)[idx]


# ----------------------------------------------------------------------------- parametric sources
def parametric_sources(
    grid: PixelGrid,
    rng: np.random.Generator,
    batch: int,
    config: ParametricSourceConfig = ParametricSourceConfig(),
    dtype=torch.float32,
    supersample: int = 2,
) -> torch.Tensor:
    """``batch`` peak-normalised parametric sources ``B x 1 x M x M`` (pixel-averaged)."""
    c = config

    def t(a):
        return torch.as_tensor(np.asarray(a), dtype=dtype).reshape(-1, 1, 1, 1)

    r_eff = rng.uniform(*c.r_eff_arcsec, batch)
    n = rng.uniform(*c.sersic_index, batch)
    q = rng.uniform(*c.axis_ratio, batch)
    phi = rng.uniform(-np.pi, np.pi, batch)
    off = c.max_offset_arcsec * np.sqrt(rng.uniform(size=batch))
    az = rng.uniform(-np.pi, np.pi, batch)
    x0, y0 = off * np.cos(az), off * np.sin(az)
    n_clumps = rng.integers(c.clumps[0], c.clumps[1] + 1, batch)
    owner = np.repeat(np.arange(batch), n_clumps)
    rr = r_eff[owner] * 1.5 * np.sqrt(rng.uniform(size=len(owner)))
    ca = rng.uniform(-np.pi, np.pi, len(owner))
    cx, cy = x0[owner] + rr * np.cos(ca), y0[owner] + rr * np.sin(ca)
    cs = rng.uniform(*c.clump_sigma_arcsec, len(owner))
    camp = rng.uniform(*c.clump_amplitude, len(owner))
    bn = t([profiles.sersic_b(v) for v in n])

    def fn(x, y):
        xp = (x - t(x0)) * torch.cos(t(phi)) + (y - t(y0)) * torch.sin(t(phi))
        yp = -(x - t(x0)) * torch.sin(t(phi)) + (y - t(y0)) * torch.cos(t(phi))
        r = torch.sqrt(t(q) * xp**2 + yp**2 / t(q) + 1e-12)
        img = torch.exp(-bn * ((r / t(r_eff)) ** (1 / t(n)) - 1))
        img = img / img.amax(dim=(-2, -1), keepdim=True)
        if len(owner):
            blobs = t(camp)[:, 0] * torch.exp(
                -0.5 * ((x - t(cx)[:, 0]) ** 2 + (y - t(cy)[:, 0]) ** 2) / t(cs)[:, 0] ** 2
            )
            img = img.index_add(0, torch.as_tensor(owner), blobs[:, None])
        return img

    out = profiles.pixelate(fn, grid, supersample, dtype)
    return out / out.amax(dim=(-2, -1), keepdim=True)
