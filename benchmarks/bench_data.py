"""Validated lenses per second from the on-the-fly generator, against what one RIM training step
consumes (data must never limit training: goal >= 50x).

    OMP_NUM_THREADS=2 python benchmarks/bench_data.py

N = 64 uses the cpu64 preset (and its RIM for the consumption rate); N = 128 uses paper128's grids
with the cpu64 data mix, and its consumption is measured with the cpu64 network run at 128 px
(the paper128 network is GPU-only).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import numpy as np
import torch

from common import machine, set_threads
from rimlens.config import get_preset
from rimlens.data.lenses import LensGenerator
from rimlens.nn.rim import RIM, rim_loss


def data_rate(preset, n=256, repeats=3):
    gen = LensGenerator(preset)
    gen.prepare()  # banks built once, outside the timing
    rates = []
    for r in range(repeats):
        t0 = time.perf_counter()
        gen.draw(np.random.default_rng(r), n)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates), gen.stats()


def consumption(preset, repeats=3):
    train = preset.train
    model = RIM.from_preset(preset).to(memory_format=torch.channels_last)
    batch = LensGenerator(preset).draw(np.random.default_rng(0), train.batch_size)
    opt = torch.optim.Adamax(model.parameters(), lr=1e-4)
    ts = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        loss = rim_loss(model(batch.observation, batch.psf, batch.noise_sigma), batch.source, batch.kappa)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ts.append(time.perf_counter() - t0)
    return train.batch_size / statistics.median(ts[1:])


def main():
    set_threads()
    print(f"# data generation, {machine()}")
    print("| N | validated lenses/s | rejected (per 100 drawn) | RIM training consumes (lenses/s) | ratio |")
    print("|---|---|---|---|---|")
    cpu64 = get_preset("cpu64")
    p128 = dataclasses.replace(get_preset("paper128"), data=cpu64.data, model=cpu64.model, train=cpu64.train)
    for n, preset in ((64, cpu64), (128, p128)):
        rate, stats = data_rate(preset)
        rej = sum(v for k, v in stats.items() if k.startswith("rejected")) / stats["drawn"] * 100
        used = consumption(preset)
        print(f"| {n} | {rate:,.0f} | {rej:.1f} | {used:.1f} | {rate / used:,.0f}x |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
