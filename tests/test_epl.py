"""The elliptical power law's deflection (Tessore & Metcalf 2015) against lenstronomy and closed forms."""

import numpy as np
import pytest
import torch

from rimlens.physics.profiles import epl_deflection, epl_kappa, sie_deflection

lenstronomy = pytest.importorskip("lenstronomy")
from lenstronomy.Util import param_util  # noqa: E402

CASES = [(1.7, 0.6, 0.3), (2.0, 0.5, 2.0), (2.25, 0.9, -1.0), (2.4, 1.0, 0.0)]


def _plane(n=41, half=2.0):
    ax = torch.linspace(-half, half, n, dtype=torch.float64)
    y, x = torch.meshgrid(ax - 0.007, ax + 0.013, indexing="ij")  # off the centre: no ray on the cusp
    return x, y


@pytest.mark.parametrize(("gamma", "q", "phi"), CASES)
def test_epl_deflection_matches_lenstronomy(gamma, q, phi):
    from lenstronomy.LensModel.Profiles.epl import EPL

    x, y = _plane()
    e1, e2 = param_util.phi_q2_ellipticity(phi, q)
    ref = EPL().derivatives(x.numpy(), y.numpy(), theta_E=1.2, gamma=gamma, e1=e1, e2=e2, center_x=0.1, center_y=-0.05)
    ours = epl_deflection(x, y, 1.2, gamma, q, phi, 0.1, -0.05)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a.numpy(), b, atol=1e-9)


def test_epl_deflection_is_the_sie_at_gamma_2_and_its_divergence_is_twice_kappa():
    x, y = _plane()
    for a, b in zip(epl_deflection(x, y, 1.2, 2.0, 0.6, 0.3), sie_deflection(x, y, 1.2, 0.6, 0.3), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    # div alpha = 2 kappa (the Poisson equation), by automatic differentiation, for a non-isothermal slope
    xs = x.clone().requires_grad_(True)
    ys = y.clone().requires_grad_(True)
    ax, ay = epl_deflection(xs, ys, 1.1, 2.3, 0.7, 0.8)
    div = torch.autograd.grad(ax.sum(), xs, retain_graph=True)[0] + torch.autograd.grad(ay.sum(), ys)[0]
    torch.testing.assert_close(div, 2 * epl_kappa(x, y, 1.1, 2.3, 0.7, 0.8), rtol=1e-8, atol=0)


def test_epl_deflection_refuses_a_bad_axis_ratio():
    x, y = _plane(5)
    with pytest.raises(ValueError, match="axis ratio"):
        epl_deflection(x, y, 1.0, 2.0, float("nan"), 0.0)


@pytest.mark.parametrize(("b", "core", "trunc"), [(0.04, 0.005, 0.25), (0.3, 0.05, 1.0)])
def test_pseudo_jaffe_matches_lenstronomy_and_its_closed_form_mass(b, core, trunc):
    from lenstronomy.LensModel.Profiles.pseudo_jaffe import PseudoJaffe as PJaffe

    from rimlens.physics.profiles import pseudo_jaffe_deflection, pseudo_jaffe_kappa

    x, y = _plane()
    sigma0 = b * (trunc - core) / (2 * core * trunc)  # lenstronomy's normalisation: kappa -> b / (2 r) inside
    kw = dict(sigma0=sigma0, Ra=core, Rs=trunc, center_x=0.3, center_y=-0.2)
    ref = PJaffe().derivatives(x.numpy(), y.numpy(), **kw)
    ours = pseudo_jaffe_deflection(x, y, b, core, trunc, 0.3, -0.2)
    for a, r in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a.numpy(), r, atol=1e-9 * b, rtol=1e-7)
    kappa = pseudo_jaffe_kappa(x, y, b, core, trunc, 0.3, -0.2)
    f_xx, _, _, f_yy = PJaffe().hessian(x.numpy(), y.numpy(), **kw)
    np.testing.assert_allclose(kappa.numpy(), 0.5 * (f_xx + f_yy), rtol=1e-7)
    # the deflection far outside the truncation encloses the total mass pi b (s - a): |alpha| r = b (s - a)
    far = torch.tensor([1e4], dtype=torch.float64)
    ax, _ = pseudo_jaffe_deflection(far, torch.zeros(1, dtype=torch.float64), b, core, trunc)
    np.testing.assert_allclose(float(ax) * 1e4, b * (trunc - core), rtol=1e-3)
