"""Lensing potential and its second derivatives for a pixelated convergence map.

The lensing potential of a convergence field is (Schneider, Ehlers & Falco 1992, eq. 8.7)

    psi(theta) = 1/pi * integral kappa(theta') ln|theta - theta'| d^2 theta'.

As in :mod:`rimlens.physics.deflection`, each pixel is a point mass ``kappa_p A`` (``A = s^2``, ``s``
the pixel scale in arcsec) at its centre:

    psi[i, j] = s^2 / pi * [ sum_{(k, l) != (i, j)} kappa[k, l] ln(s r)  +  kappa[i, j] (ln s + c) ],
    r = sqrt((j - l)^2 + (i - k)^2)  (pixels).

The point-mass self term is infinite and is replaced by a finite ``c`` (the value given to ``ln r`` at
``r = 0``, pixel units). It only adds the local term ``(s^2 c / pi) kappa`` and is chosen with
``self_term`` (constants in :data:`SELF_TERMS`):

* ``"deflection"`` (default), ``c = 1/2 - ln(Gamma(1/4)^2 / (2 sqrt(pi))) = -0.81053``: the map is the
  potential *of rimlens' deflection*. Its gradient (by any consistent finite-difference stencil)
  equals :func:`rimlens.physics.deflection` up to terms of order ``s^4``: the point-mass sum for the
  deflection carries a local error ``+ s^2 grad(kappa) / (2 pi)`` with respect to the continuous
  field, and this self term carries the matching ``+ s^2 kappa / (2 pi)``. Use it to export a
  rimlens model (potential and deflection of one and the same lens).
* ``"continuum"``, ``c = -ln(Gamma(1/4)^2 / (2 sqrt(pi))) = -1.31053``: the zeta-regularised lattice
  constant (``c = Z'(0) / 2`` with ``Z(s) = sum' |q|^-2s`` over the square lattice); with it the
  midpoint sum approximates the potential of a smooth continuous ``kappa`` to order ``s^4``
  (the other choices differ from it by the local term above).
* ``"pixel_mean"``, ``c = pi/4 - 3/2 - ln(2)/2 = -1.06118``: the mean of ``ln r`` over the pixel's own
  square (the potential at the centre of a uniform square pixel); it lies about half-way between the
  other two (order-``s^2`` errors of ``s^2 kappa / (4 pi)`` against both).

Conventions and units:

* ``ln`` takes the separation in **arcsec**: another unit only adds the constant
  ``(A / pi) ln(unit) sum kappa``; the potential is defined up to an additive constant (only its
  derivatives and differences enter lensing observables).
* ``psi`` is in arcsec^2, its first derivatives (the deflection) in arcsec, its second derivatives
  are dimensionless.
* Maps are ``B x 1 x N x N``, ``x`` along columns, ``y`` along rows, row 0 at the bottom
  (:class:`rimlens.physics.PixelGrid`).

Both functions use FFTs on a grid padded to ``2N``: the circular convolution equals the linear one
on the ``N x N`` output (no wrap-around, no approximation beyond the pixelisation above).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from rimlens.errors import RimlensInputError, check_map, check_positive_scalar

__all__ = ["SELF_TERMS", "SelfTerm", "lensing_hessian", "lensing_potential"]

SelfTerm = Literal["deflection", "continuum", "pixel_mean"]
"""Name of a self-term choice of :func:`lensing_potential`."""

_LATTICE_LOG = -math.log(math.gamma(0.25) ** 2 / (2 * math.sqrt(math.pi)))  # -1.3105329259...

SELF_TERMS: dict[str, float] = {
    "deflection": _LATTICE_LOG + 0.5,
    "continuum": _LATTICE_LOG,
    "pixel_mean": math.pi / 4 - 1.5 - 0.5 * math.log(2.0),
}
"""Value given to ``ln r`` at ``r = 0`` (pixel units) by each ``self_term`` of :func:`lensing_potential`."""

_SPECTRUM_CACHE: dict[tuple[str, int, torch.dtype, str], torch.Tensor] = {}
_CACHE_MAX = 16


def _kernels(kind: str, n_pixels: int) -> torch.Tensor:
    """Kernels in pixel units on the wrapped ``2N x 2N`` grid, shape ``C x 2N x 2N`` (float64).

    ``kind='psi'``: ``ln(r) / pi`` (zero at ``r = 0``; the self term is added separately).
    ``kind='hessian'``: the traceless second derivatives of the point-mass potential,
    ``(di^2 - dj^2) / (pi r^4)`` (the xx part, gamma_1) and ``-2 di dj / (pi r^4)`` (xy, gamma_2),
    zero at ``r = 0`` by the symmetry of the square pixel.
    """
    p = 2 * n_pixels
    o = torch.arange(p, dtype=torch.float64)
    o = torch.where(o < n_pixels, o, o - p)  # wrapped offsets: 0..N-1, -N..-1
    di, dj = torch.meshgrid(o, o, indexing="ij")  # row (y) and column (x) offsets
    r2 = di**2 + dj**2
    r2[0, 0] = 1.0
    if kind == "psi":
        k = (0.5 * torch.log(r2) / math.pi)[None]
    else:
        k = torch.stack([di**2 - dj**2, -2.0 * di * dj]) / (math.pi * r2**2)
    k[:, 0, 0] = 0.0
    # The offset -N never occurs for an N x N map; zero it so the kernels keep their exact symmetry.
    k[:, n_pixels, :] = 0.0
    k[:, :, n_pixels] = 0.0
    return k


def _spectrum(kind: str, n_pixels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """rFFT of :func:`_kernels`, shape ``C x 2N x (N+1)``, cached per (kind, N, dtype, device)."""
    key = (kind, n_pixels, dtype, str(device))
    spec = _SPECTRUM_CACHE.get(key)
    if spec is not None:
        return spec
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    spec = torch.fft.rfft2(_kernels(kind, n_pixels)).to(device=device, dtype=complex_dtype)
    if len(_SPECTRUM_CACHE) >= _CACHE_MAX:
        _SPECTRUM_CACHE.pop(next(iter(_SPECTRUM_CACHE)))
    _SPECTRUM_CACHE[key] = spec
    return spec


def _convolve(kappa: torch.Tensor, spec: torch.Tensor) -> torch.Tensor:
    """Linear convolution of ``B x 1 x N x N`` maps with ``C`` kernel spectra: ``B x C x N x N``."""
    n = kappa.shape[-1]
    p = 2 * n
    kappa_hat = torch.fft.rfft2(kappa, s=(p, p))  # B x 1 x P x (P//2+1)
    return torch.fft.irfft2(kappa_hat * spec, s=(p, p))[..., :n, :n]


def lensing_potential(
    kappa: torch.Tensor, pixel_scale_arcsec: float, *, self_term: SelfTerm = "deflection"
) -> torch.Tensor:
    """Lensing potential of a pixelated convergence map.

    Args:
        kappa: convergence, shape ``B x 1 x N x N``, dimensionless; float32 or float64; CPU or CUDA.
        pixel_scale_arcsec: pixel size of the map in arcsec.
        self_term: finite value of a pixel's own contribution (see the module docstring):
            ``"deflection"`` makes the gradient of the map :func:`rimlens.physics.deflection`,
            ``"continuum"`` approximates the potential of a smooth continuous convergence best,
            ``"pixel_mean"`` uses the mean of ``ln r`` over the pixel.

    Returns:
        ``B x 1 x N x N`` potential in arcsec^2 at the pixel centres,
        ``psi = (s^2 / pi) sum_p kappa_p ln|theta - theta_p|`` (separations in arcsec), defined up
        to an additive constant.

    Raises:
        RimlensInputError: malformed ``kappa``, non-positive scale or unknown ``self_term``.
    """
    check_map(kappa, "kappa")
    s = check_positive_scalar(pixel_scale_arcsec, "pixel_scale_arcsec")
    if self_term not in SELF_TERMS:
        raise RimlensInputError(f"self_term must be one of {sorted(SELF_TERMS)}, got {self_term!r}")
    spec = _spectrum("psi", kappa.shape[-1], kappa.dtype, kappa.device)
    psi_pix = _convolve(kappa, spec) + kappa * (SELF_TERMS[self_term] / math.pi)  # sum kappa ln(r / px) / pi
    total = kappa.sum(dim=(-2, -1), keepdim=True)
    return s**2 * (psi_pix + total * (math.log(s) / math.pi))


def lensing_hessian(kappa: torch.Tensor) -> torch.Tensor:
    """Second derivatives of the lensing potential at the pixel centres (dimensionless).

    The traceless part (the shear) is the point-mass sum over the other pixels, as for the deflection
    (a pixel's own contribution to it vanishes by the symmetry of the square); the trace is
    ``psi_xx + psi_yy = 2 kappa`` (Poisson's equation) exactly. It does not depend on the pixel scale
    (nor on the self term of :func:`lensing_potential`).

    Args:
        kappa: convergence, shape ``B x 1 x N x N``, dimensionless; float32 or float64; CPU or CUDA.

    Returns:
        ``B x 3 x N x N`` tensor with channels ``psi_xx, psi_yy, psi_xy``
        (``psi_xx = kappa + gamma_1``, ``psi_yy = kappa - gamma_1``, ``psi_xy = gamma_2``).
    """
    check_map(kappa, "kappa")
    spec = _spectrum("hessian", kappa.shape[-1], kappa.dtype, kappa.device)
    gamma = _convolve(kappa, spec)  # B x 2 x N x N: gamma_1, gamma_2
    g1, g2 = gamma[:, 0:1], gamma[:, 1:2]
    return torch.cat([kappa + g1, kappa - g1, g2], dim=1)
