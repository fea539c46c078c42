"""Training engine for the RIM: Adamax with the paper's exponential schedule and per-tensor
gradient clipping, on-the-fly data (:mod:`rimlens.data.stream`), a fixed validation set, atomic
checkpoints with exact resume, early stopping, metrics log and curve; single process or DDP under
``torchrun``. The loop itself (resume, limits, collective stops) is :class:`rimlens.train.loop.TrainingLoop`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch

from rimlens.config import Preset, TrainConfig, preset_from_json, with_train_settings
from rimlens.data.lenses import LensBatch, LensGenerator
from rimlens.data.random import child_rng
from rimlens.data.stream import draw_step_batch, step_batches
from rimlens.distributed import process_group
from rimlens.errors import RimlensInputError
from rimlens.io.atomic import atomic_path
from rimlens.io.checkpoint import load_model
from rimlens.io.figures import training_curve
from rimlens.nn.rim import RIM, RIMOutput, expand_state_dict, rim_loss
from rimlens.physics.convergence import log10_kappa
from rimlens.train.loop import TrainingLoop, TrainResult, previous_run, refuse_resume_changes
from rimlens.train.peer import PeerValidationSet, load_peer_validation, peer_figures

__all__ = ["Trainer", "train_rim"]


class Trainer(TrainingLoop):
    """Train a RIM for ``preset`` into ``out_dir``.

    Args:
        preset: grids, data, model (``preset.model``) and training (``preset.train``) configuration.
        out_dir: run folder: ``latest.pt``, ``best.pt``, ``config.json``, ``metrics.csv``,
            ``training_curve.png``.
        resume: continue from ``out_dir/latest.pt`` (its configuration wins).
        init_from: start a new run from the weights of this checkpoint (fresh optimizer and step
            count; the model configurations must match), e.g. to keep training the shipped model.
        device: torch device (default: CUDA with DDP local rank if available, else CPU).
    """

    def __init__(
        self,
        preset: Preset,
        out_dir: str | Path,
        resume: bool = False,
        device=None,
        progress: bool = True,
        init_from: str | Path | None = None,
    ):
        super().__init__(out_dir, progress)
        ckpt = previous_run(self.out_dir, resume)
        if ckpt is not None:
            preset = preset_from_json(ckpt["preset"])
        self.preset = preset
        self.cfg = preset.train
        shards = self.world if self.world > 1 else self.cfg.data_shards
        if self.cfg.batch_size % shards:
            raise RimlensInputError(f"batch_size {self.cfg.batch_size} is not divisible by {shards} data shards")
        self.shards = shards
        self.shard_batch = self.cfg.batch_size // shards
        if device is None:
            if torch.cuda.is_available():
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            else:
                device = torch.device("cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda": this rank's own GPU
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.manual_seed(self.cfg.seed)  # same initial weights for the same seed (and on every rank)
        self.dtype = getattr(torch, self.cfg.dtype)
        self.model = RIM.from_preset(preset).to(self.device, self.dtype)
        if self.cfg.channels_last and self.device.type == "cpu":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.amp = self.cfg.amp and self.device.type == "cuda"
        self.optimizer = torch.optim.Adamax(
            self.model.parameters(), lr=self.cfg.learning_rate, betas=(0.9, 0.999), eps=1e-7
        )
        if init_from is not None and ckpt is None:
            source = load_model(init_from)
            same_grid = source.preset is not None and dataclasses.replace(
                source.preset.grid, supersample=1
            ) == dataclasses.replace(
                preset.grid, supersample=1
            )  # the weights carry over to a run that samples pixels more finely
            # a model without the shear term grows one (zero-initialised new weights: expand_state_dict)
            grows_shear = (
                source.preset is not None and preset.model.external_shear and not source.preset.model.external_shear
            )
            same_model = source.preset is not None and source.preset.model == (
                dataclasses.replace(preset.model, external_shear=False) if grows_shear else preset.model
            )
            if source.preset is None or not same_model or not same_grid:
                raise RimlensInputError(
                    f"--init-from {init_from}: its model or grid differs from preset {preset.name!r}"
                )
            state = source.state_dict()
            self.model.load_state_dict(expand_state_dict(state, self.model) if grows_shear else state)
        self.restore(ckpt)
        self.ddp_model: torch.nn.Module = self.model
        if self.world > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.generator = LensGenerator(preset, split="train", bank_seed=self.cfg.seed)
        self._val: LensBatch | None = None
        self.peer: PeerValidationSet | None = None
        if self.cfg.peer_validation:  # checkpoints are then selected on lenses a peer simulator made
            self.peer = load_peer_validation(self.cfg.peer_validation, self.model.grid.image_grid)
            self.selection_metric = "peer_score"
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.out_dir / "config.json") as tmp:
                tmp.write_text(json.dumps(preset.to_dict(), indent=2, sort_keys=True))

    # ------------------------------------------------------------------ data
    def _shards(self, shards=None):
        return [self.rank] if self.world > 1 else range(self.shards) if shards is None else shards

    def batch_for_step(self, step: int, shards=None) -> LensBatch:
        """The (local) training batch of ``step``: this rank's shard(s)."""
        return draw_step_batch(self.generator, self.cfg.seed, self._shards(shards), self.shard_batch, step)

    def batches(self, start: int):
        """The training batches of steps ``start .. max_steps - 1``; drawn by ``data_workers``
        DataLoader processes ahead of the model when configured (the same batches either way)."""
        return step_batches(
            self.generator,
            self.cfg.seed,
            list(self._shards()),
            self.shard_batch,
            start,
            self.cfg.max_steps,
            self.cfg.data_workers,
        )

    def validation_set(self) -> LensBatch:
        """Fixed validation lenses: held-out (test-split) galaxies, their own seed stream."""
        if self._val is None:
            gen = LensGenerator(self.preset, split="test", bank_seed=self.cfg.seed)
            self._val = gen.draw(child_rng(self.cfg.seed, 10**6), self.cfg.val_size)
        return self._val

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, self.dtype, non_blocking=True)

    # ------------------------------------------------------------------ what the loop needs
    def kappa_weight(self, batch: LensBatch) -> torch.Tensor | None:
        """``1 + annulus_weight`` on the pixels at 0.5-2 ``theta_e`` from the field's centre, 1 elsewhere
        (``B x 1 x N x N``); ``None`` without an annulus weight."""
        if not self.cfg.annulus_weight:
            return None
        x, y = self.model.grid.image_grid.coordinates(torch.float64)
        r = torch.hypot(x, y)[None, None]
        theta = batch.theta_e.to(torch.float64).reshape(-1, 1, 1, 1)
        annulus = ((r >= 0.5 * theta) & (r <= 2 * theta)).to(torch.float64)
        return self._to(1 + self.cfg.annulus_weight * annulus)

    def loss(self, batch: LensBatch) -> torch.Tensor:
        self.ddp_model.train()
        out = self.ddp_model(self._to(batch.observation), self._to(batch.psf), self._to(batch.noise_sigma))
        return rim_loss(
            out,
            self._to(batch.source),
            self._to(batch.kappa),
            shear=self._to(batch.shear),
            kappa_weight=self.kappa_weight(batch),
        )

    def clip_gradients(self, norms: list[torch.Tensor]) -> None:
        """Per-tensor ``clip_by_norm`` at ``clip_norm``, as the paper (TF clip_by_norm)."""
        params = [p for p in self.trainable() if p.grad is not None]
        for p, n in zip(params, norms, strict=True):
            if n > self.cfg.clip_norm:
                p.grad.mul_(self.cfg.clip_norm / n)

    def checkpoint_extras(self) -> dict:
        return {"preset": self.preset.to_json()}

    def write_figures(self) -> None:
        training_curve(self.history, self.out_dir / "training_curve.png")

    @torch.no_grad()
    def evaluate(self, batch: LensBatch | None = None, chunk: int = 16) -> dict:
        """Validation loss and final-step errors, with the trivial mean-map baseline."""
        batch = batch or self.validation_set()
        self.model.eval()
        losses, src_mse, kap_mse, shear_err = [], [], [], []
        for i in range(0, len(batch), chunk):
            b = batch.select(np.arange(i, min(i + chunk, len(batch))))
            out = self.model(self._to(b.observation), self._to(b.psf), self._to(b.noise_sigma))
            s, k = self._to(b.source), self._to(b.kappa)
            g = self._to(b.shear)
            losses.append(rim_loss(out, s, k, reduction="none", shear=g).cpu())
            if out.final_shear is not None:
                shear_err.append((out.final_shear - g).norm(dim=-1).cpu())
            src_mse.append(((out.source[-1] - s) ** 2).mean(dim=(1, 2, 3)).cpu())
            kap_mse.append(((out.log10_kappa[-1] - log10_kappa(k)) ** 2).mean(dim=(1, 2, 3)).cpu())
        src_mse, kap_mse = torch.cat(src_mse), torch.cat(kap_mse)
        # trivial baseline: predict the mean source and mean log10 kappa of the validation set itself
        mean_src = batch.source.mean(0, keepdim=True)
        log_kappa = log10_kappa(batch.kappa)
        mean_eta = log_kappa.mean(0, keepdim=True)
        # (with the shear term, the baseline guesses no shear, so that both losses hold the same terms)
        no_shear = torch.zeros(1, len(batch), 2) if self.model.shear else None
        const = RIMOutput(
            mean_src.expand_as(batch.source)[None], mean_eta.expand_as(batch.kappa)[None], torch.zeros(0), no_shear
        )
        baseline_loss = float(rim_loss(const, batch.source, batch.kappa, shear=batch.shear))
        shear = {}
        if shear_err:  # median |gamma_hat - gamma| beside the trivial "no shear" guess
            shear = {
                "val_shear_error": float(torch.cat(shear_err).median()),
                "baseline_shear_error": float(batch.shear.norm(dim=-1).median()),
            }
        peer = peer_figures(self.model, self.peer) if self.peer is not None else {}
        return {
            **shear,
            **peer,
            "val_loss": float(torch.cat(losses).mean()),
            "baseline_loss": baseline_loss,
            "val_source_mse": float(src_mse.mean()),
            "val_log10_kappa_mse": float(kap_mse.mean()),
            "baseline_source_mse": float(((batch.source - mean_src) ** 2).mean()),
            "baseline_log10_kappa_mse": float(((log_kappa - mean_eta) ** 2).mean()),
        }


