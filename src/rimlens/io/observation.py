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
import scipy.ndimage
import torch
import torch.nn.functional as F

from rimlens.errors import RimlensInputError
from rimlens.io.fits import pixel_scale_from_header, read_image, wcs_rotation_deg
from rimlens.physics import PixelGrid
from rimlens.physics.lens_light import NativeFrame
from rimlens.physics.likelihood import EXCLUDE_SIGMA
from rimlens.physics.resample import resample_density, resample_flux, resample_variance, sample_kernel_at_centres

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
    meta = {
        "pixel_scale_from": "given" if pixel_scale_arcsec is not None else "header",
        "header_pixel_scale_arcsec": pixel_scale_from_header(header),
        "wcs_rotation_deg": wcs_rotation_deg(header),
        "bunit": str(header.get("BUNIT", "")).strip(),
        "shape": list(image.shape),
    }
    return Observation(image, noise, psf / psf.sum(), float(scale), mask, name=Path(image_path).stem, meta=meta)


@dataclass
class PreparedObservation:
    """Tensors on the model grid (``1 x 1 x N x N``) and how they were obtained.

    ``psf`` is the PSF averaged over each model pixel (for point-sampled forward models),
    ``psf_sampled`` the PSF at the model pixels' centres (for pixel-integrated ones; see
    :meth:`kernel_for`). ``center_arcsec`` is the lens centre used (arcsec from the cut-out's centre; x along columns,
    y along rows), ``center_method`` how it was chosen (``given``, ``cutout``, ``light`` or
    ``ring``), ``padded_fraction`` the fraction of the model field that lay outside the cut-out
    (excluded pixels), ``cropped`` whether the cut-out extended beyond the model field.
    """

    observation: torch.Tensor
    noise_sigma: torch.Tensor  # map, EXCLUDE_SIGMA where excluded
    psf: torch.Tensor  # 1 x 1 x K x K, unit sum
    mask: torch.Tensor  # bool, True = used
    flux_scale: float  # model-grid units = input flux per model pixel * flux_scale
    center_arcsec: tuple[float, float]
    grid: PixelGrid
    center_method: str = "given"
    padded_fraction: float = 0.0
    cropped: bool = False
    # the PSF sampled at the model pixels' centres, for models that integrate over pixels themselves
    # (supersampled ray tracing, the MGE lens light); ``psf`` is area-averaged over each model pixel, the
    # kernel for point-sampled models such as the RIM's own simulator (rimlens.physics.resample)
    psf_sampled: torch.Tensor | None = None
    # the detector's own pixels and PSF, for models rendered there and resampled like the data (the lens
    # light: rimlens.physics.lens_light.NativeFrame); None when unknown (e.g. data made on the model grid)
    native: NativeFrame | None = None

    def kernel_for(self, supersample: int) -> torch.Tensor:
        """The PSF kernel for a forward model that samples ``supersample`` rays per pixel side: the
        area-averaged ``psf`` for point sampling (1), ``psf_sampled`` when the model integrates (> 1)."""
        return self.psf if supersample <= 1 or self.psf_sampled is None else self.psf_sampled

    def describe(self) -> dict:
        """How the cut-out was brought onto the model grid (JSON-ready, for ``summary.json``)."""
        return {
            "center_arcsec": [round(c, 4) for c in self.center_arcsec],
            "center_method": self.center_method,
            "padded_fraction": round(self.padded_fraction, 4),
            "cropped": self.cropped,
            "flux_scale": self.flux_scale,
            "model_field_arcsec": self.grid.fov_arcsec,
            "model_pixel_scale_arcsec": self.grid.pixel_scale_arcsec,
        }


RING_TRUST_ARCSEC = 0.5
"""``center="auto"`` without a dominant lens light moves off the cut-out's centre only beyond this."""


def _smoothed(image: np.ndarray, sigma_px: float) -> np.ndarray:
    return scipy.ndimage.gaussian_filter(image, sigma_px, mode="constant") if sigma_px > 0 else image


