"""Deflection of pixelated convergence maps against closed forms (docs/validation.md items 1-3)."""

import math

import numpy as np
import pytest
import torch

from rimlens.physics import PixelGrid, deflection, profiles


def _gaussian_errors(n, scale, sigma=0.3, shift=(0.0, 0.0), dtype=torch.float64):
    g = PixelGrid(n, scale)
    x, y = g.coordinates(dtype)
    kappa = profiles.gaussian_kappa(x, y, 1.0, sigma)[None, None]
    ax, ay = deflection(kappa, scale)
    tx, ty = profiles.gaussian_deflection(x + shift[0] * scale, y + shift[1] * scale, 1.0, sigma)
    r = torch.sqrt(x**2 + y**2)
    err = torch.sqrt((ax[0, 0] - tx) ** 2 + (ay[0, 0] - ty) ** 2) / torch.sqrt(tx**2 + ty**2)
    return err[r > 3 * scale]


@pytest.mark.parametrize("n,scale", [(128, 0.06), (127, 0.06), (64, 0.12), (100, 0.05)])
def test_gaussian_closed_form(n, scale):
    err = _gaussian_errors(n, scale)
    assert float(err.median()) <= 1e-6


def test_half_pixel_shift_detector():
    base = float(_gaussian_errors(128, 0.06).median())
    for sx, sy in [(0.5, 0), (-0.5, 0), (0, 0.5), (0, -0.5), (0.5, 0.5)]:
        shifted = float(_gaussian_errors(128, 0.06, shift=(sx, sy)).median())
        assert shifted > 1e3 * base, (sx, sy, shifted, base)


def test_float32_close_to_float64():
    e32 = _gaussian_errors(128, 0.06, dtype=torch.float32)
    assert float(e32.median()) < 1e-5


def test_deflection_direction_of_offset_mass():
    # A single pixel of mass to the right of the centre pulls light towards it: alpha_x < 0 on the
    # left of it (alpha points from the mass to the ray, theta - theta').
    n, scale = 33, 0.1
    kappa = torch.zeros(1, 1, n, n, dtype=torch.float64)
    kappa[0, 0, 16, 20] = 1.0
    ax, ay = deflection(kappa, scale)
    assert ax[0, 0, 16, 10] < 0 and ax[0, 0, 16, 30] > 0 and abs(float(ay[0, 0, 16, 10])) < 1e-15
    # point mass: |alpha| = m / (pi r) with m = kappa * scale^2
    r = 10 * scale
    assert float(-ax[0, 0, 16, 10]) == pytest.approx(scale**2 / (math.pi * r), rel=1e-12)
    # rows grow with y: a ray above the mass (larger row) has alpha_y > 0
    assert ay[0, 0, 26, 20] > 0


def test_sie_homoeoid_truncated_large_grid():
    """An SIE cut along one of its own isodensity ellipses (a homoeoid exerts no force inside it)
    matches the analytic SIE deflection inside the cut (docs/validation.md)."""
    n, scale = 400, 0.05
    theta_e, q, phi, core = 1.0, 0.7, 0.4, 0.02
    g = PixelGrid(n, scale)
    x, y = g.coordinates(torch.float64)
    kappa = profiles.sie_kappa(x, y, theta_e, q, phi, core_arcsec=core)
    xp = x * math.cos(phi) + y * math.sin(phi)
    yp = -x * math.sin(phi) + y * math.cos(phi)
    ell_r = torch.sqrt(q * xp**2 + yp**2 / q)
    kappa = torch.where(ell_r < 8.0, kappa, torch.zeros_like(kappa))
    ax, ay = deflection(kappa[None, None], scale)
    tx, ty = profiles.sie_deflection(x, y, theta_e, q, phi, core_arcsec=core)
    sel = (ell_r > 0.5) & (ell_r < 3.0)
    err = torch.sqrt((ax[0, 0] - tx) ** 2 + (ay[0, 0] - ty) ** 2) / torch.sqrt(tx**2 + ty**2)
    assert float(err[sel].median()) < 3e-3
    assert float(err[sel].max()) < 1e-2


def test_sis_pixel_against_analytic_lenstronomy_style():
    # lenstronomy test_convergence_integrals: SIS theta_E = 1 on a fine grid, alpha_x 0.5" from the
    # centre to 1.5e-2 absolute.
    n, scale = 1000, 0.01
    g = PixelGrid(n, scale)
    x, y = g.coordinates(torch.float64)
    kappa = profiles.sis_kappa(x, y + 1e-9, 1.0)
    r = torch.sqrt(x**2 + y**2)
    kappa = torch.where(r < 4.9, kappa, torch.zeros_like(kappa))  # circular truncation: no force inside
    ax, _ = deflection(kappa[None, None], scale)
    j = int(np.argmin(np.abs(g.axis(torch.float64).numpy() - 0.5)))
    i = int(np.argmin(np.abs(g.axis(torch.float64).numpy() - 0.0)))
    assert abs(float(ax[0, 0, i, j]) - 1.0) < 1.5e-2


def test_batch_and_dtype_preserved():
    kappa = torch.rand(3, 1, 16, 16)
    ax, _ay = deflection(kappa, 0.1)
    assert ax.shape == (3, 1, 16, 16) and ax.dtype == torch.float32
    single = deflection(kappa[1:2], 0.1)[0]
    assert torch.allclose(ax[1:2], single, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    kappa = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    a = deflection(kappa, 0.1)[0]
    b = deflection(kappa.cuda(), 0.1)[0].cpu()
    assert torch.allclose(a, b, atol=1e-10)
