"""Convergence maps on the image grid: analytic lenses (SIE + substructure + multipoles), the
Einstein-radius estimator and rescaling, the shipped TNG100 evaluation maps, and augmentation.

All maps are ``B x 1 x N x N`` float tensors following the grid convention of
:mod:`rimlens.physics.grid`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

from rimlens.errors import RimlensInputError, check_map
from rimlens.physics import PSF, PixelGrid, profiles
from rimlens.physics.resample import resample_density

__all__ = [
    "TNG_PIXEL_SCALE_ARCSEC",
    "AnalyticKappaConfig",
    "analytic_kappa",
    "einstein_profile",
    "einstein_radius",
    "random_dihedral",
    "resample_map",
    "rescale_to_einstein_radius",
    "tng_evaluation_maps",
]


# ----------------------------------------------------------------------------- Einstein radius
def einstein_profile(kappa: torch.Tensor, pixel_scale: float):
    """Mean convergence inside circles around the lens centre.

    The centre is the peak of the map smoothed with a 0.3" FWHM Gaussian (robust to clumps and
    to a single noisy pixel). Pixels are sorted by distance to it; after ``k`` pixels the enclosed mean is
    ``cumsum(kappa)/k`` and the equivalent radius ``sqrt(k s^2 / pi)``.

    Returns:
        ``(radius, mean_kappa)``: two ``B x N^2`` tensors (arcsec, dimensionless).
    """
    check_map(kappa, "kappa")
    b, _, n, _ = kappa.shape
    k = kappa[:, 0].double()
    grid = PixelGrid(n, pixel_scale)
    x, y = grid.coordinates(torch.float64, kappa.device)
    smooth = PSF.gaussian(max(0.3, 1.5 * pixel_scale), pixel_scale, dtype=torch.float64).convolve(k[:, None])
    peak = smooth.flatten(1).argmax(dim=1)
    cx, cy = x.flatten()[peak], y.flatten()[peak]
    d2 = (x[None] - cx[:, None, None]) ** 2 + (y[None] - cy[:, None, None]) ** 2
    order = d2.flatten(1).argsort(dim=1)
    ks = torch.gather(k.flatten(1), 1, order)
    count = torch.arange(1, n * n + 1, dtype=torch.float64, device=kappa.device)
    mean = ks.cumsum(dim=1) / count
    radius = torch.sqrt(count * pixel_scale**2 / math.pi).expand(b, -1)
    return radius, mean


def einstein_radius(kappa: torch.Tensor, pixel_scale: float) -> torch.Tensor:
    """Effective Einstein radius (arcsec) per map, shape ``(B,)``: the radius of the circle, around
    the lens centre, inside which the mean convergence is 1 (0 if even the central pixel has
    mean kappa < 1). Exact for circular lenses; the usual effective definition otherwise."""
    radius, mean = einstein_profile(kappa, pixel_scale)
    return _radius_at_mean(radius, mean, torch.ones(kappa.shape[0], dtype=torch.float64, device=kappa.device)).to(
        kappa.dtype
    )


def _radius_at_mean(radius, mean, level):
    """First radius where ``mean`` falls below ``level`` (linear interpolation)."""
    below = mean < level[:, None]
    idx = torch.where(
        below.any(dim=1), below.double().argmax(dim=1), torch.full_like(level, mean.shape[1] - 1, dtype=torch.long)
    )
    i1 = idx.clamp_min(1)
    i0 = i1 - 1
    m0, m1 = mean.gather(1, i0[:, None])[:, 0], mean.gather(1, i1[:, None])[:, 0]
    r0, r1 = radius.gather(1, i0[:, None])[:, 0], radius.gather(1, i1[:, None])[:, 0]
    t = ((m0 - level) / (m0 - m1).clamp_min(1e-300)).clamp(0, 1)
    out = r0 + t * (r1 - r0)
    return torch.where(idx == 0, torch.zeros_like(out), out)


def rescale_to_einstein_radius(
    kappa: torch.Tensor, pixel_scale: float, theta_e_arcsec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multiply each map by the factor that gives it the requested Einstein radius.

    Since the enclosed mean scales linearly with the map, the factor is ``1 / mean_kappa(<theta_E)``.

    Returns:
        ``(rescaled kappa, factors (B,))``.
    """
    radius, mean = einstein_profile(kappa, pixel_scale)
    target = (
        torch.as_tensor(theta_e_arcsec, dtype=torch.float64, device=kappa.device).reshape(-1).expand(kappa.shape[0])
    )
    if bool((target > radius[:, -1]).any()):
        raise RimlensInputError("requested Einstein radius is larger than the map")
    # mean kappa at radius = target, by interpolation in the (increasing) radius
    idx = torch.searchsorted(radius.contiguous(), target[:, None].contiguous())[:, 0].clamp(1, radius.shape[1] - 1)
    r0, r1 = radius.gather(1, (idx - 1)[:, None])[:, 0], radius.gather(1, idx[:, None])[:, 0]
    m0, m1 = mean.gather(1, (idx - 1)[:, None])[:, 0], mean.gather(1, idx[:, None])[:, 0]
    t = ((target - r0) / (r1 - r0)).clamp(0, 1)
    factor = 1.0 / (m0 + t * (m1 - m0))
    return kappa * factor.to(kappa.dtype).reshape(-1, 1, 1, 1), factor.to(kappa.dtype)


