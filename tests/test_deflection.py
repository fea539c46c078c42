"""Deflection of pixelated convergence maps against closed forms (docs/validation.md items 1-3)."""

import itertools
import math

import numpy as np
import pytest
import torch

from rimlens.errors import RimlensInputError
from rimlens.physics import PixelGrid, deflection, deflection_field, profiles
from rimlens.physics.deflection import deflection_at_offsets, deflection_supersampled, subpixel_offsets


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


# ------------------------------------------------------------------ off-centre (supersampled) deflections
OFFSETS = [(0.0, 0.0), (0.25, -0.25), (0.375, 0.125), (-0.5, 0.5), (0.1, 0.0)]


def _brute_force(kappa, scale, offsets, pixel):
    """Direct O(N^4) sum over the pixels, in numpy, independent of the FFT machinery."""

    def g(u, v):
        r2 = u**2 + v**2
        log_term = np.where(r2 > 0, np.log(np.where(r2 > 0, r2, 1.0)), 0.0)
        atan_term = np.where(u != 0, u * np.arctan(v / np.where(u != 0, u, 1.0)), 0.0)
        return 0.5 * v * log_term + atan_term

    def square(u, v):  # x-deflection of a uniform unit square at the origin, times pi
        return g(u + 0.5, v + 0.5) - g(u - 0.5, v + 0.5) - g(u + 0.5, v - 0.5) + g(u - 0.5, v - 0.5)

    k = kappa[0, 0].numpy()
    n = k.shape[0]
    out = np.zeros((len(offsets), 2, n, n))
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    for o, (ox, oy) in enumerate(offsets):
        for i in range(n):
            for j in range(n):
                a, b = j + ox - cols, i + oy - rows  # from every mass (row, col) to the ray
                if pixel == "point":
                    r2 = a**2 + b**2
                    on = r2 == 0
                    r2 = np.where(on, 1.0, r2)
                    kx, ky = np.where(on, 0.0, a / r2), np.where(on, 0.0, b / r2)
                else:
                    kx, ky = square(a, b), square(b, a)
                out[o, 0, i, j] = scale / math.pi * (k * kx).sum()
                out[o, 1, i, j] = scale / math.pi * (k * ky).sum()
    return out


@pytest.mark.parametrize("pixel", ["square", "point"])
@pytest.mark.parametrize("n", [7, 8])
def test_deflection_at_offsets_equals_brute_force_sum(pixel, n, rng):
    kappa = torch.rand(2, 1, n, n, generator=rng, dtype=torch.float64)
    ours = deflection_at_offsets(kappa, 0.1, OFFSETS, pixel=pixel)
    assert ours.shape == (2, len(OFFSETS), 2, n, n)
    for b in range(2):
        ref = _brute_force(kappa[b : b + 1], 0.1, OFFSETS, pixel)
        np.testing.assert_allclose(ours[b].numpy(), ref, rtol=0, atol=1e-13)


def test_square_pixel_kernel_is_the_integral_over_the_square():
    # uniform unit square of kappa = 1 at the origin (one pixel of scale 1): quadrature of
    # (1/pi) (r - r') / |r - r'|^2 over the square, at points inside, on the edge and outside it
    from scipy.integrate import dblquad

    kappa = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    kappa[0, 0, 4, 4] = 1.0
    for ox, oy in [(0.25, 0.1), (0.5, -0.3), (0.45, 0.45), (0.0, 0.3)]:
        alpha = deflection_at_offsets(kappa, 1.0, [(ox, oy)], pixel="square")[0, 0]
        for i, j in [(4, 4), (4, 6), (1, 3)]:
            px, py = j - 4 + ox, i - 4 + oy

            def integrand(v, u, c, px=px, py=py):
                d = (px - u, py - v)
                return d[c] / (math.pi * (d[0] ** 2 + d[1] ** 2))

            # split the square at the ray's coordinates so that the 1/r singularity sits at corners
            us = sorted({-0.5, 0.5, *([px] if abs(px) < 0.5 else [])})
            vs = sorted({-0.5, 0.5, *([py] if abs(py) < 0.5 else [])})
            for c in (0, 1):
                ref = sum(
                    dblquad(integrand, u0, u1, v0, v1, args=(c,), epsabs=1e-11)[0]
                    for u0, u1 in itertools.pairwise(us)
                    for v0, v1 in itertools.pairwise(vs)
                )
                assert float(alpha[c, i, j]) == pytest.approx(ref, abs=2e-7), (ox, oy, i, j, c)


def test_point_at_zero_offset_is_the_pixel_centre_deflection(rng):
    for dtype in (torch.float32, torch.float64):
        kappa = torch.rand(3, 1, 16, 16, generator=rng, dtype=torch.float64).to(dtype)
        ours = deflection_at_offsets(kappa, 0.1, [(0.0, 0.0)], pixel="point")[:, 0]
        reference = deflection_field(kappa, 0.1)
        # the same sum by two FFT routes: equal up to rounding (bitwise on some CPUs, 1 ulp apart on
        # others), while any real difference -- an offset or a kernel off by a pixel -- is ~1e-2 here
        rounding = 8 * torch.finfo(dtype).eps * float(reference.abs().max())
        torch.testing.assert_close(ours, reference, rtol=0, atol=rounding)
        torch.testing.assert_close(
            deflection_supersampled(kappa, 0.1, 1, pixel="point"), reference, rtol=0, atol=rounding
        )


