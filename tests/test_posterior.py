"""Posterior sampling (issue 13): both samplers (low-rank Laplace, perturb-and-MAP) against a
posterior known in closed form (a linear-Gaussian source behind a fixed lens), and a mis-specified
noise level showing up as mis-calibration."""

import dataclasses

import numpy as np
import pytest
import torch

from rimlens.errors import RimlensInputError
from rimlens.inference.posterior import PosteriorOptions, laplace_samples, marginal_samples, perturb_and_map
from rimlens.physics import PSF, LensSimulator, PixelGrid


def _problem():
    """A 12-px image (3.6") of a 6-px source (3") behind a fixed cored isothermal kappa: y = A s +
    noise with A linear (144 x 36)."""
    torch.manual_seed(0)
    sim = LensSimulator(PixelGrid(12, 3.6), PixelGrid(6, 3.0))
    x, y = sim.image_grid.coordinates(torch.float64)
    kappa = (0.4 / (2 * torch.sqrt(x**2 + 0.7 * y**2 + 0.05)))[None, None]
    psf = PSF.gaussian(torch.tensor([0.35], dtype=torch.float64), sim.image_grid.pixel_scale_arcsec, size=5)
    m = 36
    basis = torch.eye(m, dtype=torch.float64).reshape(m, 1, 6, 6)
    a = sim.forward(basis, kappa.expand(m, -1, -1, -1), PSF.from_kernel(psf.kernel.expand(m, -1, -1, -1)))
    return sim, kappa, psf, a.reshape(m, -1).T  # A: 144 x 36


def _exact(a, y, sigma, prior_mean, tau):
    precision = a.T @ a / sigma**2 + torch.eye(a.shape[1], dtype=a.dtype) / tau**2
    cov = torch.linalg.inv(precision)
    mean = cov @ (a.T @ y / sigma**2 + prior_mean / tau**2)
    return mean, cov


SAMPLERS = pytest.mark.parametrize("sampler", [laplace_samples, perturb_and_map], ids=["laplace", "perturb"])


