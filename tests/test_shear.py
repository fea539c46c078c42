"""External shear: the deflection against lenstronomy's SHEAR, the simulator's image with a shear
against the same image made from an explicit deflection, and the shear's likelihood gradient
against finite differences."""

import pytest
import torch

from rimlens.errors import RimlensInputError
from rimlens.physics import PSF, LensSimulator, PixelGrid
from rimlens.physics.profiles import shear_deflection, sie_deflection

lens_model = pytest.importorskip("lenstronomy.LensModel.lens_model")


def test_shear_deflection_matches_lenstronomy():
    x, y = torch.meshgrid(
        torch.linspace(-3, 3, 25, dtype=torch.float64), torch.linspace(-2, 4, 25, dtype=torch.float64), indexing="xy"
    )
    lm = lens_model.LensModel(["SHEAR"])
    for g1, g2 in [(0.05, -0.02), (-0.1, 0.07), (0.0, 0.1)]:
        ax, ay = shear_deflection(x, y, g1, g2)
        fx, fy = lm.alpha(x.numpy().ravel(), y.numpy().ravel(), [{"gamma1": g1, "gamma2": g2, "ra_0": 0, "dec_0": 0}])
        torch.testing.assert_close(ax.ravel(), torch.as_tensor(fx), rtol=0, atol=1e-12)
        torch.testing.assert_close(ay.ravel(), torch.as_tensor(fy), rtol=0, atol=1e-12)
        # zero convergence, shear (g1, g2): the Hessian of lenstronomy's potential
        f_xx, f_xy, _, f_yy = lm.hessian(0.3, -0.7, [{"gamma1": g1, "gamma2": g2}])
        assert abs(0.5 * (f_xx + f_yy)) < 1e-12
        assert abs(0.5 * (f_xx - f_yy) - g1) < 1e-12 and abs(f_xy - g2) < 1e-12


@pytest.mark.parametrize("supersample", [1, 2])
def test_simulator_shear_equals_explicit_deflection(supersample):
    grid, src_grid = PixelGrid(32, 7.68), PixelGrid(32, 3.0)
    sim = LensSimulator(grid, src_grid, supersample=supersample)
    x, y = sim.ray_grid.coordinates(torch.float64)
    source = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    shear = torch.tensor([[0.06, -0.03], [-0.02, 0.09]], dtype=torch.float64)
    alpha_lens = torch.stack(sie_deflection(x, y, 1.2, 0.8, 0.4), dim=0)[None].expand(2, -1, -1, -1)
    ax, ay = shear_deflection(x, y, shear[:, 0, None, None], shear[:, 1, None, None])
    explicit = sim.lens(source, alpha=alpha_lens + torch.stack([ax, ay], dim=1))
    torch.testing.assert_close(sim.lens(source, alpha=alpha_lens, shear=shear), explicit, rtol=0, atol=1e-12)
    # a shear changes the image; zero shear does not
    assert (sim.lens(source, alpha=alpha_lens, shear=shear) - sim.lens(source, alpha=alpha_lens)).abs().max() > 1e-3
    torch.testing.assert_close(
        sim.lens(source, alpha=alpha_lens, shear=torch.zeros_like(shear)), sim.lens(source, alpha=alpha_lens)
    )


def test_shear_gradient_matches_finite_differences():
    torch.manual_seed(0)
    grid = PixelGrid(24, 7.68)
    sim = LensSimulator(grid, PixelGrid(24, 3.0))
    x, y = grid.coordinates(torch.float64)
    source = torch.exp(-((x / 1.5) ** 2 + (y / 1.2) ** 2) * 4)[None, None] * 1.0
    kappa = (0.8 / torch.sqrt(x**2 + y**2 + 0.05))[None, None]
    psf = PSF.gaussian(torch.tensor([0.2], dtype=torch.float64), grid.pixel_scale_arcsec, size=7)
    truth = torch.tensor([[0.05, -0.04]], dtype=torch.float64)
    obs = sim.forward(source, kappa, psf, shear=truth) + 0.01 * torch.randn(1, 1, 24, 24, dtype=torch.float64)
    shear = torch.tensor([[0.02, 0.01]], dtype=torch.float64)
    eta = torch.log10(kappa)
    g_s, g_eta, g_shear, chi2 = sim.likelihood_gradient_with_shear(obs, source, eta, shear, psf, 0.01)
    eps = 1e-6
    for k in range(2):
        d = torch.zeros_like(shear)
        d[0, k] = eps
        up = sim.chi_squared(obs, source, kappa, psf, 0.01, shear=shear + d)
        down = sim.chi_squared(obs, source, kappa, psf, 0.01, shear=shear - d)
        fd = 0.5 * (up - down) / (2 * eps)
        assert torch.allclose(g_shear[0, k], fd[0], rtol=1e-5), (g_shear, fd)
    # the source / kappa gradients are those of likelihood_gradient at the same shear
    g_s2, g_eta2, chi2b = sim.likelihood_gradient(obs, source, eta, psf, 0.01, shear=shear)
    torch.testing.assert_close(g_s, g_s2)
    torch.testing.assert_close(g_eta, g_eta2)
    torch.testing.assert_close(chi2, chi2b)
    # functional form agrees
    f = sim.likelihood_gradient_with_shear(obs, source, eta, shear, psf, 0.01, functional=True)
    torch.testing.assert_close(f[2], g_shear)


def test_bad_shear_is_refused():
    sim = LensSimulator(PixelGrid(16, 7.68), PixelGrid(16, 3.0))
    src, kap = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    psf = PSF.gaussian(torch.tensor([0.2]), 0.48, size=5)
    for bad, msg in [
        (torch.zeros(2, 3), "B x 2"),
        (torch.tensor([[float("nan"), 0.0]] * 2), "NaN"),
        (torch.zeros(3, 2), "rows"),
    ]:
        with pytest.raises(RimlensInputError, match=msg):
            sim.forward(src, kap, psf, shear=bad)
