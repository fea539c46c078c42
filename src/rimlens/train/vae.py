"""Training of the source and log10-kappa VAEs (``rimlens train-vae {source,kappa}``).

Data are drawn on the fly from the preset's non-VAE families (COSMOS + parametric sources; SIE,
SIE + substructure and particle-galaxy convergence maps rescaled to the Einstein-radius range),
deterministically per step, so resume is exact. Adam with a staircase decay and gradient clipping
by value, as the paper. Checkpoints are atomic and carry their configuration.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from rimlens.config import Preset, VAEConfig, VAETrainConfig, from_dict, get_preset, preset_from_json
from rimlens.data.lenses import LensGenerator
from rimlens.data.random import child_rng
from rimlens.errors import RimlensInputError
from rimlens.nn.vae import VAE, default_vae_config
from rimlens.physics.convergence import log10_kappa
from rimlens.train.loop import TrainingLoop, TrainResult, previous_run, refuse_resume_changes

__all__ = ["VAETrainer", "draw_vae_batch", "train_vae"]


def draw_vae_batch(gen: LensGenerator, kind: str, rng: np.random.Generator, n: int) -> torch.Tensor:
    """Training maps ``n x 1 x N x N``: peak-normalised sources, or log10 kappa maps."""
    if kind == "source":
        weights = {k: v for k, v in gen.source_weights.items() if k != "vae"}
        fam = gen._families(rng, {k: v / sum(weights.values()) for k, v in weights.items()}, n)
        return gen._sources(rng, fam)
    weights = {k: v for k, v in gen.kappa_weights.items() if k != "vae"}
    fam = gen._families(rng, {k: v / sum(weights.values()) for k, v in weights.items()}, n)
    kappa, _ = gen._kappas(rng, fam)
    return log10_kappa(kappa)


class VAETrainer(TrainingLoop):
    """Train one VAE (``kind`` 'source' or 'kappa') into ``out_dir`` (``latest.pt``, ``best.pt``,
    ``metrics.csv``); ``train`` overrides :class:`rimlens.config.VAETrainConfig` settings."""

    def __init__(
        self,
        kind: str,
        preset: Preset,
        out_dir: str | Path,
        resume: bool = False,
        train: dict | None = None,
        progress: bool = True,
    ):
        super().__init__(out_dir, progress)
        ckpt = previous_run(self.out_dir, resume)
        if ckpt is not None:
            kind, preset, train = ckpt["kind"], preset_from_json(ckpt["preset"]), json.loads(ckpt["train"])
        self.kind, self.preset = kind, preset
        self.desc = f"{kind} VAE"
        self.cfg: VAETrainConfig = from_dict(VAETrainConfig, train or {})
        self.vae_cfg = (
            default_vae_config(kind, preset) if ckpt is None else from_dict(VAEConfig, json.loads(ckpt["vae"]))
        )
        torch.manual_seed(self.cfg.seed)
        self.model: VAE = VAE(self.vae_cfg)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.cfg.learning_rate)
        self.restore(ckpt)
        self.gen = LensGenerator(preset, split="train", bank_seed=self.cfg.seed)
        self.val = draw_vae_batch(
            LensGenerator(preset, split="test", bank_seed=self.cfg.seed),
            kind,
            child_rng(self.cfg.seed, 10**6),
            self.cfg.val_size,
        )
        # maps from the training distribution (training galaxies and banks), for the reconstruction check
        self.train_probe = draw_vae_batch(self.gen, kind, child_rng(self.cfg.seed, 3), self.cfg.val_size)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def batches(self, start: int):
        return (
            draw_vae_batch(self.gen, self.kind, child_rng(self.cfg.seed, 2, s), self.cfg.batch_size)
            for s in range(start, self.cfg.max_steps)
        )

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        self.model.train()
        torch.manual_seed(self.cfg.seed * 1_000_003 + self.step)  # reparametrisation noise, exact on resume
        return self.model.loss(batch, self.step)[0]

    def clip_gradients(self, norms: list[torch.Tensor]) -> None:
        torch.nn.utils.clip_grad_value_(self.model.parameters(), self.cfg.clip_value)

    def checkpoint_extras(self) -> dict:
        return {
            "kind": self.kind,
            "preset": self.preset.to_json(),
            "vae": json.dumps(dataclasses.asdict(self.vae_cfg)),
            "train": json.dumps(dataclasses.asdict(self.cfg)),
        }

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss and its terms, and the reconstruction error of held-out and training maps
        against the mean-map error."""
        self.model.eval()
        torch.manual_seed(0)
        loss, terms = self.model.loss(self.val, self.step)
        out = {"val_loss": float(loss), **terms}
        for name, x in (("val", self.val), ("train", self.train_probe)):
            mu, _, _ = self.model.encode(x)
            out[f"{name}_reconstruction_error"] = float(((self.model.decode(mu) - x) ** 2).sum(dim=(1, 2, 3)).mean())
            out[f"{name}_mean_map_error"] = float(((x - x.mean(0, keepdim=True)) ** 2).sum(dim=(1, 2, 3)).mean())
        self.model.train()
        return out


def train_vae(
    kind: str,
    preset_name: str,
    out_dir: str | Path,
    *,
    resume: bool = False,
    settings: dict | None = None,
    progress: bool = True,
) -> tuple[VAETrainer, TrainResult]:
    """``rimlens train-vae``: train (or, with ``resume``, continue) a VAE. On resume the checkpoint's
    configuration wins except for :attr:`VAETrainConfig.RESUME_OVERRIDES`."""
    settings = settings or {}
    refuse_resume_changes(resume, settings, VAETrainConfig.RESUME_OVERRIDES)
    trainer = VAETrainer(
        kind, get_preset(preset_name), out_dir, resume=resume, train=None if resume else settings, progress=progress
    )
    if resume and trainer.kind != kind:
        raise RimlensInputError(f"{out_dir} holds a {trainer.kind} VAE run, not a {kind} one")
    if resume and settings:
        allowed = {k: v for k, v in settings.items() if k in VAETrainConfig.RESUME_OVERRIDES}
        trainer.cfg = from_dict(VAETrainConfig, {**dataclasses.asdict(trainer.cfg), **allowed})
    return trainer, trainer.train()
