"""Analytic convergence profiles with closed-form deflections, and the Sersic light profile.

All functions are pure: they take image-plane coordinates ``x, y`` in arcsec (tensors of any,
broadcastable, shape) and parameters, and return the convergence (dimensionless) or the deflection
``(alpha_x, alpha_y)`` in arcsec. Parameters may be Python floats or tensors broadcastable to the
coordinates (e.g. shape ``B x 1 x 1 x 1`` for a batch of lenses on an ``N x N`` grid).

Elliptical profiles use the axis ratio ``q`` (minor / major, 0 < q <= 1) and the position angle
``phi`` of the major axis, counter-clockwise from the +x axis, in radians. Their elliptical radius is
the "product-averaged" ``sqrt(q x'^2 + y'^2 / q)`` (as lenstronomy), so ``theta_E`` is the Einstein
radius of the equivalent circular lens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeAlias

import scipy.special
import torch
from torch.types import Device

from rimlens.physics.grid import PixelGrid

__all__ = [
    "epl_deflection",
    "epl_kappa",
    "gaussian_deflection",
    "gaussian_kappa",
    "nfw_deflection",
    "nfw_kappa",
    "pixelate",
    "pseudo_jaffe_deflection",
    "pseudo_jaffe_kappa",
    "sersic",
    "sersic_b",
    "shear_deflection",
    "sie_deflection",
    "sie_kappa",
    "sis_deflection",
    "sis_kappa",
]

Param: TypeAlias = float | torch.Tensor
"""A profile parameter: a Python float or a tensor broadcastable to the coordinates."""


def _rotate(
    x: torch.Tensor, y: torch.Tensor, center_x: Param, center_y: Param, phi: Param
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates in the frame centred on the lens with x' along the major axis."""
    dx, dy = x - center_x, y - center_y
    c, s = _cos(phi), _sin(phi)
    return dx * c + dy * s, -dx * s + dy * c


def _unrotate(ax: torch.Tensor, ay: torch.Tensor, phi: Param) -> tuple[torch.Tensor, torch.Tensor]:
    c, s = _cos(phi), _sin(phi)
    return ax * c - ay * s, ax * s + ay * c


def _cos(a: Param) -> Param:
    return torch.cos(a) if isinstance(a, torch.Tensor) else math.cos(a)


def _sin(a: Param) -> Param:
    return torch.sin(a) if isinstance(a, torch.Tensor) else math.sin(a)


def _as_tensor_like(v: Param, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=like.dtype, device=like.device)


# ------------------------------------------------------------------------------ Gaussian
def gaussian_kappa(
    x: torch.Tensor,
    y: torch.Tensor,
    kappa_0: Param,
    sigma_arcsec: Param,
    center_x: Param = 0.0,
    center_y: Param = 0.0,
) -> torch.Tensor:
    """Circular Gaussian convergence ``kappa_0 exp(-r^2 / 2 sigma^2)``.

    ``x, y``, ``sigma_arcsec`` and the centre are in arcsec; ``kappa_0`` is dimensionless. Returns
    the (dimensionless) convergence with the broadcast shape of the coordinates and parameters.
    """
    r2 = (x - center_x) ** 2 + (y - center_y) ** 2
    return kappa_0 * torch.exp(-0.5 * r2 / sigma_arcsec**2)


