"""Lens-model figures of merit on convergence maps, and the exact pixel-averaged convergence of an
analytic lens.

Every function here is pure and works on **one** map: an ``N x N`` numpy array or torch tensor (a
``1 x 1 x N x N`` or ``1 x N x N`` tensor is accepted and squeezed), on a :class:`rimlens.physics.PixelGrid`
(pixel ``i`` centred at ``(i - (N - 1) / 2) * s`` arcsec, ``x`` along columns, ``y`` along rows,
row 0 at the bottom). Maps are pixel *averages* (a convergence is dimensionless). Centres are
``(x, y)`` in arcsec in the map's own frame (offsets from the grid's centre) unless said otherwise.
Radii are in arcsec.

Circles and annuli are intersected with pixels **exactly** (closed-form area of a disc inside a
rectangle), so enclosed masses are continuous in the radius and root finding is exact to the map's
own pixelisation (each pixel's mean convergence is spread uniformly over the pixel).

* :func:`einstein_radius_of_map` -- radius of the circle inside which the mean convergence is 1.
* :func:`log_slope` -- power-law slope ``gamma`` (``kappa ∝ r^(1 - gamma)``) of the azimuthally
  averaged convergence.
* :func:`kappa_error_in_annulus` -- median relative convergence error around the Einstein ring.
* :func:`source_error` -- normalised L2 error of sources (peak-normalised or best-fit flux scale).
* :func:`pixel_mean_kappa` -- the exact mean convergence of every pixel from an analytic deflection
  field, by the divergence theorem.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import scipy.ndimage
import scipy.optimize
import torch

from rimlens.errors import RimlensInputError
from rimlens.physics.grid import PixelGrid

__all__ = [
    "disc_pixel_areas",
    "einstein_radius_of_map",
    "enclosed_mean_kappa",
    "kappa_error_in_annulus",
    "kappa_peak_center",
    "log_slope",
    "pixel_mean_kappa",
    "radial_profile",
    "source_error",
]

MapLike = np.ndarray | torch.Tensor
"""One map: ``N x N`` (or ``1 x 1 x N x N`` / ``1 x N x N``), numpy or torch."""


def _as_map(a: MapLike, name: str = "map", grid: PixelGrid | None = None) -> np.ndarray:
    """``N x N`` float64 numpy copy of one map (leading unit axes squeezed)."""
    arr = a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise RimlensInputError(f"{name} must be one square N x N map, got shape {tuple(np.shape(a))}")
    if grid is not None and arr.shape[0] != grid.n_pixels:
        raise RimlensInputError(f"{name} has {arr.shape[0]} pixels per side, the grid {grid.n_pixels}")
    if not np.all(np.isfinite(arr)):
        raise RimlensInputError(f"{name} contains NaN or infinite values")
    return arr


def _center(center: Sequence[float] | None) -> tuple[float, float]:
    if center is None:
        return 0.0, 0.0
    cx, cy = (float(c) for c in center)
    return cx, cy


def _pixel_edges(grid: PixelGrid) -> np.ndarray:
    """Pixel boundaries along one axis, ``(N + 1,)`` arcsec: ``(b - N / 2) * s``."""
    n, s = grid.n_pixels, grid.pixel_scale_arcsec
    return (np.arange(n + 1) - n / 2) * s


# ----------------------------------------------------------------------------- exact disc / pixel areas
def _quadrant_area(a: np.ndarray, b: np.ndarray, r: float) -> np.ndarray:
    """Area of ``[0, a] x [0, b]`` inside the disc of radius ``r`` about the origin (``a, b >= 0``)."""
    a = np.minimum(a, r)
    b = np.minimum(b, r)
    inside = a**2 + b**2 <= r**2
    u0 = np.sqrt(np.clip(r**2 - b**2, 0.0, None))  # beyond u0 the circle is below y = b

    def h(u: np.ndarray) -> np.ndarray:  # integral of sqrt(r^2 - t^2) from 0 to u
        return 0.5 * (u * np.sqrt(np.clip(r**2 - u**2, 0.0, None)) + r**2 * np.arcsin(np.clip(u / r, -1.0, 1.0)))

    return np.where(inside, a * b, b * u0 + h(a) - h(np.minimum(u0, a)))


def _signed_area(x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Signed area of ``[0, x] x [0, y]`` inside the disc (the disc is symmetric in both axes)."""
    return np.sign(x) * np.sign(y) * _quadrant_area(np.abs(x), np.abs(y), r)


