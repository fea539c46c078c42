"""RIM cost per preset: training-step time (batch and T of the preset), reconstruction latency for
one lens, and batched reconstruction throughput.

    OMP_NUM_THREADS=2 python benchmarks/bench_rim.py [--presets tiny cpu64] [--include-paper128]

paper128 (3.5e8 parameters) is only timed with --include-paper128 (minutes per step on a CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from common import machine, set_threads
from rimlens.config import get_preset
from rimlens.data.lenses import LensGenerator
from rimlens.nn.rim import RIM, rim_loss
from rimlens.nn.unet import count_parameters


def time_it(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench(name, repeats):
    preset = get_preset(name)
    train = preset.train
    model = RIM.from_preset(preset)
    if train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    gen = LensGenerator(preset)
    rng = np.random.default_rng(0)
    batch = gen.draw(rng, max(train.batch_size, 32))
    opt = torch.optim.Adamax(model.parameters(), lr=1e-4)
    b = train.batch_size

    def step():
        out = model(batch.observation[:b], batch.psf[:b], batch.noise_sigma[:b])
        loss = rim_loss(out, batch.source[:b], batch.kappa[:b])
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.eval()

    def one():
        with torch.no_grad():
            model(batch.observation[:1], batch.psf[:1], batch.noise_sigma[:1])

    def many():
        with torch.no_grad():
            model(batch.observation[:32], batch.psf[:32], batch.noise_sigma[:32])

    t_step = time_it(step, repeats)
    t_one = time_it(one, repeats)
    t_many = time_it(many, max(2, repeats // 2))
    return {
        "preset": name,
        "params": count_parameters(model),
        "T": model.config.steps,
        "batch": b,
        "step_s": t_step,
        "latency_s": t_one,
        "throughput": 32 / t_many,
    }


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["tiny", "cpu64"])
    ap.add_argument("--include-paper128", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    set_threads()
    names = args.presets + (["paper128"] if args.include_paper128 else [])
    print(f"# RIM cost, {machine()}")
    print(
        "| preset | parameters | T | batch | training step (s) | steps/hour | reconstruction, 1 lens (s) | batched (lenses/s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in names:
        r = bench(n, args.repeats if n != "paper128" else 1)
        print(
            f"| {r['preset']} | {r['params']:,} | {r['T']} | {r['batch']} | {r['step_s']:.3f} | {3600 / r['step_s']:,.0f} "
            f"| {r['latency_s']:.3f} | {r['throughput']:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
