"""One-call GPU check for a lent accelerator (run by the device tool; writes under $OUT):

    PYTHONPATH=src python benchmarks/gpu_check.py --out "$OUT"

1. paper128 builds on the GPU (parameter count); one training step (T = 8, bf16 autocast of the
   U-net) timed at batch 1 and batch 4 with peak memory; one reconstruction's latency.
2. paper128 trained for a few minutes (the paper's optimiser settings): steps/s and the loss curve.
3. cpu64 (the default preset: EPL population, external shear, f = 4 pixel integration) trained
   further on the GPU from ``--cpu64-init`` (the shipped weights, or a CPU run's checkpoint carried
   along), at a larger batch; the exported model and its metrics come back for evaluation here.
4. hst128 (0.06"/px, issue 11) trained from scratch for ``--hst-minutes`` at ``--hst-batch``; the
   exported model and its curve come back (it is too slow to train far on 2 CPU cores).

``--ema-decay`` and ``--peer-validation FILE`` (``--hst-peer-validation`` for hst128) train with a weight
average and select checkpoints on peer-simulated lenses (made here with lenstronomy and
``benchmarks/peer_validation.py``, carried to the device), as the CPU runs of issue 11 do.

Each stage is guarded: a failure is recorded in $OUT/gpu_check.json and the next stage still runs.
Dry run on a CPU: ``--device cpu --paper-preset tiny --paper-train-minutes 0.2 --train-minutes 0.2``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from rimlens.config import get_preset, with_train_settings
from rimlens.data.lenses import LensGenerator
from rimlens.io.checkpoint import export_model
from rimlens.nn.rim import RIM, rim_loss
from rimlens.nn.unet import count_parameters
from rimlens.train import Trainer


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_steps(preset, dev, batch_size: int, repeats: int = 5) -> dict:
    """Median training-step time (s) and peak memory (GiB) at ``batch_size``."""
    torch.manual_seed(0)
    model = RIM.from_preset(preset).to(dev)
    model.amp = dev.type == "cuda"
    batch = LensGenerator(preset).draw(np.random.default_rng(0), batch_size)
    obs, psf, sig, src, kap = (
        t.to(dev) for t in (batch.observation, batch.psf, batch.noise_sigma, batch.source, batch.kappa)
    )
    opt = torch.optim.Adamax(model.parameters(), lr=1e-4, eps=1e-7)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats + 1):
        _sync(dev)
        t0 = time.perf_counter()
        loss = rim_loss(model(obs, psf, sig), src, kap)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    res = {
        "batch_size": batch_size,
        "train_step_s_median": statistics.median(times[1:]),
        "train_step_s_all": [round(t, 4) for t in times[1:]],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
    }
    model.eval()
    with torch.no_grad():
        lat = []
        for _ in range(4):
            _sync(dev)
            t0 = time.perf_counter()
            model(obs[:1], psf[:1], sig[:1])
            _sync(dev)
            lat.append(time.perf_counter() - t0)
    res["reconstruction_s_one_lens"] = statistics.median(lat[1:])
    del model, opt
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--paper-preset", default="paper128", help="stage 1-2 preset (tiny for a CPU dry run)")
    ap.add_argument("--paper-train-minutes", type=float, default=0.0, help="measured once already (README)")
    ap.add_argument("--paper-batch", type=int, default=4)
    ap.add_argument("--train-minutes", type=float, default=3.5)
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--cpu64-init", default="default", help="weights to continue (a checkpoint or run folder)")
    ap.add_argument("--hst-minutes", type=float, default=3.0)
    ap.add_argument("--hst-batch", type=int, default=16)
    ap.add_argument("--hst-learning-rate", type=float, default=3e-3)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--work", default="/tmp/rimlens_gpu_check")
    ap.add_argument("--data-workers", type=int, default=0, help="DataLoader workers drawing training batches")
    ap.add_argument("--skip-step-timing", action="store_true")
    ap.add_argument("--ema-decay", type=float, default=0.0, help="weight average for the cpu64/hst128 runs (0: off)")
    ap.add_argument(
        "--peer-validation",
        default="",
        help="peer-simulated lenses on the cpu64 grid (benchmarks/peer_validation.py): select cpu64 checkpoints on them",
    )
    ap.add_argument("--hst-peer-validation", default="", help="the same on the hst128 grid, for the hst128 run")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    dev = torch.device(args.device)
    res = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "torch": torch.__version__}

    def record():
        (out / "gpu_check.json").write_text(json.dumps(res, indent=2))

    def stage(name, fn):
        t0 = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as exc:  # record and go on: one device call must return as much as it can
            res[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
        res[name + "_wall_s"] = round(time.perf_counter() - t0, 1)
        record()
        print(name, json.dumps(res[name], indent=1)[:1500], flush=True)

    paper = get_preset(args.paper_preset)
    res["paper_preset"] = paper.name
    res["paper_parameters"] = count_parameters(RIM.from_preset(paper))
    record()
    if not args.skip_step_timing:
        stage("paper_step_batch1", lambda: time_steps(paper, dev, 1))
        stage(f"paper_step_batch{args.paper_batch}", lambda: time_steps(paper, dev, args.paper_batch))

    def train(preset, name, minutes, batch, lr=None, init_from=None, val_size=None, val_every=None, peer="", ema=0.0):
        train_cfg = {
            "batch_size": batch,
            "max_minutes": minutes,
            "patience": 0,
            "data_workers": args.data_workers,
            "ema_decay": ema,
            "peer_validation": peer,
        }
        if lr is not None:
            train_cfg.update(learning_rate=lr, decay_steps=2000, staircase=False)
        if val_size:
            train_cfg["val_size"] = val_size
        if val_every:
            train_cfg["val_every"] = val_every
        p = with_train_settings(preset, train_cfg)
        t = Trainer(p, work / name, device=dev, progress=False, init_from=init_from)
        start = t.evaluate() if init_from else None
        t0 = time.perf_counter()
        result = t.train()
        r = {**result.last, "step": result.step, "stop_reason": result.stop_reason}
        wall = time.perf_counter() - t0
        (out / name).mkdir(exist_ok=True)
        for f in ("metrics.csv", "training_curve.png"):
            if (work / name / f).exists():
                shutil.copy(work / name / f, out / name / f)
        keys = ("step", "val_loss", "baseline_loss", "val_source_mse", "val_log10_kappa_mse", "stop_reason")
        summary = {k: r[k] for k in (*keys, "peer_theta_err", "peer_gamma_err", "peer_kappa_err") if k in r}
        summary.update(
            batch_size=batch,
            steps_per_s=r["step"] / wall,
            lenses_per_s=r["step"] * batch / wall,
            best_selection_score=t.best_val,
            selection_metric=t.selection_metric,
            data_workers=args.data_workers,
        )
        if start is not None:
            summary["start_val_loss"] = start["val_loss"]
        return summary

    if args.paper_train_minutes > 0:
        stage(
            "paper_training",
            lambda: train(paper, "paper", args.paper_train_minutes, args.paper_batch, val_size=16, val_every=50),
        )

    def cpu64():
        s = train(
            get_preset("cpu64"),
            "cpu64_gpu",
            args.train_minutes,
            args.train_batch,
            lr=args.learning_rate,
            init_from=args.cpu64_init,
            val_every=100,
            peer=args.peer_validation,
            ema=args.ema_decay,
        )
        export_model(work / "cpu64_gpu", out / "cpu64_gpu")  # best.pt -> model.pt (no optimiser state)
        return s

    if args.train_minutes > 0:
        stage("cpu64_continued", cpu64)

    def hst128():
        s = train(
            get_preset("hst128"),
            "hst128_gpu",
            args.hst_minutes,
            args.hst_batch,
            lr=args.hst_learning_rate,
            val_every=100,
            peer=args.hst_peer_validation,
            ema=args.ema_decay,
        )
        export_model(work / "hst128_gpu", out / "hst128_gpu")
        return s

    if args.hst_minutes > 0:
        stage("hst128_training", hst128)
    print(json.dumps({k: v for k, v in res.items() if "traceback" not in str(v)}, indent=1)[:3000])


if __name__ == "__main__":
    main()
