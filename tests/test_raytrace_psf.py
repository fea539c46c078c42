"""Bilinear source sampling and PSF convolution (docs/validation.md items 10-12)."""

import numpy as np
import pytest
import torch
from scipy.interpolate import RegularGridInterpolator
from scipy.signal import convolve2d

from rimlens.errors import RimlensInputError
from rimlens.physics import PSF, LensSimulator, PixelGrid, deflection_field, profiles, sample_bilinear
from rimlens.physics.deflection import deflection_supersampled
from rimlens.physics.raytrace import pixel_average, supersampled_grid


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


@pytest.mark.parametrize(("k", "n", "margin"), [(7, 30, 3), (9, 31, 6), (11, 40, 9)])
def test_interior_convolution_is_the_linear_convolution_cropped(k, n, margin, rng):
    # the circular FFT on the canvas' own size must equal scipy's zero-padded convolution of the whole
    # canvas, cropped: odd and even canvases, margins at and beyond the half-size, a per-example PSF
    img = torch.rand(2, 1, n, n, generator=rng, dtype=torch.float64)
    psf = PSF.from_kernel(_asymmetric_kernel(k, batch=2))
    inner = psf.convolve_interior(img, margin)
    assert inner.shape == (2, 1, n - 2 * margin, n - 2 * margin)
    for b in range(2):
        ref = convolve2d(img[b, 0].numpy(), psf.kernel[b, 0].numpy(), mode="same", boundary="fill")
        np.testing.assert_allclose(inner[b, 0].numpy(), ref[margin : n - margin, margin : n - margin], atol=1e-12)
    with pytest.raises(RimlensInputError, match="half-size"):
        psf.convolve_interior(img, k // 2 - 1)


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


# ------------------------------------------------------------------ supersampled (pixel-integrated) images
def _lens(n=12, m=10, batch=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    img, src = PixelGrid(n, 0.12), PixelGrid(m, 0.1)
    x, y = img.coordinates(dtype)
    theta_e = torch.linspace(0.4, 0.5, batch, dtype=dtype).reshape(-1, 1, 1, 1)
    kappa = profiles.sie_kappa(x, y, theta_e, 0.7, 0.3, core_arcsec=0.1)
    sx, sy = src.coordinates(dtype)
    source = profiles.sersic(sx, sy, 1.0, 0.15, 1.0, 0.8, 0.2, 0.05, 0.0).expand(batch, 1, m, m).clone()
    source = source + 0.05 * torch.rand(source.shape, generator=g, dtype=dtype)
    return img, src, kappa, source, g


def test_supersampled_grid_and_pixel_average():
    grid = PixelGrid(4, 0.3)
    fine = supersampled_grid(grid, 3)
    assert fine.n_pixels == 12 and fine.pixel_scale_arcsec == pytest.approx(0.1) and supersampled_grid(grid, 1) is grid
    # the fine pixels of coarse pixel i are centred at x_i + ((k + 1/2)/3 - 1/2) * 0.3
    sub = fine.axis(torch.float64).reshape(4, 3) - grid.axis(torch.float64)[:, None]
    assert torch.allclose(sub, torch.tensor([-0.1, 0.0, 0.1], dtype=torch.float64).expand(4, 3), atol=1e-15)
    img = torch.arange(16.0).reshape(1, 1, 4, 4)
    up = img.repeat_interleave(3, -1).repeat_interleave(3, -2)
    assert torch.equal(pixel_average(up, 3), img) and pixel_average(img, 1) is img
    for bad in (0, 2.0, True):
        with pytest.raises(RimlensInputError):
            supersampled_grid(grid, bad)
        with pytest.raises(RimlensInputError):
            LensSimulator(grid, grid, supersample=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_supersample_one_is_point_sampling_bit_for_bit(dtype):
    img, src, kappa, source, _ = _lens(dtype=dtype)
    alpha = deflection_field(kappa, img.pixel_scale_arcsec)
    x, y = img.coordinates(dtype)
    manual = sample_bilinear(source, src, x - alpha[:, 0], y - alpha[:, 1])
    for sim in (LensSimulator(img, src), LensSimulator(img, src, supersample=1)):
        assert sim.ray_grid == img
        assert torch.equal(sim.lens(source, kappa), manual)
        psf = PSF.gaussian(0.15, img.pixel_scale_arcsec, dtype=dtype)
        assert torch.equal(sim.forward(source, kappa, psf), psf.convolve(manual))


@pytest.mark.parametrize("factor", [2, 3])
def test_supersampled_image_is_the_mean_of_sub_pixel_samples(factor):
    # independent construction: for each sub-pixel offset, shift the pixel-centre coordinates, evaluate
    # the analytic deflection there, sample the source, and average the f^2 images
    img, src, _, source, _ = _lens()
    sim = LensSimulator(img, src, supersample=factor)
    assert sim.ray_grid == PixelGrid(img.n_pixels * factor, img.pixel_scale_arcsec / factor)
    x, y = img.coordinates(torch.float64)
    s = img.pixel_scale_arcsec
    sub = [((k + 0.5) / factor - 0.5) * s for k in range(factor)]
    manual = torch.zeros(2, 1, 12, 12, dtype=torch.float64)
    for dy in sub:
        for dx in sub:
            ax, ay = profiles.sie_deflection(x + dx, y + dy, 0.45, 0.7, 0.3, core_arcsec=0.05)
            manual += sample_bilinear(source, src, (x + dx - ax).expand(2, -1, -1), (y + dy - ay).expand(2, -1, -1))
    manual /= factor**2
    fx, fy = sim.ray_grid.coordinates(torch.float64)
    alpha = torch.stack(profiles.sie_deflection(fx, fy, 0.45, 0.7, 0.3, core_arcsec=0.05))[None]
    assert torch.allclose(sim.lens(source, alpha=alpha), manual, rtol=0, atol=1e-13)
    # a convergence map: the rays use its sub-pixel deflection
    _, _, kappa, _, _ = _lens()
    via_alpha = sim.lens(source, alpha=deflection_supersampled(kappa, s, factor))
    assert torch.equal(sim.lens(source, kappa), via_alpha)
    assert torch.equal(sim.ray_deflection(kappa), deflection_supersampled(kappa, s, factor))
    assert sim.deflection(kappa).shape == (2, 2, 12, 12)  # the pixel-centre deflection is unchanged


def test_supersampled_alpha_must_be_on_the_ray_grid():
    img, src, kappa, source, _ = _lens()
    sim = LensSimulator(img, src, supersample=2)
    coarse = deflection_field(kappa, img.pixel_scale_arcsec)
    with pytest.raises(RimlensInputError, match="B x 2 x 24 x 24"):
        sim.lens(source, alpha=coarse)
    with pytest.raises(RimlensInputError):
        LensSimulator(img, src).lens(source, alpha=torch.zeros(2, 2, 24, 24, dtype=torch.float64))
    assert "supersample=2" in repr(sim) and "supersample" not in repr(LensSimulator(img, src))


@pytest.mark.parametrize("factor", [2, 3])
def test_supersampled_likelihood_gradient_gradcheck(factor):
    n, m = 6, 6
    img, src, kappa, source, g = _lens(n=n, m=m)
    sim = LensSimulator(img, src, supersample=factor)
    psf = PSF.gaussian(0.2, img.pixel_scale_arcsec, size=3, dtype=torch.float64)
    sigma = torch.tensor([0.02, 0.05], dtype=torch.float64)
    obs = sim.simulate(source, kappa, psf, sigma, generator=g).observation
    eta = torch.log10(kappa)

    def half_chi2(s, e):
        return 0.5 * sim.chi_squared(obs, s, 10**e, psf, sigma, check=False).sum()

    s = (source + 0.1).requires_grad_(True)
    e = (eta - 0.05).requires_grad_(True)
    assert torch.autograd.gradcheck(half_chi2, (s, e), eps=1e-6, atol=1e-5, rtol=1e-4)
    ref_s, ref_e = torch.autograd.grad(half_chi2(s, e), (s, e))
    for functional in (False, True):
        g_s, g_e, chi2 = sim.likelihood_gradient(obs, s.detach(), e.detach(), psf, sigma, functional=functional)
        assert torch.allclose(g_s, ref_s, rtol=1e-10, atol=1e-12) and torch.allclose(g_e, ref_e, rtol=1e-10, atol=1e-12)
        assert torch.allclose(0.5 * chi2.sum(), half_chi2(s, e))
    # second order (fine-tuning differentiates through the gradient)
    g_s, g_e, _ = sim.likelihood_gradient(obs, s, e, psf, sigma, create_graph=True)
    (hvp,) = torch.autograd.grad((g_e**2).sum(), s)
    assert hvp.shape == s.shape and bool(torch.isfinite(hvp).all()) and float(hvp.abs().max()) > 0
    # per-example gradients with vmap over the functional path
    per = torch.func.vmap(
        lambda o, s1, e1: sim.likelihood_gradient(o[None], s1[None], e1[None], psf, 0.03, functional=True, check=False)[
            1
        ]
    )(obs, s.detach(), e.detach())
    whole = sim.likelihood_gradient(obs, s.detach(), e.detach(), psf, 0.03)[1]
    assert torch.allclose(per[:, 0], whole, rtol=1e-10, atol=1e-12)


def test_grid_config_supersample_reaches_the_simulators():
    from rimlens.config import GridConfig, RIMConfig, from_dict
    from rimlens.nn.rim import RIM

    assert GridConfig().supersample == 1
    grid = from_dict(GridConfig, {"image_pixels": 32, "source_pixels": 32, "supersample": 3})
    assert RIM(RIMConfig(), grid).simulator.supersample == 3
    assert RIM(RIMConfig(), GridConfig(image_pixels=32, source_pixels=32)).simulator.supersample == 1
    for bad in (0, -1, 2.0, True, "2"):
        with pytest.raises(RimlensInputError):
            GridConfig(supersample=bad)
