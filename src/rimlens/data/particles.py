"""Convergence maps from simulation particles (smooth-particle lensing, paper section 2.2).

Each particle of mass ``m_i`` is spread with a 2-D Gaussian of width
``l_i = sqrt(103 / 1120) * D_i``, ``D_i`` being the 3-D distance to its 64th nearest neighbour
(itself included), found with a scipy k-d tree. The surface density is integrated over each pixel
(products of error functions — exact mass conservation even for kernels smaller than a pixel, where
the paper's point sampling at pixel centres is not), then ``kappa = Sigma / Sigma_crit`` with
``Sigma_crit = c^2 D_s / (4 pi G D_d D_ds)`` from astropy (Planck18, z_d = 0.5, z_s = 1.5 by default).

Units: positions in physical kpc, masses in solar masses.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import astropy.units as u
import h5py
import numpy as np
from astropy.constants import G, c
from astropy.cosmology import Planck18
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation
from scipy.special import erf

from rimlens.errors import RimlensInputError
from rimlens.physics import PixelGrid

__all__ = [
    "N_NEIGHBOURS",
    "SMOOTHING_FACTOR",
    "SyntheticGalaxyConfig",
    "critical_density_msun_per_arcsec2",
    "kappa_from_particles",
    "rasterize",
    "read_tng_cutout",
    "sample_exponential_disk",
    "sample_hernquist",
    "sample_nfw",
    "sample_sis",
    "smoothing_lengths",
    "synthetic_galaxy",
]

SMOOTHING_FACTOR = math.sqrt(103.0 / 1120.0)
N_NEIGHBOURS = 64


@functools.lru_cache(maxsize=32)
def critical_density_msun_per_arcsec2(
    z_lens: float = 0.5, z_source: float = 1.5, cosmology=None
) -> tuple[float, float]:
    """``(Sigma_crit in M_sun / arcsec^2, kpc per arcsec at z_lens)`` for a cosmology (Planck18 default)."""
    if cosmology is None:
        cosmology = Planck18
    d_d = cosmology.angular_diameter_distance(z_lens)
    d_s = cosmology.angular_diameter_distance(z_source)
    try:  # astropy >= 7 takes (z1, z2); older releases only have the _z1z2 method
        d_ds = cosmology.angular_diameter_distance(z_lens, z_source)
    except TypeError:
        d_ds = cosmology.angular_diameter_distance_z1z2(z_lens, z_source)
    sigma_crit = (c**2 * d_s / (4 * np.pi * G * d_d * d_ds)).to(u.Msun / u.kpc**2)
    kpc_per_arcsec = (d_d * (1 * u.arcsec).to(u.rad).value).to(u.kpc).value
    return float(sigma_crit.value * kpc_per_arcsec**2), float(kpc_per_arcsec)


def smoothing_lengths(positions: np.ndarray, n_neighbours: int = N_NEIGHBOURS) -> np.ndarray:
    """Adaptive kernel widths ``sqrt(103/1120) * D_64`` for ``P x 3`` positions (same units)."""
    k = min(n_neighbours, len(positions))
    dist, _ = cKDTree(positions).query(positions, k=k)
    return SMOOTHING_FACTOR * (dist[:, -1] if dist.ndim == 2 else dist)


def _pixel_weights(coord: np.ndarray, width: np.ndarray, grid: PixelGrid) -> np.ndarray:
    """``P x N`` fraction of each particle's Gaussian falling in each pixel along one axis."""
    edges = (np.arange(grid.n_pixels + 1) - grid.n_pixels / 2) * grid.pixel_scale_arcsec
    z = (edges[None, :] - coord[:, None]) / (np.sqrt(2) * width[:, None])
    cdf = 0.5 * (1 + erf(z))
    return np.diff(cdf, axis=1)


def rasterize(
    x_arcsec: np.ndarray,
    y_arcsec: np.ndarray,
    mass: np.ndarray,
    width_arcsec: np.ndarray,
    grid: PixelGrid,
    chunk: int = 200_000,
) -> np.ndarray:
    """Projected mass per pixel area (``N x N``, mass / arcsec^2) of Gaussian particles.

    ``Sigma = W_y^T diag(m) W_x / s^2`` where ``W`` are the per-axis pixel fractions: exact pixel
    integrals of the Gaussian kernels, computed as one matrix product.
    """
    x, y, m, w = (np.asarray(a, dtype=np.float64) for a in (x_arcsec, y_arcsec, mass, width_arcsec))
    if not (x.shape == y.shape == m.shape == w.shape) or x.ndim != 1:
        raise RimlensInputError("particle positions, masses and widths must be 1-D arrays of equal length")
    if not np.all(np.isfinite(np.concatenate([x, y, m, w]))) or np.any(w <= 0):
        raise RimlensInputError("particle data must be finite, with widths > 0")
    out = np.zeros((grid.n_pixels, grid.n_pixels))
    for s in range(0, len(x), chunk):
        wx = _pixel_weights(x[s : s + chunk], w[s : s + chunk], grid)
        wy = _pixel_weights(y[s : s + chunk], w[s : s + chunk], grid)
        out += (wy * m[s : s + chunk, None]).T @ wx
    return out / grid.pixel_scale_arcsec**2


