"""Bilinear source sampling and PSF convolution (docs/validation.md items 10-12)."""

import numpy as np
import pytest
import torch
from scipy.interpolate import RegularGridInterpolator
from scipy.signal import convolve2d

from rimlens.physics import PSF, LensSimulator, PixelGrid, sample_bilinear


def test_bilinear_matches_scipy(rng):
    grid = PixelGrid(17, 0.2)
    src = torch.rand(1, 1, 17, 17, generator=rng, dtype=torch.float64)
    half = 8 * 0.2
    bx = (torch.rand(1, 40, 40, generator=rng, dtype=torch.float64) * 2 - 1) * half
    by = (torch.rand(1, 40, 40, generator=rng, dtype=torch.float64) * 2 - 1) * half
    ours = sample_bilinear(src, grid, bx, by)[0, 0].numpy()
    a = grid.axis(torch.float64).numpy()
    # scipy takes (row, col) = (y, x) with row 0 at y = a[0]
    interp = RegularGridInterpolator((a, a), src[0, 0].numpy(), method="linear")
    ref = interp(np.stack([by[0].numpy().ravel(), bx[0].numpy().ravel()], -1)).reshape(40, 40)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


def test_sampling_at_pixel_centres_is_identity_and_outside_is_zero(rng):
    grid = PixelGrid(9, 0.1)
    src = torch.rand(2, 1, 9, 9, generator=rng, dtype=torch.float64)
    x, y = grid.coordinates(torch.float64)
    out = sample_bilinear(src, grid, x.expand(2, 9, 9), y.expand(2, 9, 9))
    assert torch.allclose(out, src, atol=1e-12)
    far = torch.full((2, 3, 3), 5.0, dtype=torch.float64)
    assert torch.all(sample_bilinear(src, grid, far, far) == 0)


def test_linear_fall_off_beyond_the_outermost_centres():
    # zero padding: half a pixel beyond the last centre the brightness is half the edge value,
    # one pixel beyond it is zero
    grid = PixelGrid(5, 0.2)
    src = torch.ones(1, 1, 5, 5, dtype=torch.float64)
    edge = 2 * 0.2
    x = torch.tensor([[[edge, edge + 0.1, edge + 0.2, edge + 0.3]]], dtype=torch.float64)
    y = torch.zeros_like(x)
    out = sample_bilinear(src, grid, x, y)[0, 0, 0]
    assert torch.allclose(out, torch.tensor([1.0, 0.5, 0.0, 0.0], dtype=torch.float64), atol=1e-12)


def test_finer_source_grid_reproduces_zero_padded_copy():
    # image pixels at the centres of a 2x coarser source grid: every second image pixel = source pixel
    src_grid = PixelGrid(5, 0.2)
    img_grid = PixelGrid(9, 0.1)
    src = torch.arange(25, dtype=torch.float64).reshape(1, 1, 5, 5)
    x, y = img_grid.coordinates(torch.float64)
    out = sample_bilinear(src, src_grid, x[None], y[None])
    assert torch.allclose(out[0, 0, ::2, ::2], src[0, 0])


def test_rays_mapped_to_origin_see_the_central_source_pixel():
    # a deflection equal to theta sends every ray to beta = 0 (caustics test_pixelated_deflection)
    img_grid, src_grid = PixelGrid(16, 0.1), PixelGrid(11, 0.05)
    sim = LensSimulator(img_grid, src_grid)
    x, y = img_grid.coordinates(torch.float64)
    alpha = torch.stack([x, y])[None]
    src = torch.zeros(1, 1, 11, 11, dtype=torch.float64)
    src[0, 0, 5, 5] = 3.0
    out = sim.lens(src, alpha=alpha)
    assert torch.allclose(out, torch.full_like(out, 3.0), atol=1e-10)


def _asymmetric_kernel(k, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    kern = torch.rand(batch, 1, k, k, generator=g, dtype=torch.float64) ** 3
    kern[:, :, 0, -1] += 2.0  # strongly asymmetric
    return kern


@pytest.mark.parametrize("k", [3, 7, 11])
def test_fft_psf_matches_direct_and_scipy(k, rng):
    img = torch.rand(2, 1, 32, 32, generator=rng, dtype=torch.float64)
    psf = PSF.from_kernel(_asymmetric_kernel(k, batch=2))
    fft = psf.convolve(img, method="fft")
    direct = psf.convolve(img, method="direct")
    assert torch.allclose(fft, direct, atol=1e-6, rtol=0)
    # independent reference: scipy's true 2-D convolution, 'same' mode, zero fill
    for b in range(2):
        ref = convolve2d(img[b, 0].numpy(), psf.kernel[b, 0].numpy(), mode="same", boundary="fill")
        np.testing.assert_allclose(fft[b, 0].numpy(), ref, atol=1e-6)


def test_psf_direction_convention():
    # light at kernel offset (+1 column) moves a point source one pixel right (towards +x)
    kern = torch.zeros(3, 3, dtype=torch.float64)
    kern[1, 2] = 1.0
    img = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    img[0, 0, 4, 4] = 1.0
    for method in ("fft", "direct"):
        out = PSF.from_kernel(kern).convolve(img, method=method)
        assert float(out[0, 0, 4, 5]) == pytest.approx(1.0)


def test_gaussian_separable_matches_fft_and_conserves_flux():
    fwhm = torch.tensor([0.08, 0.25, 0.15])
    psf = PSF.gaussian(fwhm, 0.06, dtype=torch.float64)
    img = torch.zeros(3, 1, 64, 64, dtype=torch.float64)
    img[:, :, 30:34, 25:40] = 1.0
    sep = psf.convolve(img)  # auto -> separable
    fft = psf.convolve(img, method="fft")
    assert torch.allclose(sep, fft, atol=1e-10)
    assert torch.allclose(sep.sum(dim=(-2, -1)), img.sum(dim=(-2, -1)), rtol=1e-12)
    assert torch.allclose(psf.kernel.sum(dim=(-2, -1)), torch.ones(3, 1, dtype=torch.float64))
    # the kernel's variance is the requested one (sigma = FWHM / 2.3548), to sampling accuracy
    k = psf.kernel[1, 0]
    u = torch.arange(k.shape[-1], dtype=torch.float64) - k.shape[-1] // 2
    var = float((k.sum(0) * u**2).sum()) * 0.06**2
    assert var == pytest.approx((0.25 / 2.354820045) ** 2, rel=1e-3)


def test_per_example_psfs_are_applied_per_example(rng):
    img = torch.rand(2, 1, 24, 24, generator=rng, dtype=torch.float64)
    psf = PSF.gaussian(torch.tensor([0.1, 0.3]), 0.05, dtype=torch.float64)
    both = psf.convolve(img)
    for b in range(2):
        single = PSF.gaussian(float(psf_fwhm := [0.1, 0.3][b]), 0.05, size=psf.size, dtype=torch.float64).convolve(
            img[b : b + 1]
        )
        assert torch.allclose(both[b : b + 1], single, atol=1e-12), psf_fwhm
