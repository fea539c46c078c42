"""Flux-conserving resampling between centred pixel grids.

Each output pixel takes the area-weighted average of the input pixels it overlaps (input pixels
are constant over their area). The operation is separable: ``out = W_rows @ in @ W_cols^T`` with
``W[o, i] = overlap(o, i) / output pixel size``. Densities (surface brightness, convergence) are
averaged; the total flux ``sum(values) * scale^2`` of everything inside the output field is
conserved exactly.
"""

from __future__ import annotations

import torch
from torch.types import Device

from rimlens.errors import RimlensInputError, check_positive_scalar

__all__ = ["overlap_matrix", "resample_density", "resample_flux", "resample_variance", "sample_kernel_at_centres"]


def overlap_matrix(
    n_in: int,
    scale_in: float,
    n_out: int,
    scale_out: float,
    dtype: torch.dtype = torch.float64,
    device: Device = None,
    center_in: float = 0.0,
) -> torch.Tensor:
    """``n_out x n_in`` weights: overlap length of each (output, input) pixel pair divided by the
    output pixel size. The output grid is centred on 0; the input grid's centre is at ``-center_in``
    (i.e. the input point ``center_in`` (arcsec from the input's centre) lands on the output centre).

    ``scale_in`` and ``scale_out`` are the pixel sizes in arcsec; the weights are dimensionless."""
    scale_in = check_positive_scalar(scale_in, "scale_in")
    scale_out = check_positive_scalar(scale_out, "scale_out")
    e_in = (torch.arange(n_in + 1, dtype=torch.float64, device=device) - n_in / 2) * scale_in - center_in
    e_out = (torch.arange(n_out + 1, dtype=torch.float64, device=device) - n_out / 2) * scale_out
    lo = torch.maximum(e_out[:-1, None], e_in[None, :-1])
    hi = torch.minimum(e_out[1:, None], e_in[None, 1:])
    return ((hi - lo).clamp_min(0) / scale_out).to(dtype)


def resample_density(
    maps: torch.Tensor, scale_in: float, n_out: int, scale_out: float, center_in: tuple[float, float] = (0.0, 0.0)
) -> torch.Tensor:
    """Resample ``... x M x M`` density maps to ``... x n_out x n_out`` pixels of ``scale_out``.

    Pixel scales are in arcsec; the output is in the (per-area) units of ``maps``.
    ``center_in = (x, y)`` (arcsec from the input's centre) becomes the output's centre. Regions of
    the output outside the input field are zero.
    """
    w_rows = overlap_matrix(maps.shape[-2], scale_in, n_out, scale_out, maps.dtype, maps.device, center_in[1])
    w_cols = overlap_matrix(maps.shape[-1], scale_in, n_out, scale_out, maps.dtype, maps.device, center_in[0])
    return w_rows @ maps @ w_cols.T


def resample_flux(
    images: torch.Tensor, scale_in: float, n_out: int, scale_out: float, center_in: tuple[float, float] = (0.0, 0.0)
) -> torch.Tensor:
    """Resample images in flux per pixel (counts): the sum over the overlapping field is conserved.

    ``... x M x M`` in, ``... x n_out x n_out`` out, in the units of ``images``; arguments as in
    :func:`resample_density`.
    """
    return resample_density(images, scale_in, n_out, scale_out, center_in) * (scale_out / scale_in) ** 2


def resample_variance(
    variance: torch.Tensor,
    scale_in: float,
    n_out: int,
    scale_out: float,
    center_in: tuple[float, float] = (0.0, 0.0),
) -> torch.Tensor:
    """Variance (flux units) of :func:`resample_flux` outputs for independent input pixels:
    ``var_out = sum_i (w_i (s_out/s_in)^2)^2 var_i`` (correlations between output pixels ignored).

    ``... x M x M`` in, ``... x n_out x n_out`` out, in the units of ``variance`` (flux squared);
    arguments as in :func:`resample_density`."""
    w_rows = overlap_matrix(
        variance.shape[-2], scale_in, n_out, scale_out, variance.dtype, variance.device, center_in[1]
    )
    w_cols = overlap_matrix(
        variance.shape[-1], scale_in, n_out, scale_out, variance.dtype, variance.device, center_in[0]
    )
    return (w_rows**2) @ variance @ (w_cols**2).T * (scale_out / scale_in) ** 4


def tent_matrix(
    n_in: int, scale_in: float, n_out: int, scale_out: float, dtype: torch.dtype = torch.float64, device: Device = None
) -> torch.Tensor:
    """``n_out x n_in`` linear-interpolation weights ``max(0, 1 - |x_o - x_i| / scale_in)`` between two
    grids centred on 0 (pixel centres ``x = (i - (n - 1) / 2) * scale``, arcsec); dimensionless."""
    scale_in = check_positive_scalar(scale_in, "scale_in")
    scale_out = check_positive_scalar(scale_out, "scale_out")
    x_in = (torch.arange(n_in, dtype=torch.float64, device=device) - (n_in - 1) / 2) * scale_in
    x_out = (torch.arange(n_out, dtype=torch.float64, device=device) - (n_out - 1) / 2) * scale_out
    return (1 - (x_out[:, None] - x_in[None, :]).abs() / scale_in).clamp_min(0).to(dtype)


def sample_kernel_at_centres(kernel: torch.Tensor, scale_in: float, n_out: int, scale_out: float) -> torch.Tensor:
    """A PSF kernel ``... x K x K`` (pixels of ``scale_in``) sampled at the centres of ``n_out x n_out``
    pixels of ``scale_out`` by bilinear interpolation, normalised to unit sum.

    Why bilinear, and why not :func:`resample_density`: an image model that already integrates over
    its pixels (supersampled ray tracing, the MGE lens light) must be convolved with the PSF *sampled*
    at the model's pixel centres -- the area-averaged kernel of :func:`resample_density` carries the
    model pixel's response a second time (a 0.12" box on top of a ~0.1" PSF). The data were resampled
    from their own pixels by area overlap, which adds one input-pixel box to them; sampling the input
    kernel's piecewise-constant interpolant averaged over one input pixel -- a tent, i.e. bilinear
    interpolation -- adds the same box to the kernel.
    """
    k = kernel.to(torch.float64)
    w_rows = tent_matrix(k.shape[-2], scale_in, n_out, scale_out, device=k.device)
    w_cols = tent_matrix(k.shape[-1], scale_in, n_out, scale_out, device=k.device)
    out = w_rows @ k @ w_cols.T
    total = out.sum(dim=(-2, -1), keepdim=True)
    if bool((total <= 0).any()):
        raise RimlensInputError("the PSF has no positive flux at the model's pixel centres")
    return out / total