def kappa_from_particles(
    positions_kpc: np.ndarray,
    masses_msun: np.ndarray,
    grid: PixelGrid,
    *,
    z_lens: float = 0.5,
    z_source: float = 1.5,
    cosmology=None,
    projection: np.ndarray | None = None,
    center_kpc: np.ndarray | None = None,
    margin: float = 0.05,
) -> np.ndarray:
    """Convergence map (``N x N``) of a particle galaxy.

    Args:
        positions_kpc: ``P x 3`` physical positions (kpc).
        masses_msun: ``(P,)`` masses (M_sun).
        grid: image grid.
        projection: optional ``3 x 3`` rotation applied before projecting along z.
        center_kpc: 3-D point put on the optical axis; default: peak of the projected mass
            (2-D histogram), as in the paper.
        margin: only particles within the field plus this fraction per side are rasterised;
            smoothing lengths use all particles.
    """
    pos = np.asarray(positions_kpc, dtype=np.float64)
    mass = np.asarray(masses_msun, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 3 or len(mass) != len(pos):
        raise RimlensInputError(f"positions must be P x 3 and masses (P,), got {pos.shape} and {mass.shape}")
    if len(pos) < 2:
        raise RimlensInputError("need at least 2 particles")
    if projection is not None:
        pos = pos @ np.asarray(projection).T
    sigma_crit, kpc_per_arcsec = critical_density_msun_per_arcsec2(z_lens, z_source, cosmology)
    widths = smoothing_lengths(pos) / kpc_per_arcsec
    xy = pos[:, :2] / kpc_per_arcsec
    if center_kpc is None:
        center = _projected_peak(xy, mass, grid)
    else:
        c = np.asarray(center_kpc, dtype=np.float64)
        c = np.asarray(projection) @ c if projection is not None else c
        center = c[:2] / kpc_per_arcsec
    xy = xy - center
    half = grid.fov_arcsec / 2 * (1 + 2 * margin)
    keep = np.all(np.abs(xy) < half, axis=1)
    sigma = rasterize(xy[keep, 0], xy[keep, 1], mass[keep], widths[keep], grid)
    return sigma / sigma_crit


def _projected_peak(xy, mass, grid, bins: int = 188):
    """Centre of the most massive cell of a mass-weighted 2-D histogram spanning the particles
    (within 3 fields of view of their median), as the paper's rasteriser."""
    med = np.median(xy, axis=0)
    half = 1.5 * grid.fov_arcsec
    sel = np.all(np.abs(xy - med) < half, axis=1)
    h, ex, ey = np.histogram2d(
        xy[sel, 0],
        xy[sel, 1],
        bins=bins,
        range=[[med[0] - half, med[0] + half], [med[1] - half, med[1] + half]],
        weights=mass[sel],
    )
    i, j = np.unravel_index(np.argmax(h), h.shape)
    return np.array([(ex[i] + ex[i + 1]) / 2, (ey[j] + ey[j + 1]) / 2])


# ----------------------------------------------------------------------------- TNG reader
def read_tng_cutout(path: str | Path, part_types=(0, 1, 4, 5)) -> tuple[np.ndarray, np.ndarray]:
    """Read an IllustrisTNG cutout HDF5 file (``PartTypeX/Coordinates`` in ckpc/h, ``Masses`` in
    1e10 M_sun/h; dark matter mass from ``Header/MassTable``).

    Returns:
        ``(positions P x 3 in physical kpc, masses (P,) in M_sun)``.
    """

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise RimlensInputError(f"cannot read TNG cutout {path}: {exc}") from None
    with f:
        header = dict(f["Header"].attrs) if "Header" in f else {}
        h = float(header.get("HubbleParam", 0.6774))
        z = float(header.get("Redshift", 0.0))
        a = 1.0 / (1.0 + z)
        pos, mass = [], []
        for pt in part_types:
            g = f.get(f"PartType{pt}")
            if g is None or "Coordinates" not in g:
                continue
            c = np.asarray(g["Coordinates"], dtype=np.float64)
            if "Masses" in g:
                m = np.asarray(g["Masses"], dtype=np.float64)
            else:
                table = header.get("MassTable")
                if table is None:
                    raise RimlensInputError(f"{path}: PartType{pt} has no Masses and the header no MassTable")
                m = np.full(len(c), float(table[pt]))
            pos.append(c * a / h)
            mass.append(m * 1e10 / h)
    if not pos:
        raise RimlensInputError(f"{path}: no particles of types {part_types} found (is this a TNG cutout?)")
    pos, mass = np.concatenate(pos), np.concatenate(mass)
    return pos, mass


# ----------------------------------------------------------------------------- synthetic galaxies
@dataclass(frozen=True)
class SyntheticGalaxyConfig:
    """Ranges of the synthetic particle galaxies (log-uniform masses, uniform sizes, kpc / M_sun)."""

    n_particles: int = 30_000
    bulge_mass: tuple[float, float] = (1e10, 2e11)
    bulge_scale_kpc: tuple[float, float] = (0.5, 3.0)
    disk_fraction: tuple[float, float] = (0.0, 1.0)  # disk mass / bulge mass
    disk_scale_kpc: tuple[float, float] = (1.5, 5.0)
    disk_height_ratio: tuple[float, float] = (0.05, 0.2)
    halo_mass: tuple[float, float] = (3e11, 3e12)
    halo_scale_kpc: tuple[float, float] = (15.0, 40.0)
    halo_truncation_kpc: float = 60.0
    subhalo_count: tuple[int, int] = (0, 6)
    subhalo_mass_fraction: tuple[float, float] = (0.002, 0.02)
    subhalo_scale_kpc: tuple[float, float] = (0.3, 1.5)


def _log_uniform(rng, lo_hi):
    lo, hi = lo_hi
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _isotropic(rng, r):
    v = rng.normal(size=(len(r), 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True) * r[:, None]


def sample_hernquist(rng, n, scale):
    """Radii of a Hernquist sphere: ``M(<r) = M r^2 / (r + a)^2``."""
    u = np.sqrt(rng.uniform(size=n) * 0.999)
    return _isotropic(rng, scale * u / (1 - u))


def sample_nfw(rng, n, scale, r_max):
    """Positions in a truncated NFW sphere (inverse-CDF on a fine radial table)."""
    r = np.geomspace(1e-4 * scale, r_max, 4096)
    m = np.log1p(r / scale) - (r / scale) / (1 + r / scale)
    return _isotropic(rng, np.interp(rng.uniform(0, m[-1], n), m, r))


def sample_sis(rng, n, r_max):
    """Positions in a singular isothermal sphere truncated at ``r_max`` (M(<r) proportional to r)."""
    return _isotropic(rng, rng.uniform(0, r_max, n))


def sample_exponential_disk(rng, n, scale, height):
    """Exponential disk (surface density ~ exp(-R/R_d)) with a sech^2-like vertical profile."""
    rad = rng.gamma(2.0, scale, n)
    phi = rng.uniform(0, 2 * np.pi, n)
    z = height * np.arctanh(rng.uniform(-0.999, 0.999, n))
    return np.stack([rad * np.cos(phi), rad * np.sin(phi), z], axis=1)


def synthetic_galaxy(rng: np.random.Generator, config: SyntheticGalaxyConfig = SyntheticGalaxyConfig()):
    """A random particle galaxy: Hernquist bulge, exponential disk, NFW halo and NFW subhaloes,
    randomly oriented. Particles of each component share one mass (as in an N-body run).

    Returns:
        ``(positions P x 3 kpc, masses (P,) M_sun)``, centred on the galaxy.
    """
    c = config
    m_bulge = _log_uniform(rng, c.bulge_mass)
    m_disk = m_bulge * rng.uniform(*c.disk_fraction)
    m_halo = _log_uniform(rng, c.halo_mass)
    n_sub = int(rng.integers(c.subhalo_count[0], c.subhalo_count[1] + 1))
    m_subs = [m_halo * rng.uniform(*c.subhalo_mass_fraction) for _ in range(n_sub)]
    total = m_bulge + m_disk + m_halo + sum(m_subs)
    parts, masses = [], []

    def add(pos, m):
        parts.append(pos)
        masses.append(np.full(len(pos), m / max(len(pos), 1)))

    def count(m):
        return max(N_NEIGHBOURS + 1, int(c.n_particles * m / total))

    add(sample_hernquist(rng, count(m_bulge), rng.uniform(*c.bulge_scale_kpc)), m_bulge)
    if m_disk > 0:
        rd = rng.uniform(*c.disk_scale_kpc)
        add(sample_exponential_disk(rng, count(m_disk), rd, rd * rng.uniform(*c.disk_height_ratio)), m_disk)
    add(sample_nfw(rng, count(m_halo), rng.uniform(*c.halo_scale_kpc), c.halo_truncation_kpc), m_halo)
    for m in m_subs:
        centre = _isotropic(rng, rng.uniform(2.0, 15.0, 1))[0]
        add(sample_nfw(rng, count(m), rng.uniform(*c.subhalo_scale_kpc), 10 * c.subhalo_scale_kpc[1]) + centre, m)
    pos = np.concatenate(parts)
    rot = Rotation.random(random_state=rng).as_matrix()
    return pos @ rot.T, np.concatenate(masses)
