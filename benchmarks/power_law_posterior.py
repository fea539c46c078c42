"""Coverage of the power-law posterior (:mod:`rimlens.inference.power_law_posterior`) on lenstronomy's lenses
(issue 13): how often the truth lies within the samples' spread, per convergence pixel, per source pixel and
per parameter.

    python benchmarks/lenstronomy_lenses.py --count 16 --seed 13 --cutout mixed --lens-light --out LENSES
    OMP_NUM_THREADS=1 python benchmarks/power_law_fit.py LENSES --threads 1 --finetune --save FITS
    python benchmarks/power_law_posterior.py LENSES FITS [--samples 48] [--json OUT.json --vectors OUT.npz]
    python benchmarks/power_law_posterior.py --summarize OUT.json [MORE.json ...] [--tarp PNG]   # merge runs
        [--population-prior] [--tarp-reference] [--tarp-unnormalised]

Per lens, from ``--samples`` draws: the fraction of true pixel-mean kappa pixels in 0.5-2 theta_E (about the
true centre; the shipped model's 64 x 0.12" grid, centred at the fitted centre) within one posterior sigma of
the samples' mean (goal 0.60-0.80), the same for source pixels on the true source's support (> 10% of its
peak; the truth averaged over the posterior's source pixels and scaled to the samples' mean flux), both also
pooled over all the lenses' pixels (the calibration figure: a lens's pixels share its parameters' errors), the median
sigma / kappa in the annulus (goal <= 0.15), the samples' median chi2_nu; per parameter, |fit - truth| /
sigma (within 1: "covered"). Medians over lenses and a TARP test (>= 10 lenses) are printed; the fits are
``power_law_fit.py --save``'s (the measurement is not repeated here).

TARP judges a Bayesian posterior against the population the truths were drawn from; rimlens's posterior has flat
priors, so even exact widths fail it where the widths are comparable to the population's spread (the estimates
scatter beyond the population's box). ``--tarp-reference`` says how much, by simulation: exact Gaussian
posteriors with each lens's own sampled widths, truths from lenstronomy_lenses.py's uniform (theta_E, slope)
box, once with flat priors and once with that box as the prior. ``--population-prior`` redoes the TARP test with
the samples resampled under that box prior (importance weights: the box's indicator), the Bayesian posterior of
this population as far as theta_E and the slope go.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lenstronomy_lenses import (
    MODEL_GRID,
    SLOPE_RANGE,
    THETA_E_RANGE_ARCSEC,
    load_truth,
    truth_kappa,
    truth_source,
)
from posterior_coverage import annulus, block_mean, coverage, tarp_curve, tarp_test
from rimlens.errors import RimlensInputError
from rimlens.inference.power_law_posterior import COVARIANCE_INFLATION, PARAMETER_NAMES, sample_power_law_posterior

PARAMETERS = PARAMETER_NAMES


def true_parameters(kw: dict) -> np.ndarray:
    """The truth in the fit's order (lenstronomy EPL + SHEAR)."""
    epl = next(k for m, k in zip(kw["lens_models"], kw["kwargs_lens"], strict=True) if m == "EPL")
    shear = next((k for m, k in zip(kw["lens_models"], kw["kwargs_lens"], strict=True) if m == "SHEAR"), {})
    return np.array([epl["theta_E"], epl["gamma"], epl["e1"], epl["e2"], epl["center_x"], epl["center_y"],
                     shear.get("gamma1", 0.0), shear.get("gamma2", 0.0)])  # fmt: skip