def find_lens_center(obs: Observation, search_radius_arcsec: float = 2.0) -> tuple[tuple[float, float], str]:
    """Find the lens in a cut-out: ``((x, y) arcsec from the cut-out's centre, method)``.

    * ``light``: a bright lens galaxy dominates the centre (its smoothed peak is over 5x the 90th
      percentile of the significant pixels farther than 0.5" from it, where the arcs are, and those
      pixels surround it in at least 11 of 12 directions): the flux-weighted centroid within 0.3"
      of that peak.
    * ``ring``: the lens light was subtracted (or is faint): the centre of the circle fitted, weighted
      by signal-to-noise, to the significant (> 3 sigma) pixels within ``search_radius_arcsec`` —
      the arcs and images of a lensed source lie around the lens at roughly the Einstein radius.
      Falls back to their centroid when the fit is degenerate (a single short arc). This is only
      a first guess: arcs that cover part of the ring, elliptical lenses and extended sources bias
      it (README: "Observations as they come" gives the measured errors); pass ``--center`` when
      the lens light was subtracted and the centre is known.
    """
    s = obs.pixel_scale_arcsec
    ny, nx = obs.image.shape
    used = obs.noise_sigma < EXCLUDE_SIGMA
    if obs.mask is not None:
        used &= obs.mask
    image = np.where(used, obs.image, 0.0)
    x = (np.arange(nx) - (nx - 1) / 2) * s
    y = (np.arange(ny) - (ny - 1) / 2) * s
    xx, yy = np.meshgrid(x, y)
    smooth = _smoothed(image, 0.08 / s)
    noise = np.median(obs.noise_sigma[used]) if used.any() else 1.0
    snr = smooth / (noise / max(1.0, 0.08 / s * np.sqrt(4 * np.pi)))
    near = (xx**2 + yy**2 <= search_radius_arcsec**2) & used
    signal = near & (snr > 3)
    if signal.sum() < 5:
        raise RimlensInputError(
            "cannot find the lens automatically (no significant flux near the centre): pass --center X,Y"
        )
    peak = np.unravel_index(np.argmax(np.where(near, smooth, -np.inf)), smooth.shape)
    dx, dy = xx - xx[peak], yy - yy[peak]
    away = signal & (dx**2 + dy**2 > 0.5**2)
    # a lens galaxy is brighter than the arcs and surrounded by significant flux (its own outskirts and
    # the arcs) in every direction; a bright knot of an arc has the rest of the arcs on some sides only
    sectors = np.unique(((np.arctan2(dy[away], dx[away]) + np.pi) / (2 * np.pi) * 12).astype(int) % 12)
    if not away.any() or (smooth[peak] > 5 * np.percentile(smooth[away], 90) and len(sectors) >= 11):
        cx, cy = float(xx[peak]), float(yy[peak])
        for _ in range(3):  # light centroid, re-centred on itself
            aperture = ((xx - cx) ** 2 + (yy - cy) ** 2 <= 0.3**2) & used
            w = np.clip(smooth, 0, None) * aperture
            cx, cy = float((w * xx).sum() / w.sum()), float((w * yy).sum() / w.sum())
        return (cx, cy), "light"
    w = snr[signal]
    X, Y = xx[signal], yy[signal]
    # weighted algebraic circle fit: x^2 + y^2 = 2 a x + 2 b y + c
    A = np.stack([2 * X, 2 * Y, np.ones_like(X)], axis=1) * w[:, None]
    (a, b, c), *_ = np.linalg.lstsq(A, (X**2 + Y**2) * w, rcond=None)
    radius = np.sqrt(max(c + a**2 + b**2, 0.0))
    if 0.2 <= radius <= search_radius_arcsec and np.hypot(a, b) < search_radius_arcsec:
        return (float(a), float(b)), "ring"
    return (float((w * X).sum() / w.sum()), float((w * Y).sum() / w.sum())), "ring"


