"""Lensing potential, lenstronomy INTERPOL export and COOLEST export.

Measured tolerances (this file's set-ups, float64):

* potential: FFT sum = direct sum to 1e-15 (relative to max |psi|); the 6th-order finite-difference
  gradient of the ``"deflection"`` potential = rimlens' deflection to 3.5e-6 of max |alpha|
  (converges as s^4); the ``"continuum"`` potential of a Gaussian = the closed form to 8e-7 of its
  range (s^4); the ``"pixel_mean"`` self term sits at 8e-4 / 2.5e-4 from these (order s^2).
* INTERPOL, at the pixel centres: deflection and kappa = rimlens to machine precision.
  Off the centres (bilinear interpolation) against the exact piecewise-constant-kappa deflection
  of a singular SIE + Gaussian clump, 96 px at 0.05": median 1.6e-4, max 2.7e-3 of max |alpha| beyond
  0.5" from the cusp, 7.2e-3 beyond 0.3"; up to ~44% within a pixel or two of the cusp where the
  deflection turns over (a bilinear interpolant cannot follow that). lenstronomy's kappa off the
  centres is exactly the bilinear interpolation of the map (vs the analytic SIE: < 1% beyond 0.5").
* Image of an SIE lens through the export (lenstronomy ImageModel) vs rimlens' simulator: < 1% of peak.
"""

import math
import os
import warnings

import numpy as np
import pytest
import torch
from astropy.io import fits
from scipy.special import exp1

from rimlens.errors import RimlensInputError
from rimlens.physics import PSF, LensSimulator, PixelGrid, deflection, deflection_field, profiles, sample_bilinear
from rimlens.physics.deflection import deflection_at_offsets
from rimlens.physics.potential import SELF_TERMS, lensing_hessian, lensing_potential

EULER_GAMMA = 0.5772156649015329


def _fd6(p, s, dim):
    """6th-order central difference of an N x N map along columns (dim=1, x) or rows (dim=0, y),
    on the interior (N - 6) x (N - 6)."""
    c = [-1 / 60, 3 / 20, -3 / 4, 0.0, 3 / 4, -3 / 20, 1 / 60]
    n = p.shape[-1]
    if dim == 1:
        return sum(c[m] * p[3:-3, m : n - 6 + m] for m in range(7)) / s
    return sum(c[m] * p[m : n - 6 + m, 3:-3] for m in range(7)) / s


def _blobs(grid):
    """A smooth convergence: two offset Gaussians, ``1 x 1 x N x N`` float64."""
    x, y = grid.coordinates(torch.float64)
    k = profiles.gaussian_kappa(x, y, 1.5, 0.4, 0.013, -0.021) + profiles.gaussian_kappa(x, y, 0.4, 0.25, 0.6, 0.4)
    return k[None, None]


