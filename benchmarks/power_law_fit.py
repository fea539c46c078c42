"""The power-law measurement (``rimlens reconstruct --power-law``, :mod:`rimlens.inference.power_law`) on
lenstronomy-made lenses, against the truth and the trivial baselines.

    python benchmarks/lenstronomy_lenses.py --count 16 --seed 41 --cutout mixed --out LENSES
    OMP_NUM_THREADS=2 python benchmarks/power_law_fit.py LENSES [--first 0 --count 16] [--finetune] [--json OUT]

Reported per lens, against lenstronomy's EPL parameters (the fit's own parametrisation): ``gamma_err``
``|gamma - gamma_true|`` of the evidence-ranked slope (the measurement), ``gamma_err_fit`` of the first
fit's slope (penalised chi2 at the evidence's lambda, the session-12 method), ``gamma_err_rim`` (the RIM
map's log-slope over 0.5-2 theta_E, ``summary.json``'s ``lens_mass``), the baseline ``gamma_err_iso``
``|2 - gamma_true|``; ``theta_err`` ``|theta / theta_E - 1|``; the fit's ``chi2_nu``; ``seconds`` of the
measurement (the RIM's reconstruction not included; ``--finetune``: started from the refined
reconstruction, whose lens light has its shape re-fitted). Medians for all lenses and with / without subhaloes.
The rows are written to ``--json`` after every lens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lenstronomy_lenses import load_truth
from rimlens.inference.finetune import FinetuneOptions
from rimlens.inference.pipeline import FinetuneSetup, describe_mass, reconstruct_prepared
from rimlens.inference.power_law import (
    SLOPE_SIGMA_SYSTEMATIC,
    SUBHALO_EVIDENCE_THRESHOLD,
    SUBHALO_REFITS,
    measure_power_law,
)
from rimlens.io.atomic import atomic_path
from rimlens.io.checkpoint import load_model
from rimlens.io.observation import load_observation, prepare_observation


def report(rows: list[dict]) -> None:
    """Print medians (all lenses, with / without subhaloes) and how often the reported widths hold the truth."""

    def med(key, sel=lambda r: True):
        vals = [r[key] for r in rows if sel(r)]
        return float(np.nanmedian(vals)) if vals else float("nan")

    for label, sel in (("all", lambda r: True), ("no subhaloes", lambda r: r["n_subhalos"] == 0),
                       ("with subhaloes", lambda r: r["n_subhalos"] > 0)):  # fmt: skip
        n = sum(1 for r in rows if sel(r))
        if n == 0:
            continue
        print(
            f"{label} ({n}): median slope error: evidence-ranked {med('gamma_err', sel):.3f} "
            f"(first fit {med('gamma_err_fit', sel):.3f}, RIM map {med('gamma_err_rim', sel):.3f}, isothermal guess "
            f"{med('gamma_err_iso', sel):.3f}); theta_E error {100 * med('theta_err', sel):.2f}%; "
            f"chi2_nu {med('chi2_nu', sel):.2f}; {med('seconds', sel):.0f} s/lens"
        )
    if not rows:
        return
    err = np.array([r["gamma_err"] for r in rows])
    stat = np.array([r["gamma_sigma"] for r in rows])
    total = np.hypot(stat, SLOPE_SIGMA_SYSTEMATIC)  # as summary.json's log_slope_sigma
    print(
        f"slope error: max {err.max():.3f}, {int((err <= 0.05).sum())} of {len(err)} <= 0.05; truth within the "
        f"statistical width {np.mean(err <= stat):.2f} (1 sigma), within the total width (+ {SLOPE_SIGMA_SYSTEMATIC} "
        f"systematic) {np.mean(err <= total):.2f} (1 sigma), {np.mean(err <= 2 * total):.2f} (2 sigma)"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lenses", type=Path, nargs="?", help="folder of lens* folders (not needed with --summarize)")
    ap.add_argument(
        "--summarize", type=Path, nargs="+", metavar="JSON", help="only report the rows of earlier runs' --json files"
    )
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--model", default="default")
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--save",
        type=Path,
        help="folder for each lens's inversion and measurement (LENS.pt, torch.save) to sample posteriors from later",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--finetune", action="store_true", help="start from the refined reconstruction (as reconstruct --finetune)"
    )
    ap.add_argument("--max-subhalos", type=int, default=2, help="subhaloes the evidence may add (0: none)")
    ap.add_argument(
        "--subhalo-threshold",
        type=float,
        default=SUBHALO_EVIDENCE_THRESHOLD,
        help="log-evidence rise a subhalo must bring to be kept",
    )
    ap.add_argument(
        "--subhalo-refits", type=int, default=SUBHALO_REFITS, help="candidates refitted per subhalo search round"
    )
    ap.add_argument(
        "--lens-light",
        choices=["auto", "mge", "none"],
        default="auto",
        help="the reconstruction's lens-light mode (none: the images hold the arcs only)",
    )
    args = ap.parse_args(argv)
    if args.summarize:
        report([row for path in args.summarize for row in json.loads(path.read_text())])
        return 0
    if args.lenses is None:
        ap.error("give the lenses' folder (or --summarize JSON ...)")
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    grid = model.grid.image_grid
    setup = FinetuneSetup.load(options=FinetuneOptions.for_mode("refine"), model=model) if args.finetune else None
    folders = sorted(p for p in args.lenses.glob("lens*") if (p / "image.fits").exists())
    folders = folders[args.first : args.first + args.count]
    rows = []
    for lens in folders:
        obs = load_observation(lens / "image.fits", lens / "psf.fits", lens / "noise_map.fits", None, None)
        prep = prepare_observation(obs, grid, "auto")
        rec = reconstruct_prepared(model, prep, setup, args.lens_light)
        kappa = rec.kappa[0, 0].double().numpy()
        mass = describe_mass(kappa, grid, prep.center_arcsec)
        m = measure_power_law(
            obs.image, obs.noise_sigma, obs.psf, obs.pixel_scale_arcsec, kappa, grid, prep.center_arcsec,
            mask=obs.mask, light=rec.lens_light_model, light_flux_scale=prep.flux_scale,
            max_subhalos=args.max_subhalos, subhalo_threshold=args.subhalo_threshold,
            subhalo_refits=args.subhalo_refits,
        )  # fmt: skip
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            with atomic_path(args.save / f"{lens.name}.pt") as tmp:
                torch.save({"inversion": m.inversion, "measurement": m}, tmp)
        truth, kw = load_truth(lens)
        true_subs = [
            (k["sigma0"] * 2 * k["Ra"] * k["Rs"] / (k["Rs"] - k["Ra"]), k["center_x"], k["center_y"])
            for name, k in zip(kw["lens_models"], kw["kwargs_lens"], strict=True)
            if name == "PJAFFE"
        ]
        gamma, theta = float(truth["gamma"]), float(truth["theta_E"])
        row = {
            "lens": lens.name,
            "gamma": gamma,
            "gamma_fit": m.mass.slope,
            "gamma_sigma": m.slope_sigma,
            "gamma_err": abs(m.mass.slope - gamma),
            "gamma_err_fit": abs(m.fit.mass.slope - gamma),
            "gamma_err_rim": abs(mass["log_slope"] - gamma) if mass["log_slope"] is not None else float("nan"),
            "gamma_err_iso": abs(2 - gamma),
            "theta_err": abs(m.mass.theta_e_arcsec / theta - 1),
            "chi2_nu": m.chi2_nu,
            "seconds": m.seconds,
            "n_subhalos": int(truth["n_subhalos"]),
            "subhalos_found": [[round(v, 3) for v in sub] for sub in m.mass.subhalos],
            "subhalos_true": [[round(v, 3) for v in sub] for sub in true_subs],
            "subhalo_delta_log_evidence": [round(sr.delta_log_evidence, 1) for sr in m.subhalo_searches],
            "seconds_subhalos": sum(sr.seconds for sr in m.subhalo_searches),
            "seconds_profile": m.profile.seconds,
            "lens_light": rec.lens_light_model is not None,
            "nodes": [[round(g, 3), round(e, 2), round(c, 4)] for g, e, c in m.profile.nodes],
        }
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))

    report(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