def disc_pixel_areas(grid: PixelGrid, radius: float, center: Sequence[float] | None = None) -> np.ndarray:
    """Exact area (arcsec²) of each pixel inside the disc of ``radius`` (arcsec) about ``center``.

    Returns an ``N x N`` array (rows = y, columns = x); it sums to ``pi radius²`` when the disc lies
    inside the map.
    """
    if radius <= 0:
        return np.zeros((grid.n_pixels, grid.n_pixels))
    cx, cy = _center(center)
    e = _pixel_edges(grid)
    ex, ey = e - cx, e - cy
    x1, x2 = ex[None, :-1], ex[None, 1:]
    y1, y2 = ey[:-1, None], ey[1:, None]
    r = float(radius)
    area = _signed_area(x2, y2, r) - _signed_area(x1, y2, r) - _signed_area(x2, y1, r) + _signed_area(x1, y1, r)
    return np.clip(area, 0.0, None)


def _largest_inner_radius(grid: PixelGrid, center: tuple[float, float]) -> float:
    """Radius of the largest circle about ``center`` that lies inside the map."""
    return grid.fov_arcsec / 2 - max(abs(center[0]), abs(center[1]))


# ----------------------------------------------------------------------------- Einstein radius
def enclosed_mean_kappa(kappa: MapLike, grid: PixelGrid, radius: float, center: Sequence[float] | None = None) -> float:
    """Mean convergence inside the circle of ``radius`` (arcsec) about ``center`` (arcsec, map frame;
    ``None``: the grid's centre): ``sum(kappa * overlap area) / (pi radius²)``. Mass beyond the map
    counts as zero."""
    k = _as_map(kappa, "kappa", grid)
    return _enclosed_mean(k, grid, float(radius), _center(center))


def _enclosed_mean(k: np.ndarray, grid: PixelGrid, radius: float, center: tuple[float, float]) -> float:
    return float((k * disc_pixel_areas(grid, radius, center)).sum() / (math.pi * radius**2))


def einstein_radius_of_map(kappa: MapLike, grid: PixelGrid, center: Sequence[float] | None = None) -> float:
    """Radius (arcsec) of the circle about ``center`` inside which the mean convergence is 1.

    The enclosed mass is exact for the pixelated map (every pixel's area inside the circle in
    closed form; each pixel's mean spread uniformly over it). Radii from a quarter pixel to the
    largest circle inside the map are scanned in half-pixel steps for the first crossing of mean 1
    from above, which Brent's method then solves to 1e-9 arcsec.

    Args:
        kappa: one convergence map (``N x N``, dimensionless pixel means).
        grid: its grid.
        center: ``(x, y)`` arcsec in the map's frame; ``None``: the grid's centre. See also
            :func:`kappa_peak_center`.

    Returns:
        theta_E in arcsec; 0.0 if the mean inside a quarter pixel is already below 1; NaN if the
        mean stays above 1 out to the largest circle inside the map.
    """
    k = _as_map(kappa, "kappa", grid)
    c = _center(center)
    s = grid.pixel_scale_arcsec
    r_max = _largest_inner_radius(grid, c)
    r_min = 0.25 * s
    if r_max <= r_min:
        raise RimlensInputError(f"centre {c} lies too close to the edge of the map")

    def f(r: float) -> float:
        return _enclosed_mean(k, grid, r, c) - 1.0

    radii = np.append(np.arange(r_min, r_max, 0.5 * s), r_max)
    prev_r, prev_f = radii[0], f(radii[0])
    if prev_f < 0:
        return 0.0
    for r in radii[1:]:
        fr = f(r)
        if fr < 0:
            return float(scipy.optimize.brentq(f, prev_r, r, xtol=1e-9, rtol=1e-12))
        prev_r, prev_f = r, fr
    return float("nan")


