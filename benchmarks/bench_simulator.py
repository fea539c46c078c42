"""Simulator throughput (lensed images per second), rimlens vs caustics, and accuracy on a
Gaussian convergence with a closed-form deflection.

    OMP_NUM_THREADS=2 python benchmarks/bench_simulator.py [--quick] [--supersample F]

Task per lens: pixelated convergence (N x N over 7.68") -> deflection -> bilinear sampling of a
pixelated source (N x N over 3") -> Gaussian PSF (FWHM 0.1"). Forward+backward = gradient of a
chi^2 with respect to the source and the convergence. float32, CPU, medians of repeated runs.

Supersampled task (second table): the same, with the image pixel-integrated over F x F rays per
pixel (default F = 4, the factor benchmarks/bench_supersampling.py recommends), the PSF at the image
pixel scale. rimlens: ``LensSimulator(..., supersample=F)`` (rays through the F x F sub-pixel
centres, the exact deflection of the pixelated convergence there: F^2 FFT convolutions). caustics:
``LensSource(..., quad_level=F)`` (F x F Gauss-Legendre rays per pixel, weighted; its deflection at
the rays is bilinearly interpolated from the one at the pixel centres; PSF at the image pixel scale)
- the same work per lens. (caustics' other option, ``upsample_factor=F``, convolves the PSF on the
fine grid and needs the PSF sampled there: a different task.) Both are timed in the same run,
round-robin, so that their ratio is robust to machine noise.
"""

from __future__ import annotations

import argparse
import sys

import torch

from common import compare_times, machine, set_threads
from rimlens.physics import PSF, LensSimulator, PixelGrid, deflection, profiles

SUPERSAMPLE = 4


def rimlens_case(n, batch, supersample=1):
    img, src = PixelGrid.from_fov(n, 7.68), PixelGrid.from_fov(n, 3.0)
    sim = LensSimulator(img, src, supersample=supersample)
    psf = PSF.gaussian(0.1, img.pixel_scale_arcsec)
    g = torch.Generator().manual_seed(0)
    kappa = torch.rand(batch, 1, n, n, generator=g)
    source = torch.rand(batch, 1, n, n, generator=g)
    obs = torch.rand(batch, 1, n, n, generator=g)

    def fwd():
        with torch.no_grad():
            sim.forward(source, kappa, psf, check=False)

    def fwd_bwd():
        s = source.clone().requires_grad_(True)
        k = kappa.clone().requires_grad_(True)
        ((sim.forward(s, k, psf, check=False) - obs) ** 2).sum().backward()

    return fwd, fwd_bwd, psf.size


def caustics_case(n, batch, psf_size, quad_level=None):
    import caustics

    scale = 7.68 / n
    cosmo = caustics.FlatLambdaCDM(name="cosmo")
    lens = caustics.PixelatedConvergence(
        pixelscale=scale,
        cosmology=cosmo,
        z_l=0.5,
        z_s=1.5,
        convergence_map=torch.zeros(n, n),
        shape=(n, n),
        name="lens",
    )
    src = caustics.Pixelated(image=torch.zeros(n, n), x0=0.0, y0=0.0, pixelscale=3.0 / n, shape=(n, n), name="src")
    kern = PSF.gaussian(0.1, scale, size=psf_size).kernel[0, 0]
    sim = caustics.LensSource(
        lens=lens,
        source=src,
        pixelscale=scale,
        pixels_x=n,
        psf=kern,
        psf_shape=tuple(kern.shape),
        quad_level=quad_level,
        name="sim",
    )
    lens.convergence_map.to_dynamic()
    src.image.to_dynamic()
    g = torch.Generator().manual_seed(0)
    kappa = torch.rand(batch, n, n, generator=g)
    source = torch.rand(batch, n, n, generator=g)
    obs = torch.rand(batch, n, n, generator=g)
    run = torch.vmap(lambda k, s: sim([k, s]))

    def fwd():
        with torch.no_grad():
            run(kappa, source)

    def fwd_bwd():
        s = source.clone().requires_grad_(True)
        k = kappa.clone().requires_grad_(True)
        ((run(k, s) - obs) ** 2).sum().backward()

    return fwd, fwd_bwd


