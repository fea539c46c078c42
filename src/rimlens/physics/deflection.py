"""Deflection angles of a pixelated convergence map.

The deflection of a convergence field is (Schneider, Ehlers & Falco 1992, eq. 8.8)

    alpha(theta) = 1/pi * integral kappa(theta') (theta - theta') / |theta - theta'|^2 d^2 theta'.

Treating each pixel as a point mass of ``kappa * s^2`` at its centre gives the exact discrete
convolution

    alpha_x[i, j] = s / pi * sum_{k, l} kappa[k, l] (j - l) / ((j - l)^2 + (i - k)^2)

(and ``alpha_y`` with ``(i - k)`` in the numerator), the self term being zero by symmetry.
We evaluate it with FFTs on a grid padded to ``2N`` so that the circular convolution equals the
linear one on the ``N x N`` output: no wrap-around, no approximation.

Unlike the Censai code (docs/censai_as_run.md section 1.2) there is no ``N/(N-1)`` rescaling: the kernel
distances use the same pixel scale as the map.
"""

from __future__ import annotations

import math

import torch

from rimlens.errors import check_map, check_positive_scalar

__all__ = ["deflection", "deflection_field"]

_SPECTRUM_CACHE: dict[tuple[int, torch.dtype, str], torch.Tensor] = {}
_CACHE_MAX = 16
_CHUNK_BYTES = 4 * 2**20  # target size of the spectra of one chunk of a large batch


def _kernel_spectrum(n_pixels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """rFFT of the (x, y) deflection kernels in pixel units, shape ``2 x P x (P//2+1)``.

    The kernel ``(dj, di) / (pi (dj^2 + di^2))`` is placed at wrapped offsets on a ``P = 2N`` grid.
    Computed in float64 and cached per (N, dtype, device).
    """
    key = (n_pixels, dtype, str(device))
    spec = _SPECTRUM_CACHE.get(key)
    if spec is not None:
        return spec
    p = 2 * n_pixels
    offsets = torch.arange(p, dtype=torch.float64)
    offsets = torch.where(offsets < n_pixels, offsets, offsets - p)  # wrapped: 0..N-1, -N..-1
    di, dj = torch.meshgrid(offsets, offsets, indexing="ij")
    r2 = di**2 + dj**2
    r2[0, 0] = 1.0
    kx = dj / (math.pi * r2)
    ky = di / (math.pi * r2)
    kx[0, 0] = 0.0
    ky[0, 0] = 0.0
    # The offset -N never occurs for an N x N map; zero it so the kernel is exactly antisymmetric.
    kx[n_pixels, :] = 0.0
    kx[:, n_pixels] = 0.0
    ky[n_pixels, :] = 0.0
    ky[:, n_pixels] = 0.0
    spec = torch.fft.rfft2(torch.stack([kx, ky]))
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    spec = spec.to(device=device, dtype=complex_dtype)
    if len(_SPECTRUM_CACHE) >= _CACHE_MAX:
        _SPECTRUM_CACHE.pop(next(iter(_SPECTRUM_CACHE)))
    _SPECTRUM_CACHE[key] = spec
    return spec


def deflection_field(kappa: torch.Tensor, pixel_scale: float, *, check: bool = True) -> torch.Tensor:
    """Deflection of a pixelated convergence map, stacked as one tensor.

    Args:
        kappa: convergence, shape ``B x 1 x N x N``, dimensionless.
        pixel_scale: pixel size of the map in arcsec.
        check: validate the inputs (shape, finiteness, scale).

    Returns:
        ``B x 2 x N x N`` tensor, channel 0 = alpha_x, channel 1 = alpha_y, in arcsec, at the pixel
        centres of the map's own grid.
    """
    if check:
        check_map(kappa, "kappa")
        pixel_scale = check_positive_scalar(pixel_scale, "pixel_scale")
    n = kappa.shape[-1]
    spec = _kernel_spectrum(n, kappa.dtype, kappa.device)
    # Large batches are processed in chunks whose spectra stay in cache (3-4x faster at N = 128).
    per_example = 2 * spec.shape[-2] * spec.shape[-1] * spec.element_size()
    chunk = max(1, _CHUNK_BYTES // per_example)
    if kappa.shape[0] <= chunk:
        return _deflection_fft(kappa, spec, pixel_scale)
    return torch.cat([_deflection_fft(k, spec, pixel_scale) for k in kappa.split(chunk)])


def _deflection_fft(kappa: torch.Tensor, spec: torch.Tensor, pixel_scale: float) -> torch.Tensor:
    """Linear convolution with the kernel by zero-padded FFTs, skipping the transforms of rows
    that are known to be zero (input) or are not needed (output)."""
    n = kappa.shape[-1]
    p = 2 * n
    kappa_hat = torch.fft.fft(torch.fft.rfft(kappa, n=p, dim=-1), n=p, dim=-2)  # B x 1 x P x (P//2+1)
    rows = torch.fft.ifft(kappa_hat * spec, dim=-2)[..., :n, :]  # B x 2 x N x (P//2+1)
    return torch.fft.irfft(rows, n=p, dim=-1)[..., :n] * pixel_scale


def deflection(kappa: torch.Tensor, pixel_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Deflection ``(alpha_x, alpha_y)`` in arcsec of a ``B x 1 x N x N`` convergence map.

    Args:
        kappa: convergence, shape ``B x 1 x N x N``; float32 or float64; CPU or CUDA.
        pixel_scale: pixel size in arcsec (the map follows rimlens' grid convention).

    Returns:
        Two tensors of shape ``B x 1 x N x N`` with the deflection components in arcsec.
    """
    alpha = deflection_field(kappa, pixel_scale)
    return alpha[:, 0:1], alpha[:, 1:2]
