"""Training engine for the RIM: Adamax with the paper's exponential schedule and per-tensor
gradient clipping, on-the-fly data, a fixed validation set, atomic checkpoints with exact resume,
early stopping, metrics log and curve; single process or DDP under ``torchrun``.

Data determinism: the global batch of step ``t`` is the concatenation, over data shards
``k = 0..S-1``, of ``LensGenerator.draw(child_rng(seed, k, 0, t), batch_size / S)``. Under DDP
with ``W`` processes, ``S = W`` and rank ``r`` draws shard ``r``; a single process can emulate the
same stream with ``data_shards = W``. Hence resume is exact (the data depend only on the step),
and a W-process run equals a one-process run with the same global batch.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from rimlens.config import Preset, from_dict, preset_from_json
from rimlens.data.lenses import LensBatch, LensGenerator
from rimlens.data.random import child_rng
from rimlens.errors import RimlensInputError
from rimlens.inference.rim import KAPPA_FLOOR, rim_loss
from rimlens.inference.sharding import rank_and_world
from rimlens.io.atomic import atomic_path
from rimlens.train.checkpoint import build_model, load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (paper values in censai_as_run.md section 5; CPU presets use a larger
    learning rate and faster decay because they train for hours, not days)."""

    batch_size: int = 8  # global batch
    learning_rate: float = 1e-4
    decay_rate: float = 0.95
    decay_steps: int = 100_000
    staircase: bool = True
    clip_norm: float = 5.0  # per-tensor gradient norm clip
    max_steps: int = 1_000_000
    max_minutes: float = 0.0  # 0 = no limit
    val_size: int = 64
    val_every: int = 200
    checkpoint_every: int = 100
    patience: int = 20  # evaluations without improvement before stopping (0 = never)
    seed: int = 0
    data_shards: int = 1  # emulate this many DDP ranks in one process
    channels_last: bool = True
    amp: bool = False  # bfloat16 autocast of the U-net on CUDA
    dtype: str = "float32"  # or "float64" (exact comparisons in tests)
    data_workers: int = 0  # DataLoader worker processes drawing batches ahead of the model (0: in the main process)

    # settings a resumed run may change (limits, workers, and the learning rate after a divergence)
    RESUME_OVERRIDES = ("max_steps", "max_minutes", "data_workers", "learning_rate")

    def __post_init__(self):
        for name in ("batch_size", "decay_steps", "val_size", "val_every", "checkpoint_every", "data_shards", "max_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise RimlensInputError(f"training setting {name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.data_workers, int) or isinstance(self.data_workers, bool) or self.data_workers < 0:
            raise RimlensInputError(f"training setting data_workers must be an integer >= 0, got {self.data_workers!r}")
        for name in ("learning_rate", "decay_rate", "clip_norm"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise RimlensInputError(f"training setting {name} must be a number > 0, got {v!r}")

    def lr_at(self, step: int) -> float:
        e = step / self.decay_steps
        return self.learning_rate * self.decay_rate ** (math.floor(e) if self.staircase else e)


def draw_step_batch(generator: LensGenerator, seed: int, shards, shard_batch: int, step: int) -> LensBatch:
    """The training batch of ``step``: ``shard_batch`` lenses from each shard in ``shards``, each
    drawn from its own ``(seed, shard, 0, step)`` stream, so a batch depends on the step alone."""
    parts = [generator.draw(child_rng(seed, k, 0, step), shard_batch) for k in shards]
    return LensBatch.concat(parts) if len(parts) > 1 else parts[0]


class StepBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``i`` is the batch of step ``start + i``: DataLoader workers can
    then draw batches ahead of the model while every batch stays a pure function of its step (exact
    resume and DDP equivalence are kept)."""

    def __init__(self, generator: LensGenerator, seed: int, shards, shard_batch: int, start: int, stop: int):
        self.generator, self.seed, self.shards, self.shard_batch = generator, seed, list(shards), shard_batch
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __getitem__(self, i: int):
        try:
            return draw_step_batch(self.generator, self.seed, self.shards, self.shard_batch, self.start + i)
        except RimlensInputError as exc:  # re-raised by the main process as the same one-line error
            return _WorkerInputError(str(exc))


@dataclass
class _WorkerInputError:
    message: str


def _keep_batch(batch):  # DataLoader collate for ready-made batches (module level: picklable)
    return batch


def _one_thread_worker(_):  # each worker draws with one thread: no oversubscription of the cores
    torch.set_num_threads(1)


class Trainer:
    """Train a RIM for ``preset`` into ``out_dir``.

    Args:
        preset: grids, data, model (``preset.model``: RIMConfig dict) and training (``preset.train``:
            TrainConfig dict).
        out_dir: run folder: ``latest.pt``, ``best.pt``, ``config.json``, ``metrics.csv``,
            ``training_curve.png``.
        resume: continue from ``out_dir/latest.pt`` (its configuration wins).
        init_from: start a new run from the weights of this checkpoint (fresh optimizer and step
            count; the model configurations must match), e.g. to keep training the shipped model.
        device: torch device (default: CUDA with DDP local rank if available, else CPU).
    """

    def __init__(self, preset: Preset, out_dir: str | Path, resume: bool = False, device=None, progress: bool = True,
                 init_from: str | Path | None = None):
        self.out_dir = Path(out_dir)
        self.rank, self.world = rank_and_world()
        latest = self.out_dir / "latest.pt"
        ckpt = None
        if resume:
            if not latest.exists():
                raise RimlensInputError(f"--resume: no checkpoint {latest}")
            ckpt = load_checkpoint(latest)
            preset = preset_from_json(ckpt["preset"])
        elif latest.exists():
            raise RimlensInputError(f"{self.out_dir} already holds a run; use --resume or another --out")
        self.preset = preset
        self.cfg = from_dict(TrainConfig, preset.train)
        shards = self.world if self.world > 1 else self.cfg.data_shards
        if self.cfg.batch_size % shards:
            raise RimlensInputError(f"batch_size {self.cfg.batch_size} is not divisible by {shards} data shards")
        self.shards = shards
        self.shard_batch = self.cfg.batch_size // shards
        if device is None:
            if torch.cuda.is_available():
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            else:
                device = torch.device("cpu")
        self.device = torch.device(device)
        self.progress = progress and self.rank == 0
        torch.manual_seed(self.cfg.seed)  # same initial weights for the same seed (and on every rank)
        if self.cfg.dtype not in ("float32", "float64"):
            raise RimlensInputError(f"training dtype must be float32 or float64, got {self.cfg.dtype!r}")
        self.dtype = getattr(torch, self.cfg.dtype)
        self.model = build_model(preset).to(self.device, self.dtype)
        if self.cfg.channels_last and self.device.type == "cpu":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.amp = self.cfg.amp and self.device.type == "cuda"
        self.optimizer = torch.optim.Adamax(self.model.parameters(), lr=self.cfg.learning_rate, betas=(0.9, 0.999), eps=1e-7)
        self.step = 0
        self.best_val = float("inf")
        self.evals_without_improvement = 0
        self.history: list[dict] = []
        self.elapsed = 0.0
        if init_from is not None and ckpt is None:
            from rimlens.train.checkpoint import load_model

            source_model, source_preset, _ = load_model(init_from)
            if source_preset.model != preset.model or source_preset.grid != preset.grid:
                raise RimlensInputError(f"--init-from {init_from}: its model or grid differs from preset {preset.name!r}")
            self.model.load_state_dict(source_model.state_dict())
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.step = int(ckpt["step"])
            self.best_val = float(ckpt["best_val"])
            self.evals_without_improvement = int(ckpt.get("evals_without_improvement", 0))
            self.history = list(json.loads(ckpt.get("history", "[]")))
            self.elapsed = float(ckpt.get("elapsed_s", 0.0))
        self.ddp_model = self.model
        if self.world > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.generator = LensGenerator(preset, split="train", bank_seed=self.cfg.seed)
        self._val = None
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.out_dir / "config.json") as tmp:
                tmp.write_text(json.dumps(preset.to_dict(), indent=2, sort_keys=True))

    # ------------------------------------------------------------------ data
    def batch_for_step(self, step: int, shards=None) -> LensBatch:
        """The (local) training batch of ``step``: this rank's shard(s)."""
        return draw_step_batch(self.generator, self.cfg.seed, self._shards(shards), self.shard_batch, step)

    def _shards(self, shards=None):
        return [self.rank] if self.world > 1 else range(self.shards) if shards is None else shards

    def batches_from(self, step: int):
        """Iterator over the training batches of ``step``, ``step + 1``, ... ``max_steps - 1``; drawn by
        ``data_workers`` DataLoader processes ahead of the model when configured."""
        if self.cfg.data_workers == 0:
            return (self.batch_for_step(s) for s in range(step, self.cfg.max_steps))
        self.generator.prepare()  # built once here, shared by the forked workers (a bad mix fails here, in-process)
        data = StepBatches(self.generator, self.cfg.seed, self._shards(), self.shard_batch, step, self.cfg.max_steps)
        return iter(torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=self.cfg.data_workers,
                                                collate_fn=_keep_batch, worker_init_fn=_one_thread_worker,
                                                prefetch_factor=4, persistent_workers=False))

    def validation_set(self) -> LensBatch:
        """Fixed validation lenses: held-out (test-split) galaxies, their own seed stream."""
        if self._val is None:
            gen = LensGenerator(self.preset, split="test", bank_seed=self.cfg.seed)
            self._val = gen.draw(child_rng(self.cfg.seed, 10**6), self.cfg.val_size)
        return self._val

    def _to(self, t):
        return t.to(self.device, self.dtype, non_blocking=True)

    # ------------------------------------------------------------------ steps
    def train_step(self, batch: LensBatch) -> float:
        self.ddp_model.train()
        for g in self.optimizer.param_groups:
            g["lr"] = self.cfg.lr_at(self.step)
        out = self.ddp_model(self._to(batch.observation), self._to(batch.psf), self._to(batch.noise_sigma))
        loss = rim_loss(out, self._to(batch.source), self._to(batch.kappa))
        if not torch.isfinite(loss):  # stop before the weights are poisoned; the last checkpoints stay good
            raise RimlensInputError(
                f"the training loss became non-finite at step {self.step}; nothing from this step on was saved "
                f"(best.pt keeps the best weights). Resume from {self.out_dir / 'latest.pt'} with a lower learning "
                f"rate: --resume --set learning_rate=...")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in self.model.parameters():  # per-tensor clip_by_norm, as the paper (TF clip_by_norm)
            if p.grad is not None:
                n = p.grad.norm()
                if n > self.cfg.clip_norm:
                    p.grad.mul_(self.cfg.clip_norm / n)
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, batch: LensBatch | None = None, chunk: int = 16) -> dict:
        """Validation loss and final-step errors, with the trivial mean-map baseline."""
        batch = batch or self.validation_set()
        self.model.eval()
        losses, src_mse, kap_mse = [], [], []
        for i in range(0, len(batch), chunk):
            b = batch.select(np.arange(i, min(i + chunk, len(batch))))
            out = self.model(self._to(b.observation), self._to(b.psf), self._to(b.noise_sigma))
            s, k = self._to(b.source), self._to(b.kappa)
            losses.append(float(rim_loss(out, s, k)) * len(b))
            src_mse.append(((out.source[-1] - s) ** 2).mean(dim=(1, 2, 3)).cpu())
            kap_mse.append(((out.log10_kappa[-1] - torch.log10(k.clamp_min(KAPPA_FLOOR))) ** 2).mean(dim=(1, 2, 3)).cpu())
        src_mse, kap_mse = torch.cat(src_mse), torch.cat(kap_mse)
        # trivial baseline: predict the mean source and mean log10 kappa of the validation set itself
        mean_src = batch.source.mean(0, keepdim=True)
        log_kappa = torch.log10(batch.kappa.clamp_min(KAPPA_FLOOR))
        mean_eta = log_kappa.mean(0, keepdim=True)
        from rimlens.inference.rim import RIMOutput

        const = RIMOutput(mean_src.expand_as(batch.source)[None], mean_eta.expand_as(batch.kappa)[None], torch.zeros(0))
        baseline_loss = float(rim_loss(const, batch.source, batch.kappa))
        return {"val_loss": sum(losses) / len(batch), "baseline_loss": baseline_loss, "val_source_mse": float(src_mse.mean()),
                "val_log10_kappa_mse": float(kap_mse.mean()),
                "baseline_source_mse": float(((batch.source - mean_src) ** 2).mean()),
                "baseline_log10_kappa_mse": float(((log_kappa - mean_eta) ** 2).mean())}

    # ------------------------------------------------------------------ checkpoints & logs
    def _payload(self) -> dict:
        return {"preset": self.preset.to_json(), "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "best_val": self.best_val, "evals_without_improvement": self.evals_without_improvement,
                "history": json.dumps(self.history), "elapsed_s": self.elapsed}

    def save(self, best: bool = False) -> None:
        if self.rank != 0:
            return
        payload = self._payload()
        if best:  # best first: latest.pt records best_val, so it must never get ahead of best.pt
            save_checkpoint(self.out_dir / "best.pt", {k: v for k, v in payload.items() if k != "optimizer"})
        save_checkpoint(self.out_dir / "latest.pt", payload)
        self._write_logs()

    def _write_logs(self) -> None:
        if not self.history:
            return
        keys = sorted({k for h in self.history for k in h})
        keys = ["step"] + [k for k in keys if k != "step"]
        with atomic_path(self.out_dir / "metrics.csv") as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=keys)
                w.writeheader()
                w.writerows(self.history)
        try:
            from rimlens.evaluate.figures import training_curve

            training_curve(self.history, self.out_dir / "training_curve.png")
        except Exception as exc:  # a figure must never kill a training run
            print(f"warning: could not draw the training curve: {exc}")

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        """Run until ``max_steps``, ``max_minutes`` or early stopping; returns the last metrics."""
        from tqdm import tqdm

        cfg = self.cfg
        t_start = time.time() - self.elapsed
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.progress, unit="step", desc="training")
        batches = self.batches_from(self.step)
        try:
            stop_reason, last = self._loop(batches, bar, t_start)
        finally:  # DataLoader workers end now, also on errors and early stops (not at garbage collection)
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        bar.close()
        self.save()
        return {**last, "stop_reason": stop_reason, "step": self.step}

    def _loop(self, batches, bar, t_start) -> tuple[str, dict]:
        cfg = self.cfg
        running, n_running = 0.0, 0
        last = {}
        stop_reason = "max_steps"
        while self.step < cfg.max_steps:
            batch = next(batches)
            if isinstance(batch, _WorkerInputError):
                raise RimlensInputError(batch.message)
            loss = self.train_step(batch)
            running += loss
            n_running += 1
            bar.update(1)
            self.elapsed = time.time() - t_start
            done = self.step >= cfg.max_steps
            out_of_time = cfg.max_minutes > 0 and self.elapsed > 60 * cfg.max_minutes
            if self.step % cfg.val_every == 0 or done or out_of_time:
                metrics = self.evaluate()
                improved = metrics["val_loss"] < self.best_val
                if improved:
                    self.best_val = metrics["val_loss"]
                    self.evals_without_improvement = 0
                else:
                    self.evals_without_improvement += 1
                last = {"step": self.step, "train_loss": running / max(n_running, 1), "lr": cfg.lr_at(self.step),
                        "elapsed_s": round(self.elapsed, 1), **metrics}
                self.history.append(last)
                running, n_running = 0.0, 0
                bar.set_postfix(train=f"{last['train_loss']:.4f}", val=f"{metrics['val_loss']:.4f}")
                self.save(best=improved)
                if cfg.patience and self.evals_without_improvement >= cfg.patience:
                    stop_reason = "early_stopping"
                    break
            elif self.step % cfg.checkpoint_every == 0:
                self.save()
            if out_of_time:
                stop_reason = "max_minutes"
                break
        return stop_reason, last