def prepare_observation(
    obs: Observation,
    grid: PixelGrid,
    center_arcsec: tuple[float, float] | str | None = None,
    max_psf_pixels: int = 21,
) -> PreparedObservation:
    """Bring a cut-out of any size and pixel scale onto a model grid.

    The model field is centred on ``center_arcsec`` (arcsec from the cut-out's centre; ``None``:
    the cut-out's centre; ``"auto"``: the lens light's centroid when a lens galaxy dominates, else the
    arcs' circle centre if it lies over ``RING_TRUST_ARCSEC`` from the cut-out's centre, else the
    cut-out's centre; see :func:`find_lens_center`). Where the model field reaches past
    the cut-out, the cut-out is padded with excluded pixels (they carry no weight in the
    likelihood); a larger cut-out is cropped. Then the flux is resampled conservingly (noise
    propagated as variance), the PSF resampled to the model pixel scale, and the flux normalised
    so that the image peaks near 1 like the training data (sigma scaled alike).
    """
    s_in = obs.pixel_scale_arcsec
    method = "given"
    if center_arcsec is None:
        center_arcsec, method = (0.0, 0.0), "cutout"
    elif isinstance(center_arcsec, str):
        if center_arcsec != "auto":
            raise RimlensInputError(f"center must be 'auto' or (x, y) in arcsec, got {center_arcsec!r}")
        try:
            center_arcsec, method = find_lens_center(obs)
        except RimlensInputError:  # too faint to locate: the cut-out's own centring, as before auto existed
            center_arcsec, method = (0.0, 0.0), "cutout"
        if method == "ring" and np.hypot(*center_arcsec) < RING_TRUST_ARCSEC:
            # the arcs' circle centre is good to a few tenths of an arcsec: closer than that to the
            # cut-out's centre, the cut-out's own centring (usually the observer's) is the better guess
            center_arcsec, method = (0.0, 0.0), "cutout"
    cx, cy = float(center_arcsec[0]), float(center_arcsec[1])
    ny, nx = obs.image.shape
    if not (np.isfinite(cx) and np.isfinite(cy)):
        raise RimlensInputError(f"the lens centre must be finite, got ({cx}, {cy})")
    if abs(cx) > nx * s_in / 2 or abs(cy) > ny * s_in / 2:
        raise RimlensInputError(
            f'the lens centre ({cx:.3g}", {cy:.3g}") lies outside the cut-out ({nx * s_in:.3g}" x {ny * s_in:.3g}"); '
            "--center takes arcsec from the cut-out's centre, not pixels"
        )
    half = grid.fov_arcsec / 2
    # padding (input pixels, each side) that makes the cut-out cover the model field around the centre
    pad_x = (
        max(0, int(np.ceil((abs(cx) + half - nx * s_in / 2) / s_in - 1e-9)) + 1)
        if abs(cx) + half > nx * s_in / 2
        else 0
    )
    pad_y = (
        max(0, int(np.ceil((abs(cy) + half - ny * s_in / 2) / s_in - 1e-9)) + 1)
        if abs(cy) + half > ny * s_in / 2
        else 0
    )
    # cropped: some of the cut-out lies outside the model field (it is left out)
    cropped = bool(
        -nx * s_in / 2 < cx - half - 1e-9
        or nx * s_in / 2 > cx + half + 1e-9
        or -ny * s_in / 2 < cy - half - 1e-9
        or ny * s_in / 2 > cy + half + 1e-9
    )
    widths = ((pad_y, pad_y), (pad_x, pad_x))
    image = np.pad(obs.image, widths)
    noise = np.pad(obs.noise_sigma, widths, constant_values=EXCLUDE_SIGMA)
    mask = None if obs.mask is None else np.pad(obs.mask, widths, constant_values=False)
    img = torch.as_tensor(image, dtype=torch.float64)[None, None]
    var = torch.as_tensor(noise, dtype=torch.float64)[None, None] ** 2
    bad = torch.as_tensor(noise >= EXCLUDE_SIGMA)
    if mask is not None:
        bad |= ~torch.as_tensor(mask)
    bad = bad[None, None].double()
    img = img * (1 - bad)
    var = torch.where(bad > 0, torch.zeros_like(var), var)
    n = grid.n_pixels
    args = (s_in, n, grid.pixel_scale_arcsec, (cx, cy))
    model_image = resample_flux(img, *args)
    variance = resample_variance(var, *args)
    bad_frac = resample_density(bad, *args)
    excluded = bad_frac > 1e-9
    beyond = torch.as_tensor(np.pad(np.zeros_like(obs.image), widths, constant_values=1.0))[None, None]
    outside = resample_density(beyond, *args)
    padded_fraction = float((outside > 1e-9).double().mean())
    # flux normalisation: the peak of the lightly smoothed image becomes ~1, as in training
    smooth = F.avg_pool2d(model_image, 3, stride=1, padding=1, count_include_pad=False)
    peak = float(smooth.masked_fill(excluded, -np.inf).max())
    if not np.isfinite(peak) or peak <= 0:
        raise RimlensInputError("the image has no positive flux inside the model field")
    scale = 1.0 / peak
    model_image = model_image * scale
    sigma = torch.sqrt(variance) * scale
    sigma = torch.where(excluded | (sigma <= 0), torch.full_like(sigma, EXCLUDE_SIGMA), sigma)
    model_image = model_image.masked_fill(excluded, 0.0)
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
    psf_sampled = sample_kernel_at_centres(
        torch.as_tensor(obs.psf, dtype=torch.float64)[None, None], s_in, k_out, grid.pixel_scale_arcsec
    )
    return PreparedObservation(
        model_image.float(),
        sigma.float(),
        psf.float(),
        ~excluded,
        scale,
        (cx, cy),
        grid,
        method,
        padded_fraction,
        cropped,
        psf_sampled.float(),
        NativeFrame.for_cutout(grid, s_in, (image.shape[0], image.shape[1]), (cx, cy), torch.as_tensor(obs.psf)),
    )
