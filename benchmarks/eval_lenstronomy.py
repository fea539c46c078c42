"""Judge rimlens reconstructions of lenstronomy-made lenses (``lenstronomy_lenses.py``) against the
pixel-averaged truth, beside trivial baselines.

    python benchmarks/lenstronomy_lenses.py --count 16 --seed 1 --out LENSES
    OMP_NUM_THREADS=2 rimlens reconstruct LENSES --out OUT
    python benchmarks/eval_lenstronomy.py LENSES OUT [--json OUT/eval_lenstronomy.json]

Frames. A reconstruction's maps are on the model grid centred on ``summary.json``'s
``center_arcsec`` ``c_rec`` (arcsec from the cut-out's centre); in that frame the true lens centre
is at ``d = c_true - c_rec``. The truth is recomputed **on the reconstruction's own grid** (exact
pixel means from lenstronomy's deflections, :func:`lenstronomy_lenses.truth_kappa` centred at
``c_rec``; the source on the source grid centred at ``c_rec``), so maps are compared pixel by pixel
without any resampling. The stored ``truth.npz`` maps (centred on ``c_true``) serve as a check.

Per lens (all from :mod:`rimlens.physics.lens_metrics`):

* ``theta_true``: :func:`einstein_radius_of_map` of the truth map about ``d`` (the circle-enclosed
  radius: for q < 1 up to ~2 % below lenstronomy's ``theta_E``, which is also reported);
* ``theta_err``: ``|theta_hat - theta_true| / theta_true``, ``theta_hat`` of the reconstruction's
  kappa about the same known centre ``d``; ``theta_err_own``: ``theta_hat`` about the
  reconstruction's own centre (:func:`kappa_peak_center`, smoothed peak) instead;
* ``gamma_err``: ``|gamma_hat - gamma_true|``, both by :func:`log_slope` about ``d`` in
  0.5-2 ``theta_true`` (the same annuli for both maps); ``gamma_true`` is measured on the truth map
  (subhaloes included), lenstronomy's EPL ``gamma`` is also reported;
* ``kappa_err``: :func:`kappa_error_in_annulus` in 0.5-2 ``theta_true`` about ``d``;
* ``source_err``, ``source_err_scale``: :func:`source_error` (relative L2, no alignment) with both
  maps peak-normalised, and with the best-fitting flux scale (``sqrt(1 - cos^2)``);
* ``shear_err``: ``|gamma_hat - gamma_true|`` of the external shear's components (``summary.json``'s
  ``external_shear``; NaN for a model without the shear term), baseline: no shear (``|gamma_true|``);
* ``chi2_nu``, ``seconds``: from ``summary.json``; ``center_err``: ``|c_rec - c_true|`` and
  ``kappa_center_err``: the reconstruction's own centre's distance to ``d`` (arcsec).

Baselines (no lens model at all):

* Einstein radius from the image: the S/N-weighted mean distance from the true centre of the
  significant pixels (S/N >= 5, raw cut-out pixels, within 3") of the lens-subtracted image (with
  ``--lens-light`` lenses the *true* noiseless lens light is subtracted: an idealised subtraction);
* slope: isothermal, gamma = 2;
* kappa: an SIS of the baseline Einstein radius at the true centre (its exact pixel means).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from lenstronomy_lenses import load_truth, truth_kappa, truth_source
from rimlens.io.fits import read_image
from rimlens.physics import PixelGrid
from rimlens.physics.lens_metrics import (
    einstein_radius_of_map,
    kappa_error_in_annulus,
    kappa_peak_center,
    log_slope,
    pixel_mean_kappa,
    source_error,
)

SNR_CUT = 5.0
RING_SEARCH_ARCSEC = 3.0


def ring_radius_baseline(image: np.ndarray, noise: np.ndarray, pixel_scale: float, center) -> float:
    """S/N-weighted mean radius (arcsec) about ``center`` (cut-out frame) of the pixels with
    S/N >= ``SNR_CUT`` within ``RING_SEARCH_ARCSEC``; NaN if there are none."""
    n_y, n_x = image.shape
    x = (np.arange(n_x) - (n_x - 1) / 2) * pixel_scale
    y = (np.arange(n_y) - (n_y - 1) / 2) * pixel_scale
    xx, yy = np.meshgrid(x, y)
    r = np.hypot(xx - center[0], yy - center[1])
    snr = image / noise
    sel = (snr >= SNR_CUT) & (r <= RING_SEARCH_ARCSEC)
    return float((snr[sel] * r[sel]).sum() / snr[sel].sum()) if sel.any() else float("nan")


def sis_map(theta_e: float, grid: PixelGrid, center) -> np.ndarray:
    """Exact pixel means of an SIS of ``theta_e`` at ``center`` (map frame)."""

    def alpha(x, y):
        dx, dy = x - center[0], y - center[1]
        r = np.maximum(np.hypot(dx, dy), 1e-300)
        return theta_e * dx / r, theta_e * dy / r

    return pixel_mean_kappa(alpha, grid, (0.0, 0.0), singular_points=[center])


def evaluate_lens(lens_dir: Path, rec_dir: Path) -> dict:
    """All figures of one lens (see the module docstring)."""
    arrays, params = load_truth(lens_dir)
    summary = json.loads((rec_dir / "summary.json").read_text())
    ig, sg = summary["image_grid"], summary["source_grid"]
    grid = PixelGrid(int(ig["n_pixels"]), float(ig["pixel_scale_arcsec"]))
    src_grid = PixelGrid(int(sg["n_pixels"]), float(sg["pixel_scale_arcsec"]))
    c_rec = [float(v) for v in summary["center_arcsec"]]
    c_true = [float(v) for v in params["center"]]
    d = (c_true[0] - c_rec[0], c_true[1] - c_rec[1])

    kappa_hat, _ = read_image(rec_dir / "kappa.fits", "kappa")
    source_hat, _ = read_image(rec_dir / "source.fits", "source")
    kappa_true = truth_kappa(params, grid, c_rec)
    source_true = truth_source(params, src_grid, c_rec)

    theta_true = einstein_radius_of_map(kappa_true, grid, d)
    theta_stored = einstein_radius_of_map(arrays["kappa"], PixelGrid(64, float(arrays["kappa_pixel_scale"])))
    theta_hat = einstein_radius_of_map(kappa_hat, grid, d)
    own = kappa_peak_center(kappa_hat, grid)
    theta_own = einstein_radius_of_map(kappa_hat, grid, own)
    gamma_true = log_slope(kappa_true, grid, theta_true, d)
    gamma_hat = log_slope(kappa_hat, grid, theta_true, d)

    image, _ = read_image(lens_dir / "image.fits", "image")
    noise, header = read_image(lens_dir / "noise_map.fits", "noise map")
    subtracted = image - arrays["lens_light_image"]
    theta_base = ring_radius_baseline(subtracted, noise, float(header.get("PIXSCALE", 0.05)), c_true)
    kappa_base = sis_map(theta_base, grid, d) if np.isfinite(theta_base) else np.full_like(kappa_true, np.nan)

    def rel(a, b):
        return abs(a - b) / b

    shear_true = (float(params["gamma1"]), float(params["gamma2"]))
    shear_hat = summary.get("external_shear")
    shear_err = (
        math.hypot(shear_hat["gamma1"] - shear_true[0], shear_hat["gamma2"] - shear_true[1])
        if shear_hat
        else float("nan")
    )

    return {
        "lens": lens_dir.name,
        "theta_E_lenstronomy": float(params["theta_E"]),
        "gamma_lenstronomy": float(params["gamma"]),
        "axis_ratio": float(params["axis_ratio"]),
        "shear": float(params["shear"]),
        "n_subhalos": int(params["n_subhalos"]),
        "snr": float(params["snr"]),
        "theta_true": theta_true,
        "theta_true_stored_map": theta_stored,
        "theta_hat": theta_hat,
        "theta_hat_own_center": theta_own,
        "theta_base": theta_base,
        "gamma_true": gamma_true,
        "gamma_hat": gamma_hat,
        "theta_err": rel(theta_hat, theta_true),
        "theta_err_own": rel(theta_own, theta_true),
        "theta_err_base": rel(theta_base, theta_true),
        "gamma_err": abs(gamma_hat - gamma_true),
        "gamma_err_base": abs(2.0 - gamma_true),
        "kappa_err": kappa_error_in_annulus(kappa_hat, kappa_true, grid, theta_true, d),
        "kappa_err_base": kappa_error_in_annulus(kappa_base, kappa_true, grid, theta_true, d)
        if np.isfinite(theta_base)
        else float("nan"),
        "source_err": source_error(source_hat, source_true),
        "source_err_scale": source_error(source_hat, source_true, "scale"),
        "shear_err": shear_err,
        "shear_err_base": math.hypot(*shear_true),
        "chi2_nu": float(summary["chi2_nu"]),
        "seconds": float(summary["seconds"]),
        "center_err": math.hypot(*d),
        "kappa_center_err": math.hypot(own[0] - d[0], own[1] - d[1]),
        "center_method": summary.get("center_method", ""),
        "truth_gamma_vs_lenstronomy": abs(gamma_true - float(params["gamma"])),
        "truth_theta_vs_lenstronomy": theta_true / float(params["theta_E"]) - 1,
    }


ROWS = [
    # (label, rimlens key, baseline key, format)
    ("Einstein radius error, known centre", "theta_err", "theta_err_base", "{:.3f}"),
    ("Einstein radius error, map's own centre", "theta_err_own", None, "{:.3f}"),
    ("slope error abs(gamma_hat - gamma_true)", "gamma_err", "gamma_err_base", "{:.3f}"),
    ("kappa error, median rel. in 0.5-2 theta_E", "kappa_err", "kappa_err_base", "{:.3f}"),
    ("source error (peak-normalised rel. L2)", "source_err", None, "{:.3f}"),
    ("source error (best-fit flux scale rel. L2)", "source_err_scale", None, "{:.3f}"),
    ("external shear error abs(gamma_hat - gamma_true)", "shear_err", "shear_err_base", "{:.3f}"),
    ("chi2_nu", "chi2_nu", None, "{:.2f}"),
    ("seconds per lens", "seconds", None, "{:.2f}"),
    ('centre used, abs(c_rec - c_true) ["]', "center_err", None, "{:.3f}"),
    ('kappa peak centre error ["]', "kappa_center_err", None, "{:.3f}"),
    ("truth check: gamma_true(map) - lenstronomy gamma", "truth_gamma_vs_lenstronomy", None, "{:.4f}"),
    ("truth check: theta_true(circle) / lenstronomy theta_E - 1", "truth_theta_vs_lenstronomy", None, "{:+.4f}"),
]


def _median(rows, key):
    v = np.array([r[key] for r in rows], dtype=float)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else float("nan")


def table(rows: list[dict]) -> str:
    """Markdown table of the medians (and the baselines' medians)."""
    lines = [
        f"| median over {len(rows)} lenses | rimlens | baseline |",
        "|---|---|---|",
    ]
    for label, key, base, fmt in ROWS:
        b = fmt.format(_median(rows, base)) if base else ""
        if base == "gamma_err_base":
            b += " (gamma = 2)"
        elif base == "theta_err_base":
            b += " (ring radius)"
        elif base == "kappa_err_base":
            b += " (SIS of ring radius)"
        elif base == "shear_err_base":
            b += " (no shear)"
        lines.append(f"| {label} | {fmt.format(_median(rows, key))} | {b} |")
    return "\n".join(lines)


def per_lens_table(rows: list[dict]) -> str:
    """Markdown table, one row per lens."""
    cols = [
        ("lens", "lens", "{}"),
        ("theta_true", "theta_true", "{:.3f}"),
        ("theta_hat", "theta_hat", "{:.3f}"),
        ("theta_base", "theta_base", "{:.3f}"),
        ("gamma_lt", "gamma_lenstronomy", "{:.3f}"),
        ("gamma_true", "gamma_true", "{:.3f}"),
        ("gamma_hat", "gamma_hat", "{:.3f}"),
        ("kappa_err", "kappa_err", "{:.3f}"),
        ("source_err", "source_err", "{:.3f}"),
        ("chi2_nu", "chi2_nu", "{:.1f}"),
        ("SNR", "snr", "{:.0f}"),
        ("q", "axis_ratio", "{:.2f}"),
    ]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[k]) for _, k, fmt in cols) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lenses", type=Path, help="folder from lenstronomy_lenses.py")
    ap.add_argument("reconstructions", type=Path, help="OUT of `rimlens reconstruct LENSES --out OUT`")
    ap.add_argument("--json", type=Path, default=None, help="default: RECONSTRUCTIONS/eval_lenstronomy.json")
    args = ap.parse_args(argv)
    rows, missing = [], []
    for lens_dir in sorted(p for p in args.lenses.iterdir() if (p / "truth.npz").exists()):
        rec_dir = args.reconstructions / lens_dir.name
        if not (rec_dir / "summary.json").exists():
            missing.append(lens_dir.name)
            continue
        rows.append(evaluate_lens(lens_dir, rec_dir))
    if missing:
        print(f"no reconstruction for {len(missing)} lenses: {', '.join(missing)}", file=sys.stderr)
    if not rows:
        sys.exit("nothing to evaluate")
    print(table(rows))
    print()
    print(per_lens_table(rows))
    out = args.json or args.reconstructions / "eval_lenstronomy.json"
    keys = [k for _, key, base, _ in ROWS for k in (key, base) if k]
    medians = {k: _median(rows, k) for k in keys}
    out.write_text(json.dumps({"medians": medians, "lenses": rows, "missing": missing}, indent=2))
    print(f"\nwritten {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