# ----------------------------------------------------------------------------- analytic maps
@dataclass(frozen=True)
class AnalyticKappaConfig:
    """Distributions of the analytic lens family (paper Table 2 / docs/censai_as_run.md section 2.3).

    Attributes:
        theta_e_range: Einstein radius, uniform (arcsec).
        ellipticity_range: e = 1 - q, uniform.
        max_offset_arcsec: centre offset radius, uniform in [0, max].
        core_arcsec: SIE core radius.
        subhalo_mean_count: Poisson mean of truncated-NFW subhaloes (0 disables).
        subhalo_mass_fraction: (min, max) of each subhalo's kappa_s relative to theta_E (uniform).
        multipole_max_amplitude: maximum amplitude of m = 3, 4 multipoles (0 disables).
        supersample: sub-pixels per side used to pixelate (conserves the cusp's mass).
        slope_range: power-law log-slope gamma, uniform (``(2, 2)``: the SIE; otherwise an EPL,
            :func:`rimlens.physics.profiles.epl_kappa`, and the slope is drawn after every other
            parameter, so SIE draws are unchanged).
    """

    theta_e_range: tuple[float, float] = (0.5, 2.5)
    ellipticity_range: tuple[float, float] = (0.0, 0.6)
    max_offset_arcsec: float = 0.1
    core_arcsec: float = 0.001
    subhalo_mean_count: float = 0.0
    subhalo_kappa_s_range: tuple[float, float] = (0.02, 0.15)
    subhalo_rs_range_arcsec: tuple[float, float] = (0.03, 0.15)
    multipole_max_amplitude: float = 0.0
    supersample: int = 2
    slope_range: tuple[float, float] = (2.0, 2.0)


def analytic_kappa(
    grid: PixelGrid,
    rng: np.random.Generator,
    batch: int,
    config: AnalyticKappaConfig = AnalyticKappaConfig(),
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, dict]:
    """Draw ``batch`` SIE (or EPL) convergence maps (optionally with subhaloes and multipoles).

    Returns:
        ``(kappa B x 1 x N x N, parameters dict of numpy arrays)``.
    """
    c = config
    theta_e = rng.uniform(*c.theta_e_range, batch)
    e = rng.uniform(*c.ellipticity_range, batch)
    r0 = rng.uniform(0, c.max_offset_arcsec, batch)
    az = rng.uniform(-np.pi, np.pi, batch)
    phi = rng.uniform(-np.pi, np.pi, batch)
    x0, y0 = r0 * np.cos(az), r0 * np.sin(az)
    params = {"theta_e": theta_e, "axis_ratio": 1 - e, "phi": phi, "x0": x0, "y0": y0}
    power_law = tuple(c.slope_range) != (2.0, 2.0)
    if power_law:
        params["slope"] = rng.uniform(*c.slope_range, batch)

    def t(a):
        return torch.as_tensor(a, dtype=dtype).reshape(-1, 1, 1, 1)

    def fn(x, y):
        if power_law:
            k = profiles.epl_kappa(x, y, t(theta_e), t(params["slope"]), t(1 - e), t(phi), t(x0), t(y0), c.core_arcsec)
        else:
            k = profiles.sie_kappa(x, y, t(theta_e), t(1 - e), t(phi), t(x0), t(y0), c.core_arcsec)
        if c.multipole_max_amplitude > 0:
            ang = torch.atan2(y - t(y0), x - t(x0))
            for m in (3, 4):
                amp = rng.uniform(0, c.multipole_max_amplitude, batch)
                phase = rng.uniform(-np.pi, np.pi, batch)
                params[f"multipole{m}_amplitude"] = amp
                k = k * (1 + t(amp) * torch.cos(m * (ang - t(phase))))
        return k

    kappa = profiles.pixelate(fn, grid, c.supersample, dtype)
    if c.subhalo_mean_count > 0:
        kappa = kappa + _subhaloes(grid, rng, theta_e, x0, y0, c).to(dtype)
    return kappa.to(dtype), params


