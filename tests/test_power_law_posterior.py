"""The power-law posterior (rimlens.inference.power_law_posterior): its draws against the closed-form joint
Gaussian of (mass, source), its mass derivative against autograd, and its coverage over noise realisations
(right with the true noise, wrong with a mis-stated one)."""

import numpy as np
import pytest
import torch

from rimlens.errors import RimlensInputError
from rimlens.inference.power_law import SourceInversion
from rimlens.inference.power_law_posterior import _mass_jacobian, sample_about_mass

V_TRUE = torch.tensor([0.3, 2.1, 0.05, -0.03, 0.01, -0.02, 0.02, 0.01], dtype=torch.float64)


def _problem(seed: int, noise: float = 0.02, n: int = 21, s: int = 8):
    """A small lens: a Gaussian source behind ``V_TRUE`` on ``n x n`` pixels of 0.05", with its inversion."""
    kernel = torch.as_tensor(np.outer([0.25, 0.5, 0.25], [0.25, 0.5, 0.25]))
    inv = SourceInversion(torch.zeros(n, n), torch.full((n, n), noise), kernel, 0.05, source_pixels=s, supersample=2)
    inv.box = (0.0, 0.0, 0.2)
    ax = torch.linspace(-1, 1, s, dtype=torch.float64)
    source = torch.exp(-0.5 * (ax[None, :] ** 2 + (ax[:, None] - 0.1) ** 2) / 0.35**2).reshape(-1)
    clean = inv.model(source, inv._coords(V_TRUE))
    rng = np.random.default_rng(seed)
    inv.data = clean + torch.as_tensor(rng.normal(0, noise, clean.shape))
    return inv, source


def _joint_precision(inv: SourceInversion, v: torch.Tensor, lam: float) -> torch.Tensor:
    """The dense joint precision of (mass, source) of the linearised problem."""
    x = inv.solve(v, lam)
    j = _mass_jacobian(inv, v, x)
    b = inv.design_matrix(v)
    top = torch.cat([j.T @ j, j.T @ b], 1)
    bottom = torch.cat([b.T @ j, b.T @ b + lam * inv.regularisation_matrix()], 1)
    return torch.cat([top, bottom], 0)


def test_the_mass_derivative_matches_autograd():
    torch.set_num_threads(1)
    inv, source = _problem(0)
    j = _mass_jacobian(inv, V_TRUE, source)

    def image(v):
        return (inv.model(source, inv._coords(v)) * inv.w2.sqrt()).reshape(-1)

    exact = torch.autograd.functional.jacobian(image, V_TRUE)
    # the bilinear source makes the image piecewise smooth in the mass: where a ray crosses a source pixel's
    # edge within the step the two differ (~5% of the entries here); each column agrees to 1% in norm
    err = (j - exact).norm(dim=0) / exact.norm(dim=0)
    assert float(err.max()) < 0.01, err
    assert float((j - exact).abs().le(1e-6 * exact.abs().max()).float().mean()) > 0.9


def test_draws_follow_the_joint_gaussian_of_mass_and_source():
    torch.set_num_threads(1)
    inv, _ = _problem(1)
    lam = 3.0
    cov = torch.linalg.inv(_joint_precision(inv, V_TRUE, lam))
    n = 4000
    post = sample_about_mass(inv, V_TRUE, lam, n, seed=2, marginalise_light=False, resolve_source=False)
    x_hat = inv.solve(V_TRUE, lam)
    d = torch.cat([post.masses - V_TRUE, post.sources.reshape(n, -1) - x_hat], 1)
    std = cov.diagonal().sqrt()
    # means within 4.5 Monte-Carlo errors, variances within 12%, correlations within 0.08
    assert (d.mean(0).abs() < 4.5 * std / n**0.5).all()
    emp = torch.cov(d.T)
    torch.testing.assert_close(
        emp.diagonal() / cov.diagonal(), torch.ones(d.shape[1], dtype=torch.float64), atol=0.12, rtol=0
    )
    corr = emp / torch.outer(emp.diagonal().sqrt(), emp.diagonal().sqrt())
    exact = cov / torch.outer(std, std)
    assert float((corr - exact).abs().max()) < 0.08
    torch.testing.assert_close(torch.as_tensor(post.covariance_statistical), cov[:8, :8], rtol=1e-6, atol=0)
    # widened to a given slope width, the other parameters follow the slope (their regression on it kept)
    wide = sample_about_mass(
        inv, V_TRUE, lam, n, seed=3, slope_sigma_total=3 * float(std[1]), marginalise_light=False, resolve_source=False
    )
    assert abs(float(wide.masses[:, 1].std()) / (3 * float(std[1])) - 1) < 0.05
    slope_dev = wide.masses[:, 1] - V_TRUE[1]
    beta = float(((wide.masses[:, 0] - V_TRUE[0]) * slope_dev).sum() / (slope_dev * slope_dev).sum())
    assert abs(beta / float(cov[0, 1] / cov[1, 1]) - 1) < 0.1
    with pytest.raises(RimlensInputError, match="at least 2"):
        sample_about_mass(inv, V_TRUE, lam, 1)
    # a slope beyond the deflection's bound (a fit that ran off, as on one lenstronomy lens at 3.03) leaves the
    # image unchanged by the slope: refused by name, not a singular-matrix traceback
    off = V_TRUE.clone()
    off[1] = 3.1
    with pytest.raises(RimlensInputError, match="constrain the power law's slope"):
        sample_about_mass(inv, off, lam, 4)


def _fit(inv: SourceInversion, v: torch.Tensor, lam: float, steps: int = 6) -> torch.Tensor:
    """Gauss-Newton on the penalised chi2 over (mass, source) jointly, from ``v``."""
    x = inv.solve(v, lam)
    for _ in range(steps):
        p = _joint_precision(inv, v, lam)
        r = ((inv.data - inv.model(x, inv._coords(v))) * inv.w2.sqrt()).reshape(-1)
        j = _mass_jacobian(inv, v, x)
        b = inv.design_matrix(v)
        g = torch.cat([j.T @ r, b.T @ r - lam * inv.regularise(x)])
        step = torch.linalg.solve(p, g)
        v = v + step[: v.shape[0]]
        x = inv.solve(v, lam)
    return v


@pytest.mark.parametrize("claimed_over_true", [1.0, 1 / 3])
def test_the_mass_widths_cover_the_truth_over_noise_realisations(claimed_over_true):
    # 40 noise realisations of one lens, each fitted: the fraction of fits within one posterior sigma of the truth
    # is ~0.68 when the noise is stated right (binomial 1-sigma 0.07 per parameter; measured 0.67 over 60) and
    # ~0.26 (P(|z| < 1/3)) when it is stated 3x too small (measured 0.25)
    torch.set_num_threads(1)
    lam = 3.0
    inside = []
    for seed in range(40):
        inv, _ = _problem(100 + seed)
        inv.w2 = inv.w2 / claimed_over_true**2
        v = _fit(inv, V_TRUE.clone(), lam, steps=4)
        post = sample_about_mass(inv, v, lam, 2, marginalise_light=False, resolve_source=False)
        sigma = np.sqrt(np.diag(post.covariance_statistical))
        inside.append(np.abs((v - V_TRUE).numpy()) <= sigma)
    frac = np.mean(inside, axis=0)
    if claimed_over_true == 1.0:
        assert 0.58 <= frac.mean() <= 0.78, frac
        assert frac[:2].min() >= 0.45 and frac[:2].max() <= 0.9, frac  # Einstein radius and slope
    else:
        assert frac.mean() < 0.4, frac