def kappa_peak_center(kappa: MapLike, grid: PixelGrid, fwhm_arcsec: float = 0.3) -> tuple[float, float]:
    """Lens centre from the map itself: the peak of the map smoothed with a Gaussian of
    ``fwhm_arcsec`` (as :func:`rimlens.data.kappa.einstein_profile`), refined to sub-pixel precision
    by a parabola through the peak and its neighbours along each axis. Returns ``(x, y)`` arcsec."""
    k = _as_map(kappa, "kappa", grid)
    s = grid.pixel_scale_arcsec
    sm = scipy.ndimage.gaussian_filter(k, fwhm_arcsec / s / 2.3548, mode="constant")
    i, j = np.unravel_index(int(np.argmax(sm)), sm.shape)
    n = grid.n_pixels

    def refine(lo: float, mid: float, hi: float) -> float:
        d = lo - 2 * mid + hi
        return 0.0 if d >= 0 else float(np.clip(0.5 * (lo - hi) / d, -0.5, 0.5))

    dj = refine(sm[i, j - 1], sm[i, j], sm[i, j + 1]) if 0 < j < n - 1 else 0.0
    di = refine(sm[i - 1, j], sm[i, j], sm[i + 1, j]) if 0 < i < n - 1 else 0.0
    return float((j + dj - (n - 1) / 2) * s), float((i + di - (n - 1) / 2) * s)


