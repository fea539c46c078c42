"""Coverage of rimlens's posterior samples (issue 13).

Two modes:

    # calibrate the prior widths on rimlens's own held-out simulations (never on the judging set)
    python benchmarks/posterior_coverage.py calibrate --count 16 --tau-kappa 0.02 0.05 0.1 --tau-source 0.05 0.1

    # judge on lenstronomy's lenses reconstructed with `rimlens reconstruct LT --posterior N --out OUT`
    python benchmarks/posterior_coverage.py judge LT OUT

Per lens: the fraction of true kappa pixels in the annulus 0.5-2 theta_E (about the true centre)
within one posterior sigma of the posterior mean (goal 0.60-0.80), the same for source pixels on the
source's support (true source > 10% of its peak), the median sigma/kappa in the annulus (goal <= 0.15),
the samples' median chi2_nu; the medians over lenses are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from rimlens.physics import PixelGrid


def coverage(mean, std, truth, where) -> float:
    """Fraction of pixels in ``where`` whose truth lies within one sigma of the mean."""
    inside = np.abs(np.asarray(mean) - np.asarray(truth)) < np.asarray(std)
    return float(inside[where].mean()) if where.any() else float("nan")


def annulus(grid: PixelGrid, center, theta_e: float) -> np.ndarray:
    x, y = (c.numpy() for c in grid.coordinates(torch.float64))
    r = np.hypot(x - center[0], y - center[1])
    return (r >= 0.5 * theta_e) & (r <= 2 * theta_e)


def lens_figures(kappa_s, source_s, chi2_nu, kappa_true, source_true, grid, center, theta_e) -> dict:
    """Coverage figures of one lens from its samples (``S x N x N`` / ``S x M x M`` numpy arrays)."""
    ring = annulus(grid, center, theta_e)
    support = source_true > 0.1 * source_true.max()
    k_mean, k_std = kappa_s.mean(0), kappa_s.std(0, ddof=1)
    s_mean, s_std = source_s.mean(0), source_s.std(0, ddof=1)
    return {
        "kappa_coverage": coverage(k_mean, k_std, kappa_true, ring),
        "source_coverage": coverage(s_mean, s_std, source_true, support),
        "sigma_over_kappa": float(np.median((k_std / np.maximum(k_mean, 1e-6))[ring])),
        "chi2_nu_samples": float(np.median(chi2_nu)),
    }


def _medians(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    return {k: float(np.nanmedian([r[k] for r in rows])) for k in keys}


def calibrate(args) -> None:
    """Coverage on rimlens-simulated held-out lenses for each pair of prior widths."""
    from rimlens.data.lenses import LensGenerator
    from rimlens.data.random import child_rng
    from rimlens.inference.posterior import PosteriorOptions, perturb_and_map
    from rimlens.io.checkpoint import load_model
    from rimlens.physics.convergence import log10_kappa
    from rimlens.physics.lens_metrics import einstein_radius_of_map

    model = load_model(args.model).eval()
    grid = model.grid.image_grid
    lenses = LensGenerator(model.preset, split="test", noise="high").draw(child_rng(args.seed, 0), args.count)
    with torch.no_grad():
        out = model(lenses.observation, lenses.psf, lenses.noise_sigma)
    results = {}
    for tau_k in args.tau_kappa:
        for tau_s in args.tau_source:
            rows = []
            for i in range(args.count):
                opts = PosteriorOptions(
                    n_samples=args.samples, source_prior_sigma=tau_s, log10_kappa_prior_sigma=tau_k, seed=i
                )
                shear = None if out.final_shear is None else out.final_shear[i : i + 1]
                post = perturb_and_map(
                    model.simulator,
                    lenses.observation[i : i + 1],
                    lenses.psf[i : i + 1],
                    lenses.noise_sigma[i : i + 1],
                    out.source[-1][i : i + 1],
                    log10_kappa(out.final_kappa[i : i + 1]),
                    shear,
                    opts,
                )
                k_true = lenses.kappa[i, 0].numpy()
                theta = einstein_radius_of_map(k_true, grid, (0.0, 0.0))
                rows.append(
                    lens_figures(
                        post.kappa[:, 0].numpy(),
                        post.source[:, 0].numpy(),
                        post.chi2_nu.numpy(),
                        k_true,
                        lenses.source[i, 0].numpy(),
                        grid,
                        (0.0, 0.0),
                        theta,
                    )
                )
            results[f"tau_kappa={tau_k} tau_source={tau_s}"] = _medians(rows)
            print(
                f"tau_kappa {tau_k} tau_source {tau_s}: {json.dumps(results[f'tau_kappa={tau_k} tau_source={tau_s}'])}"
            )
            sys.stdout.flush()


def judge(args) -> None:
    """Coverage on lenstronomy's lenses, from `rimlens reconstruct LT --posterior N` products."""
    import h5py

    from lenstronomy_lenses import load_truth, truth_kappa, truth_source
    from rimlens.physics.lens_metrics import einstein_radius_of_map

    rows = []
    for lens_dir in sorted(p for p in args.lenses.iterdir() if (p / "truth.npz").exists()):
        rec = args.reconstructions / lens_dir.name
        if not (rec / "posterior_samples.h5").exists():
            continue
        _, params = load_truth(lens_dir)
        summary = json.loads((rec / "summary.json").read_text())
        ig, sg = summary["image_grid"], summary["source_grid"]
        grid = PixelGrid(int(ig["n_pixels"]), float(ig["pixel_scale_arcsec"]))
        src_grid = PixelGrid(int(sg["n_pixels"]), float(sg["pixel_scale_arcsec"]))
        c_rec = [float(v) for v in summary["center_arcsec"]]
        d = (float(params["center"][0]) - c_rec[0], float(params["center"][1]) - c_rec[1])
        kappa_true = truth_kappa(params, grid, c_rec)
        source_true = truth_source(params, src_grid, c_rec)
        with h5py.File(rec / "posterior_samples.h5") as h5:
            kappa_s, source_s, chi2 = h5["kappa"][:], h5["source"][:], h5["chi2_nu"][:]
        # the truth source is peak-normalised: compare on the samples' mean's scale (best-fit flux)
        mean = source_s.mean(0)
        scale = float((mean * source_true).sum() / max((source_true**2).sum(), 1e-30))
        theta = einstein_radius_of_map(kappa_true, grid, d)
        row = lens_figures(kappa_s, source_s, chi2, kappa_true, source_true * scale, grid, d, theta)
        rows.append({"lens": lens_dir.name, **row})
    if not rows:
        sys.exit("no posterior samples found")
    medians = _medians(rows)
    print(json.dumps({"lenses": len(rows), "medians": medians}, indent=1))
    (args.reconstructions / "posterior_coverage.json").write_text(json.dumps({"medians": medians, "lenses": rows}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("calibrate")
    c.add_argument("--model", default="default")
    c.add_argument("--count", type=int, default=16)
    c.add_argument("--seed", type=int, default=777)
    c.add_argument("--samples", type=int, default=16)
    c.add_argument("--tau-kappa", type=float, nargs="+", default=[0.05])
    c.add_argument("--tau-source", type=float, nargs="+", default=[0.1])
    j = sub.add_parser("judge")
    j.add_argument("lenses", type=Path)
    j.add_argument("reconstructions", type=Path)
    args = ap.parse_args(argv)
    calibrate(args) if args.mode == "calibrate" else judge(args)


if __name__ == "__main__":
    main()