def judge_lens(lens: Path, fit_file: Path, n_samples: int, scale: float, total_slope: bool, seed: int) -> tuple:
    """Figures of one lens and its TARP vectors."""
    saved = torch.load(fit_file, weights_only=False)
    m = saved["measurement"]
    m.inversion = saved["inversion"]
    post = sample_power_law_posterior(m, n_samples, seed=seed, covariance_scale=scale, total_slope_width=total_slope)
    _, params = load_truth(lens)
    truth = true_parameters(params)
    fit_center = (float(m.mass.center_x_arcsec), float(m.mass.center_y_arcsec))
    kappa_s = post.kappa_maps(MODEL_GRID, fit_center)
    kappa_true = truth_kappa(params, MODEL_GRID, fit_center)
    d = (truth[4] - fit_center[0], truth[5] - fit_center[1])
    ring = annulus(MODEL_GRID, d, float(truth[0]))
    source_s = post.sources.numpy()
    src_true = truth_source(params, post.source_grid, post.source_box[:2])
    support = src_true > 0.1 * src_true.max()
    mean = source_s.mean(0)
    src_true = src_true * float((mean * src_true).sum() / max((src_true**2).sum(), 1e-300))
    k_mean, k_std = kappa_s.mean(0), kappa_s.std(0, ddof=1)
    sigma_stat = np.sqrt(np.diag(post.covariance_statistical)[:8])
    sigma = np.sqrt(np.diag(post.covariance)[:8])  # the sampled covariance's (exact, not the samples' noisy spread)
    fit = m.mass.vector().numpy()[:8]
    row = {
        "lens": lens.name,
        "kappa_coverage": coverage(k_mean, k_std, kappa_true, ring),
        "source_coverage": coverage(mean, source_s.std(0, ddof=1), src_true, support),
        "kappa_pixels": int(ring.sum()),
        "source_pixels": int(support.sum()),
        "sigma_over_kappa": float(np.median((k_std / np.maximum(k_mean, 1e-6))[ring])),
        "kappa_error": float(np.median(np.abs(k_mean - kappa_true)[ring] / kappa_true[ring])),
        "chi2_nu_samples": float(np.median(post.chi2_nu)),
        "chi2_nu_fit": float(m.fit.chi2_nu),
        "seconds_sampling": post.seconds,
        # the measurement's own warning (chi2_nu > 1.5, or the slope at the scan's edge): the CLI flags these fits
        "warning": m.describe().get("warning"),
        "z": {p: float(abs(fit[i] - truth[i]) / sigma[i]) for i, p in enumerate(PARAMETERS)},
        "z_statistical": {p: float(abs(fit[i] - truth[i]) / sigma_stat[i]) for i, p in enumerate(PARAMETERS)},
        "slope_sigma": float(sigma[1]),
        "slope_sigma_statistical_laplace": float(sigma_stat[1]),
        "slope_sigma_statistical_profile": float(m.slope_sigma),
    }
    # TARP vectors: log10 of kappa's 8 x 8-pixel block means (64 px), the source's 5 x 5 block means (40 px)
    vectors = {
        "lens": (post.masses.numpy()[:, :2], truth[:2]),
        "kappa": (np.log10(block_mean(kappa_s, 8)).reshape(n_samples, -1), np.log10(block_mean(kappa_true, 8)).ravel()),
        "source": (block_mean(source_s, 5).reshape(n_samples, -1), block_mean(src_true, 5).ravel()),
    }
    return row, vectors


def summarise(rows: list[dict]) -> dict:
    """Medians over lenses and the per-parameter coverage (fraction with z <= 1 and <= 2)."""
    keys = ["kappa_coverage", "source_coverage", "sigma_over_kappa", "kappa_error", "chi2_nu_samples",
            "seconds_sampling"]  # fmt: skip
    out = {k: round(float(np.nanmedian([r[k] for r in rows])), 4) for k in keys}
    # the calibration figure: the fraction of all the lenses' pixels within one sigma (a lens's pixels share
    # its parameters' errors, so a calibrated posterior covers most pixels of some lenses and few of others:
    # the median over lenses is then no coverage figure)
    for which in ("kappa", "source"):
        n = sum(r[f"{which}_pixels"] for r in rows)
        out[f"{which}_coverage_pooled"] = round(sum(r[f"{which}_coverage"] * r[f"{which}_pixels"] for r in rows) / n, 4)
    for which in ("z", "z_statistical"):
        out[f"{which}_within_1"] = {p: round(float(np.mean([r[which][p] <= 1 for r in rows])), 2) for p in PARAMETERS}
    out["z_within_2"] = {p: round(float(np.mean([r["z"][p] <= 2 for r in rows])), 2) for p in PARAMETERS}
    return out


POPULATION_BOX = np.array([THETA_E_RANGE_ARCSEC, SLOPE_RANGE]).T  # 2 x 2: lower, upper of (theta_E, slope)


def in_population_box(theta: np.ndarray) -> np.ndarray:
    """Whether each (theta_E, slope) of ``theta`` (... x 2) lies in the simulator's uniform box (... )."""
    return ((theta >= POPULATION_BOX[0]) & (theta <= POPULATION_BOX[1])).all(-1)


