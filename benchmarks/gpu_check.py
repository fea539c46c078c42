"""One-call GPU check for a lent accelerator (run by the device tool; writes under $OUT):

    python benchmarks/gpu_check.py --out "$OUT" --train-minutes 4

1. paper128 builds on the GPU (parameter count), 2. one training step (batch 1, T = 8, bf16
autocast of the U-net) timed over a few repeats with peak memory, 3. a reconstruction latency,
4. cpu64 trained on the GPU for a few minutes (checkpoints and metrics copied to $OUT).
Everything it measures goes to $OUT/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from rimlens.config import get_preset
from rimlens.data.lenses import LensGenerator
from rimlens.inference.rim import rim_loss
from rimlens.nn.unet import count_parameters
from rimlens.train import Trainer
from rimlens.train.checkpoint import build_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--train-minutes", type=float, default=4.0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    p = get_preset("paper128")
    model = build_model(p).to(dev)
    model.amp = True
    res["paper128_parameters"] = count_parameters(model)
    batch = LensGenerator(p).draw(np.random.default_rng(0), 1)
    opt = torch.optim.Adamax(model.parameters(), lr=1e-4, eps=1e-7)
    obs, psf, sig, src, kap = (t.to(dev) for t in (batch.observation, batch.psf, batch.noise_sigma, batch.source, batch.kappa))
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = rim_loss(model(obs, psf, sig), src, kap)
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    res["paper128_train_step_s"] = statistics.median(times[1:])
    res["paper128_peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    model.eval()
    with torch.no_grad():
        lat = []
        for _ in range(4):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(obs, psf, sig)
            torch.cuda.synchronize()
            lat.append(time.perf_counter() - t0)
    res["paper128_reconstruction_s"] = statistics.median(lat[1:])
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2))
    del model, opt
    torch.cuda.empty_cache()
    import dataclasses

    c = get_preset("cpu64")
    c = dataclasses.replace(c, train={**c.train, "batch_size": 32, "max_minutes": args.train_minutes, "val_every": 200})
    t = Trainer(c, out / "cpu64_gpu", device=dev, progress=False)
    r = t.train()
    res["cpu64_gpu_training"] = {k: r[k] for k in ("step", "val_loss", "baseline_loss", "stop_reason") if k in r}
    res["cpu64_gpu_steps_per_s"] = r["step"] / max(r.get("elapsed_s", 1), 1)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
