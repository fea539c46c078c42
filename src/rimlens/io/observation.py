"""A user's observation (FITS image, PSF, noise, mask) brought onto a model's grid.

``prepare_observation`` crops and centres the field on the lens, resamples flux-conservingly to
the model grid (noise propagated as variance), resamples the PSF to the model pixel scale, and
normalises the flux so that the image peaks near 1 like the training data (sigma scaled alike).
Pixels that are masked, or whose noise sigma is >= 1e6, are excluded from the likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rimlens.errors import RimlensInputError
from rimlens.io.fits import pixel_scale_from_header, read_image
from rimlens.physics import PixelGrid
from rimlens.physics.likelihood import EXCLUDE_SIGMA
from rimlens.physics.resample import resample_density, resample_flux, resample_variance

__all__ = ["Observation", "PreparedObservation", "load_observation", "prepare_observation"]


@dataclass
class Observation:
    """Raw observation, as read (arrays with row 0 at the bottom)."""

    image: np.ndarray
    noise_sigma: np.ndarray  # per-pixel 1-sigma map (same shape as image)
    psf: np.ndarray
    pixel_scale_arcsec: float
    mask: np.ndarray | None = None  # True = use the pixel
    name: str = "observation"
    meta: dict = field(default_factory=dict)


def load_observation(
    image_path,
    psf_path,
    noise_path=None,
    sigma: float | None = None,
    pixel_scale_arcsec: float | None = None,
    mask_path=None,
) -> Observation:
    """Read and check an observation from FITS files.

    Exactly one of ``noise_path`` (a 1-sigma map) and ``sigma`` (one value) must be given. The pixel
    scale comes from ``pixel_scale_arcsec`` or else the image header.
    """
    image, header = read_image(image_path, "image")
    psf, _ = read_image(psf_path, "PSF")
    if (noise_path is None) == (sigma is None):
        raise RimlensInputError("give exactly one of a noise map (--noise) or a noise level (--sigma)")
    if noise_path is not None:
        noise, _ = read_image(noise_path, "noise map")
        if noise.shape != image.shape:
            raise RimlensInputError(f"noise map shape {noise.shape} differs from image shape {image.shape}")
        if np.any(noise <= 0):
            raise RimlensInputError(f"noise map {noise_path} has {int((noise <= 0).sum())} pixels with sigma <= 0")
    else:
        assert sigma is not None  # exactly one of the two was given (checked above)
        if not np.isfinite(sigma) or sigma <= 0:
            raise RimlensInputError(f"--sigma must be finite and > 0, got {sigma}")
        noise = np.full(image.shape, float(sigma))
    mask = None
    if mask_path is not None:
        m, _ = read_image(mask_path, "mask")
        if m.shape != image.shape:
            raise RimlensInputError(f"mask shape {m.shape} differs from image shape {image.shape}")
        mask = m > 0
    if psf.shape[0] != psf.shape[1] or psf.shape[0] % 2 == 0:
        raise RimlensInputError(f"PSF must be square with an odd size, got {psf.shape}")
    if psf.shape[0] > min(image.shape):
        raise RimlensInputError(f"PSF ({psf.shape[0]} px) is larger than the image {image.shape}")
    if abs(psf.sum()) <= 0:
        raise RimlensInputError("PSF sums to zero")
    scale = pixel_scale_arcsec if pixel_scale_arcsec is not None else pixel_scale_from_header(header)
    if scale is None:
        raise RimlensInputError("the image header gives no pixel scale (CD/CDELT/PIXSCALE): pass --pixel-scale")
    if not np.isfinite(scale) or scale <= 0:
        raise RimlensInputError(f"pixel scale must be > 0, got {scale}")
    return Observation(image, noise, psf / psf.sum(), float(scale), mask, name=Path(image_path).stem)


@dataclass
class PreparedObservation:
    """Tensors on the model grid (``1 x 1 x N x N``) and how they were obtained."""

    observation: torch.Tensor
    noise_sigma: torch.Tensor  # map, EXCLUDE_SIGMA where excluded
    psf: torch.Tensor  # 1 x 1 x K x K, unit sum
    mask: torch.Tensor  # bool, True = used
    flux_scale: float  # model-grid units = input flux per model pixel * flux_scale
    center_arcsec: tuple[float, float]
    grid: PixelGrid


def prepare_observation(
    obs: Observation, grid: PixelGrid, center_arcsec: tuple[float, float] | None = None, max_psf_pixels: int = 21
) -> PreparedObservation:
    """Crop/centre, resample (flux-conserving) and normalise an observation for a model grid."""
    s_in = obs.pixel_scale_arcsec
    n_in = obs.image.shape
    if center_arcsec is None:
        center_arcsec = (0.0, 0.0)  # the cutout's centre
    cx, cy = center_arcsec
    half_in = (n_in[1] * s_in / 2, n_in[0] * s_in / 2)
    if abs(cx) + grid.fov_arcsec / 2 > half_in[0] + 1e-9 or abs(cy) + grid.fov_arcsec / 2 > half_in[1] + 1e-9:
        raise RimlensInputError(
            f'the model field ({grid.fov_arcsec:.2f}") does not fit in the image ({n_in[1] * s_in:.2f}" x {n_in[0] * s_in:.2f}") '
            "around the chosen centre; give a larger cutout"
        )
    img = torch.as_tensor(obs.image, dtype=torch.float64)[None, None]
    var = torch.as_tensor(obs.noise_sigma, dtype=torch.float64)[None, None] ** 2
    bad = torch.as_tensor(obs.noise_sigma >= EXCLUDE_SIGMA)
    if obs.mask is not None:
        bad |= ~torch.as_tensor(obs.mask)
    bad = bad[None, None].double()
    img = img * (1 - bad)
    var = torch.where(bad > 0, torch.zeros_like(var), var)
    n = grid.n_pixels
    args = (s_in, n, grid.pixel_scale_arcsec, (cx, cy))
    image = resample_flux(img, *args)
    variance = resample_variance(var, *args)
    bad_frac = resample_density(bad, *args)
    excluded = bad_frac > 1e-9
    # flux normalisation: the peak of the lightly smoothed image becomes ~1, as in training
    smooth = F.avg_pool2d(image, 3, stride=1, padding=1, count_include_pad=False)
    peak = float(smooth.masked_fill(excluded, -np.inf).max())
    if not np.isfinite(peak) or peak <= 0:
        raise RimlensInputError("the image has no positive flux inside the model field")
    scale = 1.0 / peak
    image = image * scale
    sigma = torch.sqrt(variance) * scale
    sigma = torch.where(excluded | (sigma <= 0), torch.full_like(sigma, EXCLUDE_SIGMA), sigma)
    image = image.masked_fill(excluded, 0.0)
    # PSF to the model pixel scale, odd size, unit sum
    k_in = obs.psf.shape[0]
    k_out = int(np.ceil(k_in * s_in / grid.pixel_scale_arcsec))
    k_out = min(k_out + (1 - k_out % 2), max_psf_pixels, n - 1 + (n % 2))
    k_out = max(k_out if k_out % 2 else k_out - 1, 1)
    psf = resample_density(
        torch.as_tensor(obs.psf, dtype=torch.float64)[None, None], s_in, k_out, grid.pixel_scale_arcsec
    )
    if float(psf.sum()) <= 0:
        raise RimlensInputError("PSF has no positive flux after resampling")
    psf = psf / psf.sum()
    return PreparedObservation(image.float(), sigma.float(), psf.float(), ~excluded, scale, (cx, cy), grid)