def under_population_prior(vec: dict, rng: np.random.Generator) -> tuple[dict, bool]:
    """One lens's TARP vectors with their samples resampled (with replacement, as many) from those whose
    (theta_E, slope) lie in the simulator's uniform box: the flat-prior posterior times that prior. Where no
    sample does (the truth, always inside, is then far in the posterior's tail) the vectors are returned as they
    are, so the lens still counts as the miss it is; the flag says whether any sample was inside."""
    inside = np.flatnonzero(in_population_box(vec["lens"][0]))
    if inside.size == 0:
        return vec, False
    pick = rng.choice(inside, size=len(vec["lens"][0]), replace=True)
    return {k: (samples[pick], truth) for k, (samples, truth) in vec.items()}, True


def tarp_reference(vectors: list[dict], repeats: int = 20, seed: int = 0) -> dict:
    """What TARP's largest |ECP - credibility| of the (theta_E, slope) vector is for exact Gaussian posteriors of
    these lenses' flat-prior sampled widths (per lens: the samples' standard deviations, no correlation), on
    truths drawn from the simulator's box: with flat priors (what rimlens reports) and with the box as prior (the
    Bayesian posterior). Median and 16-84th percentiles over ``repeats`` simulated sets of as many lenses."""
    rng = np.random.default_rng(seed)
    sigma = np.array([v["lens"][0].std(0, ddof=1) for v in vectors])  # lenses x 2
    n, n_samples = len(sigma), len(vectors[0]["lens"][0])
    figures: dict[str, list[float]] = {"flat_prior": [], "population_prior": []}
    for r in range(repeats):
        truth = rng.uniform(POPULATION_BOX[0], POPULATION_BOX[1], (n, 2))
        draws = truth + rng.normal(size=(n, 2)) * sigma + rng.normal(size=(4000, n, 2)) * sigma  # 4000 x lenses x 2
        inside = in_population_box(draws)  # 4000 x lenses; all of them where none is inside (never seen)
        pick = [np.flatnonzero(inside[:, j]) if inside[:, j].any() else np.arange(len(draws)) for j in range(n)]
        bayes = np.stack([draws[rng.choice(p, n_samples), j] for j, p in enumerate(pick)], axis=1)
        for name, samples in (("flat_prior", draws[:n_samples]), ("population_prior", bayes)):
            figures[name].append(tarp_curve(samples, truth, seed=r)[3])
    return {k: [round(float(q), 3) for q in np.percentile(v, [16, 50, 84])] for k, v in figures.items()}


