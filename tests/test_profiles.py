"""Analytic profiles: point values from independent sources and div(alpha) = 2 kappa."""

import math

import numpy as np
import pytest
import torch

from rimlens.physics import profiles


def test_nfw_pyautogalaxy_value():
    # PyAutoGalaxy NFWSph kappa_s = 1, r_s = 1 at (0.1625, 0.1625) -> alpha = 0.56194 per component.
    t = torch.tensor([0.1625], dtype=torch.float64)
    ax, ay = profiles.nfw_deflection(t, t, 1.0, 1.0)
    assert float(ax) == pytest.approx(0.56194, rel=1e-4)
    assert float(ay) == pytest.approx(0.56194, rel=1e-4)


def test_nfw_kappa_continuous_at_rs():
    r = torch.tensor([1 - 1e-3, 1 - 1e-5, 1.0, 1 + 1e-5, 1 + 1e-3], dtype=torch.float64)
    k = profiles.nfw_kappa(r, torch.zeros_like(r), 1.0, 1.0)
    assert float(k[2]) == pytest.approx(2 / 3, rel=1e-9)
    assert torch.all(torch.abs(torch.diff(k)) < 1e-3)


def test_sis_hand_value():
    # PyAutoGalaxy IsothermalSph centre (y, x) = (-0.7, 0.5), theta_E = 1.3 at (y, x) = (0.1875, 0.1625)
    x = torch.tensor([0.1625], dtype=torch.float64)
    y = torch.tensor([0.1875], dtype=torch.float64)
    ax, ay = profiles.sis_deflection(x, y, 1.3, center_x=0.5, center_y=-0.7)
    assert float(ay) == pytest.approx(1.21510, rel=1e-4)
    assert float(ax) == pytest.approx(-0.46208, rel=1e-4)


def test_sie_round_equals_sis():
    x = torch.linspace(-2, 2, 11, dtype=torch.float64)[:, None].expand(11, 11) + 0.013
    y = x.T.clone() + 0.007
    a1 = profiles.sie_deflection(x, y, 1.2, 1.0, 0.3)
    a2 = profiles.sis_deflection(x, y, 1.2)
    assert torch.allclose(a1[0], a2[0], atol=1e-6) and torch.allclose(a1[1], a2[1], atol=1e-6)


@pytest.mark.parametrize(
    "kappa_fn,alpha_fn,params",
    [
        (profiles.gaussian_kappa, profiles.gaussian_deflection, (0.8, 0.4, 0.1, -0.2)),
        (profiles.sis_kappa, profiles.sis_deflection, (1.1, 0.1, 0.05)),
        (profiles.sie_kappa, profiles.sie_deflection, (1.3, 0.6, 0.7, 0.1, -0.1, 0.05)),
        (profiles.sie_kappa, profiles.sie_deflection, (0.9, 0.35, -1.2, 0.0, 0.0, 0.0)),
        (profiles.nfw_kappa, profiles.nfw_deflection, (0.7, 0.8, 0.1, 0.2)),
    ],
)
def test_divergence_of_deflection_is_twice_kappa(kappa_fn, alpha_fn, params):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(200, generator=g, dtype=torch.float64) * 4 - 2).requires_grad_(True)
    y = (torch.rand(200, generator=g, dtype=torch.float64) * 4 - 2).requires_grad_(True)
    ax, ay = alpha_fn(x, y, *params)
    dax = torch.autograd.grad(ax.sum(), x, retain_graph=True)[0]
    day = torch.autograd.grad(ay.sum(), y)[0]
    kappa = kappa_fn(x.detach(), y.detach(), *params)
    assert torch.allclose(dax + day, 2 * kappa, rtol=1e-8, atol=1e-10)


def test_sersic_half_light():
    # integrate a round Sersic numerically: R_e encloses half the light
    n_s, r_e = 2.5, 0.4
    r = torch.linspace(1e-6, 40, 400001, dtype=torch.float64)
    i = profiles.sersic(r, torch.zeros_like(r), 1.0, r_e, n_s)
    cum = torch.cumulative_trapezoid(2 * math.pi * r * i, r)
    frac = float(cum[torch.searchsorted(r, torch.tensor(r_e, dtype=torch.float64)) - 1] / cum[-1])
    assert frac == pytest.approx(0.5, abs=2e-3)


@pytest.mark.parametrize("slope", [1.7, 2.0, 2.3])
def test_epl_kappa_matches_lenstronomy_and_the_sie(slope):
    from lenstronomy.LensModel.lens_model import LensModel

    rng = np.random.default_rng(5)
    x, y = rng.uniform(-2, 2, 200), rng.uniform(-2, 2, 200)
    q, phi, te, cx, cy = 0.7, 0.4, 1.3, 0.1, -0.05
    ours = profiles.epl_kappa(torch.tensor(x), torch.tensor(y), te, slope, q, phi, cx, cy).numpy()
    e1, e2 = (1 - q) / (1 + q) * np.cos(2 * phi), (1 - q) / (1 + q) * np.sin(2 * phi)
    theirs = LensModel(["EPL"]).kappa(
        x, y, [{"theta_E": te, "gamma": slope, "e1": e1, "e2": e2, "center_x": cx, "center_y": cy}]
    )
    assert np.allclose(ours, theirs, rtol=1e-6)
    if slope == 2.0:
        sie = profiles.sie_kappa(torch.tensor(x), torch.tensor(y), te, q, phi, cx, cy).numpy()
        assert np.allclose(ours, sie, rtol=1e-12)
