"""Lens metrics (Einstein radius, log-slope, annulus and source errors) and exact pixel-mean
convergence, against closed forms: SIS, circular power laws, SIE, and lenstronomy's EPL."""

import math

import numpy as np
import pytest
import torch

from rimlens.physics import PixelGrid, profiles
from rimlens.physics.lens_metrics import (
    disc_pixel_areas,
    einstein_radius_of_map,
    enclosed_mean_kappa,
    kappa_error_in_annulus,
    kappa_peak_center,
    log_slope,
    pixel_mean_kappa,
    source_error,
)

GRID = PixelGrid(64, 0.12)  # the shipped model's grid: 7.68"


# ----------------------------------------------------------------------------- closed forms
def _sis_rect_integral(a, b):
    """Signed ∫_0^a ∫_0^b dx dy / r (closed form: a asinh(b/a) + b asinh(a/b) for a, b > 0)."""
    aa, bb = np.abs(a), np.abs(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = np.where(aa > 0, aa * np.arcsinh(bb / np.where(aa > 0, aa, 1.0)), 0.0)
        t2 = np.where(bb > 0, bb * np.arcsinh(aa / np.where(bb > 0, bb, 1.0)), 0.0)
    return np.sign(a) * np.sign(b) * (t1 + t2)


def sis_pixel_means(grid, theta_e, cx, cy):
    """Exact pixel means of kappa = theta_E / (2 r) about (cx, cy), N x N."""
    e = (np.arange(grid.n_pixels + 1) - grid.n_pixels / 2) * grid.pixel_scale_arcsec
    x1, x2 = e[None, :-1] - cx, e[None, 1:] - cx
    y1, y2 = e[:-1, None] - cy, e[1:, None] - cy
    f = _sis_rect_integral
    return theta_e / 2 * (f(x2, y2) - f(x1, y2) - f(x2, y1) + f(x1, y1)) / grid.pixel_scale_arcsec**2


def power_law_kappa(x, y, theta_e, gamma, cx=0.0, cy=0.0):
    """kappa = (3 - gamma) / 2 * (theta_E / r)^(gamma - 1); mean inside R = (theta_E / R)^(gamma - 1)."""
    r = np.hypot(x - cx, y - cy)
    return (3 - gamma) / 2 * (theta_e / r) ** (gamma - 1)


def power_law_alpha(theta_e, gamma, cx=0.0, cy=0.0):
    """Its deflection: alpha = theta_E (r / theta_E)^(2 - gamma) along the radius."""

    def fn(x, y):
        dx, dy = x - cx, y - cy
        r = np.maximum(np.hypot(dx, dy), 1e-300)
        a = theta_e * (r / theta_e) ** (2 - gamma)
        return a * dx / r, a * dy / r

    return fn


def epl_circle_radius(theta_e, gamma, q):
    """Radius of the circle with mean kappa 1 for the EPL (lenstronomy's convention, elliptical
    radius sqrt(q x'^2 + y'^2 / q)): theta_E [<g(phi)^(1 - gamma)>_phi]^(1 / (gamma - 1)),
    g = sqrt(q cos^2 + sin^2 / q) (the circle's mean is a 1-D angular average)."""
    phi = np.linspace(0, 2 * np.pi, 200_001)[:-1]
    g = np.sqrt(q * np.cos(phi) ** 2 + np.sin(phi) ** 2 / q)
    return theta_e * np.mean(g ** (1 - gamma)) ** (1 / (gamma - 1))


def _coords(grid):
    x, y = grid.coordinates(torch.float64)
    return x.numpy(), y.numpy()


# ----------------------------------------------------------------------------- geometry
def test_disc_pixel_areas_are_exact():
    g = PixelGrid(16, 0.1)
    for center, radius in [((0.0, 0.0), 0.5), ((0.037, -0.061), 0.33), ((0.05, 0.05), 0.05)]:
        a = disc_pixel_areas(g, radius, center)
        assert a.sum() == pytest.approx(math.pi * radius**2, rel=1e-12)
        assert a.max() <= g.pixel_scale_arcsec**2 * (1 + 1e-12)
        # against brute force: 200 x 200 sub-pixels per pixel
        f = 200
        fine = PixelGrid(16 * f, 0.1 / f)
        x, y = _coords(fine)
        inside = (np.hypot(x - center[0], y - center[1]) <= radius).astype(float) * (0.1 / f) ** 2
        brute = inside.reshape(16, f, 16, f).sum(axis=(1, 3))
        assert np.abs(a - brute).max() < 2e-3 * g.pixel_scale_arcsec**2
    # a disc reaching beyond the map covers only the map's area
    assert disc_pixel_areas(g, 10.0).sum() == pytest.approx(g.fov_arcsec**2, rel=1e-12)


# ----------------------------------------------------------------------------- exact pixel means
@pytest.mark.parametrize("center", [(0.0, 0.0), (0.06, 0.06), (0.0123, -0.031)], ids=["corner", "pixel", "any"])
def test_pixel_mean_kappa_of_sis_is_exact(center):
    theta_e = 1.2

    def alpha(x, y):  # rimlens' SIS deflection (torch), as a caller would pass lenstronomy's
        return profiles.sis_deflection(torch.as_tensor(x), torch.as_tensor(y), theta_e, *center)

    ours = pixel_mean_kappa(alpha, GRID, (0.0, 0.0), singular_points=[center])
    exact = sis_pixel_means(GRID, theta_e, *center)
    assert np.abs(ours / exact - 1).max() < 1e-6


def test_pixel_mean_kappa_centre_is_the_grids_centre():
    """``center`` places the grid in the deflection's frame: a lens at (0.3, -0.2) seen by a grid
    centred there is the centred lens."""
    theta_e, c = 1.0, (0.3, -0.2)

    def alpha(x, y):
        return profiles.sis_deflection(torch.as_tensor(x), torch.as_tensor(y), theta_e, *c)

    g = PixelGrid(16, 0.12)
    assert np.allclose(pixel_mean_kappa(alpha, g, c), sis_pixel_means(g, theta_e, 0.0, 0.0), rtol=1e-8)


def test_pixel_mean_kappa_never_evaluates_the_cusp():
    """A deflection that is NaN at its centre (unguarded 0/0), with the grid centred on that cusp at
    coordinates that do not round exactly: every pixel mean stays finite and exact."""
    theta_e, c = 1.0, (-0.9180529521276106, -0.9669447289429418)  # found by search: feet round to s - 1e-17

    def alpha(x, y):
        dx, dy = x - c[0], y - c[1]
        r = np.hypot(dx, dy)
        with np.errstate(invalid="ignore", divide="ignore"):
            return theta_e * dx / r, theta_e * dy / r

    g = PixelGrid(16, 0.12)
    with np.errstate(invalid="raise", divide="raise"):
        got = pixel_mean_kappa(alpha, g, c)
    assert np.all(np.isfinite(got))
    assert np.allclose(got, sis_pixel_means(g, theta_e, 0.0, 0.0), rtol=1e-8)


@pytest.mark.parametrize("center", [(0.0, 0.0), (0.06, 0.06)], ids=["corner", "pixel"])
def test_pixel_mean_kappa_of_sie_matches_supersampling(center):
    g = PixelGrid(32, 0.12)
    p = dict(theta_e_arcsec=1.1, axis_ratio=0.7, phi_rad=0.6, center_x=center[0], center_y=center[1])

    def alpha(x, y):
        return profiles.sie_deflection(torch.as_tensor(x), torch.as_tensor(y), **p)

    ours = pixel_mean_kappa(alpha, g, singular_points=[center])
    k32, k64 = (profiles.pixelate(profiles.sie_kappa, g, f, torch.float64, **p)[0, 0].numpy() for f in (32, 64))
    # supersampling converges as 1/f in the cusp's pixels (its error there is then the difference
    # to the 32x map: measured 1.004-1.006 times it, 0.44-0.67 % of kappa) and as 1/f^2 elsewhere
    assert np.all(np.abs(ours - k64) <= 1.05 * np.abs(k64 - k32) + 1e-12)
    x, y = _coords(g)
    far = np.hypot(x - center[0], y - center[1]) > 0.2
    assert np.abs(ours / k64 - 1)[far].max() < 1e-5  # measured 4e-6
    richardson = k64 + (k64 - k32) / 3  # removes the 1/f^2 term: then agreement to 6e-11
    assert np.abs(ours / richardson - 1)[far].max() < 1e-8


# ----------------------------------------------------------------------------- Einstein radius, slope
def test_sis_map_gives_theta_e_and_isothermal_slope():
    theta_e = 1.2
    kappa = profiles.pixelate(profiles.sis_kappa, GRID, 16, torch.float64, theta_e_arcsec=theta_e)
    # measured: -0.24 % (16x supersampling loses a little of the cusp's mass; -0.40 % at 8x)
    assert abs(einstein_radius_of_map(kappa, GRID) / theta_e - 1) < 0.005
    assert abs(log_slope(kappa, GRID, theta_e) - 2.0) < 0.02  # measured 1.99991
    exact = sis_pixel_means(GRID, theta_e, 0.0, 0.0)
    # with exact pixel means only the uniform spreading of each pixel's mean is left: -0.075 %
    assert abs(einstein_radius_of_map(exact, GRID) / theta_e - 1) < 0.001
    assert enclosed_mean_kappa(exact, GRID, theta_e) == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("gamma", [1.7, 2.3])
@pytest.mark.parametrize("theta_e,center", [(1.2, (0.0, 0.0)), (0.8, (0.05, -0.03))])
def test_power_law_map_gives_slope_and_theta_e(gamma, theta_e, center):
    kappa = pixel_mean_kappa(power_law_alpha(theta_e, gamma, *center), GRID, singular_points=[center])
    # the exact pixel means agree with the closed-form kappa averaged over 16 x 16 sub-pixels away
    # from the cusp (where that average is good to ~1e-5)
    f = 16
    x, y = _coords(PixelGrid(64 * f, GRID.pixel_scale_arcsec / f))
    averaged = power_law_kappa(x, y, theta_e, gamma, *center).reshape(64, f, 64, f).mean(axis=(1, 3))
    xc, yc = _coords(GRID)
    far = np.hypot(xc - center[0], yc - center[1]) > 0.5
    assert np.abs(kappa / averaged - 1)[far].max() < 1e-4
    assert abs(log_slope(kappa, GRID, theta_e, center) - gamma) < 0.02  # measured < 0.001
    assert abs(einstein_radius_of_map(kappa, GRID, center) / theta_e - 1) < 0.005  # measured < 0.15 %


@pytest.mark.parametrize("gamma,q", [(1.85, 0.6), (2.0, 0.8), (2.15, 0.6), (2.0, 1.0)])
def test_elliptical_epl_from_lenstronomy(gamma, q):
    pytest.importorskip("lenstronomy")
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.Util import param_util

    theta_e = 1.3
    e1, e2 = param_util.phi_q2_ellipticity(0.4, q)
    kw = [dict(theta_E=theta_e, gamma=gamma, e1=e1, e2=e2, center_x=0.0, center_y=0.0)]
    lm = LensModel(["EPL"])
    # pixel-averaged lenstronomy kappa (16 x 16 sub-pixels)
    f = 16
    x, y = _coords(PixelGrid(64 * f, GRID.pixel_scale_arcsec / f))
    kappa = lm.kappa(x.ravel(), y.ravel(), kw).reshape(64, f, 64, f).mean(axis=(1, 3))
    # ... which the divergence theorem with lenstronomy's deflection reproduces (away from the cusp,
    # where supersampling is exact to 1e-5)
    exact = pixel_mean_kappa(lambda x, y: lm.alpha(x, y, kw), GRID)
    xc, yc = _coords(GRID)
    far = np.hypot(xc, yc) > 0.3
    assert np.median(np.abs(exact / kappa - 1)[far]) < 1e-5
    for k in (kappa, exact):
        assert abs(log_slope(k, GRID, theta_e) - gamma) < 0.02  # measured < 0.001
        theta_circle = epl_circle_radius(theta_e, gamma, q)
        # the estimator gives the circle's radius (measured: -0.07 to -0.1 % exact, to -0.5 % at 16x)
        assert abs(einstein_radius_of_map(k, GRID) / theta_circle - 1) < 0.006
    # lenstronomy's theta_E is that of the isodensity ellipse: the circle's radius is smaller for
    # q < 1, by (measured, closed form) 0.2-0.4 % at q = 0.8 and 1.1-2.1 % at q = 0.6 (gamma 1.7-2.3)
    est = einstein_radius_of_map(exact, GRID)
    if q == 1.0:
        assert abs(est / theta_e - 1) < 0.002
    else:
        assert -0.025 < est / theta_e - 1 < 0.0


def test_einstein_radius_edge_cases():
    assert einstein_radius_of_map(np.zeros((64, 64)), GRID) == 0.0
    assert math.isnan(einstein_radius_of_map(np.full((64, 64), 2.0), GRID))
    # a uniform sheet of 1 everywhere crosses nowhere either; 0.99 gives 0
    assert einstein_radius_of_map(np.full((64, 64), 0.99), GRID) == 0.0
    assert math.isnan(log_slope(np.ones((64, 64)), GRID, float("nan")))


def test_kappa_peak_center_finds_an_offset_lens():
    c = (0.21, -0.33)
    kappa = sis_pixel_means(GRID, 1.0, *c)
    got = kappa_peak_center(kappa, GRID)
    assert np.hypot(got[0] - c[0], got[1] - c[1]) < 0.03  # a quarter pixel
    assert einstein_radius_of_map(kappa, GRID, got) == pytest.approx(1.0, rel=0.003)


# ----------------------------------------------------------------------------- map and source errors
def test_kappa_error_in_annulus():
    theta_e, c = 1.0, (0.1, 0.0)
    truth = sis_pixel_means(GRID, theta_e, *c)
    x, y = _coords(GRID)
    r = np.hypot(x - c[0], y - c[1])
    hat = truth * 1.1
    hat[r < 0.45] = 100.0  # outside the annulus: ignored
    hat[r > 2.05] = 0.0
    assert kappa_error_in_annulus(hat, truth, GRID, theta_e, c) == pytest.approx(0.1, rel=1e-9)
    assert kappa_error_in_annulus(torch.as_tensor(truth)[None, None], truth, GRID, theta_e, c) == 0.0


def test_source_error():
    x, y = _coords(PixelGrid(64, 3.0 / 64))
    s = np.exp(-((x - 0.1) ** 2 + y**2) / (2 * 0.1**2))
    assert source_error(3.7 * s, s) == pytest.approx(0.0, abs=1e-12)  # flux scale is ignored
    assert source_error(torch.as_tensor(s)[None, None], s) == pytest.approx(0.0, abs=1e-12)
    far = np.exp(-((x + 0.8) ** 2 + y**2) / (2 * 0.1**2))
    a, b = far / far.max(), s / s.max()  # disjoint, equal peaks: sqrt(|a|^2 + |b|^2) / |b| (~ sqrt 2)
    assert source_error(far, s) == pytest.approx(math.hypot(np.linalg.norm(a), np.linalg.norm(b)) / np.linalg.norm(b))
    assert source_error(np.zeros_like(s), s) == pytest.approx(1.0)
    # best-fit flux scale: sqrt(1 - cos^2) of the two maps
    blur = np.exp(-((x - 0.1) ** 2 + y**2) / (2 * 0.2**2))
    cos = (blur * s).sum() / np.linalg.norm(blur) / np.linalg.norm(s)
    assert source_error(5 * blur, s, "scale") == pytest.approx(math.sqrt(1 - cos**2), rel=1e-9)
    assert source_error(far, s, "scale") == pytest.approx(1.0, abs=1e-6)
    assert source_error(2 * s, s, "scale") == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        source_error(s, s, "sum")


def test_summary_reports_the_einstein_radius_slope_and_centre_of_a_map():
    """``summary.json``'s lens_mass block on the exact pixel means of an SIS (theta_E 1.2", off-centre):
    radius within 1%, slope within 0.03 of isothermal, centre within a third of a pixel, in the cut-out
    frame; a sub-critical map has radius 0 and no slope, one critical to the edge neither (valid JSON)."""
    import json

    from rimlens.inference.pipeline import describe_mass

    g = PixelGrid(64, 0.12)
    mass = describe_mass(sis_pixel_means(g, 1.2, 0.3, -0.2), g, field_center_arcsec=(1.0, 2.0))
    assert mass["einstein_radius_arcsec"] == pytest.approx(1.2, rel=0.01)
    assert mass["log_slope"] == pytest.approx(2.0, abs=0.03)
    assert np.allclose(mass["kappa_center_arcsec"], (1.3, 1.8), atol=0.04)
    empty = describe_mass(np.full((64, 64), 0.1), g)
    assert empty["einstein_radius_arcsec"] == 0.0 and empty["log_slope"] is None
    full = describe_mass(np.full((64, 64), 2.0), g)
    assert full["einstein_radius_arcsec"] is None and full["log_slope"] is None
    broken = describe_mass(np.full((64, 64), np.nan), g)
    assert broken["einstein_radius_arcsec"] is None and broken["kappa_center_arcsec"] is None
    json.dumps([empty, full, broken], allow_nan=False)