def merge(
    paths: list[Path],
    tarp_png: Path | None,
    unwarned: bool = False,
    combine: Path | None = None,
    population_prior: bool = False,
    reference: bool = False,
    tarp_norm: bool = True,
) -> int:
    """Summarise the rows of several ``--json`` files (one covariance scale each), with a TARP test over their
    ``--vectors`` (the ``.npz`` beside each JSON, same stem) when every one has them; ``unwarned``: only the
    lenses whose measurement carries no warning (rows written before the warning was recorded count as such);
    ``combine``: also write the rows as one JSON, and their vectors as the ``.npz`` beside it (same stem);
    ``population_prior``: the TARP test of the samples under the simulator's (theta_E, slope) prior
    (:func:`under_population_prior`); ``reference``: :func:`tarp_reference`'s figures beside it; ``tarp_norm``:
    :func:`posterior_coverage.tarp_test`'s ``norm``."""
    rows, vectors, no_posterior, raw, scales = [], [], [], {}, set()
    for path in paths:
        ((scale, result),) = json.loads(path.read_text()).items()
        scales.add(scale)
        kept = [r for r in result["lenses"] if not (unwarned and r.get("warning"))]
        no_posterior += result.get("no_posterior", [])
        rows += kept
        npz = path.with_suffix(".npz")
        if npz.exists():
            with np.load(npz) as z:
                for r in kept:
                    vec = {k: (z[f"{r['lens']}/{k}/samples"], z[f"{r['lens']}/{k}/truth"])
                           for k in ("lens", "kappa", "source")}  # fmt: skip
                    for k, (samples, truth) in vec.items():
                        raw[f"{r['lens']}/{k}/samples"], raw[f"{r['lens']}/{k}/truth"] = samples, truth
                    # where the source is: its 16 blocks brightest in the samples' mean (chosen without the
                    # truth); off the source the truth is zero and the regularised samples are not
                    samples, truth = vec["source"]
                    bright = np.argsort(samples.mean(0))[-16:]
                    vec["source_bright"] = (samples[:, bright], truth[bright])
                    vectors.append(vec)
    summary = summarise(rows)
    summary["warned_fits"] = sum(bool(r.get("warning")) for r in rows)
    summary["fits_without_posterior"] = [r["lens"] for r in no_posterior]
    if len(vectors) == len(rows) >= 10:
        if reference:  # the widths of the samples as rimlens reports them (flat priors)
            summary["tarp_reference_lens"] = tarp_reference(vectors)
        if population_prior:
            rng = np.random.default_rng(0)
            reweighted = [under_population_prior(v, rng) for v in vectors]
            vectors = [v for v, _ in reweighted]
            summary["population_prior_no_sample_inside"] = [
                r["lens"] for r, (_, inside) in zip(rows, reweighted, strict=True) if not inside
            ]
        summary["tarp"] = tarp_test(vectors, tarp_png, norm=tarp_norm)
    print(f"{len(rows)} lenses: {json.dumps(summary)}")
    if combine is not None:
        merged = {"summary": summary, "lenses": rows, "no_posterior": no_posterior}
        combine.write_text(json.dumps({scales.pop() if len(scales) == 1 else "mixed": merged}, indent=1))
        if raw:
            np.savez_compressed(combine.with_suffix(".npz"), **{k: v.astype(np.float32) for k, v in raw.items()})
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lenses", type=Path, nargs="?", help="folder of lens* folders (benchmarks/lenstronomy_lenses.py)")
    ap.add_argument("fits", type=Path, nargs="?", help="power_law_fit.py --save's folder (LENS.pt)")
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--vectors", type=Path, help="save the TARP vectors of every lens (npz) for --summarize")
    ap.add_argument(
        "--summarize",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="only merge earlier runs' --json (and their --vectors)",
    )
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument(
        "--covariance-scale",
        type=float,
        nargs="+",
        default=[COVARIANCE_INFLATION],
        help=f"factors on the Laplace mass covariance to try (default: the calibrated {COVARIANCE_INFLATION:g})",
    )
    ap.add_argument("--statistical-slope", action="store_true", help="do not widen the slope to its total width")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--tarp", type=Path, help="PNG of the TARP curves (>= 10 lenses)")
    ap.add_argument("--combine", type=Path, help="with --summarize: write the merged rows (JSON, its .npz beside)")
    ap.add_argument(
        "--unwarned", action="store_true", help="with --summarize: only the fits the measurement does not warn of"
    )
    ap.add_argument(
        "--population-prior",
        action="store_true",
        help="with --summarize: TARP of the samples resampled under the simulator's (theta_E, slope) box prior",
    )
    ap.add_argument(
        "--tarp-reference",
        action="store_true",
        help="with --summarize: the lens TARP figure of exact flat-prior and Bayesian posteriors of these widths",
    )
    ap.add_argument(
        "--tarp-unnormalised",
        action="store_true",
        help="with --summarize: TARP's reference points in the raw unit cube, not the truths' box",
    )
    args = ap.parse_args(argv)
    if args.summarize:
        return merge(
            args.summarize,
            args.tarp,
            args.unwarned,
            args.combine,
            args.population_prior,
            args.tarp_reference,
            not args.tarp_unnormalised,
        )
    if args.lenses is None or args.fits is None:
        ap.error("give the lenses' and the fits' folders (or --summarize JSON ...)")
    torch.set_num_threads(1)
    fits = sorted(args.fits.glob("lens*.pt"))[args.first : args.first + args.count]
    if not fits:
        sys.exit(f"no lens*.pt in {args.fits}")
    results = {}
    for scale in args.covariance_scale:
        rows, vectors, failed = [], [], []
        for f in fits:
            try:
                row, vec = judge_lens(
                    args.lenses / f.stem, f, args.samples, scale, not args.statistical_slope, args.seed
                )
            except RimlensInputError as exc:  # no posterior (a parameter at its bound): said, and left out
                print(json.dumps({"lens": f.stem, "no_posterior": str(exc)}), flush=True)
                failed.append({"lens": f.stem, "no_posterior": str(exc)})
                continue
            rows.append(row)
            vectors.append(vec)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                              if not k.startswith("z")}), flush=True)  # fmt: skip
        summary = summarise(rows) if rows else {}
        if len(rows) >= 10:
            summary["tarp"] = tarp_test(vectors, args.tarp)
        print(f"covariance scale {scale}: {json.dumps(summary)}", flush=True)
        results[str(scale)] = {"summary": summary, "lenses": rows, "no_posterior": failed}
        if args.vectors and len(args.covariance_scale) == 1:
            np.savez_compressed(
                args.vectors, **{f"{r['lens']}/{k}/{w}": v[k][i] for r, v in zip(rows, vectors, strict=True)
                                 for k in v for i, w in enumerate(("samples", "truth"))},
            )  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