def gaussian_accuracy(n=128, scale=0.06, sigma=0.3):
    """Median relative deflection error vs the closed form beyond 3 pixels (float32)."""
    grid = PixelGrid(n, scale)
    x, y = grid.coordinates(torch.float32)
    kappa = profiles.gaussian_kappa(x, y, 1.0, sigma)
    tx, ty = profiles.gaussian_deflection(x.double(), y.double(), 1.0, sigma)
    r = torch.sqrt(x.double() ** 2 + y.double() ** 2)
    sel = r > 3 * scale

    def err(ax, ay):
        e = torch.sqrt((ax.double() - tx) ** 2 + (ay.double() - ty) ** 2) / torch.sqrt(tx**2 + ty**2)
        return float(e[sel].median())

    ax, ay = deflection(kappa[None, None], scale)
    out = {"rimlens": err(ax[0, 0], ay[0, 0])}
    try:
        import caustics

        lens = caustics.PixelatedConvergence(
            pixelscale=scale,
            cosmology=caustics.FlatLambdaCDM(name="c"),
            z_l=0.5,
            z_s=1.5,
            convergence_map=kappa,
            shape=(n, n),
        )
        cx, cy = lens.reduced_deflection_angle(x, y)
        out["caustics"] = err(cx, cy)
    except ImportError:
        pass
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--supersample", type=int, default=SUPERSAMPLE, help="factor of the supersampled task")
    args = ap.parse_args(argv)
    set_threads()
    repeats = 3 if args.quick else 7
    try:
        import caustics  # noqa: F401

        have_caustics = True
    except ImportError:
        have_caustics = False
    print(f"# simulator throughput, {machine()}")
    acc = gaussian_accuracy()
    print(
        '# Gaussian-kappa deflection, median relative error beyond 3 px (N=128, 0.06"/px, float32): '
        + ", ".join(f"{k} {v:.2e}" for k, v in acc.items())
    )
    print(
        "| N | batch | rimlens fwd (lens/s) | rimlens fwd+bwd (lens/s) |"
        + (" caustics fwd | caustics fwd+bwd | ratio fwd | ratio fwd+bwd |" if have_caustics else "")
    )
    print("|---|---|---|---|" + ("---|---|---|---|" if have_caustics else ""))
    for n in (64, 128):
        for batch in (1, 32):
            fwd, fb, k = rimlens_case(n, batch)
            fns = {"fwd": fwd, "fb": fb}
            if have_caustics:
                fns["cf"], fns["cfb"] = caustics_case(n, batch, k)
            t = compare_times(fns, repeats)
            row = f"| {n} | {batch} | {batch / t['fwd']:,.0f} | {batch / t['fb']:,.0f} |"
            if have_caustics:
                row += (
                    f" {batch / t['cf']:,.0f} | {batch / t['cfb']:,.0f} | {t['cf'] / t['fwd']:.1f}x"
                    f" | {t['cfb'] / t['fb']:.1f}x |"
                )
            print(row, flush=True)
    supersampled_table(args.supersample, repeats, have_caustics)
    return 0


def supersampled_table(f, repeats, have_caustics):
    print(
        f"\n# supersampled task: {f} x {f} rays per pixel, averaged, then the PSF"
        + (f" (caustics: quad_level={f})" if have_caustics else "")
    )
    print(
        "| N | batch | f | rimlens fwd (lens/s) | rimlens fwd+bwd (lens/s) |"
        + (" caustics fwd | caustics fwd+bwd | ratio fwd | ratio fwd+bwd |" if have_caustics else "")
    )
    print("|---|---|---|---|---|" + ("---|---|---|---|" if have_caustics else ""))
    for n in (64, 128):
        for batch in (1, 32):
            fwd, fb, k = rimlens_case(n, batch, supersample=f)
            fns = {"fwd": fwd, "fb": fb}
            if have_caustics:
                fns["cf"], fns["cfb"] = caustics_case(n, batch, k, quad_level=f)
            t = compare_times(fns, repeats)
            row = f"| {n} | {batch} | {f} | {batch / t['fwd']:,.0f} | {batch / t['fb']:,.0f} |"
            if have_caustics:
                row += (
                    f" {batch / t['cf']:,.0f} | {batch / t['cfb']:,.0f} | {t['cf'] / t['fwd']:.1f}x"
                    f" | {t['cfb'] / t['fb']:.1f}x |"
                )
            print(row, flush=True)


if __name__ == "__main__":
    sys.exit(main())