def gaussian_deflection(
    x: torch.Tensor,
    y: torch.Tensor,
    kappa_0: Param,
    sigma_arcsec: Param,
    center_x: Param = 0.0,
    center_y: Param = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deflection of :func:`gaussian_kappa`: ``alpha(r) = 2 kappa_0 sigma^2 (1 - e^{-r^2/2sigma^2}) / r``.

    Returns ``(alpha_x, alpha_y)`` in arcsec, each with the broadcast shape of the inputs.
    """
    dx, dy = x - center_x, y - center_y
    r2 = dx**2 + dy**2
    # alpha / r = 2 kappa_0 sigma^2 (1 - e^{-u}) / r^2, with u = r^2 / 2 sigma^2; expm1 keeps r -> 0 exact.
    u = 0.5 * r2 / sigma_arcsec**2
    factor = torch.where(u > 1e-12, -torch.expm1(-u) / torch.where(u > 1e-12, u, torch.ones_like(u)), 1 - u / 2)
    factor = kappa_0 * factor  # = alpha / r
    return factor * dx, factor * dy


# ------------------------------------------------------------------------------ SIS
def sis_kappa(
    x: torch.Tensor, y: torch.Tensor, theta_e_arcsec: Param, center_x: Param = 0.0, center_y: Param = 0.0
) -> torch.Tensor:
    """Singular isothermal sphere ``kappa = theta_E / (2 r)``.

    Coordinates and ``theta_E`` in arcsec; returns the dimensionless convergence with the broadcast
    shape of the inputs (infinite at the centre).
    """
    r = torch.sqrt((x - center_x) ** 2 + (y - center_y) ** 2)
    return theta_e_arcsec / (2 * r)


def sis_deflection(
    x: torch.Tensor, y: torch.Tensor, theta_e_arcsec: Param, center_x: Param = 0.0, center_y: Param = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deflection of :func:`sis_kappa`: ``theta_E`` times the unit radial vector.

    Returns ``(alpha_x, alpha_y)`` in arcsec, each with the broadcast shape of the inputs.
    """
    dx, dy = x - center_x, y - center_y
    r = torch.sqrt(dx**2 + dy**2).clamp_min(1e-30)
    return theta_e_arcsec * dx / r, theta_e_arcsec * dy / r


# ------------------------------------------------------------------------------ pseudo-Jaffe (truncated SIS)
def pseudo_jaffe_kappa(
    x: torch.Tensor,
    y: torch.Tensor,
    theta_e_arcsec: Param,
    core_arcsec: Param,
    truncation_arcsec: Param,
    center_x: Param = 0.0,
    center_y: Param = 0.0,
) -> torch.Tensor:
    """A truncated, cored isothermal sphere (the pseudo-Jaffe profile; lenstronomy's ``PJAFFE``):
    ``kappa = b / 2 (1 / sqrt(r^2 + a^2) - 1 / sqrt(r^2 + s^2))``, an SIS of Einstein radius ``b`` between
    its core ``a`` and its truncation radius ``s`` (``a < s``), total mass ``pi b (s - a)`` (arcsec^2 in
    units of the critical density). The usual model of a subhalo stripped by its host.

    Coordinates, ``b``, ``a`` and ``s`` in arcsec; returns the dimensionless convergence with the
    broadcast shape of the inputs.
    """
    r2 = (x - center_x) ** 2 + (y - center_y) ** 2
    return 0.5 * theta_e_arcsec * (torch.rsqrt(r2 + core_arcsec**2) - torch.rsqrt(r2 + truncation_arcsec**2))


def pseudo_jaffe_deflection(
    x: torch.Tensor,
    y: torch.Tensor,
    theta_e_arcsec: Param,
    core_arcsec: Param,
    truncation_arcsec: Param,
    center_x: Param = 0.0,
    center_y: Param = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deflection of :func:`pseudo_jaffe_kappa`: the mass within ``r`` over ``pi r``, radial,
    ``alpha = b [(sqrt(r^2 + a^2) - a) - (sqrt(r^2 + s^2) - s)] / r``, written as
    ``b r [1 / (sqrt(r^2 + a^2) + a) - 1 / (sqrt(r^2 + s^2) + s)]`` so that it is smooth (and its
    gradient finite) at the centre.

    Returns ``(alpha_x, alpha_y)`` in arcsec, each with the broadcast shape of the inputs.
    """
    dx, dy = x - center_x, y - center_y
    r2 = dx * dx + dy * dy
    f = theta_e_arcsec * (
        1.0 / (torch.sqrt(r2 + core_arcsec**2) + core_arcsec)
        - 1.0 / (torch.sqrt(r2 + truncation_arcsec**2) + truncation_arcsec)
    )
    return f * dx, f * dy


# ------------------------------------------------------------------------------ external shear
def shear_deflection(
    x: torch.Tensor, y: torch.Tensor, gamma1: Param, gamma2: Param, center_x: Param = 0.0, center_y: Param = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deflection of a constant external shear (lenstronomy's ``SHEAR`` convention).

    Potential ``psi = gamma1 (dx^2 - dy^2) / 2 + gamma2 dx dy`` about ``(center_x, center_y)``, so
    ``alpha = (gamma1 dx + gamma2 dy, gamma2 dx - gamma1 dy)``: convergence zero, shear
    ``(gamma1, gamma2)`` everywhere; magnitude ``sqrt(gamma1^2 + gamma2^2)``, angle
    ``atan2(gamma2, gamma1) / 2`` counter-clockwise from +x. Mass outside the field makes it: a
    convergence map of the field alone cannot (its deflection is not harmonic inside the field).

    Args:
        x, y: positions in arcsec (any broadcastable shape).
        gamma1, gamma2: shear components (dimensionless).
        center_x, center_y: the expansion point in arcsec (the shear is constant; the centre only
            adds a constant deflection, i.e. shifts the source).

    Returns ``(alpha_x, alpha_y)`` in arcsec.
    """
    dx, dy = x - center_x, y - center_y
    return gamma1 * dx + gamma2 * dy, gamma2 * dx - gamma1 * dy


# ------------------------------------------------------------------------------ SIE (cored)
def sie_kappa(
    x: torch.Tensor,
    y: torch.Tensor,
    theta_e_arcsec: Param,
    axis_ratio: Param,
    phi_rad: Param = 0.0,
    center_x: Param = 0.0,
    center_y: Param = 0.0,
    core_arcsec: Param = 0.0,
) -> torch.Tensor:
    """Singular (or cored) isothermal ellipsoid.

    ``kappa = theta_E / (2 sqrt(q x'^2 + y'^2 / q + s^2))`` with core radius ``s``. Coordinates,
    ``theta_E`` and ``s`` in arcsec, ``phi`` in radians; returns the dimensionless convergence with
    the broadcast shape of the inputs.
    """
    xp, yp = _rotate(x, y, center_x, center_y, phi_rad)
    return theta_e_arcsec / (2 * torch.sqrt(axis_ratio * xp**2 + yp**2 / axis_ratio + core_arcsec**2))


def epl_kappa(
    x: torch.Tensor,
    y: torch.Tensor,
    theta_e_arcsec: Param,
    slope: Param,
    axis_ratio: Param,
    phi_rad: Param = 0.0,
    center_x: Param = 0.0,
    center_y: Param = 0.0,
    core_arcsec: Param = 0.0,
) -> torch.Tensor:
    """Elliptical power law (EPL; lenstronomy's ``EPL`` convention).

    ``kappa = (3 - gamma) / 2 * (theta_E / R)^(gamma - 1)``, ``R = sqrt(q x'^2 + y'^2 / q + s^2)``, so
    ``gamma = 2`` is the SIE (:func:`sie_kappa`). Coordinates, ``theta_E`` and the core ``s`` in arcsec,
    ``phi`` in radians, ``gamma`` (the 3-D log-slope, 1 < gamma < 3) dimensionless; returns the
    dimensionless convergence with the broadcast shape of the inputs.
    """
    xp, yp = _rotate(x, y, center_x, center_y, phi_rad)
    r = torch.sqrt(axis_ratio * xp**2 + yp**2 / axis_ratio + core_arcsec**2)
    return (3 - slope) / 2 * (theta_e_arcsec / r) ** (slope - 1)


def sie_deflection(
    x: torch.Tensor,
    y: torch.Tensor,
    theta_e_arcsec: Param,
    axis_ratio: Param,
    phi_rad: Param = 0.0,
    center_x: Param = 0.0,
    center_y: Param = 0.0,
    core_arcsec: Param = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deflection of :func:`sie_kappa` (Keeton 2001, softened isothermal ellipsoid).

    With ``b = theta_E sqrt(q)``, ``s' = s / sqrt(q)``, ``psi = sqrt(q^2 (s'^2 + x'^2) + y'^2)``:
    ``alpha_x' = b / sqrt(1-q^2) atan(sqrt(1-q^2) x' / (psi + s'))``,
    ``alpha_y' = b / sqrt(1-q^2) atanh(sqrt(1-q^2) y' / (psi + q^2 s'))``.

    Returns ``(alpha_x, alpha_y)`` in arcsec (rotated back to the image frame), each with the
    broadcast shape of the inputs.
    """
    xp, yp = _rotate(x, y, center_x, center_y, phi_rad)
    q = _as_tensor_like(axis_ratio, xp)
    s = _as_tensor_like(core_arcsec, xp) / torch.sqrt(q)
    b = theta_e_arcsec * torch.sqrt(q)
    # q -> 1 is a removable singularity; a floor on sqrt(1-q^2) keeps the error below 1e-8.
    e = torch.sqrt((1 - q**2).clamp_min(1e-8))
    psi = torch.sqrt(q**2 * (s**2 + xp**2) + yp**2)
    tiny = torch.finfo(xp.dtype).tiny
    ax = b / e * torch.atan(e * xp / (psi + s + tiny))
    ay = b / e * torch.atanh(e * yp / (psi + q**2 * s + tiny))
    return _unrotate(ax, ay, phi_rad)


def epl_deflection(
    x: torch.Tensor,
    y: torch.Tensor,
    theta_e_arcsec: Param,
    slope: Param,
    axis_ratio: Param,
    phi_rad: Param = 0.0,
    center_x: Param = 0.0,
    center_y: Param = 0.0,
    rel_tol: float = 1e-10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deflection of the singular :func:`epl_kappa` (Tessore & Metcalf 2015, eq. 13 and 29).

    In the frame of the major axis, with ``b = theta_E sqrt(q)``, ``t = gamma - 1``,
    ``f = (1 - q) / (1 + q)``, ``z = q x' + i y'`` (``R = |z|``, ``varphi = arg z``):
    ``alpha' = 2 b / (1 + q) (b / R)^(t - 1) e^(i varphi) 2F1(1, t/2; 2 - t/2; -f e^(2 i varphi))``,
    the hypergeometric function summed as its recurrence
    ``Omega_n = -f (2n - (2 - t)) / (2n + (2 - t)) e^(2 i varphi) Omega_(n-1)`` until ``f^n < rel_tol``
    (``|Omega_n| <= f^n``). Differentiable in every argument; ``gamma = 2`` reduces to
    :func:`sie_deflection`.

    Args:
        x, y: positions in arcsec (any broadcastable shape).
        theta_e_arcsec: Einstein radius (arcsec).
        slope: the 3-D log-slope ``gamma`` (1 < gamma < 3; 2 is isothermal).
        axis_ratio: ``q`` (0 < q <= 1).
        phi_rad, center_x, center_y: position angle (radians) and centre (arcsec).
        rel_tol: truncation of the series (relative).

    Returns ``(alpha_x, alpha_y)`` in arcsec, rotated back to the image frame.
    """
    xp, yp = _rotate(x, y, center_x, center_y, phi_rad)
    q = _as_tensor_like(axis_ratio, xp)
    t = _as_tensor_like(slope, xp) - 1
    b = theta_e_arcsec * torch.sqrt(q)
    z = torch.complex(q * xp, yp)
    r = torch.abs(z).clamp_min(torch.finfo(xp.dtype).tiny ** 0.25)
    phase = z / r
    f = (1 - q) / (1 + q)
    f_max = float(f.detach().max())
    if not 0 <= f_max < 1:
        raise ValueError(f"EPL axis ratio must be in (0, 1], got a minimum of {float(q.detach().min())}")
    n_terms = 1 if f_max == 0 else max(2, math.ceil(math.log(rel_tol) / math.log(f_max)) + 1)
    step = -f * phase * phase
    term = phase
    omega = phase
    for n in range(1, n_terms):
        term = term * ((2 * n - (2 - t)) / (2 * n + (2 - t))) * step
        omega = omega + term
    alpha = 2 * b / (1 + q) * (b / r) ** (t - 1) * omega
    return _unrotate(alpha.real, alpha.imag, phi_rad)


# ------------------------------------------------------------------------------ NFW
def _nfw_f(xr: torch.Tensor) -> torch.Tensor:
    """F(x) of the projected NFW profile (Bartelmann 1996)."""
    one = torch.ones_like(xr)
    lo = xr < 1
    hi = xr > 1
    x_lo = torch.where(lo, xr, 0.5 * one)
    x_hi = torch.where(hi, xr, 2.0 * one)
    f_lo = torch.atanh(torch.sqrt(1 - x_lo**2)) / torch.sqrt(1 - x_lo**2)
    f_hi = torch.atan(torch.sqrt(x_hi**2 - 1)) / torch.sqrt(x_hi**2 - 1)
    return torch.where(lo, f_lo, torch.where(hi, f_hi, one))


def nfw_kappa(
    x: torch.Tensor,
    y: torch.Tensor,
    kappa_s: Param,
    r_s_arcsec: Param,
    center_x: Param = 0.0,
    center_y: Param = 0.0,
) -> torch.Tensor:
    """Spherical NFW convergence ``2 kappa_s (1 - F(x)) / (x^2 - 1)``, ``x = r / r_s``.

    Coordinates and ``r_s`` in arcsec, ``kappa_s`` dimensionless; returns the dimensionless
    convergence with the broadcast shape of the inputs.
    """
    xr = torch.sqrt((x - center_x) ** 2 + (y - center_y) ** 2) / r_s_arcsec
    xr = xr.clamp_min(1e-12)
    near = (xr - 1).abs() < 1e-4
    # Near x = 1 use the Taylor expansion 2 kappa_s (1/3 - 0.4 (x - 1)).
    x_safe = torch.where(near, torch.full_like(xr, 2.0), xr)
    k = 2 * (1 - _nfw_f(x_safe)) / (x_safe**2 - 1)
    k = torch.where(near, 2 * (1 / 3 - 0.4 * (xr - 1)), k)
    return kappa_s * k


def nfw_deflection(
    x: torch.Tensor,
    y: torch.Tensor,
    kappa_s: Param,
    r_s_arcsec: Param,
    center_x: Param = 0.0,
    center_y: Param = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deflection of :func:`nfw_kappa`: ``alpha(r) = 4 kappa_s r_s h(x) / x`` radially,
    ``h(x) = ln(x / 2) + F(x)`` (with F as in the convergence).

    Returns ``(alpha_x, alpha_y)`` in arcsec, each with the broadcast shape of the inputs.
    """
    dx, dy = x - center_x, y - center_y
    r = torch.sqrt(dx**2 + dy**2).clamp_min(1e-12)
    xr = r / r_s_arcsec
    h = torch.log(xr / 2) + _nfw_f(xr)
    amp = 4 * kappa_s * r_s_arcsec * h / xr
    return amp * dx / r, amp * dy / r


# ------------------------------------------------------------------------------ light
def sersic_b(n: float) -> float:
    """Exact Sersic ``b_n`` such that ``R_e`` encloses half the light: ``gamma(2n, b_n) = Gamma(2n)/2``.

    ``n`` (the Sersic index) and the returned scalar ``b_n`` are dimensionless.
    """
    return float(scipy.special.gammaincinv(2 * n, 0.5))


def sersic(
    x: torch.Tensor,
    y: torch.Tensor,
    amplitude: Param,
    r_eff_arcsec: Param,
    n: Param,
    axis_ratio: Param = 1.0,
    phi_rad: Param = 0.0,
    center_x: Param = 0.0,
    center_y: Param = 0.0,
) -> torch.Tensor:
    """Elliptical Sersic surface brightness ``A exp(-b_n ((R / R_e)^{1/n} - 1))``.

    ``R = sqrt(q x'^2 + y'^2 / q)``; ``amplitude`` is the brightness at ``R_e``. Coordinates and
    ``R_e`` in arcsec, ``phi`` in radians; returns the brightness, in the units of ``amplitude``,
    with the broadcast shape of the inputs.
    """
    xp, yp = _rotate(x, y, center_x, center_y, phi_rad)
    r = torch.sqrt(axis_ratio * xp**2 + yp**2 / axis_ratio + 1e-12)
    bn = (
        sersic_b(float(n))
        if not isinstance(n, torch.Tensor)
        else torch.as_tensor(
            scipy.special.gammaincinv(2 * n.detach().cpu().numpy(), 0.5), dtype=xp.dtype, device=xp.device
        )
    )
    return amplitude * torch.exp(-bn * ((r / r_eff_arcsec) ** (1.0 / n) - 1))


def pixelate(
    fn: Callable[..., torch.Tensor],
    grid: PixelGrid,
    supersample: int = 1,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
    **params: Param,
) -> torch.Tensor:
    """Pixel-averaged map of an analytic profile on ``grid``, shape ``1 x 1 x N x N``.

    ``fn(x, y, **params)`` is evaluated on ``supersample x supersample`` sub-pixel centres per pixel
    and averaged, which conserves the mass of cuspy profiles (SIS/SIE) far better than sampling the
    pixel centres. Parameters may be ``B x 1 x 1 x 1`` tensors to get ``B`` maps (shape ``B x 1 x N x N``).
    The map is in the units of ``fn``'s output (dimensionless for a convergence).
    """
    f = int(supersample)
    fine = PixelGrid(grid.n_pixels * f, grid.pixel_scale_arcsec / f)
    x, y = fine.coordinates(torch.float64 if dtype == torch.float64 else torch.float32, device)
    values = fn(x, y, **params)
    values = values.reshape(-1, 1, *values.shape[-2:]) if values.ndim != 4 else values
    if f > 1:
        values = torch.nn.functional.avg_pool2d(values, f)
    return values.to(dtype)