def train_rim(
    preset: Preset,
    out_dir: str | Path,
    *,
    resume: bool = False,
    settings: dict | None = None,
    device=None,
    init_from: str | Path | None = None,
    progress: bool = True,
) -> TrainResult | None:
    """``rimlens train``: train a RIM (joining the ``torchrun`` process group when there is one).

    ``settings`` override training settings of ``preset``; on ``--resume`` the checkpoint's
    configuration wins except for :attr:`TrainConfig.RESUME_OVERRIDES`. Returns the result on
    rank 0, ``None`` on other ranks.
    """
    settings = settings or {}
    refuse_resume_changes(resume, settings, TrainConfig.RESUME_OVERRIDES)
    preset = with_train_settings(preset, settings)
    backend = "nccl" if torch.cuda.is_available() and str(device) != "cpu" else "gloo"
    with process_group(backend) as (rank, _):
        trainer = Trainer(preset, out_dir, resume=resume, device=device, init_from=init_from, progress=progress)
        if resume:
            allowed = {k: v for k, v in settings.items() if k in type(trainer.cfg).RESUME_OVERRIDES}
            trainer.preset = with_train_settings(trainer.preset, allowed)
            trainer.cfg = trainer.preset.train
        result = trainer.train()
        del trainer  # the DDP model must go before its process group does
    return result if rank == 0 else None
