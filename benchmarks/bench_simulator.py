"""Simulator throughput (lensed images per second), rimlens vs caustics, and accuracy on a
Gaussian convergence with a closed-form deflection.

    OMP_NUM_THREADS=2 python benchmarks/bench_simulator.py [--quick]

Task per lens: pixelated convergence (N x N over 7.68") -> deflection -> bilinear sampling of a
pixelated source (N x N over 3") -> Gaussian PSF (FWHM 0.1"). Forward+backward = gradient of a
chi^2 with respect to the source and the convergence. float32, CPU, medians of repeated runs.
"""

from __future__ import annotations

import argparse
import sys

import torch

from common import compare_times, machine, set_threads
from rimlens.physics import PSF, LensSimulator, PixelGrid, deflection, profiles


def rimlens_case(n, batch):
    img, src = PixelGrid.from_fov(n, 7.68), PixelGrid.from_fov(n, 3.0)
    sim = LensSimulator(img, src)
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


def caustics_case(n, batch, psf_size):
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
        lens=lens, source=src, pixelscale=scale, pixels_x=n, psf=kern, psf_shape=tuple(kern.shape), name="sim"
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
