"""Full image: SIE + Sersic source + Gaussian PSF, rimlens vs lenstronomy (independent code)."""

import math

import numpy as np
import pytest
import torch

from rimlens.physics import PSF, LensSimulator, PixelGrid, profiles

lenstronomy = pytest.importorskip("lenstronomy")
from lenstronomy.Data.imaging_data import ImageData  # noqa: E402
from lenstronomy.Data.psf import PSF as LensPSF  # noqa: E402
from lenstronomy.ImSim.image_model import ImageModel  # noqa: E402
from lenstronomy.LensModel.lens_model import LensModel  # noqa: E402
from lenstronomy.LightModel.light_model import LightModel  # noqa: E402
from lenstronomy.Util import param_util  # noqa: E402

THETA_E, Q, PHI, X0, Y0 = 1.2, 0.75, 0.5, 0.05, -0.03
FWHM = 0.15


def _lenstronomy_image(n, scale, supersampling=1):
    """lenstronomy's image; with ``supersampling = f`` its rays go through f x f sub-pixel centres,
    averaged per pixel before the PSF (``supersampling_convolution=False``, the PSF at the image
    pixel scale: rimlens' model)."""
    e1, e2 = param_util.phi_q2_ellipticity(PHI, Q)
    kwargs_lens = [dict(theta_E=THETA_E, e1=e1, e2=e2, center_x=X0, center_y=Y0)]
    se1, se2 = param_util.phi_q2_ellipticity(-0.3, 0.8)
    kwargs_source = [dict(amp=1.0, R_sersic=0.25, n_sersic=1.0, e1=se1, e2=se2, center_x=0.08, center_y=0.04)]
    c = -(n - 1) / 2 * scale
    data = ImageData(image_data=np.zeros((n, n)), ra_at_xy_0=c, dec_at_xy_0=c, transform_pix2angle=np.eye(2) * scale)
    model = ImageModel(
        data,
        LensPSF(psf_type="GAUSSIAN", fwhm=FWHM, truncation=5),
        lens_model_class=LensModel(["SIE"]),
        source_model_class=LightModel(["SERSIC_ELLIPSE"]),
        kwargs_numerics={"supersampling_factor": supersampling, "supersampling_convolution": False},
    )
    # lenstronomy returns flux per pixel (surface brightness x pixel area)
    image = model.image(kwargs_lens=kwargs_lens, kwargs_source=kwargs_source) / scale**2
    return image, kwargs_source


def _source_on_grid(src_grid, kwargs_source):
    sx, sy = src_grid.coordinates(torch.float64)
    light = LightModel(["SERSIC_ELLIPSE"]).surface_brightness(sx.numpy(), sy.numpy(), kwargs_source)
    return torch.as_tensor(np.asarray(light).reshape(sx.shape))[None, None]


def test_analytic_deflection_image_matches_lenstronomy():
    n, scale = 100, 0.05
    ref, kwargs_source = _lenstronomy_image(n, scale)
    img_grid, src_grid = PixelGrid(n, scale), PixelGrid(240, 0.0125)
    sim = LensSimulator(img_grid, src_grid)
    x, y = img_grid.coordinates(torch.float64)
    alpha = torch.stack(profiles.sie_deflection(x, y, THETA_E, Q, PHI, X0, Y0))[None]
    source = _source_on_grid(src_grid, kwargs_source)
    ours = PSF.gaussian(FWHM, scale, dtype=torch.float64).convolve(sim.lens(source, alpha=alpha))[0, 0].numpy()
    assert np.abs(ours - ref).max() <= 0.01 * ref.max()


