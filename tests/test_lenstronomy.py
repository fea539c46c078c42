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


def _lenstronomy_image(n, scale):
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
        kwargs_numerics={"supersampling_factor": 1},
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
