"""MGE lens-light model: basis, non-negative amplitudes, shape fit, arcs, conventions (vs lenstronomy)."""

import math

import numpy as np
import pytest
import scipy.optimize
import torch

from rimlens.errors import RimlensInputError
from rimlens.physics import PSF, LensSimulator, PixelGrid, profiles
from rimlens.physics import lens_light as ll

Q, PHI, X0, Y0 = 0.7, 0.4, 0.03, -0.05  # truth of the Sersic tests (centre off the pixel grid)
CONFIGS = {"64px_0.12": (64, 0.12, 0.15), "96px_0.05": (96, 0.05, 0.1)}  # N, arcsec/px, PSF FWHM (arcsec)


def _sersic_image(grid, psf, n, r_eff, q=Q, phi=PHI, x0=X0, y0=Y0):
    """Pixel-averaged (12 x 12 sub-pixels) Sersic, convolved with ``psf``: 1 x 1 x N x N, float64."""
    img = profiles.pixelate(
        profiles.sersic,
        grid,
        12,
        torch.float64,
        amplitude=1.0,
        r_eff_arcsec=r_eff,
        n=n,
        axis_ratio=q,
        phi_rad=phi,
        center_x=x0,
        center_y=y0,
    )
    return psf.convolve(img)


def _peak_residual(model, truth):
    return float(((model - truth).abs().amax(dim=(1, 2, 3)) / truth.amax(dim=(1, 2, 3))).max())


def _unconstrained(basis, data, sigma):
    """Weighted least squares without the sign constraint (B x K), via the weighted design matrix."""
    a = basis.flatten(2).transpose(1, 2) / sigma.flatten(1)[:, :, None]
    return torch.linalg.lstsq(a, (data.flatten(1) / sigma.flatten(1))[:, :, None], driver="gelsd").solution[..., 0]


# ------------------------------------------------------------------ (a) Sersic profiles
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("n", [1.0, 2.5, 4.0])
@pytest.mark.parametrize("r_eff", [0.3, 1.0])
def test_fit_reproduces_sersic(config, n, r_eff):
    # Measured (noiseless, sigma = 1e-3 of the peak for the weights): max |residual| / peak 1e-6..3e-5,
    # centre and q exact to < 1e-3 pixel / 1e-4.
    size, scale, fwhm = CONFIGS[config]
    grid = PixelGrid(size, scale)
    psf = PSF.gaussian(fwhm, scale, dtype=torch.float64)
    truth = _sersic_image(grid, psf, n, r_eff)
    model = ll.fit_lens_light(truth, 1e-3 * truth.max(), psf, grid)
    assert _peak_residual(model.image(), truth) <= 0.01
    assert abs(float(model.center_x) - X0) / scale < 0.1
    assert abs(float(model.center_y) - Y0) / scale < 0.1
    assert abs(float(model.q) - Q) < 0.02
    assert abs(float(model.phi) - PHI) < 0.02
    # (b) the amplitudes are non-negative ...
    assert bool((model.amplitudes >= 0).all())
    # ... and the total flux is that of the Sersic inside the field (the PSF keeps flux)
    assert float(model.image().sum()) == pytest.approx(float(truth.sum()), rel=1e-3)


def test_narrow_gaussians_are_needed_when_the_psf_is_barely_sampled():
    # The design choice of default_sigmas (down to 0.1 px): at 0.12"/px with a 0.15" PSF, a de
    # Vaucouleurs cusp is not reproduced by a basis that stops at 0.5 px (residual ~5-8% of the peak,
    # measured), while the default basis reaches < 1e-3 with the true shape held fixed.
    grid = PixelGrid(64, 0.12)
    psf = PSF.gaussian(0.15, 0.12, dtype=torch.float64)
    truth = _sersic_image(grid, psf, 4.0, 0.3)
    for sigmas, bound in ((ll.default_sigmas(grid, 24, min_pixels=0.5), None), (ll.default_sigmas(grid), 1e-3)):
        basis = ll.mge_basis(grid, X0, Y0, Q, PHI, sigmas, psf)
        amps = ll.solve_amplitudes(basis, truth, 1.0)
        res = _peak_residual((amps[:, :, None, None] * basis).sum(1, keepdim=True), truth)
        if bound is None:
            assert res > 0.03
        else:
            assert res < bound


# ------------------------------------------------------------------ (b) the constraint matters
def test_unconstrained_least_squares_has_negative_amplitudes():
    grid = PixelGrid(64, 0.12)
    psf = PSF.gaussian(0.15, 0.12, dtype=torch.float64)
    truth = torch.cat([_sersic_image(grid, psf, n, 0.5) for n in (1.0, 2.5, 4.0)])
    basis = ll.mge_basis(grid, X0, Y0, Q, PHI, ll.default_sigmas(grid), psf).expand(3, -1, -1, -1)
    sigma = torch.full_like(truth, 1e-3)
    nnls = ll.solve_amplitudes(basis, truth, sigma)
    free = _unconstrained(basis, truth, sigma)
    assert bool((nnls >= 0).all())
    assert bool((free < 0).any(dim=-1).all())  # every one of the three has negative amplitudes
    # the unconstrained fit is (weakly) better in chi^2, the constrained one is the constrained optimum
    chi_nnls = (((basis * nnls[:, :, None, None]).sum(1, keepdim=True) - truth) / sigma).pow(2).sum((1, 2, 3))
    chi_free = (((basis * free[:, :, None, None]).sum(1, keepdim=True) - truth) / sigma).pow(2).sum((1, 2, 3))
    assert bool((chi_free <= chi_nnls * (1 + 1e-9)).all())


