"""Simulator, noise and likelihood gradient."""

import pytest
import torch

from rimlens.physics import PSF, LensSimulator, PixelGrid, profiles


def _setup(n=16, m=12, batch=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    img, src = PixelGrid.from_fov(n, 7.68 * n / 64), PixelGrid.from_fov(m, 3.0 * m / 64 * 2)
    sim = LensSimulator(img, src)
    x, y = img.coordinates(dtype)
    theta_e = torch.linspace(0.6, 1.0, batch, dtype=dtype).reshape(-1, 1, 1, 1)
    kappa = profiles.sie_kappa(x, y, theta_e, 0.7, 0.3, core_arcsec=0.1)
    sx, sy = src.coordinates(dtype)
    source = profiles.sersic(sx, sy, 1.0, 0.3, 1.5, 0.8, 0.2, 0.05, 0.0).expand(batch, 1, m, m).clone()
    source = source + 0.05 * torch.rand(source.shape, generator=g, dtype=dtype)
    psf = PSF.gaussian(torch.linspace(0.1, 0.3, batch), img.pixel_scale_arcsec, size=5, dtype=dtype)
    sigma = torch.linspace(0.01, 0.05, batch, dtype=dtype)
    return sim, source, kappa, psf, sigma, g


def test_noise_statistics_and_chi2_of_truth():
    sim, source, kappa, psf, _, g = _setup(n=64, m=32, batch=2)
    out = sim.simulate(source, kappa, psf, torch.tensor([0.02, 0.05]), generator=g)
    resid = (out.observation - out.noiseless) / out.noise_sigma.reshape(-1, 1, 1, 1)
    assert abs(float(resid.std()) - 1) < 0.03
    chi2nu = sim.reduced_chi_squared(out.observation, source, kappa, psf, out.noise_sigma)
    assert torch.all((chi2nu - 1).abs() < 5 * (2 / 64**2) ** 0.5)
    assert torch.allclose(out.snr, out.noiseless.amax(dim=(1, 2, 3)) / out.noise_sigma)


def test_same_seed_same_noise():
    sim, source, kappa, psf, sigma, _ = _setup()
    a = sim.simulate(source, kappa, psf, sigma, generator=torch.Generator().manual_seed(5)).observation
    b = sim.simulate(source, kappa, psf, sigma, generator=torch.Generator().manual_seed(5)).observation
    assert torch.equal(a, b)


def test_likelihood_gradient_gradcheck():
    sim, source, kappa, psf, sigma, g = _setup(n=10, m=8, batch=2)
    obs = sim.simulate(source, kappa, psf, sigma, generator=g).observation
    eta = torch.log10(kappa)

    def half_chi2(s, e):
        return 0.5 * sim.chi_squared(obs, s, 10**e, psf, sigma, check=False).sum()

    s = (source + 0.1).requires_grad_(True)
    e = (eta - 0.05).requires_grad_(True)
    assert torch.autograd.gradcheck(half_chi2, (s, e), eps=1e-6, atol=1e-5, rtol=1e-4)
    g_s, g_e, _chi2 = sim.likelihood_gradient(obs, s.detach(), e.detach(), psf, sigma)
    ref_s, ref_e = torch.autograd.grad(half_chi2(s, e), (s, e))
    assert torch.allclose(g_s, ref_s) and torch.allclose(g_e, ref_e)
    # and against central finite differences of chi2/2 on a few source pixels
    for idx in [(0, 0, 3, 4), (1, 0, 5, 2)]:
        d = torch.zeros_like(source)
        d[idx] = 1e-6
        fd = (half_chi2(s.detach() + d, e.detach()) - half_chi2(s.detach() - d, e.detach())) / 2e-6
        assert float(fd) == pytest.approx(float(g_s[idx]), rel=1e-5, abs=1e-7)


def test_batch_equals_single_calls():
    sim, source, kappa, psf, sigma, g = _setup(n=32, m=16, batch=3)
    obs = sim.simulate(source, kappa, psf, sigma, generator=g).observation
    eta = torch.log10(kappa) + 0.02
    gs, ge, chi2 = sim.likelihood_gradient(obs, source, eta, psf, sigma)
    for b in range(3):
        s1, e1, c1 = sim.likelihood_gradient(
            obs[b : b + 1], source[b : b + 1], eta[b : b + 1], psf.select(slice(b, b + 1)), sigma[b : b + 1]
        )
        assert torch.allclose(gs[b : b + 1], s1, rtol=1e-10, atol=1e-12)
        assert torch.allclose(ge[b : b + 1], e1, rtol=1e-10, atol=1e-12)
        assert torch.allclose(chi2[b], c1[0])


def test_mask_and_huge_sigma_exclude_pixels():
    sim, source, kappa, psf, sigma, g = _setup(n=32, m=16, batch=1)
    obs = sim.simulate(source, kappa, psf, sigma[:1], generator=g).observation
    mask = torch.ones(1, 1, 32, 32, dtype=torch.bool)
    mask[..., :8, :] = False
    corrupted = obs.clone()
    corrupted[..., :8, :] = 1e3  # garbage in masked pixels
    c_ref = sim.reduced_chi_squared(obs, source, kappa, psf, sigma[:1], mask)
    c_bad = sim.reduced_chi_squared(corrupted, source, kappa, psf, sigma[:1], mask)
    assert torch.allclose(c_ref, c_bad)
    noise_map = torch.full((1, 1, 32, 32), float(sigma[0]), dtype=torch.float64)
    noise_map[..., :8, :] = 1e6
    c_map = sim.reduced_chi_squared(corrupted, source, kappa, psf, noise_map)
    assert torch.allclose(c_ref, c_map)


def test_float32_default_and_float64_supported():
    sim, source, kappa, psf, _sigma, _g = _setup(dtype=torch.float32)
    assert sim.forward(source, kappa, psf).dtype == torch.float32
    sim, source, kappa, psf, _sigma, _g = _setup(dtype=torch.float64)
    assert sim.forward(source, kappa, psf).dtype == torch.float64