# ----------------------------------------------------------------------------- slope
def radial_profile(
    kappa: MapLike, grid: PixelGrid, edges: Sequence[float] | np.ndarray, center: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Azimuthally averaged map in annuli.

    Args:
        kappa: one map ``N x N``.
        grid: its grid.
        edges: increasing annulus radii ``(K + 1,)`` arcsec.
        center: ``(x, y)`` arcsec in the map's frame (``None``: the grid's centre).

    Returns:
        ``(mean (K,), covered area (K,) arcsec², annulus area (K,) arcsec²)``: the mean is
        ``sum(kappa * a) / sum(a)`` with ``a`` each pixel's exact area inside the annulus, so only the
        part of an annulus inside the map counts (NaN where none of it does).
    """
    k = _as_map(kappa, "kappa", grid)
    c = _center(center)
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or len(e) < 2 or np.any(np.diff(e) <= 0) or e[0] < 0:
        raise RimlensInputError("edges must be at least two increasing radii >= 0")
    discs = [disc_pixel_areas(grid, float(r), c) for r in e]
    mean, covered = np.zeros(len(e) - 1), np.zeros(len(e) - 1)
    for i in range(len(e) - 1):
        a = discs[i + 1] - discs[i]
        covered[i] = a.sum()
        mean[i] = (k * a).sum() / covered[i] if covered[i] > 0 else np.nan
    return mean, covered, math.pi * (e[1:] ** 2 - e[:-1] ** 2)


def log_slope(
    kappa: MapLike,
    grid: PixelGrid,
    theta_e: float,
    center: Sequence[float] | None = None,
    r_range: tuple[float, float] = (0.5, 2.0),
    n_bins: int = 10,
) -> float:
    """Power-law slope ``gamma`` of the azimuthally averaged convergence, ``kappa ∝ r^(1 - gamma)``
    (isothermal: ``gamma = 2``).

    Exactly:

    1. ``n_bins`` annuli with logarithmically spaced edges ``r_k = r_lo (r_hi / r_lo)^(k / n_bins)``,
       ``k = 0..n_bins``, ``r_lo = r_range[0] * theta_e``, ``r_hi = r_range[1] * theta_e``;
    2. the mean convergence of each annulus, ``kbar_k``, weighting each pixel by its exact area inside
       the annulus (:func:`radial_profile`; parts of an annulus beyond the map are left out);
    3. ordinary (unweighted) least squares of ``ln kbar_k`` against ``ln sqrt(r_k r_(k+1))`` over the
       annuli with ``kbar_k > 0`` (at least 2), slope ``b``;
    4. ``gamma = 1 - b``.

    For a continuous power law -- also an elliptical one, ``kappa = r^(1 - gamma) f(phi)`` -- each
    annulus mean is a constant times ``r_k^(1 - gamma)`` (equal log widths), so the fit is exact up
    to the pixelisation.

    Args:
        kappa: one convergence map ``N x N``.
        grid: its grid.
        theta_e: Einstein radius (arcsec) setting the fitted range.
        center: ``(x, y)`` arcsec in the map's frame (``None``: the grid's centre).
        r_range: fitted range in units of ``theta_e``.
        n_bins: number of annuli.

    Returns:
        ``gamma`` (dimensionless), NaN when fewer than 2 annuli have a positive mean or ``theta_e`` is
        not positive.
    """
    if not np.isfinite(theta_e) or theta_e <= 0:
        return float("nan")
    lo, hi = r_range[0] * theta_e, r_range[1] * theta_e
    edges = lo * (hi / lo) ** (np.arange(n_bins + 1) / n_bins)
    mean, covered, _ = radial_profile(kappa, grid, edges, center)
    ok = np.isfinite(mean) & (mean > 0) & (covered > 0)
    if ok.sum() < 2:
        return float("nan")
    r = np.sqrt(edges[1:] * edges[:-1])[ok]
    slope = np.polyfit(np.log(r), np.log(mean[ok]), 1)[0]
    return float(1.0 - slope)


# ----------------------------------------------------------------------------- map and source errors
def kappa_error_in_annulus(
    kappa_hat: MapLike,
    kappa_true: MapLike,
    grid: PixelGrid,
    theta_e: float,
    center: Sequence[float] | None,
    r_range: tuple[float, float] = (0.5, 2.0),
) -> float:
    """Median of ``|kappa_hat - kappa_true| / kappa_true`` over the pixels whose centres lie at
    ``r_range[0] * theta_e <= r <= r_range[1] * theta_e`` from ``center`` (arcsec, map frame) and
    where ``kappa_true > 0``. Both maps on the same ``grid``. Dimensionless; NaN if no pixel
    qualifies."""
    kh = _as_map(kappa_hat, "kappa_hat", grid)
    kt = _as_map(kappa_true, "kappa_true", grid)
    cx, cy = _center(center)
    x, y = (t.numpy() for t in grid.coordinates(torch.float64))
    r = np.hypot(x - cx, y - cy)
    sel = (r >= r_range[0] * theta_e) & (r <= r_range[1] * theta_e) & (kt > 0)
    if not sel.any():
        return float("nan")
    return float(np.median(np.abs(kh[sel] - kt[sel]) / kt[sel]))


def source_error(source_hat: MapLike, source_true: MapLike, normalise: str = "peak") -> float:
    """Normalised source error ``||s_hat - s|| / ||s||`` (L2 over the pixels), dimensionless.

    Both maps ``N x N`` on the same source grid, centred on the same optical axis; no shift or
    rotation is fitted, so a displaced source counts as an error. The flux scale, which a
    reconstruction does not constrain, is removed by ``normalise``:

    * ``"peak"``: each map divided by its own maximum (rimlens' sources are peak-normalised). 0 is
      perfect, ``sqrt(2)`` for two non-overlapping sources of equal norms; one sharp pixel (a clump
      the reconstruction blurs) sets the scale, so values near 1 are common.
    * ``"scale"``: ``s_hat`` multiplied by the least-squares factor ``<s_hat, s> / ||s_hat||^2``, i.e.
      ``sqrt(1 - cos^2)`` with ``cos`` the cosine similarity of the maps: in [0, 1], 1 for no
      (positive) overlap at all.
    """
    sh = _as_map(source_hat, "source_hat")
    st = _as_map(source_true, "source_true")
    if sh.shape != st.shape:
        raise RimlensInputError(f"source maps differ in shape: {sh.shape} vs {st.shape}")
    if st.max() <= 0:
        raise RimlensInputError("the true source has no positive pixel")
    st = st / st.max()
    if normalise == "peak":
        sh = sh / sh.max() if sh.max() > 0 else sh
    elif normalise == "scale":
        norm2 = float((sh * sh).sum())
        sh = sh * max(float((sh * st).sum()), 0.0) / norm2 if norm2 > 0 else sh
    else:
        raise RimlensInputError(f"normalise must be 'peak' or 'scale', got {normalise!r}")
    return float(np.linalg.norm(sh - st) / np.linalg.norm(st))


# ----------------------------------------------------------------------------- exact pixel means
def pixel_mean_kappa(
    alpha_fn: Callable,
    grid: PixelGrid,
    center: Sequence[float] = (0.0, 0.0),
    singular_points: Sequence[Sequence[float]] | None = None,
    order: int = 12,
    grading: int = 3,
    chunk: int = 1 << 20,
) -> np.ndarray:
    """Exact mean convergence of every pixel of ``grid`` from an analytic deflection field.

    By the divergence theorem (``div alpha = 2 kappa``), the mean of ``kappa`` over a pixel of area
    ``A`` is ``(1 / (2 A)) ∮ alpha · n dl`` over its boundary (``n`` the outward normal). Each of the
    ``2 N (N + 1)`` pixel edges is integrated once (shared edges cancel exactly, so the total mass
    equals the flux through the map's border) by Gauss-Legendre quadrature of ``order`` points on
    pieces of the edge: the edge is cut at the foot of the perpendicular from every singular point,
    each piece halved, and each half graded towards its cut end (``t = h u^grading``), which keeps
    integrable endpoint singularities of ``alpha`` (power-law cusps with ``gamma > 2``) accurate.

    Args:
        alpha_fn: ``alpha_fn(x, y) -> (alpha_x, alpha_y)``, called with 1-D float64 numpy arrays in
            arcsec (the caller's frame, e.g. ``lambda x, y: LensModel(...).alpha(x, y, kwargs)``),
            returning arrays of the same shape in arcsec (numpy or torch). The external shear has no
            convergence and may be left in or out.
        grid: the pixel grid of the map.
        center: position ``(x, y)`` (arcsec, in ``alpha_fn``'s frame) of the grid's centre.
        singular_points: ``(x, y)`` points (``alpha_fn``'s frame) where ``alpha`` is singular or
            kinked (lens and subhalo centres); default: ``[center]``.
        order: Gauss-Legendre points per graded piece.
        grading: exponent of the grading (1: plain Gauss-Legendre).
        chunk: at most this many points per call of ``alpha_fn``.

    Returns:
        ``N x N`` float64 pixel means (dimensionless), rows = y, columns = x.
    """
    n, s = grid.n_pixels, grid.pixel_scale_arcsec
    cx, cy = _center(center)
    sing = np.asarray([(cx, cy)] if singular_points is None else singular_points, dtype=np.float64).reshape(-1, 2)
    e = _pixel_edges(grid)
    ex, ey = e + cx, e + cy  # pixel boundaries in alpha_fn's frame
    u, w = np.polynomial.legendre.leggauss(order)
    u, w = (u + 1) / 2, w / 2  # on [0, 1]
    ug, wg = u**grading, w * grading * u ** (grading - 1)

    def edge_integrals(start: np.ndarray, fixed: np.ndarray, along_x: bool) -> np.ndarray:
        """∫ alpha_perp over edges running from ``start`` (E,) over length ``s`` at the fixed
        coordinate ``fixed`` (E,); the perpendicular component is alpha_y for edges along x."""
        feet = np.clip((sing[:, 0] if along_x else sing[:, 1])[None, :] - start[:, None], 0.0, s)  # (E, m)
        # a foot within rounding of an edge's end is that end (no sliver piece with points on the cusp)
        feet = np.where(feet < 1e-9 * s, 0.0, np.where(feet > s * (1 - 1e-9), s, feet))
        cuts = np.sort(np.concatenate([np.zeros((len(start), 1)), feet, np.full((len(start), 1), s)], axis=1), axis=1)
        a, b = cuts[:, :-1], cuts[:, 1:]  # (E, m + 1) pieces
        mid = (a + b) / 2
        h = (mid - a)[..., None]  # half length
        # half 1 graded towards a, half 2 graded towards b
        t = np.concatenate([a[..., None] + h * ug, b[..., None] - h * ug], axis=-1)  # (E, m + 1, 2 order)
        wt = np.concatenate([h * wg, h * wg], axis=-1)
        along = start[:, None, None] + t
        other = np.broadcast_to(fixed[:, None, None], along.shape)
        px, py = (along, other) if along_x else (other, along)
        used = (wt > 0).ravel()  # empty pieces (cuts at an edge's end) would put points on a singularity
        px, py = px.ravel()[used], py.ravel()[used]
        comp = np.zeros(wt.size)
        values = np.empty(len(px))
        for i in range(0, len(px), chunk):
            ax, ay = alpha_fn(px[i : i + chunk], py[i : i + chunk])
            values[i : i + chunk] = _to_numpy(ay if along_x else ax)
        comp[used] = values
        return (comp.reshape(wt.shape) * wt).sum(axis=(1, 2))

    # horizontal edges: H[b, j] = ∫ alpha_y dx along y = ey[b], x in [ex[j], ex[j + 1]]
    bb, jj = np.meshgrid(np.arange(n + 1), np.arange(n), indexing="ij")
    H = edge_integrals(ex[jj].ravel(), ey[bb].ravel(), True).reshape(n + 1, n)
    # vertical edges: V[i, c] = ∫ alpha_x dy along x = ex[c], y in [ey[i], ey[i + 1]]
    ii, cc = np.meshgrid(np.arange(n), np.arange(n + 1), indexing="ij")
    V = edge_integrals(ey[ii].ravel(), ex[cc].ravel(), False).reshape(n, n + 1)
    flux = H[1:, :] - H[:-1, :] + V[:, 1:] - V[:, :-1]
    return flux / (2 * s * s)


def _to_numpy(a: object) -> np.ndarray:
    return a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