def _gaussian_offset_errors(pixel, n=128, scale=0.06, sigma=0.3):
    g = PixelGrid(n, scale)
    x, y = g.coordinates(torch.float64)
    kappa = profiles.gaussian_kappa(x, y, 1.0, sigma)[None, None]
    alpha = deflection_at_offsets(kappa, scale, OFFSETS, pixel=pixel)[0]
    worst, medians = 0.0, []
    for k, (ox, oy) in enumerate(OFFSETS):
        tx, ty = profiles.gaussian_deflection(x + ox * scale, y + oy * scale, 1.0, sigma)
        err = torch.sqrt((alpha[k, 0] - tx) ** 2 + (alpha[k, 1] - ty) ** 2)
        far = torch.sqrt((x + ox * scale) ** 2 + (y + oy * scale) ** 2) > 3 * scale
        worst = max(worst, float(err.max()))
        medians.append(float((err / torch.sqrt(tx**2 + ty**2))[far].median()))
    return worst, max(medians)


def test_offset_deflection_of_gaussian_matches_closed_form():
    """Square pixels: off-centre as accurate as the pixel-centre sum (worst error 1.2e-3", at the
    Gaussian's peak: its quadrature error). Point masses: an error of order kappa s next to every ray,
    whose own pixel's mass sits a fraction of a pixel away (0.55 kappa s at offset (1/4, 1/4), 0.18"
    at offset (0.1, 0) here)."""
    n, scale, sigma = 128, 0.06, 0.3
    g = PixelGrid(n, scale)
    x, y = g.coordinates(torch.float64)
    ax, ay = deflection(profiles.gaussian_kappa(x, y, 1.0, sigma)[None, None], scale)
    tx, ty = profiles.gaussian_deflection(x, y, 1.0, sigma)
    centre_worst = float(torch.sqrt((ax[0, 0] - tx) ** 2 + (ay[0, 0] - ty) ** 2).max())  # ~1.2e-3"

    worst, median = _gaussian_offset_errors("square", n, scale, sigma)
    assert worst <= 1.1 * centre_worst and median < 1e-7
    worst_point, _ = _gaussian_offset_errors("point", n, scale, sigma)
    assert worst_point > 20 * centre_worst


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_supersampled_layout_on_the_fine_grid(factor):
    # sub-pixel (a, b) of pixel (i, j) sits at row i f + a, column j f + b of PixelGrid(f N, s / f)
    n, scale, sigma = 48, 0.12, 0.6
    x, y = PixelGrid(n, scale).coordinates(torch.float64)
    kappa = profiles.gaussian_kappa(x, y, 1.0, sigma)[None, None].expand(2, 1, n, n)
    alpha = deflection_supersampled(kappa, scale, factor)
    assert alpha.shape == (2, 2, factor * n, factor * n)
    fx, fy = PixelGrid(factor * n, scale / factor).coordinates(torch.float64)
    tx, ty = profiles.gaussian_deflection(fx, fy, 1.0, sigma)
    assert float((alpha[:, 0] - tx).abs().max()) < 3e-3 and float((alpha[:, 1] - ty).abs().max()) < 3e-3
    # and exactly the offsets' deflections, interleaved
    sub = subpixel_offsets(factor)
    assert sub == tuple((k + 0.5) / factor - 0.5 for k in range(factor))
    direct = deflection_at_offsets(kappa, scale, [(sub[1], sub[0])])[:, 0]
    assert torch.equal(alpha[:, :, 0::factor, 1::factor], direct)


def test_offset_deflection_float32_and_inputs():
    x, y = PixelGrid(64, 0.12).coordinates(torch.float64)
    kappa = profiles.gaussian_kappa(x, y, 1.0, 0.5)[None, None]
    a64 = deflection_supersampled(kappa, 0.12, 3)
    a32 = deflection_supersampled(kappa.float(), 0.12, 3)
    assert a32.dtype == torch.float32 and float((a32.double() - a64).abs().max()) < 1e-6
    with pytest.raises(RimlensInputError):
        deflection_supersampled(kappa, 0.12, 0)
    with pytest.raises(RimlensInputError):
        deflection_at_offsets(kappa, 0.12, [])
    with pytest.raises(RimlensInputError):
        deflection_at_offsets(kappa, 0.12, [(0.1, float("nan"))])
    with pytest.raises(RimlensInputError):
        deflection_at_offsets(kappa, 0.12, [(0.1, 0.1)], pixel="disc")  # type: ignore[arg-type]


def test_offset_deflection_gradcheck(rng):
    kappa = torch.rand(2, 1, 5, 5, generator=rng, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda k: deflection_supersampled(k, 0.1, 2), (kappa,))
    # the backward is hand-written (the adjoint convolution): its own derivative too
    assert torch.autograd.gradgradcheck(lambda k: deflection_supersampled(k, 0.1, 2), (kappa,))
    # under torch.func: per-example gradients with vmap
    w = torch.rand(2, 2, 10, 10, generator=rng, dtype=torch.float64)
    per = torch.func.vmap(
        torch.func.grad(lambda k, w1: (deflection_supersampled(k[None], 0.1, 2, check=False)[0] * w1).sum())
    )(kappa.detach(), w)
    (whole,) = torch.autograd.grad((deflection_supersampled(kappa, 0.1, 2) * w).sum(), kappa)
    assert torch.allclose(per, whole, rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_offset_deflection_cuda_matches_cpu():
    kappa = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    a = deflection_supersampled(kappa, 0.1, 3)
    b = deflection_supersampled(kappa.cuda(), 0.1, 3).cpu()
    assert torch.allclose(a, b, atol=1e-10)
