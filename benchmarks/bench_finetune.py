"""Fine-tuning on held-out high-SNR lenses: chi2_nu before and after, source and log10 kappa errors
(the truth is known), wall time and steps per lens, and the chi2_nu-vs-SNR picture (the paper's Fig. 9).

Three estimates per lens, each from the same RIM baseline:
  * ``ewc``: the paper's method (EWC weight fine-tuning), with the options given (default: the
    measured ``FinetuneOptions.fast()`` settings without the refinement);
  * ``ewc+refine``: the same followed by the pixel-space refinement (what ``--finetune`` runs);
  * ``refine``: the refinement alone from the RIM baseline (ablation: what the EWC stage adds).

    OMP_NUM_THREADS=2 python benchmarks/bench_finetune.py [--count 20] [--paper]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import machine, set_threads
from rimlens.data.storage import generate_dataset, read_lenses
from rimlens.inference.finetune import FinetuneOptions, FinetuneResult, finetune, refine
from rimlens.io.atomic import atomic_path
from rimlens.io.checkpoint import load_model, load_vae
from rimlens.io.figures import plt, save_figure
from rimlens.physics import PSF


def errors(source, kappa, true_source, true_kappa):
    return (
        float(((source - true_source) ** 2).mean()),
        float(((torch.log10(kappa.clamp_min(1e-6)) - torch.log10(true_kappa.clamp_min(1e-6))) ** 2).mean()),
    )


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--source-vae", default="default")
    ap.add_argument("--kappa-vae", default="default")
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--paper", action="store_true", help="the paper's settings (2000 steps, lr 1e-6, 100 samples)")
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--out", default="benchmarks/results/finetune")
    args = ap.parse_args(argv)
    set_threads()
    model = load_model(args.model)
    preset = model.preset
    sv, kv = load_vae(args.source_vae, kind="source"), load_vae(args.kappa_vae, kind="kappa")
    opts = FinetuneOptions.paper() if args.paper else FinetuneOptions.fast(refine_steps=0)
    if args.max_steps is not None:
        opts = dataclasses.replace(opts, max_steps=args.max_steps)
    if args.lr is not None:
        opts = dataclasses.replace(opts, learning_rate=args.lr)
    refine_opts = FinetuneOptions.fast()
    with tempfile.TemporaryDirectory() as tmp:
        d = read_lenses(
            generate_dataset(
                Path(tmp) / "t.h5", preset, args.count, args.seed, split="test", noise="high", progress=False
            )
        )
    rows = []
    for i in range(args.count):
        obs = torch.as_tensor(d["observation"][i : i + 1])
        psf = PSF.from_kernel(torch.as_tensor(d["psf"][i : i + 1]))
        sigma = torch.as_tensor(d["noise_sigma"][i : i + 1])
        truth = torch.as_tensor(d["source"][i : i + 1]), torch.as_tensor(d["kappa"][i : i + 1])
        r = finetune(model, obs, psf, sigma, sv, kv, opts)
        t0 = time.time()
        ref = dataclasses.replace(r, chi2_history=[], refine_steps=0)
        if ref.chi2_nu >= refine_opts.target_chi2_nu:
            refine(model.simulator, obs, psf, sigma.reshape(-1, 1, 1, 1), ref, refine_opts)
        t_refine = time.time() - t0
        t0 = time.time()
        only = FinetuneResult(
            r.baseline_source,
            r.baseline_kappa,
            r.baseline_chi2_nu,
            r.baseline_source,
            r.baseline_kappa,
            r.baseline_chi2_nu,
        )
        if only.chi2_nu >= refine_opts.target_chi2_nu:
            refine(model.simulator, obs, psf, sigma.reshape(-1, 1, 1, 1), only, refine_opts)
        t_only = time.time() - t0
        row = {
            "snr": float(d["snr"][i]),
            "chi2_baseline": r.baseline_chi2_nu,
            "chi2_ewc": r.chi2_nu,
            "chi2_ewc_refine": ref.chi2_nu,
            "chi2_refine": only.chi2_nu,
            "ewc_steps": r.steps,
            "refine_steps": ref.refine_steps,
            "s_ewc": r.seconds,
            "s_fisher": r.fisher_seconds,
            "s_ewc_refine": r.seconds + t_refine,
            "s_refine": t_only,
            "err_baseline": errors(r.baseline_source, r.baseline_kappa, *truth),
            "err_ewc": errors(r.source, r.kappa, *truth),
            "err_ewc_refine": errors(ref.source, ref.kappa, *truth),
            "err_refine": errors(only.source, only.kappa, *truth),
        }
        rows.append(row)
        print(
            f"lens {i:2d}: SNR {row['snr']:5.0f}  chi2_nu {r.baseline_chi2_nu:6.2f} -> EWC {r.chi2_nu:6.2f} ({r.steps} steps, "
            f"{r.seconds:4.1f} s) -> +refine {ref.chi2_nu:5.2f} ({ref.refine_steps} it, {r.seconds + t_refine:4.1f} s);"
            f" refine alone {only.chi2_nu:5.2f} ({t_only:.1f} s)",
            flush=True,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    snr = np.array([r["snr"] for r in rows])

    def med(key, mask=slice(None)):
        return float(np.median(np.array([r[key] for r in rows])[mask]))

    def med_err(key, j, mask=slice(None)):
        return float(np.median(np.array([r[key][j] for r in rows])[mask]))

    summary = {
        "machine": machine(),
        "options": dataclasses.asdict(opts),
        "refine_options": dataclasses.asdict(refine_opts),
        "count": args.count,
        "seed": args.seed,
    }
    for name, m in (
        ("all", snr > 0),
        ("snr_below_50", snr < 50),
        ("snr_50_100", (snr >= 50) & (snr < 100)),
        ("snr_above_100", snr >= 100),
    ):
        if m.sum():
            summary[name] = {
                "lenses": int(m.sum()),
                **{
                    f"median_{k}": med(k, m)
                    for k in (
                        "chi2_baseline",
                        "chi2_ewc",
                        "chi2_ewc_refine",
                        "chi2_refine",
                        "s_ewc",
                        "s_ewc_refine",
                        "s_refine",
                        "ewc_steps",
                    )
                },
                **{
                    f"median_{w}_{k}": med_err(k, j, m)
                    for k in ("err_baseline", "err_ewc", "err_ewc_refine", "err_refine")
                    for j, w in enumerate(("source_mse", "log10_kappa_mse"))
                },
            }
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps({"summary": summary, "lenses": rows}, indent=1))
    a = summary["all"]
    print(
        f"# fine-tuning, {machine()}, {args.count} held-out high-SNR lenses: median chi2_nu {a['median_chi2_baseline']:.2f} "
        f"-> EWC {a['median_chi2_ewc']:.2f} -> +refine {a['median_chi2_ewc_refine']:.2f} (refine alone "
        f"{a['median_chi2_refine']:.2f}); median {a['median_s_ewc_refine']:.1f} s per lens, {a['median_ewc_steps']:.0f} EWC steps"
    )
    for name in ("snr_below_50", "snr_50_100", "snr_above_100"):
        if name in summary:
            b = summary[name]
            print(
                f"#   {name}: {b['lenses']} lenses, median chi2_nu {b['median_chi2_baseline']:.2f} -> {b['median_chi2_ewc']:.2f} "
                f"-> {b['median_chi2_ewc_refine']:.2f} (refine alone {b['median_chi2_refine']:.2f}); log10 kappa MSE "
                f"{b['median_log10_kappa_mse_err_baseline']:.4f} -> {b['median_log10_kappa_mse_err_ewc_refine']:.4f}; "
                f"source MSE {b['median_source_mse_err_baseline']:.5f} -> {b['median_source_mse_err_ewc_refine']:.5f}"
            )
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter(snr, [r["chi2_baseline"] for r in rows], label="RIM baseline", s=18)
    ax.scatter(snr, [r["chi2_ewc"] for r in rows], marker="x", label="EWC fine-tuned", s=22)
    ax.scatter(snr, [r["chi2_ewc_refine"] for r in rows], marker="+", label="EWC + pixel refinement", s=40)
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("peak SNR")
    ax.set_ylabel(r"$\chi^2_\nu$")
    ax.set_title("fine-tuning, held-out lenses (cf. paper Fig. 9)", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, out / "chi2_vs_snr.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