def _subhaloes(grid, rng, theta_e, x0, y0, c: AnalyticKappaConfig) -> torch.Tensor:
    """Truncated NFW subhaloes (kappa_NFW * r_t^2 / (r^2 + r_t^2), r_t = 5 r_s) scattered within
    2 theta_E of the lens centre; all subhaloes of the batch are evaluated in one pass."""
    batch = len(theta_e)
    counts = rng.poisson(c.subhalo_mean_count, batch)
    owner = np.repeat(np.arange(batch), counts)
    out = torch.zeros(batch, 1, grid.n_pixels, grid.n_pixels, dtype=torch.float64)
    s = len(owner)
    if s == 0:
        return out
    rr = 2 * theta_e[owner] * np.sqrt(rng.uniform(size=s))
    a = rng.uniform(-np.pi, np.pi, s)
    cx = torch.as_tensor(x0[owner] + rr * np.cos(a)).reshape(-1, 1, 1)
    cy = torch.as_tensor(y0[owner] + rr * np.sin(a)).reshape(-1, 1, 1)
    rs = torch.as_tensor(rng.uniform(*c.subhalo_rs_range_arcsec, s)).reshape(-1, 1, 1)
    ks = torch.as_tensor(rng.uniform(*c.subhalo_kappa_s_range, s)).reshape(-1, 1, 1)
    x, y = grid.coordinates(torch.float64)
    r2 = (x - cx) ** 2 + (y - cy) ** 2
    sub = profiles.nfw_kappa(x, y, ks, rs, cx, cy) * (5 * rs) ** 2 / (r2 + (5 * rs) ** 2)
    out[:, 0].index_add_(0, torch.as_tensor(owner), sub)
    return out


# ----------------------------------------------------------------------------- shipped TNG maps
TNG_PIXEL_SCALE_ARCSEC = 0.06  # 128 px over 7.68" (docs/censai_as_run.md section 2.2)


def tng_evaluation_maps(grid: PixelGrid | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 4 real IllustrisTNG100 convergence maps shipped with rimlens, ``4 x 1 x N x N``.

    **For evaluation only** — never train on them. Stored at 128 px over 7.68"; resampled
    (mass-conserving area average / bilinear) to ``grid`` when given. See
    ``rimlens/data/tng/PROVENANCE.md``.
    """
    path = resources.files("rimlens.data") / "tng" / "kappa_maps.npz"
    with resources.as_file(path) as p:
        maps = torch.as_tensor(np.load(p)["kappa_maps"], dtype=torch.float64)[:, None]
    if grid is not None:
        maps = resample_map(maps, TNG_PIXEL_SCALE_ARCSEC, grid)
    return maps.to(dtype)


def resample_map(maps: torch.Tensor, pixel_scale: float, grid: PixelGrid) -> torch.Tensor:
    """Resample ``B x 1 x M x M`` convergence maps of scale ``pixel_scale`` onto ``grid`` (same
    centre), conserving mass (area-weighted averages, :mod:`rimlens.physics.resample`)."""
    return resample_density(maps, pixel_scale, grid.n_pixels, grid.pixel_scale_arcsec)


# ----------------------------------------------------------------------------- augmentation
def random_dihedral(maps: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random 90-degree rotation (k in 0..3) and flip per map (all 8 symmetries of the square)."""
    out = []
    for b in range(maps.shape[0]):
        m = torch.rot90(maps[b], int(rng.integers(0, 4)), dims=(-2, -1))
        if rng.uniform() < 0.5:
            m = torch.flip(m, dims=(-1,))
        out.append(m)
    return torch.stack(out)