@SAMPLERS
@pytest.mark.parametrize("source_prior_mean", ["estimate", "zero"])
def test_samples_follow_the_exact_linear_gaussian_posterior(sampler, source_prior_mean):
    sim, kappa, psf, a = _problem()
    sigma, tau = 0.05, 0.3
    truth = torch.rand(36, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = a @ truth + sigma * torch.randn(144, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    estimate = torch.full((36,), 0.4, dtype=torch.float64)  # where the sampler starts / linearises
    prior_mean = estimate if source_prior_mean == "estimate" else torch.zeros_like(estimate)
    mean, cov = _exact(a, y, sigma, prior_mean, tau)
    opts = PosteriorOptions(
        n_samples=3000,
        source_prior_sigma=tau,
        log10_kappa_prior_sigma=0.0,
        max_iter=400,
        source_prior_mean=source_prior_mean,
    )
    post = sampler(
        sim, y.reshape(1, 1, 12, 12), psf, sigma, estimate.reshape(1, 1, 6, 6), torch.log10(kappa), options=opts
    )
    s = post.source.reshape(3000, 36)
    std = cov.diagonal().sqrt()
    # means within 4 Monte-Carlo standard errors; variances within 12% (3000 samples: ~2.6% rms)
    assert ((s.mean(0) - mean).abs() / (std / 3000**0.5)).max() < 4.5
    assert ((s.var(0) / cov.diagonal()) - 1).abs().max() < 0.12
    # off-diagonal structure: the sample correlation matrix matches the exact one
    corr = cov / torch.outer(std, std)
    assert (torch.corrcoef(s.T) - corr).abs().max() < 0.08
    # kappa was held fixed; every sample fits the data as a posterior sample should (chi2_nu ~ 1)
    torch.testing.assert_close(post.log10_kappa, torch.log10(kappa).expand_as(post.log10_kappa))
    assert 0.7 < float(post.chi2_nu.median()) < 1.3


def test_marginal_sampler_draws_the_exact_source_posterior_given_kappa():
    # with no kappa freedom (all mode widths 0, no shear) the collapsed sampler's source draws are the
    # zero-mean Gaussian prior's exact linear posterior
    sim, kappa, psf, a = _problem()
    sigma, tau, n = 0.05, 0.3, 3000
    truth = torch.rand(36, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = a @ truth + sigma * torch.randn(144, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mean, cov = _exact(a, y, sigma, torch.zeros(36, dtype=torch.float64), tau)
    widths = dict.fromkeys(
        ("log10_kappa_offset_sigma", "slope_prior_sigma", "quadrupole_prior_sigma", "quadrupole_slope_sigma"), 0.0
    )
    opts = PosteriorOptions(n_samples=n, source_prior_sigma=tau, method="marginal", **widths)
    post = marginal_samples(
        sim, y.reshape(1, 1, 12, 12), psf, sigma, torch.zeros(1, 1, 6, 6, dtype=torch.float64), torch.log10(kappa),
        options=opts,
    )  # fmt: skip
    s = post.source.reshape(n, 36)
    std = cov.diagonal().sqrt()
    assert ((s.mean(0) - mean).abs() / (std / n**0.5)).max() < 4.5
    assert ((s.var(0) / cov.diagonal()) - 1).abs().max() < 0.12
    assert (torch.corrcoef(s.T) - cov / torch.outer(std, std)).abs().max() < 0.08
    torch.testing.assert_close(post.log10_kappa, torch.log10(kappa).expand_as(post.log10_kappa))
    assert 0.7 < float(post.chi2_nu.median()) < 1.3


@SAMPLERS
def test_a_misspecified_noise_level_shows_as_miscalibration(sampler):
    """Over repeated data sets the truth falls within 1 posterior sigma ~68% of the time when the
    noise level is right, and far less often when it is claimed 3x too small."""
    sim, kappa, psf, a = _problem()
    sigma, tau = 0.05, 0.5
    inside = {1.0: [], 1 / 3: []}
    for k in range(12):
        gen = torch.Generator().manual_seed(100 + k)
        truth = 0.5 + tau * torch.randn(36, dtype=torch.float64, generator=gen)  # drawn from the prior
        y = a @ truth + sigma * torch.randn(144, dtype=torch.float64, generator=gen)
        for factor in inside:
            opts = PosteriorOptions(n_samples=200, source_prior_sigma=tau, log10_kappa_prior_sigma=0.0, seed=k)
            post = sampler(
                sim,
                y.reshape(1, 1, 12, 12),
                psf,
                sigma * factor,
                torch.full((1, 1, 6, 6), 0.5, dtype=torch.float64),
                torch.log10(kappa),
                options=opts,
            )
            m, sd = post.mean_std("source")
            inside[factor].append(((m.flatten() - truth).abs() < sd.flatten()).double().mean())
    right, wrong = float(torch.stack(inside[1.0]).mean()), float(torch.stack(inside[1 / 3]).mean())
    assert 0.6 < right < 0.76, right
    assert wrong < 0.45, wrong


def test_bad_options_are_refused():
    for bad in (
        dict(n_samples=0),
        dict(source_prior_sigma=0.0),
        dict(log10_kappa_prior_sigma=-1.0),
        dict(method="mcmc"),
        dict(rank=0),
        dict(gauss_newton_steps=0),
        dict(source_prior_mean="truth"),
    ):
        with pytest.raises(RimlensInputError):
            PosteriorOptions(**bad)
    sim, kappa, psf, _ = _problem()
    for sampler in (laplace_samples, perturb_and_map):  # one observation at a time
        with pytest.raises(RimlensInputError, match="samples one observation"):
            sampler(sim, torch.zeros(2, 1, 12, 12), psf, 0.05, torch.zeros(1, 1, 6, 6), torch.log10(kappa))


def test_reconstruct_posterior_cli(tmp_path):
    """`rimlens reconstruct --posterior N`: posterior-mean maps, std maps, the samples and percentiles."""
    import json

    import h5py
    import numpy as np

    from rimlens.cli import main
    from rimlens.io.fits import read_image, write_image
    from test_cutouts import _lens

    obs = _lens(160, (0.0, 0.0))
    for name, data in (("image", obs.image), ("psf", obs.psf), ("noise", obs.noise_sigma)):
        write_image(tmp_path / f"{name}.fits", data, {"PIXSCALE": 0.05})
    files = [str(tmp_path / "image.fits"), "--psf", str(tmp_path / "psf.fits"), "--noise", str(tmp_path / "noise.fits")]
    out = tmp_path / "out"
    assert main(["reconstruct", *files, "--posterior", "4", "--lens-light", "none", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    p = s["posterior"]
    assert p["samples"] == 4 and len(p["einstein_radius_arcsec_p16_p50_p84"]) == 3
    lo, mid, hi = p["einstein_radius_arcsec_p16_p50_p84"]
    assert lo <= mid <= hi and abs(mid - 1.2) < 0.15  # the test lens has theta_E 1.2"
    # the samples fit the data: they start from the pixel refinement of the RIM's estimate
    assert s["refine_steps"] >= 1 and p["chi2_nu_p16_p50_p84"][2] < 2.0, (s["baseline_chi2_nu"], p)
    with h5py.File(out / "posterior_samples.h5") as h5:
        kappa = h5["kappa"][:]
        assert kappa.shape[0] == 4 and h5["source"].shape[0] == 4
    mean, _ = read_image(out / "kappa.fits", "kappa")
    std, _ = read_image(out / "kappa_std.fits", "kappa std")
    np.testing.assert_allclose(mean, kappa.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, kappa.std(0, ddof=1), rtol=1e-4, atol=1e-7)
    assert (out / "source_std.fits").exists()
    assert main(["reconstruct", *files, "--posterior", "1", "--out", str(tmp_path / "bad")]) == 2


def test_correlated_prior_field_has_unit_variance_and_gaussian_correlation():
    """White noise smoothed by a Gaussian of standard deviation l (pixels) has, away from the edges,
    unit variance and correlation exp(-d^2 / (4 l^2)) at a lag of d pixels (closed form)."""
    from rimlens.inference.posterior import correlated_field

    g = torch.Generator().manual_seed(3)
    white = torch.randn(400, 1, 48, 48, generator=g, dtype=torch.float64)
    field = correlated_field(white, 2.0)[..., 12:-12, 12:-12]
    assert abs(float(field.var()) - 1) < 0.02
    for lag in (1, 2, 4):
        corr = float((field[..., :, lag:] * field[..., :, :-lag]).mean() / field.var())
        assert abs(corr - np.exp(-(lag**2) / 16)) < 0.02, (lag, corr)
    assert torch.equal(correlated_field(white, 0.0), white)


def test_samples_that_do_not_fit_are_flagged(tmp_path):
    """A prior far wider than the linearisation holds gives samples that miss the data: the summary
    says so instead of presenting their spread as an error bar."""
    import json

    from rimlens.inference.pipeline import reconstruct_observation
    from rimlens.io.checkpoint import load_model
    from rimlens.io.fits import write_image
    from test_cutouts import _lens

    obs = _lens(160, (0.0, 0.0))
    for name, data in (("image", obs.image), ("psf", obs.psf), ("noise", obs.noise_sigma)):
        write_image(tmp_path / f"{name}.fits", data, {"PIXSCALE": 0.05})
    wide = PosteriorOptions(n_samples=4, log10_kappa_prior_sigma=0.5, source_prior_sigma=1.0, gauss_newton_steps=1)
    reconstruct_observation(
        load_model("default"),
        tmp_path / "image.fits",
        tmp_path / "psf.fits",
        tmp_path / "out",
        noise=tmp_path / "noise.fits",
        lens_light="none",
        posterior=wide,
    )
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["posterior"]["chi2_nu_p16_p50_p84"][1] > 2 * max(s["chi2_nu"], 1.0)
    assert any("posterior samples do not fit" in w for w in s["warnings"])


def test_refinement_stops_when_it_stalls_and_improves_otherwise():
    """refine_estimate from the exact answer (noiseless data, chi2 = 0) cannot gain: it stops after
    STALL_ITERATIONS on each rung of its weight ladder (300, 30, 3, 1: four) instead of spending its whole
    budget, after STALL_ITERATIONS with the weight pinned; from a poor start it lowers chi2_nu."""
    from rimlens.inference.finetune import STALL_ITERATIONS, FinetuneOptions, refine_estimate

    sim, kappa, psf, a = _problem()
    truth = torch.rand(1, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y = (a @ truth.flatten()).reshape(1, 1, 12, 12)
    opts = FinetuneOptions.refine_only(refine_steps=300, target_chi2_nu=0.0)
    assert (opts.refine_weight, opts.refine_weight_min) == (300.0, 1.0)
    # (the first iteration of a rung may still "gain" from round-off at chi2 ~ 1e-28, hence the slack)
    for options, rungs in ((opts, 4), (dataclasses.replace(opts, refine_weight_min=300.0), 1)):
        stuck = refine_estimate(sim, y, psf, 0.05, truth, kappa, options=options)
        assert rungs * STALL_ITERATIONS <= stuck.refine_steps <= rungs * (STALL_ITERATIONS + 2)
        assert stuck.chi2_nu < 1e-12 and stuck.refine_weight == options.refine_weight_min
        torch.testing.assert_close(stuck.source, truth)
    poor = refine_estimate(sim, y, psf, 0.05, 0.5 * truth, kappa, options=opts)
    assert poor.chi2_nu < 0.1 * poor.baseline_chi2_nu


def test_refinement_weight_ladder_reaches_the_noise_a_pinned_weight_cannot():
    """The discrepancy principle: a proximity weight so strong that the fit stalls far above the target
    is lowered down the ladder until the target is met; the same weight pinned stays above it."""
    from rimlens.inference.finetune import FinetuneOptions, refine_estimate

    sim, kappa, psf, a = _problem()
    truth = torch.rand(1, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    noise = 0.05 * torch.randn(144, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    y = (a @ truth.flatten() + noise).reshape(1, 1, 12, 12)
    ladder = FinetuneOptions.refine_only(refine_steps=400, refine_weight=1e6, refine_weight_min=1.0, target_chi2_nu=1.5)
    pinned = dataclasses.replace(ladder, refine_weight_min=1e6)
    held = refine_estimate(sim, y, psf, 0.05, 0.3 * truth, kappa, options=pinned)
    freed = refine_estimate(sim, y, psf, 0.05, 0.3 * truth, kappa, options=ladder)
    assert held.chi2_nu > 1.5 and held.refine_weight == 1e6
    assert freed.chi2_nu < 1.5 and freed.refine_weight < 1e6


def test_posterior_mean_products_fit_the_data(tmp_path):
    """source.fits / kappa.fits are the plain sample means, and they fit the data as well as the
    samples do (a mean clipped at zero added flux wherever the source is empty)."""
    import json

    import h5py

    from rimlens.cli import main
    from rimlens.io.fits import read_image, write_image
    from test_cutouts import _lens

    obs = _lens(160, (0.0, 0.0))
    for name, data in (("image", obs.image), ("psf", obs.psf), ("noise", obs.noise_sigma)):
        write_image(tmp_path / f"{name}.fits", data, {"PIXSCALE": 0.05})
    files = [str(tmp_path / "image.fits"), "--psf", str(tmp_path / "psf.fits"), "--noise", str(tmp_path / "noise.fits")]
    out = tmp_path / "out"
    assert main(["reconstruct", *files, "--posterior", "8", "--lens-light", "none", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    with h5py.File(out / "posterior_samples.h5") as h5:
        samples = h5["source"][:]
    source, _ = read_image(out / "source.fits", "source")
    np.testing.assert_allclose(
        source, samples.mean(0) * float(source.max() / samples.mean(0).max()), rtol=1e-4, atol=1e-6
    )
    assert s["chi2_nu"] <= 1.2 * s["posterior"]["chi2_nu_p16_p50_p84"][1], s


def test_error_modes_follow_the_estimate_and_their_widths():
    """The global modes of log10 kappa about an SIS's own centre and Einstein radius (closed form:
    kappa = theta_E / (2 r), theta_E = 1.2"): the offset is the width everywhere, the slope mode is
    -width * log10(r / theta_E) (zero on the Einstein ring), the quadrupoles are cos / sin 2 phi;
    zero widths drop modes."""
    from rimlens.inference.posterior import kappa_error_modes
    from rimlens.physics.lens_metrics import einstein_radius_of_map

    grid = PixelGrid(64, 0.12)
    x, y = grid.coordinates(torch.float64)
    r = torch.hypot(x, y)
    log10_kappa = torch.log10(1.2 / (2 * r))[None, None]
    opts = PosteriorOptions(
        log10_kappa_offset_sigma=0.1, slope_prior_sigma=0.2, quadrupole_prior_sigma=0.03, quadrupole_slope_sigma=0.05
    )
    modes = kappa_error_modes(log10_kappa, grid, opts)
    assert modes.shape == (6, 64, 64)
    assert torch.allclose(modes[0], torch.full_like(r, 0.1))
    # the modes are about the map's own Einstein radius, measured on point-sampled pixels: 2.7% below
    # 1.2" here (the cusp's pixel-centre values fall short of its pixel means)
    theta = einstein_radius_of_map(10**log10_kappa, grid, (0.0, 0.0))
    assert abs(theta / 1.2 - 1) < 0.03
    far = r > 0.5
    assert torch.allclose(modes[1], -0.2 * torch.log10(r.clamp_min(0.12) / theta), atol=1e-9)
    phi = torch.atan2(y, x)
    assert torch.allclose(modes[2][far], 0.03 * torch.cos(2 * phi)[far], atol=1e-6)
    assert torch.allclose(modes[5][far], (0.05 * torch.log10(r / theta) * torch.sin(2 * phi))[far], atol=1e-9)
    none = PosteriorOptions(
        log10_kappa_offset_sigma=0.1, slope_prior_sigma=0, quadrupole_prior_sigma=0, quadrupole_slope_sigma=0
    )
    assert kappa_error_modes(log10_kappa, grid, none).shape == (1, 64, 64)


def test_source_dilation_stretches_a_gaussian_by_the_factor():
    """S(beta / (1 + d)) of a round Gaussian of width w is a Gaussian of width w (1 + d) (closed form),
    and d = 0 leaves the source unchanged."""
    from rimlens.inference.posterior import dilate_source

    grid = PixelGrid(64, 3.0 / 64)
    x, y = grid.coordinates(torch.float64)
    source = torch.exp(-(x**2 + y**2) / (2 * 0.3**2))[None, None].expand(2, 1, 64, 64)
    out = dilate_source(source, torch.tensor([0.0, 0.2], dtype=torch.float64))
    assert torch.allclose(out[0], source[0], atol=1e-12)

    def width(img):
        return float(torch.sqrt((img * (x**2 + y**2)).sum() / img.sum() / 2))

    assert abs(width(out[1, 0]) / width(source[0, 0]) - 1.2) < 0.01


def test_data_free_samples_follow_the_prior_with_its_modes():
    """With data that say nothing (sigma 1e4), the Laplace samples' log10 kappa about the estimate is
    the prior: per-pixel variance tau^2 (correlated field, pixel-independent here) plus the sum of the
    squared error modes at that pixel -- so the modes are in the sampler with their widths."""
    from rimlens.inference.posterior import kappa_error_modes

    sim, kappa, psf, _ = _problem()
    opts = PosteriorOptions(
        n_samples=2000,
        source_prior_sigma=0.3,
        log10_kappa_prior_sigma=0.05,
        log10_kappa_correlation_arcsec=0.0,
        log10_kappa_offset_sigma=0.1,
        slope_prior_sigma=0.2,
        quadrupole_prior_sigma=0.05,
        quadrupole_slope_sigma=0.05,
        gauss_newton_steps=1,
    )
    e0 = torch.log10(kappa)
    post = laplace_samples(
        sim,
        torch.zeros(1, 1, 12, 12, dtype=torch.float64),
        psf,
        1e4,
        torch.zeros(1, 1, 6, 6, dtype=torch.float64),
        e0,
        options=opts,
    )
    delta = (post.log10_kappa - e0)[:, 0]
    modes = kappa_error_modes(e0, sim.image_grid, opts)
    expected = 0.05**2 + (modes**2).sum(0)
    ratio = delta.var(0) / expected
    # 2000 samples: the variance's relative standard error is sqrt(2 / 2000) = 3%
    assert float((ratio - 1).abs().max()) < 0.15, ratio
    # the modes correlate distant pixels as the prior says: covariance of the two corners' deviations
    cov = float(((delta[:, 0, 0] - delta[:, 0, 0].mean()) * (delta[:, -1, -1] - delta[:, -1, -1].mean())).mean())
    assert abs(cov - float((modes[:, 0, 0] * modes[:, -1, -1]).sum())) < 0.15 * float(expected[0, 0])
    assert float(delta.var(0).mean()) > 2 * 0.05**2  # without the modes it would be tau^2 alone
