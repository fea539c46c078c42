"""The training loop every rimlens model shares (the RIM and the two VAEs): resume, learning-rate
schedule, limits, evaluation cadence, early stopping, non-finite stop, atomic checkpoints, CSV log.

Under DDP every stop decision is collective (:func:`rimlens.distributed.any_rank`): a rank whose
own clock passes ``max_minutes``, that meets a non-finite loss or gradient, or that runs out of
patience stops *all* ranks at the same step, so no rank is left waiting in an all-reduce that a
stopped peer never joins.
"""

from __future__ import annotations

import contextlib
import csv
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from rimlens.config import LoopConfig
from rimlens.distributed import any_rank, rank_and_world
from rimlens.errors import RimlensInputError, TrainingDivergedError
from rimlens.io.atomic import atomic_path
from rimlens.io.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["TrainResult", "TrainingLoop", "previous_run", "refuse_resume_changes"]


@dataclass
class TrainResult:
    """How a training run ended: the step reached, why it stopped (``max_steps``, ``max_minutes`` or
    ``early_stopping``) and the metrics of the last evaluation (empty if none ran)."""

    step: int
    stop_reason: str
    last: dict = field(default_factory=dict)

    @property
    def val_loss(self) -> float:
        """Validation loss of the last evaluation (NaN if none ran)."""
        return float(self.last.get("val_loss", float("nan")))


def previous_run(out_dir: Path, resume: bool) -> dict | None:
    """The latest checkpoint of ``out_dir`` when resuming; refuses to start a new run over an old one."""
    latest = out_dir / "latest.pt"
    if resume:
        if not latest.exists():
            raise RimlensInputError(f"--resume: no checkpoint {latest}")
        return load_checkpoint(latest)
    if latest.exists():
        raise RimlensInputError(f"{out_dir} already holds a run; use --resume or another --out")
    return None


