"""Fine-tuning on held-out high-SNR lenses: chi2_nu before and after, wall time and steps per lens,
and the chi2_nu-vs-SNR picture (the paper's Fig. 9).

    OMP_NUM_THREADS=1 python benchmarks/bench_finetune.py --source-vae S.pt --kappa-vae K.pt [--count 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import machine, set_threads

from rimlens.data.storage import generate_dataset, read_lenses
from rimlens.evaluate.figures import plt, save_figure
from rimlens.inference.finetune import FinetuneOptions, finetune
from rimlens.train.checkpoint import load_model
from rimlens.train.vae import load_vae


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--source-vae", required=True)
    ap.add_argument("--kappa-vae", required=True)
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--ewc-lambda", type=float, default=1e5)
    ap.add_argument("--figure", default="finetune_chi2_vs_snr.png")
    args = ap.parse_args(argv)
    set_threads()
    model, preset, _ = load_model(args.model)
    sv, kv = load_vae(args.source_vae)[0], load_vae(args.kappa_vae)[0]
    with tempfile.TemporaryDirectory() as tmp:
        d = read_lenses(generate_dataset(Path(tmp) / "t.h5", preset, args.count, 4242, split="test", noise="high", progress=False))
    opts = FinetuneOptions(max_steps=args.max_steps, learning_rate=args.lr, ewc_lambda=args.ewc_lambda)
    rows = []
    for i in range(args.count):
        r = finetune(model, torch.as_tensor(d["observation"][i:i + 1]), torch.as_tensor(d["psf"][i:i + 1]),
                     torch.as_tensor(d["noise_sigma"][i:i + 1]), sv, kv, opts)
        rows.append((float(d["snr"][i]), r.baseline_chi2_nu, r.chi2_nu, r.steps, r.seconds))
        print(f"lens {i}: SNR {rows[-1][0]:.0f}, chi2_nu {r.baseline_chi2_nu:.2f} -> {r.chi2_nu:.2f}, {r.steps} steps, {r.seconds:.1f} s", flush=True)
    snr, before, after, steps, secs = map(np.asarray, zip(*rows))
    print(f"# fine-tuning, {machine()}: median chi2_nu {statistics.median(before):.2f} -> {statistics.median(after):.2f}; "
          f"median {statistics.median(secs):.1f} s and {statistics.median(steps):.0f} steps per lens")
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(snr, before, label="RIM baseline")
    ax.scatter(snr, after, marker="x", label="fine-tuned")
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("peak SNR")
    ax.set_ylabel(r"$\chi^2_\nu$")
    ax.legend()
    save_figure(fig, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
