"""Which supersampling factor? Accuracy of pixel-integrated images against lenstronomy, and cost.

    OMP_NUM_THREADS=2 python benchmarks/bench_supersampling.py [--quick]

Lens: SIE (theta_E 1.2", q 0.75). Source: a compact clumpy Sersic galaxy (an n = 1.5 body of
R_e = 0.15" and four clumps of R_e 0.03-0.06"). Gaussian PSF of FWHM 0.1". Field 7.68" (N = 64 at
0.12"/px, N = 128 at 0.06"/px).

Reference: lenstronomy's ImageModel with ``supersampling_factor = 10`` (its rays through 10 x 10
sub-pixel centres, averaged, then the PSF at the image pixel scale: ``supersampling_convolution =
False``, the same PSF treatment as rimlens, so that only the ray sampling of the pixels differs).
rimlens (float64) with ``supersample = f`` is compared with it, as the maximum absolute difference
in % of the reference's peak, for two deflections:

* ``analytic``: the closed-form SIE deflection on rimlens' ray grid (the supersampling error alone);
* ``pixelated``: the SIE convergence pixel-averaged on the image grid (32 x 32 sub-pixels), cut along
  an isodensity ellipse at 3.5", its deflection computed by rimlens (what the RIM sees). The 2 px
  around the lens centre are left out: there the pixelated cusp has a finite core, which makes a
  faint central image at every f (a convergence-resolution effect, not a sampling one).

The source is pixelated on a 0.002"/px grid, fine enough that its bilinear interpolation adds
< 0.1% of the peak (the ``floor`` line: rimlens and lenstronomy both at f = 10).

Cost: ``LensSimulator.forward`` (pixelated convergence -> deflection -> rays -> PSF) per lens,
float32, batch 32, forward and forward+backward (the gradient the RIM takes), medians.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch

from common import compare_times, machine, set_threads
from rimlens.physics import PSF, LensSimulator, PixelGrid, profiles

THETA_E, Q, PHI, X0, Y0 = 1.2, 0.75, 0.5, 0.05, -0.03
FWHM = 0.1
FOV = 7.68
FACTORS = (1, 2, 3, 4, 6)
SOURCE_GRID = PixelGrid(1000, 0.002)  # 2" (the source's light beyond 1" is < 1e-4 of its peak)


def _source_kwargs():
    from lenstronomy.Util import param_util

    e1, e2 = param_util.phi_q2_ellipticity(-0.3, 0.7)
    body = dict(amp=1.0, R_sersic=0.15, n_sersic=1.5, e1=e1, e2=e2, center_x=0.08, center_y=0.04)
    clumps = [
        dict(amp=3.0, R_sersic=0.04, n_sersic=1.0, center_x=0.20, center_y=0.10),
        dict(amp=2.0, R_sersic=0.03, n_sersic=1.0, center_x=-0.05, center_y=0.12),
        dict(amp=2.5, R_sersic=0.06, n_sersic=1.0, center_x=0.05, center_y=-0.10),
        dict(amp=1.5, R_sersic=0.035, n_sersic=1.0, center_x=0.16, center_y=-0.04),
    ]
    return ["SERSIC_ELLIPSE"] + ["SERSIC"] * len(clumps), [body, *clumps]


def lenstronomy_image(n, scale, factor):
    """Surface brightness (flux / pixel area) of the lenstronomy image, ``n x n``."""
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF as LensPSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.Util import param_util

    e1, e2 = param_util.phi_q2_ellipticity(PHI, Q)
    models, kwargs_source = _source_kwargs()
    c = -(n - 1) / 2 * scale
    data = ImageData(image_data=np.zeros((n, n)), ra_at_xy_0=c, dec_at_xy_0=c, transform_pix2angle=np.eye(2) * scale)
    model = ImageModel(
        data,
        LensPSF(psf_type="GAUSSIAN", fwhm=FWHM, truncation=5),
        lens_model_class=LensModel(["SIE"]),
        source_model_class=LightModel(models),
        kwargs_numerics={"supersampling_factor": factor, "supersampling_convolution": False},
    )
    kwargs_lens = [dict(theta_E=THETA_E, e1=e1, e2=e2, center_x=X0, center_y=Y0)]
    return model.image(kwargs_lens=kwargs_lens, kwargs_source=kwargs_source) / scale**2


def source_map():
    from lenstronomy.LightModel.light_model import LightModel

    models, kwargs_source = _source_kwargs()
    sx, sy = SOURCE_GRID.coordinates(torch.float64)
    light = LightModel(models).surface_brightness(sx.numpy().ravel(), sy.numpy().ravel(), kwargs_source)
    return torch.as_tensor(np.asarray(light).reshape(sx.shape))[None, None]


def pixelated_sie(grid, cut=3.5):
    x, y = grid.coordinates(torch.float64)
    kappa = profiles.pixelate(
        profiles.sie_kappa,
        grid,
        32,
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


def rimlens_images(n, scale, factor, source, kappa):
    """(analytic-deflection image, pixelated-kappa image), float64, ``n x n``."""
    sim = LensSimulator(PixelGrid(n, scale), SOURCE_GRID, supersample=factor)
    psf = PSF.gaussian(FWHM, scale, dtype=torch.float64)
    x, y = sim.ray_grid.coordinates(torch.float64)
    alpha = torch.stack(profiles.sie_deflection(x, y, THETA_E, Q, PHI, X0, Y0))[None]
    analytic = psf.convolve(sim.lens(source, alpha=alpha))[0, 0].numpy()
    pixelated = sim.forward(source, kappa, psf)[0, 0].numpy()
    return analytic, pixelated


def accuracy(n, scale, factors):
    ref = lenstronomy_image(n, scale, 10)
    peak = ref.max()
    source = source_map()
    kappa = pixelated_sie(PixelGrid(n, scale))
    x, y = PixelGrid(n, scale).coordinates(torch.float64)
    outside_core = (torch.sqrt((x - X0) ** 2 + (y - Y0) ** 2) > 2 * scale).numpy()
    rows = {}
    for f in (*factors, 10):
        analytic, pixelated = rimlens_images(n, scale, f, source, kappa)
        rows[f] = (
            100 * np.abs(analytic - ref).max() / peak,
            100 * np.abs(pixelated - ref)[outside_core].max() / peak,
            100 * np.abs(lenstronomy_image(n, scale, f) - ref).max() / peak if f < 10 else float("nan"),
        )
    return rows


def timing(n, factors, batch, repeats):
    img, src = PixelGrid.from_fov(n, FOV), PixelGrid.from_fov(n, 3.0)
    g = torch.Generator().manual_seed(0)
    kappa = torch.rand(batch, 1, n, n, generator=g)
    source = torch.rand(batch, 1, n, n, generator=g)
    obs = torch.rand(batch, 1, n, n, generator=g)
    psf = PSF.gaussian(FWHM, img.pixel_scale_arcsec)
    fns = {}
    for f in factors:
        sim = LensSimulator(img, src, supersample=f)

        def fwd(sim=sim):
            with torch.no_grad():
                sim.forward(source, kappa, psf, check=False)

        def fwd_bwd(sim=sim):
            s = source.clone().requires_grad_(True)
            k = kappa.clone().requires_grad_(True)
            ((sim.forward(s, k, psf, check=False) - obs) ** 2).sum().backward()

        fns[(f, "fwd")], fns[(f, "fb")] = fwd, fwd_bwd
    t = compare_times(fns, repeats)
    return {f: (1e3 * t[(f, "fwd")] / batch, 1e3 * t[(f, "fb")] / batch) for f in factors}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, batch 8")
    args = ap.parse_args(argv)
    set_threads()
    repeats, batch = (3, 8) if args.quick else (5, 32)
    print(f"# supersampling: accuracy vs lenstronomy supersampling_factor=10, and cost; {machine()}")
    print(f'# SIE + clumpy Sersic source, Gaussian PSF FWHM {FWHM}", field {FOV}"; errors = max |diff| in % of peak')
    print(
        "| pixel scale | N | f | analytic alpha (%) | pixelated kappa (%) | lenstronomy f vs 10 (%)"
        " | fwd (ms/lens) | fwd+bwd (ms/lens) | fwd+bwd vs f=1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for scale in (0.12, 0.06):
        n = round(FOV / scale)
        acc = accuracy(n, scale, FACTORS)
        cost = timing(n, FACTORS, batch, repeats)
        for f in FACTORS:
            a, p, lt = acc[f]
            fwd, fb = cost[f]
            print(
                f'| {scale}" | {n} | {f} | {a:.2f} | {p:.2f} | {lt:.2f} | {fwd:.2f} | {fb:.2f} | {fb / cost[1][1]:.1f}x |',
                flush=True,
            )
        a, p, _ = acc[10]
        print(f'| {scale}" | {n} | 10 (floor) | {a:.2f} | {p:.2f} | - | - | - | - |', flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