class TrainingLoop:
    """Skeleton of a training run into ``out_dir`` (``latest.pt``, ``best.pt``, ``metrics.csv``).

    A subclass sets ``self.cfg`` (a :class:`rimlens.config.LoopConfig`), ``self.model``,
    ``self.optimizer`` and calls :meth:`restore` with the resumed checkpoint, and implements
    :meth:`batches`, :meth:`loss`, :meth:`clip_gradients`, :meth:`evaluate` and
    :meth:`checkpoint_extras`. ``clock`` (seconds, monotonic) measures ``max_minutes``.
    """

    cfg: LoopConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    desc = "training"
    selection_metric = "val_loss"  # which of evaluate()'s metrics picks best.pt and early stopping (lower is better)

    def __init__(self, out_dir: str | Path, progress: bool = True):
        self.out_dir = Path(out_dir)
        self.rank, self.world = rank_and_world()
        self.progress = progress and self.rank == 0
        self.step = 0
        self.best_val = float("inf")
        self.evals_without_improvement = 0
        self.history: list[dict] = []
        self.elapsed = 0.0
        self.clock = time.monotonic
        self.ema: AveragedModel | None = None

    # ------------------------------------------------------------------ what a model provides
    def batches(self, start: int) -> Iterator:
        """Training batches of steps ``start``, ``start + 1``, ... (an optional ``close()`` is called at the end)."""
        raise NotImplementedError

    def loss(self, batch) -> torch.Tensor:
        """Training loss of one batch (model in training mode), a scalar tensor."""
        raise NotImplementedError

    def clip_gradients(self, norms: list[torch.Tensor]) -> None:
        """Clip the gradients in place; ``norms`` are the per-tensor norms of :meth:`trainable`'s gradients."""

    def evaluate(self) -> dict:
        """Validation metrics; must hold ``val_loss`` and :attr:`selection_metric` (lower is better)."""
        raise NotImplementedError

    def checkpoint_extras(self) -> dict:
        """What a checkpoint holds besides the weights, optimizer and loop state (configurations)."""
        return {}

    def write_figures(self) -> None:
        """Optional figures drawn from ``self.history`` after each log update."""

    def trainable(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates."""
        return [p for p in self.model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ state
    def restore(self, ckpt: dict | None) -> None:
        """Load weights, optimizer and loop state from a checkpoint (``None``: nothing to restore); with
        ``ema_decay`` the weight average starts here (from the current weights, or the checkpoint's average)."""
        if self.cfg.ema_decay > 0:
            self.ema = AveragedModel(
                self.model, multi_avg_fn=get_ema_multi_avg_fn(self.cfg.ema_decay), use_buffers=True
            )
        if ckpt is None:
            return
        if self.ema is not None and "ema" in ckpt:  # (ema_decay is the checkpoint's own on --resume)
            self.ema.load_state_dict(ckpt["ema"])
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])
        self.best_val = float(ckpt["best_val"])
        self.evals_without_improvement = int(ckpt.get("evals_without_improvement", 0))
        self.history = list(json.loads(ckpt.get("history", "[]")))
        self.elapsed = float(ckpt.get("elapsed_s", 0.0))

    def payload(self) -> dict:
        """The whole checkpoint dict of the current state (with ``ema_decay``, also the weight average)."""
        extra = {} if self.ema is None else {"ema": self.ema.state_dict()}
        return {
            **self.checkpoint_extras(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "best_val": self.best_val,
            "evals_without_improvement": self.evals_without_improvement,
            "history": json.dumps(self.history),
            "elapsed_s": self.elapsed,
            **extra,
        }

    @contextlib.contextmanager
    def evaluated_weights(self):
        """Within this context ``self.model`` holds the weights that are evaluated and kept as ``best.pt``:
        the weight average when there is one (the training weights come back afterwards), else the weights."""
        if self.ema is None:
            yield
            return
        kept = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        try:
            self.model.load_state_dict(self.ema.module.state_dict())
            yield
        finally:
            self.model.load_state_dict(kept)

    def save(self, best: bool = False) -> None:
        """Write ``latest.pt`` (and ``best.pt`` first when ``best``) and the logs; rank 0 only. ``best.pt``
        holds the evaluated weights (the average with ``ema_decay``), without optimizer or average state."""
        if self.rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        payload = self.payload()
        if best:  # best first: latest.pt records best_val, so it must never get ahead of best.pt
            weights = payload["model"] if self.ema is None else self.ema.module.state_dict()
            kept = {k: v for k, v in payload.items() if k not in ("optimizer", "ema")}
            save_checkpoint(self.out_dir / "best.pt", {**kept, "model": weights})
        save_checkpoint(self.out_dir / "latest.pt", payload)
        self._write_logs()

    def _write_logs(self) -> None:
        if not self.history:
            return
        keys = sorted({k for h in self.history for k in h})
        keys = ["step"] + [k for k in keys if k != "step"]
        with atomic_path(self.out_dir / "metrics.csv") as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.history)
        try:
            self.write_figures()
        except Exception as exc:  # a figure must never kill a training run
            print(f"warning: could not draw the training figures: {exc}")

    # ------------------------------------------------------------------ steps
    def train_step(self, batch) -> float:
        """One optimisation step; raises :class:`TrainingDivergedError` on every rank, before the
        weights change, if the loss or a gradient is non-finite on any rank."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr_at(self.step)
        loss = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # also with a non-finite loss: under DDP every rank must join the gradient all-reduce
        norms = [p.grad.norm() for p in self.trainable() if p.grad is not None]
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(torch.stack(norms)).all()) if norms else True
        if any_rank(not finite):  # stop before the weights are poisoned; the last checkpoints stay good
            what = "loss" if not torch.isfinite(loss) else "gradient"
            raise TrainingDivergedError(
                f"training diverged at step {self.step}: a non-finite {what} (on this or another process); nothing from "
                f"this step on was saved (best.pt keeps the best weights). Resume from {self.out_dir / 'latest.pt'} "
                "with a lower learning rate: --resume --set learning_rate=..."
            )
        self.clip_gradients(norms)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        return float(loss.detach())

    # ------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        """Run until ``max_steps``, ``max_minutes`` or early stopping; a final ``latest.pt`` is written."""
        bar = tqdm(total=self.cfg.max_steps, initial=self.step, disable=not self.progress, unit="step", desc=self.desc)
        batches = self.batches(self.step)
        try:
            result = self._loop(batches, bar)
        finally:  # data workers end now, also on errors and early stops (not at garbage collection)
            close = getattr(batches, "close", None)
            if close is not None:
                close()
            bar.close()
        self.save()
        return result

    def _loop(self, batches: Iterator, bar) -> TrainResult:
        cfg = self.cfg
        t_start = self.clock() - self.elapsed
        running, n_running = 0.0, 0
        last: dict = {}
        while self.step < cfg.max_steps:
            running += self.train_step(next(batches))
            n_running += 1
            bar.update(1)
            self.elapsed = self.clock() - t_start
            # each rank reads its own clock: the decision must be collective or one rank leaves early
            out_of_time = any_rank(cfg.max_minutes > 0 and self.elapsed > 60 * cfg.max_minutes)
            if self.step % cfg.val_every == 0 or self.step >= cfg.max_steps or out_of_time:
                with self.evaluated_weights():
                    metrics = self.evaluate()
                improved = metrics[self.selection_metric] < self.best_val
                if improved:
                    self.best_val = metrics[self.selection_metric]
                    self.evals_without_improvement = 0
                else:
                    self.evals_without_improvement += 1
                last = {
                    "step": self.step,
                    "train_loss": running / max(n_running, 1),
                    "lr": cfg.lr_at(self.step),
                    "elapsed_s": round(self.elapsed, 1),
                    **metrics,
                }
                self.history.append(last)
                running, n_running = 0.0, 0
                bar.set_postfix(train=f"{last['train_loss']:.4f}", val=f"{metrics['val_loss']:.4f}")
                self.save(best=improved)
                if any_rank(bool(cfg.patience) and self.evals_without_improvement >= cfg.patience):
                    return TrainResult(self.step, "early_stopping", last)
            elif self.step % cfg.checkpoint_every == 0:
                self.save()
            if out_of_time:
                return TrainResult(self.step, "max_minutes", last)
        return TrainResult(self.step, "max_steps", last)


def refuse_resume_changes(resume: bool, settings: dict, allowed: tuple[str, ...]) -> None:
    """A resumed run keeps its checkpoint's configuration: settings outside ``allowed`` are refused, not dropped."""
    fixed = sorted(set(settings) - set(allowed)) if resume else []
    if fixed:
        raise RimlensInputError(
            f"--resume continues the checkpoint's configuration: {', '.join(fixed)} cannot change "
            f"(a resumed run may change {', '.join(allowed)})"
        )