# ------------------------------------------------------------------ (c) NNLS vs scipy
def test_solve_amplitudes_matches_scipy_nnls():
    grid = PixelGrid(64, 0.12)
    psf = PSF.gaussian(0.15, 0.12, dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    b = 6
    truth = torch.cat([_sersic_image(grid, psf, 1 + 0.6 * i, 0.3 + 0.15 * i, q=0.75, phi=0.3) for i in range(b)])
    sigma = 0.01 * (0.5 + torch.rand(truth.shape, generator=gen, dtype=torch.float64))  # a noise map
    data = truth + sigma * torch.randn(truth.shape, generator=gen, dtype=torch.float64)
    x0 = 0.02 * torch.randn(b, generator=gen, dtype=torch.float64)
    basis = ll.mge_basis(grid, x0, -x0, 0.75, 0.3, ll.default_sigmas(grid), psf)
    ours = ll.solve_amplitudes(basis, data, sigma)
    n_active = []
    for i in range(b):
        a = (basis[i].flatten(1) / sigma[i].flatten()).T.numpy()
        y = (data[i].flatten() / sigma[i].flatten()).numpy()
        ref, _ = scipy.optimize.nnls(a, y, maxiter=10_000)
        assert np.linalg.norm(ours[i].numpy() - ref) <= 1e-6 * np.linalg.norm(ref)
        assert np.array_equal(ours[i].numpy() > 0, ref > 0)
        n_active.append(int((ref > 0).sum()))
    assert min(n_active) < basis.shape[1]  # the constraint is active (some amplitudes are 0)
    assert len(set(n_active)) > 1  # and the examples of the batch have different active sets


def test_nnls_methods_agree_on_an_mge_problem():
    # the ill-conditioned normal equations of 30 log-spaced Gaussians: SciPy's (the CPU default) and the
    # torch loop give the same amplitudes and active set
    grid = PixelGrid(64, 0.12)
    psf = PSF.gaussian(0.15, 0.12, dtype=torch.float64)
    truth = _sersic_image(grid, psf, 3.0, 0.6)
    data = truth + 1e-3 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    basis = ll.mge_basis(grid, X0, Y0, Q, PHI, ll.default_sigmas(grid), psf)
    a = basis.flatten(2)
    gram, rhs = a @ a.transpose(1, 2), (a @ data.flatten(2).transpose(1, 2))[..., 0]
    x_torch, set_torch = ll.nnls_gram(gram, rhs, method="torch")
    x_scipy, set_scipy = ll.nnls_gram(gram, rhs, method="scipy")
    assert torch.equal(set_torch, set_scipy)

    def objective(x):
        return float(0.5 * x[0] @ gram[0] @ x[0] - rhs[0] @ x[0])

    # the same minimum (measured: equal to 13 digits); the amplitudes differ by ~1e-6 in the directions
    # the near-collinear neighbouring Gaussians leave ill-determined (solve_amplitudes re-solves on the set)
    assert abs(objective(x_torch) - objective(x_scipy)) <= 1e-10 * abs(objective(x_torch))
    assert float((x_torch - x_scipy).norm() / x_torch.norm()) < 1e-5
    with pytest.raises(RimlensInputError, match="NNLS method"):
        ll.nnls_gram(gram, rhs, method="lbfgs")


def _random_nnls_problems(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16 well-posed problems (200 x 12 designs) as normal equations ``(G, h)``."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(16, 200, 12, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 200, generator=gen, dtype=torch.float64)
    return a.transpose(1, 2) @ a, (a.transpose(1, 2) @ y[:, :, None])[..., 0]


@pytest.mark.parametrize("method", ["torch", "scipy"])
def test_nnls_gram_kkt(method):
    # Random well-posed problems: the solution satisfies the KKT conditions.
    gram, rhs = _random_nnls_problems(3)
    x, passive = ll.nnls_gram(gram, rhs, method=method)
    grad = (gram @ x[:, :, None])[..., 0] - rhs  # gradient of x^T G x / 2 - h^T x
    assert bool((x >= 0).all())
    assert bool(passive.any(-1).all()) and not bool(passive.all())
    assert float(grad[passive].abs().max()) < 1e-9
    assert bool((grad[~passive] >= -1e-9).all())


def test_nnls_warm_start_gives_the_cold_solution():
    # A guessed passive set (the cold solution's, a perturbed one, all, none) changes the path, not the answer.
    gram, rhs = _random_nnls_problems(4)
    gen = torch.Generator().manual_seed(4)
    cold, cold_set = ll.nnls_gram(gram, rhs, method="torch")
    flipped = cold_set ^ (torch.rand(cold_set.shape, generator=gen) < 0.3)
    for guess in (cold_set, flipped, torch.ones_like(cold_set), torch.zeros_like(cold_set)):
        warm, warm_set = ll.nnls_gram(gram, rhs, passive_start=guess, method="torch")
        assert torch.equal(warm_set, cold_set)
        assert torch.allclose(warm, cold, rtol=1e-10, atol=1e-12)


def test_shape_fit_on_a_central_crop_reproduces_sersic():
    # The reconstruction's first fit: shape on the central half of the grid with 12 Gaussians, then the
    # full 30-Gaussian basis solved on the whole image. Measured (64 px, 0.12"/px, n = 4, R_e = 1"):
    # max |residual| / peak 6e-5, q and phi to 5e-4 and 2e-4, centre to 1e-4 pixel.
    grid = PixelGrid(64, 0.12)
    psf = PSF.gaussian(0.15, 0.12, dtype=torch.float64)
    truth = _sersic_image(grid, psf, 4.0, 1.0)
    model = ll.fit_lens_light(truth, 1e-3 * truth.max(), psf, grid, shape_pixels=32, shape_gaussians=12)
    assert model.sigmas.shape[0] == 30  # the full basis, not the crop's
    assert _peak_residual(model.image(), truth) <= 0.01
    assert abs(float(model.q) - Q) < 0.02 and abs(float(model.phi) - PHI) < 0.02
    assert abs(float(model.center_x) - X0) / 0.12 < 0.1
    with pytest.raises(RimlensInputError, match="shape_pixels"):
        ll.fit_lens_light(truth, 1e-3 * truth.max(), psf, grid, shape_pixels=31)


def test_refit_corrects_a_biased_shape():
    # A first fit with the arcs left in (q and phi pulled off, see the test above) re-fitted to the data
    # minus the arcs recovers the light: refit is how the refinement updates the light's shape.
    # Measured: q 0.809 -> 0.69994, phi 0.293 -> 0.39999, max |residual| / peak 3.6e-5, chi2 2414 -> 0.001.
    grid, psf, light, arc = _lens_with_arc(0.3)
    sigma = 0.002 * float(light.max())
    biased = ll.fit_lens_light(light + arc, sigma, psf, grid)
    assert abs(float(biased.q) - 0.7) > 0.05
    refit = biased.refit(light, sigma)
    assert abs(float(refit.q) - 0.7) < 0.01 and abs(float(refit.phi) - 0.4) < 0.01
    assert _peak_residual(refit.image(), light) < 1e-3
    assert float(refit.chi2) < float(biased.resolve(light, sigma).chi2)


# ------------------------------------------------------------------ (d) noise map and mask
def test_excluded_pixels_do_not_affect_the_solution():
    grid = PixelGrid(64, 0.12)
    psf = PSF.gaussian(0.15, 0.12, dtype=torch.float64)
    gen = torch.Generator().manual_seed(11)
    truth = torch.cat([_sersic_image(grid, psf, 2.0, 0.6), _sersic_image(grid, psf, 3.0, 0.4)])
    sigma = 0.005 * (0.5 + torch.rand(truth.shape, generator=gen, dtype=torch.float64))
    data = truth + sigma * torch.randn(truth.shape, generator=gen, dtype=torch.float64)
    mask = torch.ones_like(truth, dtype=torch.bool)
    mask[0, 0, 28:36, 20:30] = False  # e.g. a masked companion, on the light
    mask[1, 0, 40:50, 30:40] = False
    sigma_flagged = sigma.clone()
    sigma_flagged[:, 0, 30:34, 33:37] = 1e6  # bad pixels flagged in the noise map, at the centre
    excluded = ~mask | (sigma_flagged >= 1e6)
    corrupted = torch.where(excluded, data + 50.0 * truth.max(), data)

    basis = ll.mge_basis(grid, X0, Y0, Q, PHI, ll.default_sigmas(grid), psf).expand(2, -1, -1, -1)
    clean = ll.solve_amplitudes(basis, data, sigma_flagged, mask)
    dirty = ll.solve_amplitudes(basis, corrupted, sigma_flagged, mask)
    assert torch.allclose(dirty, clean, rtol=1e-9, atol=1e-12 * float(clean.abs().max()))
    unmasked = ll.solve_amplitudes(basis, corrupted, sigma)  # the corruption would matter
    assert float((unmasked - clean).abs().max()) > 0.1 * float(clean.abs().max())

    # the full non-linear fit too
    fit_clean = ll.fit_lens_light(data, sigma_flagged, psf, grid, mask)
    fit_dirty = ll.fit_lens_light(corrupted, sigma_flagged, psf, grid, mask)
    assert torch.allclose(fit_dirty.image(), fit_clean.image(), rtol=0, atol=1e-9 * float(truth.max()))
    assert _peak_residual(fit_clean.image(), truth) < 0.01


# ------------------------------------------------------------------ (e) lens light + arcs
def _lens_with_arc(arc_to_light_peak):
    grid, source_grid = PixelGrid(64, 0.12), PixelGrid(80, 0.03)
    psf = PSF.gaussian(0.15, 0.12, dtype=torch.float64)
    kappa = profiles.pixelate(
        profiles.sie_kappa, grid, 4, torch.float64, theta_e_arcsec=1.2, axis_ratio=0.8, phi_rad=0.3
    )
    sx, sy = source_grid.coordinates(torch.float64)
    source = profiles.sersic(sx, sy, 1.0, 0.15, 1.0, 0.7, -0.5, 0.08, 0.05)[None, None]
    arc = LensSimulator(grid, source_grid).forward(source, kappa, psf)
    light = _sersic_image(grid, psf, 4.0, 0.8, x0=0.02, y0=-0.03)
    arc = arc / arc.max() * arc_to_light_peak * light.max()
    return grid, psf, light, arc


def test_light_with_arcs_subtracted_and_not():
    # Measured (arc peak = 30% of the light peak, sigma = 0.2% of the light peak):
    #   arc subtracted, noiseless         max |res| / peak 3e-5
    #   arc subtracted, with noise        0.38%  (q 0.698, phi 0.402)
    #   arc NOT subtracted                5.9%   (q 0.81 instead of 0.70, phi 0.295 instead of 0.40) -- 15x worse
    #   arc NOT subtracted, clip_sigma=3  0.67%  (q 0.700, phi 0.379)
    grid, psf, light, arc = _lens_with_arc(0.3)
    peak = float(light.max())
    sigma = 0.002 * peak
    noise = sigma * torch.randn(light.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    obs = light + arc

    sub = ll.fit_lens_light(obs - arc, sigma, psf, grid)
    sub_noisy = ll.fit_lens_light(obs + noise - arc, sigma, psf, grid)
    nosub = ll.fit_lens_light(obs + noise, sigma, psf, grid)
    clipped = ll.fit_lens_light(obs + noise, sigma, psf, grid, clip_sigma=3.0)
    err = {k: _peak_residual(m.image(), light) for k, m in [("sub", sub), ("noisy", sub_noisy), ("nosub", nosub)]}
    err["clip"] = _peak_residual(clipped.image(), light)

    assert err["sub"] < 1e-3
    assert err["noisy"] < 0.01
    assert abs(float(sub_noisy.q) - 0.7) < 0.02
    assert err["nosub"] > 0.03 and err["nosub"] > 5 * err["noisy"]  # measurably worse
    assert abs(float(nosub.q) - 0.7) > 0.05
    assert err["clip"] < 0.5 * err["nosub"]  # clipping removes most of the arc bias


def test_alternating_use_resolve():
    # The intended use in a reconstruction: fit the light on the raw data (clipping the arcs), then
    # re-solve the amplitudes at fixed shape on data minus the (here: true) lensed source, then refit
    # the shape from there. Each step must help (measured max |res| / peak: 0.67%, 0.26%, 3e-5).
    grid, psf, light, arc = _lens_with_arc(0.3)
    sigma = 0.002 * float(light.max())
    obs = light + arc
    first = ll.fit_lens_light(obs, sigma, psf, grid, clip_sigma=3.0)
    again = first.resolve(obs - arc, sigma)
    direct = ll.solve_amplitudes(first.basis(), obs - arc, sigma)
    assert torch.allclose(again.amplitudes, direct, rtol=1e-10, atol=0)
    assert again.basis() is first.basis()  # the cached basis is shared
    refit = ll.fit_lens_light(obs - arc, sigma, psf, grid, center=again.center)
    errors = [_peak_residual(m.image(), light) for m in (first, again, refit)]
    assert errors[2] < errors[1] <= errors[0]
    assert errors[2] < 1e-3
    assert float(refit.chi2) < float(again.chi2)


# ------------------------------------------------------------------ conventions vs lenstronomy
def test_sersic_and_fit_agree_with_lenstronomy():
    pytest.importorskip("lenstronomy")
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF as LensPSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.Util import param_util

    n, scale, r_eff, n_sersic, x0, y0 = 64, 0.12, 0.6, 4.0, 0.05, -0.03
    e1, e2 = param_util.phi_q2_ellipticity(PHI, Q)
    kwargs = [dict(amp=1.0, R_sersic=r_eff, n_sersic=n_sersic, e1=e1, e2=e2, center_x=x0, center_y=y0)]
    grid = PixelGrid(n, scale)
    x, y = grid.coordinates(torch.float64)
    # the rimlens Sersic (brightness at R_e, product-averaged radius, phi from +x) is lenstronomy's;
    # the 2e-4 is lenstronomy's approximate b_n = 1.9992 n - 0.3271
    ref = LightModel(["SERSIC_ELLIPSE"]).surface_brightness(x.numpy().ravel(), y.numpy().ravel(), kwargs)
    ours = profiles.sersic(x, y, 1.0, r_eff, n_sersic, Q, PHI, x0, y0).numpy().ravel()
    assert np.abs(ours - ref).max() <= 1e-3 * ref.max()

    # fit an image made by lenstronomy (5 x 5 supersampling, its Gaussian PSF): same q, phi, centre
    corner = -(n - 1) / 2 * scale
    data = ImageData(
        image_data=np.zeros((n, n)), ra_at_xy_0=corner, dec_at_xy_0=corner, transform_pix2angle=np.eye(2) * scale
    )
    model = ImageModel(
        data,
        LensPSF(psf_type="GAUSSIAN", fwhm=0.15, truncation=5),
        lens_light_model_class=LightModel(["SERSIC_ELLIPSE"]),
        kwargs_numerics={"supersampling_factor": 5},
    )
    image = torch.as_tensor(model.image(kwargs_lens_light=kwargs) / scale**2)[None, None]  # flux/px -> SB
    fit = ll.fit_lens_light(image, 1e-3 * image.max(), PSF.gaussian(0.15, scale, dtype=torch.float64), grid)
    assert abs(float(fit.q) - Q) < 0.005  # measured 0.6994
    assert abs(float(fit.phi) - PHI) < 0.005  # measured 0.4004
    assert abs(float(fit.center_x) - x0) / scale < 0.01 and abs(float(fit.center_y) - y0) / scale < 0.01
    assert _peak_residual(fit.image(), image) < 0.01  # measured 1.7e-4


def test_basis_matches_lenstronomy_gaussian_ellipse():
    # Each basis image is lenstronomy's GAUSSIAN_ELLIPSE (amp = total flux = 1) averaged over the
    # pixels (32 x 32 sub-pixels): measured <= 3e-4 of its peak, from sigma = 0.1 px to 12 px.
    pytest.importorskip("lenstronomy")
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.Util import param_util

    grid, q, phi, x0, y0, sub = PixelGrid(24, 0.12), 0.6, 0.4, 0.031, -0.047, 32
    sigmas = ll.default_sigmas(grid, 20)
    basis = ll.mge_basis(grid, x0, y0, q, phi, sigmas, None)[0].numpy()
    x, y = PixelGrid(24 * sub, 0.12 / sub).coordinates(torch.float64)
    e1, e2 = param_util.phi_q2_ellipticity(phi, q)
    light = LightModel(["GAUSSIAN_ELLIPSE"])
    for k, sigma in enumerate(sigmas.tolist()):
        kw = [dict(amp=1.0, sigma=sigma, e1=e1, e2=e2, center_x=x0, center_y=y0)]
        fine = light.surface_brightness(x.numpy().ravel(), y.numpy().ravel(), kw).reshape(24 * sub, 24 * sub)
        ref = fine.reshape(24, sub, 24, sub).mean(axis=(1, 3))
        assert np.abs(basis[k] - ref).max() <= 1e-3 * ref.max(), k
    assert basis[0].sum() * 0.12**2 == pytest.approx(1.0, rel=1e-9)  # unit flux


# ------------------------------------------------------------------ batching, PSFs, autograd
def test_batch_with_per_example_psfs_equals_single_fits():
    grid = PixelGrid(48, 0.1)
    psf = PSF.gaussian([0.12, 0.2, 0.3], 0.1, dtype=torch.float64)
    imgs = torch.cat(
        [
            _sersic_image(grid, psf.select(slice(i, i + 1)), n, r, q=q, phi=p, x0=0.1 * i, y0=-0.05)
            for i, (n, r, q, p) in enumerate([(1.0, 0.4, 0.5, 1.2), (4.0, 0.3, 0.9, -0.7), (2.0, 0.8, 0.65, 0.1)])
        ]
    )
    batch = ll.fit_lens_light(imgs, 1e-3, psf, grid)
    for i in range(3):
        single = ll.fit_lens_light(imgs[i : i + 1], 1e-3, psf.select(slice(i, i + 1)), grid)
        # equal up to the fit tolerance (the batch shares the sub-pixel sampling plan, set by its lowest q)
        assert torch.allclose(batch.image()[i : i + 1], single.image(), rtol=0, atol=1e-5 * float(imgs[i].max()))
    assert _peak_residual(batch.image(), imgs) < 0.01
    assert torch.allclose(batch.q, torch.tensor([0.5, 0.9, 0.65], dtype=torch.float64), atol=0.02)


def test_non_gaussian_kernel_and_float32_data():
    # An arbitrary (non-separable, FFT-convolved) PSF kernel, float32 data.
    grid = PixelGrid(48, 0.1)
    u = torch.arange(-5, 6, dtype=torch.float64)
    kern = torch.exp(-0.5 * ((u[None, :] - 0.3 * u[:, None]) ** 2 / 1.2**2 + u[:, None] ** 2 / 2.0**2))
    kern = kern + 0.05 * torch.exp(-0.5 * (u[None, :] ** 2 + u[:, None] ** 2) / 4.0**2)
    psf = PSF.from_kernel(kern)
    assert psf.factors is None
    truth = _sersic_image(grid, psf, 2.0, 0.5)
    fit = ll.fit_lens_light(truth.float(), 1e-3, psf, grid)
    assert fit.image().dtype == torch.float32
    assert _peak_residual(fit.image().double(), truth) < 0.01
    assert abs(float(fit.q) - Q) < 0.02


def test_model_derivatives_match_autograd():
    # The Levenberg-Marquardt Jacobian is analytic: compare with autograd of the basis.
    grid = PixelGrid(32, 0.1)
    sigmas = ll.default_sigmas(grid, 16)
    gen = torch.Generator().manual_seed(2)
    amps = torch.rand(2, 16, generator=gen, dtype=torch.float64)
    params = torch.tensor([[0.04, -0.07, 0.2, -0.1], [-0.02, 0.03, -0.05, 0.3]], dtype=torch.float64)
    stack = ll._render(grid, *params.T, sigmas, 1.5, amps)

    def model(p):
        return (amps[:, :, None, None] * ll._render(grid, *p.T, sigmas, 1.5)).sum(1)

    jac = torch.autograd.functional.jacobian(
        model, params, vectorize=True, strategy="forward-mode"
    )  # B x N x N x B x 4
    for b in range(2):
        assert torch.allclose(stack[b, 0], model(params)[b], rtol=1e-12, atol=0)
        for i in range(4):
            ref = jac[b, :, :, b, i]
            assert torch.allclose(stack[b, 1 + i], ref, rtol=0, atol=1e-9 * float(ref.abs().max())), (b, i)


def test_amplitudes_are_differentiable_wrt_data():
    grid = PixelGrid(32, 0.1)
    psf = PSF.gaussian(0.15, 0.1, dtype=torch.float64)
    truth = _sersic_image(grid, psf, 2.0, 0.4)
    basis = ll.mge_basis(grid, X0, Y0, Q, PHI, ll.default_sigmas(grid, 10), psf)
    data = truth + 1e-3 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def amps(d):
        return ll.solve_amplitudes(basis, d, 1e-3)[0]

    jac = torch.autograd.functional.jacobian(amps, data).reshape(10, -1)  # K x pixels
    eps = 1e-6
    for p in range(0, 32 * 32, 37):  # central differences on a sample of pixels
        step = torch.zeros_like(data).flatten()
        step[p] = eps
        num = (amps(data + step.reshape(data.shape)) - amps(data - step.reshape(data.shape))) / (2 * eps)
        assert torch.allclose(num, jac[:, p], rtol=0, atol=1e-5 * float(jac.abs().max())), p
    data.requires_grad_(True)
    # and through the whole fit (at the fitted shape): the light model is a linear function of the data
    fit = ll.fit_lens_light(data, 1e-3, psf, grid)
    image = fit.image()
    (g,) = torch.autograd.grad(image.sum(), data)
    assert bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0


def test_profiled_light_equals_resolve_and_its_gradient():
    # refine()'s background: the normal matrix once, warm starts -- the same images and gradients as
    # resolve(...).image() for a sequence of different data (active sets changing between them)
    grid = PixelGrid(32, 0.1)
    psf = PSF.gaussian(0.15, 0.1, dtype=torch.float64)
    truth = _sersic_image(grid, psf, 2.0, 0.4)
    mask = torch.ones_like(truth, dtype=torch.bool)
    mask[..., :4, :] = False
    fit = ll.fit_lens_light(truth, 1e-3, psf, grid, mask=mask)
    image = fit.profiled(1e-3, mask)
    gen = torch.Generator().manual_seed(1)
    for scale in (1e-3, 0.3, 1e-3, 0.05):  # large perturbations change the active set
        data = (truth + scale * torch.randn(truth.shape, generator=gen, dtype=torch.float64)).requires_grad_(True)
        got = image(data)
        want = fit.resolve(data, 1e-3, mask).image()
        assert torch.allclose(got, want, rtol=0, atol=1e-10 * float(want.detach().abs().max()))
        weights = torch.randn(truth.shape, generator=gen, dtype=torch.float64)
        (g_got,) = torch.autograd.grad((got * weights).sum(), data)
        (g_want,) = torch.autograd.grad((want * weights).sum(), data)
        assert torch.allclose(g_got, g_want, rtol=0, atol=1e-9 * float(g_want.abs().max()))


def test_mge_basis_is_differentiable_wrt_shape():
    grid = PixelGrid(24, 0.1)
    psf = PSF.gaussian(0.2, 0.1, dtype=torch.float64)
    sigmas = ll.default_sigmas(grid, 8)
    params = torch.tensor([0.03, -0.02, 0.7, 0.4], dtype=torch.float64, requires_grad=True)

    def f(p):
        return ll.mge_basis(grid, p[0:1], p[1:2], p[2:3], p[3:4], sigmas, psf).sum(dim=(-2, -1))

    assert torch.autograd.gradcheck(f, (params,), eps=1e-6, atol=1e-5)


def test_input_errors():
    grid = PixelGrid(32, 0.1)
    psf = PSF.gaussian(0.15, 0.1, dtype=torch.float64)
    data = torch.zeros(2, 1, 32, 32, dtype=torch.float64)
    with pytest.raises(RimlensInputError):
        ll.fit_lens_light(data[:, :, :16, :16], 1.0, psf, grid)  # grid mismatch
    with pytest.raises(RimlensInputError):
        ll.fit_lens_light(data, 1.0, psf, grid, mask=torch.zeros_like(data, dtype=torch.bool))  # nothing used
    with pytest.raises(RimlensInputError):
        ll.fit_lens_light(data, 1.0, psf, grid, fit_center=False)  # no centre to hold
    with pytest.raises(RimlensInputError):
        ll.mge_basis(grid, 0.0, 0.0, 1.5, 0.0, [0.1, 0.2], psf)  # q > 1
    with pytest.raises(RimlensInputError):
        ll.mge_basis(grid, 0.0, 0.0, 0.5, 0.0, [0.2, 0.1], psf)  # not increasing
    with pytest.raises(RimlensInputError):
        ll.solve_amplitudes(torch.zeros(2, 3, 16, 16), data, 1.0)  # basis / data mismatch


def test_fixed_center():
    grid = PixelGrid(48, 0.1)
    psf = PSF.gaussian(0.15, 0.1, dtype=torch.float64)
    truth = _sersic_image(grid, psf, 2.0, 0.5)
    fit = ll.fit_lens_light(truth, 1e-3, psf, grid, center=(X0, Y0), fit_center=False)
    assert float(fit.center_x) == X0 and float(fit.center_y) == Y0
    assert abs(float(fit.q) - Q) < 0.01
    assert math.isfinite(float(fit.chi2))


def test_empty_and_negative_data():
    # No light at all (or only negative noise): zero amplitudes, no failure.
    grid = PixelGrid(32, 0.1)
    psf = PSF.gaussian(0.15, 0.1, dtype=torch.float64)
    data = torch.zeros(2, 1, 32, 32, dtype=torch.float64)
    data[1] = -1.0
    fit = ll.fit_lens_light(data, 0.1, psf, grid)
    assert float(fit.amplitudes.abs().max()) == 0.0
    assert bool(torch.isfinite(fit.q).all()) and bool(torch.isfinite(fit.center).all())
    assert torch.equal(fit.image(), torch.zeros_like(data))


# ------------------------------------------------------------------ the detector's frame (resampled data)
@pytest.mark.parametrize(
    ("shape", "center"), [((100, 100), (0.0, 0.0)), ((101, 96), (0.13, -0.21)), ((70, 75), (-0.07, 0.04))]
)
def test_native_frame_is_the_datas_own_resampling(shape, center):
    # An MGE light drawn on a cut-out's own 0.05" pixels, then brought to the 0.12" model grid by
    # prepare_observation (padding, off-centre lens, odd and even sides): the basis rendered in the
    # prepared observation's NativeFrame with the true amplitudes reproduces it to float32 precision.
    from rimlens.io.observation import Observation, prepare_observation

    s_in, (rows, cols) = 0.05, shape
    # an odd square on the cut-out's pixels, reaching past it by more than the PSF, cropped below
    side = max(rows, cols) + 1 + max(rows, cols) % 2 + 24
    big = PixelGrid(side, s_in)
    kernel = PSF.gaussian(0.1, s_in, size=21, dtype=torch.float64)
    # cropping the odd square to (rows, cols) puts the crop's centre half a pixel below / left of its own
    # for an even side (the crop keeps the first rows / columns)
    shift_x, shift_y = (0.0 if cols % 2 else s_in / 2), (0.0 if rows % 2 else s_in / 2)
    x0, y0, q, phi = center[0] + 0.02, center[1] - 0.03, 0.75, 0.4
    sig = torch.tensor([0.02, 0.06, 0.2, 0.6, 1.5])
    amps = torch.tensor([[2.0, 1.0, 3.0, 2.0, 4.0]], dtype=torch.float64)
    basis = ll.mge_basis(big, x0 - shift_x, y0 - shift_y, q, phi, sig, kernel)
    image = (amps[:, :, None, None] * basis).sum(1)[0]
    lo_r, lo_c = (side - rows) // 2, (side - cols) // 2
    image = image[lo_r : lo_r + rows, lo_c : lo_c + cols].numpy()
    obs = Observation(image, np.full_like(image, 1e-3), kernel.kernel[0, 0].numpy(), s_in)
    grid = PixelGrid(64, 0.12)
    prep = prepare_observation(obs, grid, center)
    assert prep.native is not None
    model = ll.LensLightModel(
        *(torch.tensor([v], dtype=torch.float64) for v in (x0 - center[0], y0 - center[1], q, phi)),
        sig.double(),
        amps,
        grid,
        PSF.from_kernel(prep.psf_sampled),
        torch.zeros(1),
        native=prep.native,
    )
    # prepare_observation treats the image as flux per pixel: undo its (s_out / s_in)^2 and flux scale
    expected = prep.observation.double() / (prep.flux_scale * (0.12 / s_in) ** 2)
    got = model.image()
    used = prep.mask
    assert float(((got - expected).abs() * used).max()) <= 2e-6 * float(expected.max())


def test_native_frame_fits_a_lenstronomy_sersic_at_high_snr():
    # A de Vaucouleurs lens galaxy drawn by lenstronomy at 0.05" (5 x 5 supersampling, Gaussian PSF of
    # FWHM 0.1") with its peak 5,000 noise sigmas, resampled to 0.12" model pixels. Rendered on the model
    # grid with the PSF sampled there, the MGE cannot follow the undersampled cusp (chi2_nu 16, axis
    # ratio off by 0.02); rendered in the detector's frame it fits to the noise and finds the shape.
    pytest.importorskip("lenstronomy")
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF as LensPSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.Util import param_util

    from rimlens.io.observation import Observation, prepare_observation

    n_in, s_in, q, phi = 100, 0.05, 0.75, 0.4
    e1, e2 = param_util.phi_q2_ellipticity(phi, q)
    kwargs = [dict(amp=1.0, R_sersic=0.8, n_sersic=4.0, e1=e1, e2=e2, center_x=0.02, center_y=-0.03)]
    corner = -(n_in - 1) / 2 * s_in
    data = ImageData(
        image_data=np.zeros((n_in, n_in)), ra_at_xy_0=corner, dec_at_xy_0=corner, transform_pix2angle=np.eye(2) * s_in
    )
    lens_psf = LensPSF(psf_type="GAUSSIAN", fwhm=0.1, pixel_size=s_in, truncation=5)
    image = ImageModel(
        data,
        lens_psf,
        lens_light_model_class=LightModel(["SERSIC_ELLIPSE"]),
        kwargs_numerics={"supersampling_factor": 5, "supersampling_convolution": True},
    ).image(kwargs_lens_light=kwargs)
    obs = Observation(image, np.full_like(image, image.max() / 5000), lens_psf.kernel_point_source, s_in)
    grid = PixelGrid(64, 0.12)
    prep = prepare_observation(obs, grid, (0.0, 0.0))
    data_t, sigma_t = prep.observation.double(), prep.noise_sigma.double()
    psf = PSF.from_kernel(prep.psf_sampled.double())

    def chi2_nu(fit):
        return float((((fit.image() - data_t) / sigma_t) ** 2 * prep.mask).sum() / prep.mask.sum())

    on_grid = ll.fit_lens_light(data_t, sigma_t, psf, grid, mask=prep.mask)
    native = ll.fit_lens_light(data_t, sigma_t, psf, grid, mask=prep.mask, native=prep.native)
    assert chi2_nu(on_grid) > 5  # measured 16.4
    assert chi2_nu(native) < 0.05  # measured 0.003 (noiseless data: 0 is perfect)
    assert abs(float(native.q) - q) < 0.002  # measured 0.7499 (model grid: 0.769)
    assert abs(float(native.phi) - phi) < 0.01
    assert abs(float(native.center_x) - 0.02) < 0.005 and abs(float(native.center_y) + 0.03) < 0.005


# ------------------------------------------------------------------ ellipticity gradient (isophote twist)
def test_ellipticity_gradient_derivative_matches_finite_differences():
    grid = PixelGrid(40, 0.1)
    psf = PSF.gaussian(0.15, 0.1, dtype=torch.float64)
    sig = ll.default_sigmas(grid, 12)
    amps = torch.rand(1, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    theta = torch.tensor([[0.03, -0.02, 0.3, -0.2, 0.15, 0.1]], dtype=torch.float64)

    def model(t):
        e1, e2 = ll._shape_of(t, sig)
        basis = ll._basis_images(grid, psf, None, t[:, 0], t[:, 1], e1, e2, sig, 1.5)
        return (amps[:, :, None, None] * basis).sum(1).flatten(1)

    e1, e2 = ll._shape_of(theta, sig)
    shape = (grid, psf, None, theta, e1, e2, sig, 1.5)
    analytic = ll._shape_derivatives(*shape, amps * ll._log_widths(sig))[:, 2:]  # d/d(gradient)
    for j in (4, 5):
        step = torch.zeros_like(theta)
        step[0, j] = 1e-6
        numeric = (model(theta + step) - model(theta - step)) / 2e-6
        assert torch.allclose(analytic[0, j - 4], numeric[0], rtol=0, atol=1e-5 * float(numeric.abs().max()))


def test_refit_recovers_an_ellipticity_gradient():
    # outer isophotes flatter and turned (e changes by (0.12, -0.08) per dex of width): one shape leaves
    # a residual of ~1% of the peak, the gradient fit recovers it and the data to the noise
    grid = PixelGrid(64, 0.08)
    psf = PSF.gaussian(0.12, 0.08, dtype=torch.float64)
    sig = ll.default_sigmas(grid, 20)
    profile = torch.exp(-0.5 * (torch.log(sig / 0.4) / 0.9) ** 2)  # a smooth radial profile
    truth_gradient = torch.tensor([[0.12, -0.08]], dtype=torch.float64)
    e1, e2 = ll.gaussian_ellipticities(
        *ll.ellipticity_from_q_phi(torch.tensor([0.8]), torch.tensor([0.5])), truth_gradient, sig
    )
    image = (
        profile[None, :, None, None]
        * ll._basis_images(
            grid, psf, None, torch.tensor([0.02]), torch.tensor([-0.01]), e1.double(), e2.double(), sig, 1.5
        )
    ).sum(1, keepdim=True)
    noise = 1e-3 * float(image.max())
    single = ll.fit_lens_light(image, noise, psf, grid, sigmas=sig)
    twisted = single.refit(image, noise, max_iter=30, fit_gradient=True)
    assert _peak_residual(single.image(), image) > 0.01  # measured 0.016
    assert _peak_residual(twisted.image(), image) < 1e-6  # measured 4e-8
    assert twisted.ellipticity_gradient is not None
    assert torch.allclose(twisted.ellipticity_gradient, truth_gradient, atol=1e-4)
    assert abs(float(twisted.q) - 0.8) < 1e-4 and abs(float(twisted.phi) - 0.5) < 1e-4
    # resolve keeps the gradient (the basis is the twisted one)
    again = twisted.resolve(image, noise)
    assert torch.equal(again.ellipticity_gradient, twisted.ellipticity_gradient)
    assert _peak_residual(again.image(), image) < 1e-6


def test_the_gradient_is_kept_only_when_the_data_ask_for_it():
    # the refinement's first light re-fit adds the two numbers only if they pay their BIC price
    from types import SimpleNamespace

    from rimlens.inference.pipeline import _choose_light_shape

    grid = PixelGrid(64, 0.08)
    psf = PSF.gaussian(0.12, 0.08, dtype=torch.float64)
    sig = ll.default_sigmas(grid, 20)
    profile = torch.exp(-0.5 * (torch.log(sig / 0.4) / 0.9) ** 2)
    gen = torch.Generator().manual_seed(9)
    for gradient, expect in ((torch.tensor([[0.12, -0.08]], dtype=torch.float64), True), (None, False)):
        e1, e2 = ll.gaussian_ellipticities(
            *ll.ellipticity_from_q_phi(torch.tensor([0.8], dtype=torch.float64), torch.tensor([0.5])), gradient, sig
        )
        x0, y0 = torch.tensor([0.02]), torch.tensor([-0.01])
        basis = ll._basis_images(grid, psf, None, x0, y0, e1, e2, sig, 1.5)
        image = (profile[None, :, None, None] * basis).sum(1, keepdim=True)
        sigma = torch.full_like(image, 1e-3 * float(image.max()))
        data = image + sigma * torch.randn(image.shape, generator=gen, dtype=torch.float64)
        start = ll.fit_lens_light(data, sigma, psf, grid, sigmas=sig)
        prep = SimpleNamespace(noise_sigma=sigma, mask=torch.ones_like(data, dtype=torch.bool))
        chosen = _choose_light_shape(start, data, torch.zeros_like(data), prep)
        assert (chosen.ellipticity_gradient is not None) == expect


def test_basis_on_another_grid_matches_the_models_own_basis():
    """``LensLightModel.basis_on`` renders the fitted Gaussians on another grid: on the model's own grid
    (no offset) it is the model's basis, edges included, and both are the central crop of the basis on a
    grid large enough that nothing is lost to the convolution's padding; on a grid shifted by whole
    pixels, the same images shifted."""
    import torch

    from rimlens.physics.grid import PixelGrid
    from rimlens.physics.lens_light import LensLightModel, default_sigmas
    from rimlens.physics.psf import PSF

    grid = PixelGrid(32, 0.1)
    xs = torch.arange(-3, 4, dtype=torch.float64)
    kernel = torch.exp(-(xs[None] ** 2 + xs[:, None] ** 2) / 2.0)
    psf = PSF.from_kernel(kernel)
    sigmas = torch.as_tensor(default_sigmas(grid, 6), dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    model = LensLightModel(
        center_x=0.03 * one, center_y=-0.02 * one, q=0.7 * one, phi=0.4 * one, sigmas=sigmas,
        amplitudes=torch.ones(1, sigmas.numel(), dtype=torch.float64), grid=grid, psf=psf, chi2=one,
    )  # fmt: skip
    own = model.basis_on(grid, (0.0, 0.0), psf)
    torch.testing.assert_close(own, model.basis(True)[0], atol=1e-12, rtol=1e-9)
    large = model.basis_on(PixelGrid(64, 0.1), (0.0, 0.0), psf)
    torch.testing.assert_close(own, large[:, 16:48, 16:48], atol=1e-12, rtol=1e-9)
    # a zero-padded convolution on the grid itself would have lost the light scattered in from beyond the
    # edge (the broadest Gaussian's): the edge row is brighter than that, the interior the same
    zero_padded = psf.convolve(model.basis(False)[0][:, None])[:, 0]
    assert float((own[-1, 0] - zero_padded[-1, 0]).min()) > 0
    torch.testing.assert_close(own[:, 3:-3, 3:-3], zero_padded[:, 3:-3, 3:-3], atol=1e-12, rtol=1e-9)
    shifted = model.basis_on(grid, (0.3, 0.0), psf)  # this grid's centre 3 pixels to the right
    torch.testing.assert_close(shifted[:, 8:24, 5:21], model.basis(True)[0][:, 8:24, 8:24], atol=1e-12, rtol=1e-9)


def test_mge_basis_edges_receive_the_light_from_beyond_the_field():
    """``mge_basis`` (the model grid's basis: the RIM's light subtraction, the light fits) equals the central
    crop of the same basis on a grid large enough that the convolution's padding loses nothing, edges
    included, with and without the analytic derivatives' path (the Levenberg-Marquardt's ``_basis_images``)."""
    import torch

    from rimlens.physics.grid import PixelGrid
    from rimlens.physics.lens_light import (
        _basis_images,
        default_sigmas,
        ellipticity_from_q_phi,
        mge_basis,
    )
    from rimlens.physics.psf import PSF

    grid, large_grid = PixelGrid(24, 0.12), PixelGrid(56, 0.12)
    psf = PSF.gaussian(0.3, 0.12, size=9, dtype=torch.float64)
    sigmas = default_sigmas(grid, 8)
    small = mge_basis(grid, 0.05, -0.04, 0.6, 0.7, sigmas, psf)
    large = mge_basis(large_grid, 0.05, -0.04, 0.6, 0.7, sigmas, psf)
    torch.testing.assert_close(small, large[..., 16:40, 16:40], atol=1e-12, rtol=1e-9)
    one = torch.ones(1, dtype=torch.float64)
    e1, e2 = ellipticity_from_q_phi(0.6 * one, 0.7 * one)
    amps = torch.linspace(1.0, 2.0, len(sigmas), dtype=torch.float64)[None]
    args = (0.05 * one, -0.04 * one, e1, e2, torch.as_tensor(sigmas, dtype=torch.float64), 1.5, amps)
    small_d = _basis_images(grid, psf, None, *args)
    large_d = _basis_images(large_grid, psf, None, *args)
    torch.testing.assert_close(small_d, large_d[..., 16:40, 16:40], atol=1e-12, rtol=1e-9)