# ------------------------------------------------------------------------------ potential
@pytest.mark.parametrize("self_term", sorted(SELF_TERMS))
def test_potential_is_the_direct_pixel_sum(self_term):
    n, s = 20, 0.07
    grid = PixelGrid(n, s)
    kappa = torch.rand(2, 1, n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    psi = lensing_potential(kappa, s, self_term=self_term)
    x, y = grid.coordinates(torch.float64)
    xf, yf = x.reshape(-1), y.reshape(-1)
    d = torch.sqrt((xf[:, None] - xf[None]) ** 2 + (yf[:, None] - yf[None]) ** 2)
    log_d = torch.log(d.fill_diagonal_(1.0)).fill_diagonal_(SELF_TERMS[self_term] + math.log(s))
    direct = (kappa.reshape(2, -1) @ log_d.T) * s**2 / math.pi
    assert psi.shape == kappa.shape
    assert torch.allclose(psi.reshape(2, -1), direct, rtol=0, atol=1e-13 * direct.abs().max())


def test_self_terms_are_the_lattice_constants():
    # mean of ln r over the unit square; zeta-regularised lattice constant (= Z'(0)/2 for sum' |q|^-2s)
    assert SELF_TERMS["pixel_mean"] == pytest.approx(-1.0611754268825244, abs=1e-15)
    assert SELF_TERMS["continuum"] == pytest.approx(-1.3105329259115097, abs=1e-15)
    assert SELF_TERMS["deflection"] == pytest.approx(SELF_TERMS["continuum"] + 0.5, abs=1e-15)
    # the lattice constant, numerically: sum' f(q) ln|q| + c f(0) = integral f ln r for a wide Gaussian f
    sig, r = 20.0, 240
    q = np.arange(-r, r + 1, dtype=np.float64)
    qx, qy = np.meshgrid(q, q)
    r2 = qx**2 + qy**2
    r2[r, r] = 1.0
    f = np.exp(-r2 / (2 * sig**2))
    f[r, r] = 0.0
    c_20 = math.pi * sig**2 * (math.log(2 * sig**2) - EULER_GAMMA) - math.fsum((f * 0.5 * np.log(r2)).ravel())
    assert c_20 == pytest.approx(SELF_TERMS["continuum"], abs=3e-4)  # the O(sigma^-2) rest: 1.2e-4


def test_potential_gradient_is_rimlens_deflection():
    errors = []
    for n, s in ((64, 0.1), (128, 0.05)):
        kappa = _blobs(PixelGrid(n, s))
        psi = lensing_potential(kappa, s)[0, 0]
        ax, ay = (a[0, 0] for a in deflection(kappa, s))
        amax = torch.hypot(ax, ay).max()
        ex = (_fd6(psi, s, 1) - ax[3:-3, 3:-3]).abs().max()
        ey = (_fd6(psi, s, 0) - ay[3:-3, 3:-3]).abs().max()
        errors.append(float(max(ex, ey) / amax))
    assert errors[1] < 1e-5  # measured 3.5e-6
    assert errors[0] / errors[1] > 8  # fourth order in the pixel scale (measured 12.6)
    # the other self terms are off by the local term s^2 grad(kappa) / (2 pi) (resp. half of it)
    kappa = _blobs(PixelGrid(128, 0.05))
    ax = deflection(kappa, 0.05)[0][0, 0]
    for term, low in (("continuum", 1e-3), ("pixel_mean", 5e-4)):
        psi = lensing_potential(kappa, 0.05, self_term=term)[0, 0]
        assert float((_fd6(psi, 0.05, 1) - ax[3:-3, 3:-3]).abs().max() / ax.abs().max()) > low


def test_potential_of_gaussian_matches_closed_form():
    # psi(r) = kappa_0 sigma^2 [E1(u) + ln u + gamma], u = r^2 / (2 sigma^2), up to a constant
    k0, sig, cx, cy = 1.5, 0.4, 0.013, -0.021
    for n, s, tol in ((128, 0.05, 3e-6), (256, 0.025, 2e-7)):
        grid = PixelGrid(n, s)
        x, y = grid.coordinates(torch.float64)
        kappa = profiles.gaussian_kappa(x, y, k0, sig, cx, cy)[None, None]
        u = ((x - cx) ** 2 + (y - cy) ** 2) / (2 * sig**2)
        exact = k0 * sig**2 * (torch.as_tensor(exp1(u.numpy())) + torch.log(u) + EULER_GAMMA)
        span = float(exact.max() - exact.min())
        for term in SELF_TERMS:
            diff = lensing_potential(kappa, s, self_term=term)[0, 0] - exact
            err = float((diff - diff.mean()).abs().max()) / span
            if term == "continuum":
                assert err < tol  # measured 8.0e-7 and 5.0e-8
            else:
                assert err < 1.5e-3 * (s / 0.05) ** 2  # order s^2 (measured 5.1e-4, 2.5e-4 at 0.05")


def test_potential_units_and_dtypes():
    kappa = _blobs(PixelGrid(32, 0.1))
    psi = lensing_potential(kappa, 0.1)
    # another length unit only adds (A / pi) ln(unit) sum(kappa): here arcsec -> mas (pixel scale 100 mas)
    psi_mas = lensing_potential(kappa, 100.0) / 1e6  # in arcsec^2 again
    shift = 0.01 / math.pi * math.log(1e3) * float(kappa.sum())
    assert torch.allclose(psi_mas - psi, torch.full_like(psi, shift), rtol=1e-12, atol=1e-12)
    psi32 = lensing_potential(kappa.float(), 0.1)
    assert psi32.dtype == torch.float32
    assert torch.allclose(psi32.double(), psi, rtol=0, atol=1e-5 * float(psi.abs().max()))
    with pytest.raises(RimlensInputError, match="self_term"):
        lensing_potential(kappa, 0.1, self_term="nope")
    with pytest.raises(RimlensInputError):
        lensing_potential(kappa[0], 0.1)
    with pytest.raises(RimlensInputError):
        lensing_potential(kappa, -1.0)


def test_hessian_trace_and_consistency_with_deflection():
    n, s = 128, 0.05
    kappa = _blobs(PixelGrid(n, s))
    h = lensing_hessian(kappa)
    assert h.shape == (1, 3, n, n)
    assert torch.allclose((h[:, 0] + h[:, 1]) / 2, kappa[:, 0], rtol=0, atol=1e-14)
    # shear against the direct point-mass sum at a few pixels
    x, y = PixelGrid(n, s).coordinates(torch.float64)
    for i, j in ((64, 64), (10, 100), (127, 0)):
        dx, dy = (x[i, j] - x) / s, (y[i, j] - y) / s
        r4 = (dx**2 + dy**2) ** 2
        r4[i, j] = 1.0
        g1 = (kappa[0, 0] * (dy**2 - dx**2) / (math.pi * r4)).sum()
        g2 = (kappa[0, 0] * (-2 * dx * dy) / (math.pi * r4)).sum()
        assert float(h[0, 0, i, j] - kappa[0, 0, i, j]) == pytest.approx(float(g1), abs=1e-12)
        assert float(h[0, 2, i, j]) == pytest.approx(float(g2), abs=1e-12)
    # derivatives of the deflection agree to order s^2 (measured 2.4e-3 of max |psi_ij|)
    ax, ay = deflection_field(kappa, s)[0]
    hmax = float(h.abs().max())
    c = (slice(3, -3), slice(3, -3))
    for fd, ref in (
        (_fd6(ax, s, 1), h[0, 0]),
        (_fd6(ay, s, 0), h[0, 1]),
        (_fd6(ax, s, 0), h[0, 2]),
        (_fd6(ay, s, 1), h[0, 2]),
    ):
        assert float((fd - ref[c]).abs().max()) < 4e-3 * hmax


# ------------------------------------------------------------------------------ lenstronomy INTERPOL
lens_model_mod = pytest.importorskip("lenstronomy.LensModel.lens_model")
from rimlens.io.export import (  # noqa: E402
    INTERPOL_KEYS,
    SHEAR_KEYS,
    coolest_shear,
    lens_maps,
    read_lenstronomy,
    to_lenstronomy_interpol,
    write_coolest,
    write_lenstronomy,
)

SIE = {"theta_e_arcsec": 1.0, "axis_ratio": 0.7, "phi_rad": 0.4, "center_x": 0.03, "center_y": -0.02}
CLUMP = (0.3, 0.15, 0.8, 0.5)  # kappa_0, sigma, x, y


def _sie_kappa(grid):
    """Singular SIE (pixel-averaged 8x8) + a Gaussian clump, ``1 x 1 x N x N`` float64."""
    x, y = grid.coordinates(torch.float64)
    k = profiles.pixelate(profiles.sie_kappa, grid, 8, torch.float64, **SIE)
    return k + profiles.gaussian_kappa(x, y, *CLUMP)[None, None]


def test_interpol_orientation_and_pixel_centres():
    n, s = 96, 0.05
    grid = PixelGrid(n, s)
    kappa = _sie_kappa(grid)
    models, kwargs = to_lenstronomy_interpol(kappa, grid)
    assert models == ["INTERPOL"] and set(kwargs[0]) == set(INTERPOL_KEYS)
    kw = kwargs[0]
    assert np.all(np.diff(kw["grid_interp_x"]) > 0) and np.array_equal(kw["grid_interp_x"], kw["grid_interp_y"])
    assert kw["grid_interp_x"][0] == pytest.approx(-(n - 1) / 2 * s) and kw["f_"].shape == (n, n)
    lm = lens_model_mod.LensModel(models)
    x, y = (c.numpy() for c in grid.coordinates(torch.float64))
    ax, ay = (a.reshape(n, n) for a in lm.alpha(x.ravel(), y.ravel(), kwargs))
    ref = deflection_field(kappa, s)[0].numpy()
    amax = np.hypot(ref[0], ref[1]).max()
    assert np.abs(ax - ref[0]).max() <= 1e-6 * amax and np.abs(ay - ref[1]).max() <= 1e-6 * amax  # measured 0
    kap = lm.kappa(x.ravel(), y.ravel(), kwargs).reshape(n, n)
    assert np.abs(kap - kappa[0, 0].numpy()).max() <= 1e-12 * kappa.max().item()  # everywhere, edges too
    psi = lm.potential(x.ravel(), y.ravel(), kwargs).reshape(n, n)
    assert np.array_equal(psi, lensing_potential(kappa, s)[0, 0].numpy())
    # orientation, independently of rimlens: a clump on the upper right pulls rays towards it
    k = torch.zeros(1, 1, n, n, dtype=torch.float64)
    k[0, 0, 70, 80] = 1.0  # row 70 (y > 0), column 80 (x > 0)
    lm2 = lens_model_mod.LensModel(["INTERPOL"])
    kw2 = to_lenstronomy_interpol(k, grid)[1]
    bx, by = lm2.alpha(np.array([0.0]), np.array([0.0]), kw2)
    assert bx[0] < 0 and by[0] < 0  # alpha = theta - beta points away from the mass, seen from the origin
    assert math.atan2(by[0], bx[0]) == pytest.approx(math.atan2(-(70 - 47.5), -(80 - 47.5)), abs=0.02)


def test_interpol_between_pixel_centres():
    n, s = 96, 0.05
    grid = PixelGrid(n, s)
    kappa = _sie_kappa(grid)
    models, kwargs = to_lenstronomy_interpol(kappa, grid)
    lm = lens_model_mod.LensModel(models)
    ref0 = deflection_field(kappa, s)[0].numpy()
    amax = np.hypot(ref0[0], ref0[1]).max()
    x, y = (c.numpy() for c in grid.coordinates(torch.float64))
    edge = grid.axis(torch.float64)[-1].item()
    errs = {}
    for off in ((0.5, 0.5), (0.25, -0.25), (0.5, 0.0), (-0.3, 0.1)):
        ref = deflection_at_offsets(kappa, s, [off], pixel="square")[0, 0].numpy()  # exact, piecewise-constant kappa
        xs, ys = x + off[0] * s, y + off[1] * s
        inside = (np.abs(xs) <= edge) & (np.abs(ys) <= edge)
        bx, by = (a.reshape(n, n) for a in lm.alpha(xs.ravel(), ys.ravel(), kwargs))
        err = np.hypot(bx - ref[0], by - ref[1])[inside] / amax
        r = np.hypot(xs - SIE["center_x"], ys - SIE["center_y"])[inside]
        errs[off] = (np.median(err), err[r > 0.3].max(), err[r > 0.5].max())
        # kappa in between: exactly the bilinear interpolation of the map ...
        kap = lm.kappa(xs.ravel(), ys.ravel(), kwargs).reshape(n, n)
        col, row = (xs - x[0, 0]) / s, (ys - y[0, 0]) / s
        j0, i0 = np.floor(col).astype(int).clip(0, n - 2), np.floor(row).astype(int).clip(0, n - 2)
        tx, ty = col - j0, row - i0
        km = kappa[0, 0].numpy()
        bilinear = (
            km[i0, j0] * (1 - tx) * (1 - ty)
            + km[i0, j0 + 1] * tx * (1 - ty)
            + km[i0 + 1, j0] * (1 - tx) * ty
            + km[i0 + 1, j0 + 1] * tx * ty
        )
        assert np.abs(kap - bilinear)[inside].max() < 1e-12 * km.max()
        # ... which is within 1% of the analytic convergence beyond 0.5" of the cusp (measured 0.82%)
        xt, yt = torch.as_tensor(xs), torch.as_tensor(ys)
        analytic = (profiles.sie_kappa(xt, yt, **SIE) + profiles.gaussian_kappa(xt, yt, *CLUMP)).numpy()
        assert (np.abs(kap - analytic) / analytic)[inside][r > 0.5].max() < 0.01
    assert max(e[0] for e in errs.values()) < 3e-4  # median, measured 1.6e-4
    assert max(e[1] for e in errs.values()) < 1e-2  # beyond 0.3", measured 7.2e-3
    assert max(e[2] for e in errs.values()) < 4e-3  # beyond 0.5", measured 2.7e-3
    # outside the outermost pixel centres lenstronomy clamps to the edge values
    out = lm.alpha(np.array([edge, edge + 0.02, edge + 0.3]), np.array([0.0, 0.0, 0.0]), kwargs)[0]
    assert out[0] == out[1] == out[2]


def _sersic_source(src_grid):
    light_model = pytest.importorskip("lenstronomy.LightModel.light_model")
    from lenstronomy.Util import param_util

    e1, e2 = param_util.phi_q2_ellipticity(-0.3, 0.8)
    kwargs_source = [dict(amp=1.0, R_sersic=0.25, n_sersic=1.0, e1=e1, e2=e2, center_x=0.08, center_y=0.04)]
    sx, sy = src_grid.coordinates(torch.float64)
    lm = light_model.LightModel(["SERSIC_ELLIPSE"])
    source = np.asarray(lm.surface_brightness(sx.numpy(), sy.numpy(), kwargs_source)).reshape(sx.shape)
    return torch.as_tensor(source)[None, None], kwargs_source


def test_sie_image_through_lenstronomy_matches_rimlens_simulator():
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF as LensPSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LightModel.light_model import LightModel

    n, s, fwhm = 100, 0.05, 0.15
    grid, src_grid = PixelGrid(n, s), PixelGrid(240, 0.0125)
    kappa = profiles.pixelate(profiles.sie_kappa, grid, 8, torch.float64, **SIE)
    source, kwargs_source = _sersic_source(src_grid)
    models, kwargs_lens = to_lenstronomy_interpol(kappa, grid)
    lm = lens_model_mod.LensModel(models)
    sim = LensSimulator(grid, src_grid)
    # ray shooting: beta = theta - alpha exactly, so the lensed pixelated source is rimlens' own
    x, y = grid.coordinates(torch.float64)
    bx, by = lm.ray_shooting(x.numpy().ravel(), y.numpy().ravel(), kwargs_lens)
    beta_x, beta_y = (torch.as_tensor(b.reshape(1, n, n)) for b in (bx, by))
    lensed = sample_bilinear(source, src_grid, beta_x, beta_y)
    assert torch.allclose(lensed, sim.lens(source, kappa), rtol=0, atol=1e-12)
    # full image in lenstronomy (analytic Sersic, its PSF) vs rimlens' simulator (pixelated source)
    c = -(n - 1) / 2 * s
    data = ImageData(image_data=np.zeros((n, n)), ra_at_xy_0=c, dec_at_xy_0=c, transform_pix2angle=np.eye(2) * s)
    image_model = ImageModel(
        data,
        LensPSF(psf_type="GAUSSIAN", fwhm=fwhm, truncation=5),
        lens_model_class=lm,
        source_model_class=LightModel(["SERSIC_ELLIPSE"]),
        kwargs_numerics={"supersampling_factor": 1},
    )
    ref = image_model.image(kwargs_lens=kwargs_lens, kwargs_source=kwargs_source) / s**2
    ours = sim.forward(source, kappa, PSF.gaussian(fwhm, s, dtype=torch.float64))[0, 0].numpy()
    assert np.abs(ours - ref).max() <= 0.01 * ref.max()


def test_write_and_read_lenstronomy(tmp_path):
    grid = PixelGrid(48, 0.08)
    kappa = _sie_kappa(grid)
    path = write_lenstronomy(tmp_path / "lens_interpol.npz", kappa.float(), grid)
    models, kwargs = read_lenstronomy(path)
    ref_models, ref_kwargs = to_lenstronomy_interpol(kappa.float(), grid)
    assert models == ref_models == ["INTERPOL"]
    for key in INTERPOL_KEYS:
        assert kwargs[0][key].dtype == np.float64
        assert np.array_equal(kwargs[0][key], ref_kwargs[0][key])
    # as documented, with numpy alone (no pickle)
    with np.load(path, allow_pickle=False) as f:
        kw = [{key: f[key] for key in f["interpol_keys"]}]
        assert float(f["pixel_scale_arcsec"]) == 0.08 and int(f["n_pixels"]) == 48
        assert np.array_equal(f["kappa"], kappa.float()[0, 0].double().numpy())
    lm = lens_model_mod.LensModel(["INTERPOL"])
    x, y = grid.coordinates(torch.float64)
    ax, _ = lm.alpha(x.numpy().ravel(), y.numpy().ravel(), kw)
    assert np.allclose(ax.reshape(48, 48), ref_kwargs[0]["f_x"], rtol=0, atol=1e-12)
    with pytest.raises(RimlensInputError):
        read_lenstronomy(tmp_path / "missing.npz")
    with pytest.raises(RimlensInputError, match="pixels per side"):
        to_lenstronomy_interpol(kappa, PixelGrid(50, 0.08))
    with pytest.raises(RimlensInputError, match="one map"):
        to_lenstronomy_interpol(torch.zeros(2, 1, 48, 48), grid)


SHEARS = ((0.05, 0.03), (-0.04, 0.06), (-0.03, -0.05), (0.07, -0.02))  # 2 phi in each quadrant


@pytest.mark.parametrize("shear", SHEARS)
def test_lenstronomy_interpol_plus_shear(tmp_path, shear):
    n, s = 48, 0.08
    grid = PixelGrid(n, s)
    kappa = _sie_kappa(grid)
    g1, g2 = shear
    models, kwargs = to_lenstronomy_interpol(kappa, grid, torch.tensor([[g1, g2]], dtype=torch.float64))
    assert models == ["INTERPOL", "SHEAR"] and kwargs[1] == {"gamma1": g1, "gamma2": g2, "ra_0": 0.0, "dec_0": 0.0}
    path = write_lenstronomy(tmp_path / "lens.npz", kappa, grid, shear=np.array(shear))
    models_r, kwargs_r = read_lenstronomy(path)
    assert models_r == models and kwargs_r[1] == kwargs[1] and all(type(v) is float for v in kwargs_r[1].values())
    for key in INTERPOL_KEYS:
        assert np.array_equal(kwargs_r[0][key], kwargs[0][key])
    with np.load(path, allow_pickle=False) as f:  # plain arrays, as documented
        assert [str(k) for k in f["shear_keys"]] == list(SHEAR_KEYS)
        assert f["shear"].dtype == np.float64 and list(f["shear"]) == [g1, g2, 0.0, 0.0]
    # lenstronomy's INTERPOL + SHEAR = its INTERPOL of the map + rimlens' shear deflection, on and off the centres
    lm = lens_model_mod.LensModel(models_r)
    lm_map = lens_model_mod.LensModel(["INTERPOL"])
    xp = np.array([0.0, 0.37, -1.21, 0.9, -0.55, 1.6])
    yp = np.array([0.0, -0.83, 0.44, 1.3, -1.7, 0.2])
    ax, ay = lm.alpha(xp, yp, kwargs_r)
    mx, my = lm_map.alpha(xp, yp, kwargs_r[:1])
    sx, sy = (a.numpy() for a in profiles.shear_deflection(torch.as_tensor(xp), torch.as_tensor(yp), g1, g2))
    assert np.allclose(ax, mx + sx, rtol=0, atol=1e-14) and np.allclose(ay, my + sy, rtol=0, atol=1e-14)
    assert np.abs(sx).max() > 0.02  # the shear term is not negligible here
    # at the pixel centres: rimlens' deflection of the map plus its shear deflection
    x, y = grid.coordinates(torch.float64)
    bx, by = (a.reshape(n, n) for a in lm.alpha(x.numpy().ravel(), y.numpy().ravel(), kwargs_r))
    ref = deflection_field(kappa, s)[0].numpy()
    rx, ry = (a.numpy() for a in profiles.shear_deflection(x, y, g1, g2))
    assert np.allclose(bx, ref[0] + rx, rtol=0, atol=1e-12) and np.allclose(by, ref[1] + ry, rtol=0, atol=1e-12)
    # the shear's Hessian in lenstronomy: gamma = (gamma1, gamma2), kappa unchanged
    f_xx, f_xy, _, f_yy = lm.hessian(xp, yp, kwargs_r)
    m_xx, m_xy, _, m_yy = lm_map.hessian(xp, yp, kwargs_r[:1])
    assert np.allclose(f_xx - m_xx, g1, atol=1e-14) and np.allclose(f_yy - m_yy, -g1, atol=1e-14)
    assert np.allclose(f_xy - m_xy, g2, atol=1e-14)


def test_lenstronomy_without_shear_is_unchanged(tmp_path):
    grid = PixelGrid(32, 0.1)
    kappa = _sie_kappa(grid)
    a = write_lenstronomy(tmp_path / "a.npz", kappa, grid)
    b = write_lenstronomy(tmp_path / "b.npz", kappa, grid, shear=None)
    with np.load(a, allow_pickle=False) as fa, np.load(b, allow_pickle=False) as fb:
        meta = ("interpol_keys", "lens_model_list", "kappa", "pixel_scale_arcsec", "n_pixels", "conventions")
        assert sorted(fa.files) == sorted(fb.files) == sorted([*INTERPOL_KEYS, *meta, "rimlens_version"])
        assert all(np.array_equal(fa[k], fb[k]) for k in fa.files)
    models, kwargs = read_lenstronomy(a)
    assert models == ["INTERPOL"] and len(kwargs) == 1
    assert to_lenstronomy_interpol(kappa, grid, None)[0] == ["INTERPOL"]
    for bad in ((0.1,), (0.1, float("nan")), np.zeros((2, 2))):
        with pytest.raises(RimlensInputError, match="shear"):
            to_lenstronomy_interpol(kappa, grid, bad)


# ------------------------------------------------------------------------------ COOLEST
coolest_json = pytest.importorskip("coolest.template.json")


def _coolest_inputs(n=40, m=50, s=0.08, s_src=0.04):
    g = torch.Generator().manual_seed(3)
    grid, src_grid = PixelGrid(n, s), PixelGrid(m, s_src)
    return {
        "source": torch.rand(1, 1, m, m, generator=g, dtype=torch.float64),
        "kappa": _sie_kappa(grid),
        "image_grid": grid,
        "source_grid": src_grid,
        "observation": torch.randn(1, 1, n, n, generator=g, dtype=torch.float64),
        "psf": PSF.gaussian(0.2, s, dtype=torch.float64),
    }


def _load(out_dir, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # coolest 0.1.11 warns on every 3-D stack it reads
        return coolest_json.JSONSerializer(os.path.join(str(out_dir), name)).load(verbose=False)


def test_coolest_round_trip(tmp_path):
    inp = _coolest_inputs()
    n, m, s = 40, 50, 0.08
    g = torch.Generator().manual_seed(4)
    noise_map = 0.1 + torch.rand(1, 1, n, n, generator=g, dtype=torch.float64)
    lens_light = torch.rand(n, n, generator=g, dtype=torch.float64)
    mask = torch.rand(1, 1, n, n, generator=g) > 0.3
    paths = write_coolest(
        tmp_path / "out",
        **inp,
        noise_sigma=noise_map,
        lens_light=lens_light,
        mask=mask,
        name="lens1",
        z_lens=0.5,
        z_source=2.0,
        cosmology=(70.0, 0.3),
        origin_ra_dec=("10h21m3.5s", "-12d3m4s"),
        instrument_name="HST-WFC3",
        band="F160W",
    )
    assert paths["json"] == str((tmp_path / "out" / "lens1.json").resolve())
    out = (tmp_path / "out").resolve()
    c = _load(out, "lens1")
    assert c.mode == "MAP" and c.standard == "COOLEST"
    assert c.meta["kappa_fits"] == "lens1-kappa.fits" and c.meta["hessian_stack_order"] == "xx, yy, xy"
    assert (c.cosmology.H0, c.cosmology.Om0, c.cosmology.astropy_name) == (70.0, 0.3, "FlatLambdaCDM")
    assert c.coordinates_origin.ra == "10h21m03.5s" and c.coordinates_origin.dec == "-12d03m04s"
    half = n * s / 2

    def check_grid(grid_obj, fov_half, npix, values):
        assert list(grid_obj.field_of_view_x) == pytest.approx([-fov_half, fov_half], abs=1e-15)
        assert list(grid_obj.field_of_view_y) == pytest.approx([-fov_half, fov_half], abs=1e-15)
        assert (grid_obj.num_pix_x, grid_obj.num_pix_y) == (npix, npix)
        assert np.array_equal(grid_obj.get_pixels(directory=str(out)), values)

    # observation, noise, instrument, PSF, likelihood mask
    obs = c.observation
    check_grid(obs.pixels, half, n, inp["observation"][0, 0].numpy())
    assert obs.pixels.pixel_size == pytest.approx(s, rel=1e-12)
    assert obs.noise.type == "NoiseMap"
    check_grid(obs.noise.noise_map, half, n, noise_map[0, 0].numpy())
    ins = c.instrument
    assert (ins.pixel_size, ins.name, ins.band) == (s, "HST-WFC3", "F160W")
    assert ins.psf.type == "PixelatedPSF"
    k = inp["psf"].size
    check_grid(ins.psf.pixels, k * s / 2, k, inp["psf"].kernel[0, 0].numpy())
    assert ins.psf.pixels.pixel_size == pytest.approx(s, rel=1e-12)
    (likelihood,) = c.likelihoods
    assert likelihood.type == "ImagingDataLikelihood"
    check_grid(likelihood.mask, half, n, mask[0, 0].numpy().astype(np.float64))
    # lensing entities
    lens, source = c.lensing_entities
    assert (lens.type, lens.name, lens.redshift, source.name, source.redshift) == ("Galaxy", "lens", 0.5, "source", 2.0)
    assert len(source.mass_model) == 0 and len(source.light_model) == 1
    (src_light,) = source.light_model
    assert src_light.type == "PixelatedRegularGrid"
    check_grid(src_light.parameters["pixels"], m * 0.04 / 2, m, inp["source"][0, 0].numpy())
    (lens_light_profile,) = lens.light_model
    assert lens_light_profile.type == "PixelatedRegularGrid"
    check_grid(lens_light_profile.parameters["pixels"], half, n, lens_light.numpy())
    (mass,) = lens.mass_model
    assert mass.type == "PixelatedRegularGridFullyDefined"
    maps = lens_maps(inp["kappa"], inp["image_grid"])
    check_grid(mass.parameters["pixels"], half, n, maps["psi"])
    deriv = mass.parameters["pixels_derivative"]
    hess = mass.parameters["pixels_hessian"]
    assert (deriv.num_stack, hess.num_stack) == (2, 3)
    check_grid(deriv, half, n, np.stack([maps["alpha_x"], maps["alpha_y"]]))
    check_grid(hess, half, n, np.stack([maps["psi_xx"], maps["psi_yy"], maps["psi_xy"]]))
    # exactly the lenstronomy export, and kappa = (xx + yy) / 2
    kw = to_lenstronomy_interpol(inp["kappa"], inp["image_grid"])[1][0]
    assert np.array_equal(hess.get_pixels(directory=str(out))[2], kw["f_xy"])
    assert np.allclose(0.5 * (maps["psi_xx"] + maps["psi_yy"]), inp["kappa"][0, 0].numpy(), rtol=0, atol=1e-13)
    assert np.array_equal(fits.getdata(out / c.meta["kappa_fits"]), inp["kappa"][0, 0].numpy())


def test_coolest_coordinates_follow_rimlens_grids(tmp_path):
    # COOLEST's own coordinate code puts array[i, j] at rimlens' (x_j, y_i): x right, y up, bottom row first
    pytest.importorskip("skimage")  # coolest.api.util needs scikit-image (a lenstronomy dependency)
    from coolest.api.profiles.light import PixelatedRegularGrid as ApiPixelatedRegularGrid
    from coolest.api.util import get_coordinates

    inp = _coolest_inputs()
    write_coolest(tmp_path, **inp, noise_sigma=0.3, name="c")
    c = _load(tmp_path, "c")
    xi, yi = inp["image_grid"].coordinates(torch.float64)
    cx, cy = get_coordinates(c).pixel_coordinates
    assert np.allclose(cx, xi.numpy(), rtol=0, atol=1e-12) and np.allclose(cy, yi.numpy(), rtol=0, atol=1e-12)
    px = c.lensing_entities[1].light_model[0].parameters["pixels"]
    api = ApiPixelatedRegularGrid(px.field_of_view_x, px.field_of_view_y, px.num_pix_x, px.num_pix_y)
    sx, sy = api.get_coordinates().pixel_coordinates
    xs, ys = inp["source_grid"].coordinates(torch.float64)
    assert np.allclose(sx, xs.numpy(), rtol=0, atol=1e-12) and np.allclose(sy, ys.numpy(), rtol=0, atol=1e-12)
    # FITS order: the first row of the file is the bottom row (y = y_min + s / 2)
    data = fits.getdata(tmp_path / "c-source.fits")
    assert np.array_equal(data[0], inp["source"][0, 0, 0].numpy())


def test_coolest_scalar_noise_potential_only(tmp_path):
    inp = _coolest_inputs()
    inp["psf"] = inp["psf"].kernel[0, 0].numpy() * 3.0  # a plain kernel: normalised on writing
    paths = write_coolest(
        tmp_path, **inp, noise_sigma=torch.tensor([0.25]), mass_profile="PixelatedRegularGridPotential"
    )
    assert not any(key.endswith(("noise_map.fits", "mask.fits", "lens_light.fits", "hessian.fits")) for key in paths)
    c = _load(tmp_path, "coolest")
    assert c.observation.noise.type == "UniformGaussianNoise" and c.observation.noise.std_dev == 0.25
    assert c.likelihoods is None and c.cosmology is None
    lens = c.lensing_entities[0]
    assert len(lens.light_model) == 0 and lens.redshift is None
    (mass,) = lens.mass_model
    assert mass.type == "PixelatedRegularGridPotential" and set(mass.parameters) == {"pixels"}
    psi = mass.parameters["pixels"].get_pixels(directory=str(tmp_path))
    assert np.array_equal(psi, lens_maps(inp["kappa"], inp["image_grid"])["psi"])
    psf = c.instrument.psf.pixels.get_pixels(directory=str(tmp_path))
    assert psf.sum() == pytest.approx(1.0, abs=1e-12)


def test_coolest_input_errors(tmp_path):
    inp = _coolest_inputs()
    bad = dict(inp, source=torch.zeros(1, 1, 30, 30, dtype=torch.float64))
    with pytest.raises(RimlensInputError, match="source has 30 pixels"):
        write_coolest(tmp_path, **bad, noise_sigma=0.1)
    with pytest.raises(RimlensInputError, match="noise_sigma"):
        write_coolest(tmp_path, **inp, noise_sigma=-1.0)
    with pytest.raises(RimlensInputError, match="mass_profile"):
        write_coolest(tmp_path, **inp, noise_sigma=0.1, mass_profile="PixelatedConvergence")
    with pytest.raises(RimlensInputError, match="name"):
        write_coolest(tmp_path, **inp, noise_sigma=0.1, name="a/b")


@pytest.mark.parametrize("shear", SHEARS)
def test_coolest_external_shear(tmp_path, shear):
    from coolest.api.profiles.mass import ExternalShear as ApiExternalShear
    from lenstronomy.Util.coolest_read_util import gamma_phi_coolest_to_g1_g2_lenstronomy
    from lenstronomy.Util.coolest_update_util import g1g2_lenstronomy_to_gamma_phi_coolest

    g1, g2 = shear
    inp = _coolest_inputs()
    write_coolest(tmp_path, **inp, noise_sigma=0.2, z_lens=0.4, shear=torch.tensor([[g1, g2]], dtype=torch.float64))
    c = _load(tmp_path, "coolest")
    lens, source, field = c.lensing_entities  # lens and source keep their places
    assert (lens.name, source.name) == ("lens", "source")
    assert (field.type, field.name, field.redshift) == ("MassField", "external_shear", 0.4)
    (profile,) = field.mass_model
    assert profile.type == "ExternalShear"
    gamma_ext = profile.parameters["gamma_ext"].point_estimate.value
    phi_ext = profile.parameters["phi_ext"].point_estimate.value
    assert gamma_ext == pytest.approx(math.hypot(g1, g2), rel=1e-15) and -90 < phi_ext <= 90
    assert (gamma_ext, phi_ext) == coolest_shear(g1, g2)
    # back to (gamma1, gamma2) with COOLEST's own convention (x right, phi east of north) ...
    phi = math.radians(phi_ext - 90.0)
    assert gamma_ext * math.cos(2 * phi) == pytest.approx(g1, abs=1e-15)
    assert gamma_ext * math.sin(2 * phi) == pytest.approx(g2, abs=1e-15)
    # ... and COOLEST's ExternalShear deflects exactly as rimlens' shear
    xp, yp = np.array([0.7, -0.4, 0.1, -1.3]), np.array([0.2, 0.9, -1.1, -0.6])
    cx, cy = ApiExternalShear().deflection(xp, yp, gamma_ext=gamma_ext, phi_ext=phi_ext)
    rx, ry = (a.numpy() for a in profiles.shear_deflection(torch.as_tensor(xp), torch.as_tensor(yp), g1, g2))
    assert np.allclose(cx, rx, rtol=0, atol=1e-15) and np.allclose(cy, ry, rtol=0, atol=1e-15)
    # lenstronomy's COOLEST conversion works in the x = RA (mirrored) frame, where gamma2 changes sign
    assert g1g2_lenstronomy_to_gamma_phi_coolest(g1, -g2)[1] == pytest.approx(phi_ext, abs=1e-12)
    l1, l2 = gamma_phi_coolest_to_g1_g2_lenstronomy(gamma_ext, phi_ext)
    assert (l1, -l2) == pytest.approx((g1, g2), abs=1e-15)


def test_coolest_without_shear_and_bad_shear(tmp_path):
    inp = _coolest_inputs()
    write_coolest(tmp_path, **inp, noise_sigma=0.2, shear=None)
    c = _load(tmp_path, "coolest")
    assert [e.type for e in c.lensing_entities] == ["Galaxy", "Galaxy"] and "external_shear" not in c.meta
    with pytest.raises(RimlensInputError, match="shear magnitude"):
        write_coolest(tmp_path, **inp, noise_sigma=0.2, shear=(0.9, -0.6))
    with pytest.raises(RimlensInputError, match="shear"):
        write_coolest(tmp_path, **inp, noise_sigma=0.2, shear=(0.1, 0.2, 0.3))
    assert coolest_shear(0.0, 0.0) == (0.0, 90.0)
    assert coolest_shear(-0.1, 0.0) == (0.1, 0.0)  # gamma along y (north): position angle 0
