"""Coverage of rimlens's posterior samples (issue 13).

Two modes:

    # calibrate the prior widths on rimlens's own held-out simulations (never on the judging set)
    python benchmarks/posterior_coverage.py calibrate --count 16 --tau-kappa 0.02 0.05 0.1 --tau-source 0.05 0.1
    python benchmarks/posterior_coverage.py calibrate --preset cpu64 --mode-scale 0 0.5 1 2   # the error modes

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
import time
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


def block_mean(a: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor x factor`` pixel blocks of the last two axes (their sizes divisible by it)."""
    *lead, h, w = a.shape
    return a.reshape(*lead, h // factor, factor, w // factor, factor).mean(axis=(-3, -1))


def lens_vectors(kappa_s, source_s, kappa_true, source_true, grid, center) -> dict:
    """TARP parameter vectors of one lens: each a function applied alike to every sample and to the
    truth. ``lens``: (Einstein radius, log-slope over 0.5-2 of the true Einstein radius), both about
    the true centre; ``kappa``: log10 kappa in 8 x 8-pixel blocks; ``source``: the source in 8 x 8
    blocks. Returns ``{name: (samples S x D, truth D)}``."""
    from rimlens.errors import RimlensInputError
    from rimlens.physics.lens_metrics import einstein_radius_of_map, log_slope

    theta_true = einstein_radius_of_map(kappa_true, grid, center)

    def lens(k: np.ndarray) -> list[float]:
        try:
            return [einstein_radius_of_map(k, grid, center), log_slope(k, grid, theta_true, center)]
        except RimlensInputError:
            return [float("nan"), float("nan")]

    def flat(a: np.ndarray) -> np.ndarray:
        return a.reshape(a.shape[0], -1)

    return {
        "lens": (np.array([lens(k) for k in kappa_s]), np.array(lens(kappa_true))),
        "kappa": (flat(block_mean(np.log10(kappa_s), 8)), block_mean(np.log10(kappa_true), 8).ravel()),
        "source": (flat(block_mean(source_s, 8)), block_mean(source_true, 8).ravel()),
    }


def tarp_curve(samples: np.ndarray, truth: np.ndarray, seed: int = 0, norm: bool = True) -> tuple:
    """TARP's expected coverage (Lemos, Coogan et al. 2023; the ``tarp`` package) of ``samples``
    (S x lenses x D) against ``truth`` (lenses x D), 100 bootstrap resamplings: the credibility levels,
    the bootstrap-mean and standard deviation of the curve, and its largest |ECP - credibility| (0 for a
    calibrated posterior). ``norm``: the package's normalisation (each component scaled to the truths' range
    over the lenses, the reference points uniform in that box); without it the references are uniform in the
    raw unit cube."""
    import tarp

    # the package's default (lenses // 10 bins) leaves one bin, hence a trivially flat curve, below 20 lenses
    bins = max(2, min(20, truth.shape[0] // 5))
    # its bootstrap overwrites the arrays it is given (one lens by another, cumulatively), hence copies; and it
    # draws its first resampling from numpy's global generator before seeding it, hence the seed here
    np.random.seed(seed)  # noqa: NPY002 (the package uses the global generator)
    ecp, alpha = tarp.get_tarp_coverage(
        samples.copy(), truth.copy(), num_alpha_bins=bins, norm=norm, bootstrap=True, num_bootstrap=100, seed=seed
    )
    mean = ecp.mean(0)
    return alpha, mean, ecp.std(0), float(np.max(np.abs(mean - alpha)))


def tarp_test(vectors: list[dict], out_png: Path | None = None, seed: int = 0, norm: bool = True) -> dict:
    """:func:`tarp_curve` of each vector over all lenses; lenses with a non-finite vector are left out.
    Returns, per vector, the lenses used and the largest |ECP - credibility|, and draws the curves to
    ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    fig, axes = plt.subplots(1, len(vectors[0]), figsize=(4 * len(vectors[0]), 4), squeeze=False)
    for ax, name in zip(axes[0], vectors[0], strict=True):
        keep = [v[name] for v in vectors if np.isfinite(v[name][0]).all() and np.isfinite(v[name][1]).all()]
        samples = np.stack([s for s, _ in keep], axis=1)  # S x lenses x D
        truth = np.stack([t for _, t in keep])
        alpha, mean, std, worst = tarp_curve(samples, truth, seed, norm)
        figures[name] = {"lenses": len(keep), "max_abs_ecp_minus_alpha": worst}
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
        ax.plot(alpha, mean, label=f"rimlens ({len(keep)} lenses)")
        ax.fill_between(alpha, mean - std, mean + std, alpha=0.3)
        ax.set(xlabel="credibility level", ylabel="expected coverage", title=f"TARP: {name}", xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left")
    fig.tight_layout()
    if out_png is not None:
        fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return figures


def _medians(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    return {k: float(np.nanmedian([r[k] for r in rows])) for k in keys}


def calibrate(args) -> None:
    """Coverage on rimlens-simulated held-out lenses for each pair of prior widths."""
    from rimlens.config import get_preset
    from rimlens.data.lenses import LensGenerator
    from rimlens.data.random import child_rng
    from rimlens.inference.finetune import fit_simulator, refine_estimate
    from rimlens.inference.posterior import PosteriorOptions, sample_posterior
    from rimlens.io.checkpoint import load_model
    from rimlens.physics import PSF
    from rimlens.physics.convergence import log10_kappa
    from rimlens.physics.lens_metrics import einstein_radius_of_map

    model = load_model(args.model).eval()
    grid = model.grid.image_grid
    # the lens population: the model's own, or a preset's (same grids), e.g. cpu64's EPL + shear population
    population = model.preset if args.preset is None else get_preset(args.preset)
    if population.grid.image_grid != grid:
        sys.exit(f"preset {args.preset!r} has another image grid than the model")
    lenses = LensGenerator(population, split="test", noise="high").draw(child_rng(args.seed, 0), args.count)
    with torch.no_grad():
        out = model(lenses.observation, lenses.psf, lenses.noise_sigma)
    # the refinement's and the sampler's forward model, as `rimlens reconstruct --fit-supersample` builds it
    simulator = fit_simulator(model, args.supersample)
    results = {}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    default = PosteriorOptions()
    mode_names = (
        "log10_kappa_offset_sigma",
        "slope_prior_sigma",
        "quadrupole_prior_sigma",
        "quadrupole_slope_sigma",
        "source_dilation_sigma",
    )
    settings = [(t, c, m) for t in args.tau_kappa for c in args.correlation for m in args.mode_scale]
    for tau_k, corr, mode_scale in settings:
        for tau_s in args.tau_source:
            rows, vectors, start = [], [], time.perf_counter()
            key = f"tau_kappa={tau_k} correlation={corr} mode_scale={mode_scale} tau_source={tau_s}"
            for i in range(args.count):
                opts = PosteriorOptions(
                    n_samples=args.samples,
                    source_prior_sigma=tau_s,
                    log10_kappa_prior_sigma=tau_k,
                    log10_kappa_correlation_arcsec=corr,
                    seed=i,
                    method=args.method,
                    gauss_newton_steps=args.gauss_newton_steps,
                    **{name: mode_scale * getattr(default, name) for name in mode_names},
                )
                shear = None if out.final_shear is None else out.final_shear[i : i + 1]
                obs, psf = lenses.observation[i : i + 1], PSF.from_kernel(lenses.psf[i : i + 1])
                sigma = lenses.noise_sigma[i : i + 1]
                # as `rimlens reconstruct --posterior` does: refine the RIM's estimate, sample around the fit
                fit = refine_estimate(
                    simulator, obs, psf, sigma, out.source[-1][i : i + 1], out.final_kappa[i : i + 1], shear
                )
                post = sample_posterior(simulator, obs, psf, sigma, fit.source, log10_kappa(fit.kappa), fit.shear, opts)
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
                vectors.append(
                    lens_vectors(
                        post.kappa[:, 0].numpy(),
                        post.source[:, 0].numpy(),
                        k_true,
                        lenses.source[i, 0].numpy(),
                        grid,
                        (0.0, 0.0),
                    )
                )
            results[key] = {
                **_medians(rows),
                "seconds_per_lens": (time.perf_counter() - start) / args.count,
            }
            if args.count >= 10:
                name = f"tarp_tau_kappa{tau_k}_corr{corr}_modes{mode_scale}_tau_source{tau_s}.png"
                png = None if args.out is None else args.out / name
                results[key]["tarp"] = tarp_test(vectors, png)
            print(f"{key}: {json.dumps(results[key])}")
            sys.stdout.flush()
    if args.out is not None:
        (args.out / "calibration.json").write_text(json.dumps(results, indent=1))


def judge(args) -> None:
    """Coverage on lenstronomy's lenses, from `rimlens reconstruct LT --posterior N` products."""
    import h5py

    from lenstronomy_lenses import load_truth, truth_kappa, truth_source
    from rimlens.physics.lens_metrics import einstein_radius_of_map

    rows, vectors = [], []
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
        rows.append({"lens": lens_dir.name, "seconds": summary.get("seconds", float("nan")), **row})
        vectors.append(lens_vectors(kappa_s, source_s, kappa_true, source_true * scale, grid, d))
    if not rows:
        sys.exit("no posterior samples found")
    medians = _medians(rows)
    tarp_figures = tarp_test(vectors, args.reconstructions / "tarp.png") if len(rows) >= 10 else {}
    print(json.dumps({"lenses": len(rows), "medians": medians, "tarp": tarp_figures}, indent=1))
    (args.reconstructions / "posterior_coverage.json").write_text(
        json.dumps({"medians": medians, "tarp": tarp_figures, "lenses": rows})
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("calibrate")
    c.add_argument("--model", default="default")
    c.add_argument("--preset", default=None, help="draw lenses from this preset's population (default: the model's)")
    c.add_argument("--count", type=int, default=16)
    c.add_argument("--seed", type=int, default=777)
    c.add_argument("--samples", type=int, default=16)
    c.add_argument("--tau-kappa", type=float, nargs="+", default=[0.05])
    c.add_argument("--tau-source", type=float, nargs="+", default=[0.1])
    c.add_argument("--method", default="laplace", choices=["laplace", "perturb-and-map", "marginal"])
    c.add_argument("--gauss-newton-steps", type=int, default=4, help="laplace: 1 = the linearised posterior only")
    c.add_argument(
        "--correlation", type=float, nargs="+", default=[0.0], help="log10 kappa correlation lengths (arcsec)"
    )
    c.add_argument(
        "--mode-scale",
        type=float,
        nargs="+",
        default=[1.0],
        help="factor on the default widths of log10 kappa's global error modes and the source dilation (0: none)",
    )
    c.add_argument(
        "--supersample",
        type=int,
        default=None,
        help="rays per pixel side of the refinement's and the sampler's simulator (default: the model's)",
    )
    c.add_argument("--out", type=Path, default=None, help="folder for the TARP figures and calibration.json")
    j = sub.add_parser("judge")
    j.add_argument("lenses", type=Path)
    j.add_argument("reconstructions", type=Path)
    args = ap.parse_args(argv)
    calibrate(args) if args.mode == "calibrate" else judge(args)


if __name__ == "__main__":
    main()
