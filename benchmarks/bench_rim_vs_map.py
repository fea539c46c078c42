"""RIM vs the classical MAP baseline on one fixed held-out test set: wall time per lens and
source / log10 kappa errors, with the ratios.

    OMP_NUM_THREADS=2 python benchmarks/bench_rim_vs_map.py [--model default] [--count 20]

The test set is made here with a fixed seed from the held-out (test-split) galaxies, high-SNR
noise recipe, at the model's grid.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import machine, set_threads
from rimlens.data.storage import generate_dataset, read_lenses
from rimlens.inference.map_fit import MAPOptions, fit_map
from rimlens.inference.predict import reconstruct
from rimlens.io.checkpoint import load_model


def errors(source, kappa, d, n):
    src = torch.as_tensor(d["source"][:n])
    kap = torch.as_tensor(d["kappa"][:n])
    s = ((source - src) ** 2).mean(dim=(1, 2, 3))
    k = ((torch.log10(kappa) - torch.log10(kap)) ** 2).mean(dim=(1, 2, 3))
    return float(s.median()), float(k.median())


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument(
        "--map-iterations",
        default="200,1000,3000",
        help="L-BFGS iterations per start, comma-separated: MAP is run at each budget",
    )
    args = ap.parse_args(argv)
    set_threads()
    model = load_model(args.model)
    preset = model.preset
    with tempfile.TemporaryDirectory() as tmp:
        path = generate_dataset(
            Path(tmp) / "test.h5", preset, args.count, args.seed, split="test", noise="high", progress=False
        )
        d = read_lenses(path)
    obs, psf, sig = (torch.as_tensor(d[k]) for k in ("observation", "psf", "noise_sigma"))
    n = args.count
    t0 = time.perf_counter()
    r = reconstruct(model, obs, psf, sig, batch_size=n)
    t_rim_batched = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for i in range(n):
        reconstruct(model, obs[i : i + 1], psf[i : i + 1], sig[i : i + 1])
    t_rim_single = (time.perf_counter() - t0) / n
    rs, rk = errors(r.source, r.kappa, d, n)
    maps = []
    for iters in [int(x) for x in args.map_iterations.split(",")]:
        # one L-BFGS problem per lens (see fit_map): time per lens is the total over the set / count
        m = fit_map(model.simulator, obs.double(), psf.double(), sig.double(), options=MAPOptions(max_iterations=iters))
        maps.append((iters, m.seconds / n, *errors(m.source.float(), m.kappa.float(), d, n), float(m.chi2_nu.median())))
        print(f"MAP {iters} iterations/start: {maps[-1][1]:.2f} s/lens, log10 kappa MSE {maps[-1][3]:.4f}", flush=True)
    print(
        f"# RIM vs MAP, {machine()}, model {model.checkpoint_path.name} ({preset.name}), {n} held-out high-SNR lenses (seed {args.seed})"
    )
    print("| method | seconds / lens | median source MSE | median log10 kappa MSE | median chi2_nu |")
    print("|---|---|---|---|---|")
    print(f"| RIM, one lens at a time | {t_rim_single:.3f} | {rs:.4f} | {rk:.4f} | {float(r.chi2_nu.median()):.2f} |")
    print(f"| RIM, batched | {t_rim_batched:.3f} | | | |")
    for iters, t_map, ms, mk, mc in maps:
        print(
            f"| MAP (L-BFGS per lens, 3 starts x {iters} iterations) | {t_map:.2f} | {ms:.4f} | {mk:.4f} | {mc:.2f} |"
        )
    for iters, t_map, _ms, mk, _mc in maps:
        print(
            f"speed-up of the RIM over MAP at {iters} iterations/start: {t_map / t_rim_single:.0f}x one at a time, "
            f"{t_map / t_rim_batched:.0f}x batched; log10 kappa error ratio RIM/MAP {rk / mk:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