def test_pixelated_kappa_image_matches_lenstronomy():
    # The convergence is pixelated on a grid wide enough that, truncated along its own isodensity
    # ellipse (no force inside a homoeoid), the deflection in the central image matches the SIE.
    n, scale = 240, 0.05
    ref, kwargs_source = _lenstronomy_image(n, scale)
    img_grid, src_grid = PixelGrid(n, scale), PixelGrid(240, 0.0125)
    sim = LensSimulator(img_grid, src_grid)
    x, y = img_grid.coordinates(torch.float64)
    # pixel-averaged (8 x 8 sub-pixels) so that the cusp's mass is right
    kappa = profiles.pixelate(
        profiles.sie_kappa,
        img_grid,
        8,
        torch.float64,
        theta_e_arcsec=THETA_E,
        axis_ratio=Q,
        phi_rad=PHI,
        center_x=X0,
        center_y=Y0,
    )[0, 0]
    xp = (x - X0) * math.cos(PHI) + (y - Y0) * math.sin(PHI)
    yp = -(x - X0) * math.sin(PHI) + (y - Y0) * math.cos(PHI)
    kappa = torch.where(torch.sqrt(Q * xp**2 + yp**2 / Q) < 5.5, kappa, torch.zeros_like(kappa))[None, None]
    source = _source_on_grid(src_grid, kwargs_source)
    ours = sim.forward(source, kappa, PSF.gaussian(FWHM, scale, dtype=torch.float64))[0, 0].numpy()
    c = slice(n // 2 - 50, n // 2 + 50)  # central 5" where the arcs are
    assert np.abs(ours[c, c] - ref[c, c]).max() <= 0.01 * ref.max()


# ------------------------------------------------------------------ pixel-integrated (supersampled) images
SUPER_TOL = 0.005  # of the peak


def _pixelated_sie(grid, supersample, cut):
    """SIE convergence pixel-averaged on ``grid`` and cut along its isodensity ellipse at ``cut`` arcsec."""
    x, y = grid.coordinates(torch.float64)
    kappa = profiles.pixelate(
        profiles.sie_kappa,
        grid,
        supersample,
        torch.float64,
        theta_e_arcsec=THETA_E,
        axis_ratio=Q,
        phi_rad=PHI,
        center_x=X0,
        center_y=Y0,
    )[0, 0]
    xp = (x - X0) * math.cos(PHI) + (y - Y0) * math.sin(PHI)
    yp = -(x - X0) * math.sin(PHI) + (y - Y0) * math.cos(PHI)
    return torch.where(torch.sqrt(Q * xp**2 + yp**2 / Q) < cut, kappa, torch.zeros_like(kappa))[None, None]


@pytest.mark.parametrize("factor", [4, 5])
def test_supersampled_analytic_deflection_image_matches_lenstronomy(factor):
    """0.12"/px: rimlens' pixel-integrated image (rays through f x f sub-pixels, the analytic SIE
    deflection on its fine ray grid) matches lenstronomy's supersampling_factor=f image to 0.5% of the
    peak (measured 0.09%, limited by the source grid); the point-sampled image misses it by 7.1%."""
    n, scale = 48, 0.12
    ref, kwargs_source = _lenstronomy_image(n, scale, supersampling=factor)
    img_grid, src_grid = PixelGrid(n, scale), PixelGrid(480, 0.00625)
    source = _source_on_grid(src_grid, kwargs_source)
    psf = PSF.gaussian(FWHM, scale, dtype=torch.float64)

    def image(f):
        sim = LensSimulator(img_grid, src_grid, supersample=f)
        x, y = sim.ray_grid.coordinates(torch.float64)
        alpha = torch.stack(profiles.sie_deflection(x, y, THETA_E, Q, PHI, X0, Y0))[None]
        return psf.convolve(sim.lens(source, alpha=alpha))[0, 0].numpy()

    assert np.abs(image(factor) - ref).max() <= SUPER_TOL * ref.max()
    # the point-sampled image does not meet the tolerance (7.1-7.2% of the peak): the test can fail
    assert np.abs(image(1) - ref).max() > 5 * SUPER_TOL * ref.max()


def test_supersampled_pixelated_kappa_image_matches_lenstronomy():
    """0.12"/px, pixelated convergence (pixel-averaged SIE): rimlens' supersample=4 image vs
    lenstronomy's supersampling_factor=4 image (analytic SIE) to 1.5% of the peak (measured 1.05%).

    The remaining error is the convergence's, not the sampling's: a piecewise-constant map at
    0.12"/px deflects rays near the arcs by ~3e-3" differently from the smooth SIE (an O(s^2) error;
    the same comparison at 0.05"/px gives 0.85%, and 1% is the tolerance of the pixelated-kappa test
    above). The 2 px around the lens centre are left out: there the pixelated cusp has a finite core
    and makes a central image (23% of the peak at f=1, 3.4% at f=4) that no ray sampling removes.
    The point-sampled image (f=1) misses the tolerance (6.6%), and so do sub-pixel deflections taken
    as a sum over point masses instead of uniform square pixels (10.2%).
    """
    from rimlens.physics.deflection import deflection_supersampled

    n, scale, f = 100, 0.12, 4
    ref, kwargs_source = _lenstronomy_image(n, scale, supersampling=f)
    img_grid, src_grid = PixelGrid(n, scale), PixelGrid(480, 0.00625)
    kappa = _pixelated_sie(img_grid, 32, cut=5.5)
    source = _source_on_grid(src_grid, kwargs_source)
    psf = PSF.gaussian(FWHM, scale, dtype=torch.float64)
    x, y = img_grid.coordinates(torch.float64)
    r = torch.sqrt((x - X0) ** 2 + (y - Y0) ** 2).numpy()
    central = (np.abs(x.numpy()) < 2.5) & (np.abs(y.numpy()) < 2.5)  # the arcs
    use = central & (r > 2 * scale)
    tol = 0.015 * ref.max()

    sim = LensSimulator(img_grid, src_grid, supersample=f)
    ours = sim.forward(source, kappa, psf)[0, 0].numpy()
    assert np.abs(ours - ref)[use].max() <= tol
    point_sampled = LensSimulator(img_grid, src_grid).forward(source, kappa, psf)[0, 0].numpy()
    assert np.abs(point_sampled - ref)[use].max() > 3 * tol
    point_masses = deflection_supersampled(kappa, scale, f, pixel="point")
    with_points = psf.convolve(sim.lens(source, alpha=point_masses))[0, 0].numpy()
    assert np.abs(with_points - ref)[use].max() > 4 * tol
