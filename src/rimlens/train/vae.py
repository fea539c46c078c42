"""Training of the source and log10-kappa VAEs (``rimlens train-vae {source,kappa}``).

Data are drawn on the fly from the preset's non-VAE families (COSMOS + parametric sources; SIE,
SIE + substructure and particle-galaxy convergence maps rescaled to the Einstein-radius range),
deterministically per step, so resume is exact. Adam with a staircase decay and gradient clipping
by value, as the paper. Checkpoints are atomic and carry their configuration.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rimlens.config import Preset, from_dict, preset_from_json
from rimlens.data.lenses import LensGenerator
from rimlens.data.random import child_rng
from rimlens.errors import RimlensInputError
from rimlens.io.atomic import atomic_path
from rimlens.nn.vae import KAPPA_VAE, SOURCE_VAE, VAE, VAEConfig
from rimlens.train.checkpoint import load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class VAETrainConfig:
    batch_size: int = 20
    learning_rate: float = 1e-4
    decay_rate: float = 0.5
    decay_steps: int = 30_000
    clip_value: float = 10.0
    max_steps: int = 20_000
    max_minutes: float = 0.0
    val_size: int = 64
    val_every: int = 500
    seed: int = 0

    RESUME_OVERRIDES = ("max_steps", "max_minutes", "learning_rate")  # what a resumed run may change


def default_vae_config(kind: str, preset: Preset) -> VAEConfig:
    if kind not in ("source", "kappa"):
        raise RimlensInputError(f"VAE kind must be 'source' or 'kappa', got {kind!r}")
    base = SOURCE_VAE if kind == "source" else KAPPA_VAE
    n = preset.grid.source_pixels if kind == "source" else preset.grid.image_pixels
    cfg = VAEConfig(image_pixels=n, **base)
    # The reconstruction term sums over pixels, so on an N-pixel grid it is (N/128)^2 of the paper's;
    # scale beta alike to keep the paper's balance (at 32 px the unscaled KL weight collapses the
    # posterior and the VAE returns the mean map).
    f = (n / 128) ** 2
    return dataclasses.replace(cfg, beta_start=cfg.beta_start * f, beta_end=cfg.beta_end * f)


def draw_vae_batch(gen: LensGenerator, kind: str, rng: np.random.Generator, n: int) -> torch.Tensor:
    """Training maps: peak-normalised sources, or log10 kappa maps."""
    if kind == "source":
        weights = {k: v for k, v in gen.source_weights.items() if k != "vae"}
        fam = gen._families(rng, {k: v / sum(weights.values()) for k, v in weights.items()}, n)
        return gen._sources(rng, fam)
    weights = {k: v for k, v in gen.kappa_weights.items() if k != "vae"}
    fam = gen._families(rng, {k: v / sum(weights.values()) for k, v in weights.items()}, n)
    kappa, _ = gen._kappas(rng, fam)
    return torch.log10(kappa.clamp_min(1e-4))


class VAETrainer:
    """Train one VAE into ``out_dir`` (``latest.pt``, ``best.pt``, ``metrics.csv``)."""

    def __init__(self, kind: str, preset: Preset, out_dir, resume: bool = False, train: dict | None = None,
                 progress: bool = True):
        self.out_dir = Path(out_dir)
        latest = self.out_dir / "latest.pt"
        ckpt = None
        if resume:
            if not latest.exists():
                raise RimlensInputError(f"--resume: no checkpoint {latest}")
            ckpt = load_checkpoint(latest)
            kind = ckpt["kind"]
            preset = preset_from_json(ckpt["preset"])
            train = json.loads(ckpt["train"])
        elif latest.exists():
            raise RimlensInputError(f"{self.out_dir} already holds a run; use --resume or another --out")
        self.kind, self.preset, self.progress = kind, preset, progress
        self.cfg = from_dict(VAETrainConfig, train or {})
        self.vae_cfg = default_vae_config(kind, preset) if ckpt is None else from_dict(VAEConfig, json.loads(ckpt["vae"]))
        torch.manual_seed(self.cfg.seed)
        self.model = VAE(self.vae_cfg)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.cfg.learning_rate)
        self.step, self.best, self.history = 0, float("inf"), []
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.step, self.best = int(ckpt["step"]), float(ckpt["best_val"])
            self.history = json.loads(ckpt["history"])
        self.gen = LensGenerator(preset, split="train", bank_seed=self.cfg.seed)
        self.val = draw_vae_batch(LensGenerator(preset, split="test", bank_seed=self.cfg.seed), kind,
                                  child_rng(self.cfg.seed, 10**6), self.cfg.val_size)
        # maps from the training distribution (training galaxies and banks), for the reconstruction check
        self.train_probe = draw_vae_batch(self.gen, kind, child_rng(self.cfg.seed, 3), self.cfg.val_size)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def _payload(self, with_optimizer=True) -> dict:
        p = {"kind": self.kind, "preset": self.preset.to_json(), "vae": json.dumps(dataclasses.asdict(self.vae_cfg)),
             "train": json.dumps(dataclasses.asdict(self.cfg)), "model": self.model.state_dict(), "step": self.step,
             "best_val": self.best, "history": json.dumps(self.history)}
        if with_optimizer:
            p["optimizer"] = self.optimizer.state_dict()
        return p

    @torch.no_grad()
    def evaluate(self) -> dict:
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

    def train(self) -> dict:
        from tqdm import tqdm

        cfg, t0 = self.cfg, time.time()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.progress, unit="step", desc=f"{self.kind} VAE")
        last = {}
        while self.step < cfg.max_steps:
            for g in self.optimizer.param_groups:
                g["lr"] = cfg.learning_rate * cfg.decay_rate ** (self.step // cfg.decay_steps)
            x = draw_vae_batch(self.gen, self.kind, child_rng(cfg.seed, 2, self.step), cfg.batch_size)
            torch.manual_seed(cfg.seed * 1_000_003 + self.step)  # reparametrisation noise, exact on resume
            loss, _ = self.model.loss(x, self.step)
            if not torch.isfinite(loss):  # stop before the weights are poisoned; the last checkpoints stay good
                bar.close()
                raise RimlensInputError(
                    f"{self.kind} VAE: the training loss became non-finite at step {self.step}; nothing from this step "
                    f"on was saved (best.pt keeps the best weights). Resume from {self.out_dir / 'latest.pt'} with a "
                    f"lower learning rate: --resume --set learning_rate=...")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_value_(self.model.parameters(), cfg.clip_value)
            self.optimizer.step()
            self.step += 1
            bar.update(1)
            timeout = cfg.max_minutes > 0 and time.time() - t0 > 60 * cfg.max_minutes
            if self.step % cfg.val_every == 0 or self.step >= cfg.max_steps or timeout:
                last = {"step": self.step, "train_loss": float(loss.detach()), **self.evaluate()}
                self.history.append(last)
                improved = last["val_loss"] < self.best
                if improved:
                    self.best = last["val_loss"]
                    save_checkpoint(self.out_dir / "best.pt", self._payload(False))
                save_checkpoint(self.out_dir / "latest.pt", self._payload())
                with atomic_path(self.out_dir / "metrics.csv") as tmp:
                    with open(tmp, "w", newline="") as fh:
                        w = csv.DictWriter(fh, fieldnames=list(self.history[-1]))
                        w.writeheader()
                        w.writerows(self.history)
            if timeout:
                break
        bar.close()
        save_checkpoint(self.out_dir / "latest.pt", self._payload())
        return last


def shipped_vae_path(kind: str) -> Path:
    """Path of the VAE (``kind`` 'source' or 'kappa') shipped with the default model."""
    from rimlens.train.checkpoint import default_model_path

    if kind not in ("source", "kappa"):
        raise RimlensInputError(f"VAE kind must be 'source' or 'kappa', got {kind!r}")
    path = default_model_path().parent / f"vae_{kind}.pt"  # shipped beside the default RIM
    if not path.exists():
        raise RimlensInputError(f"no {kind} VAE is shipped with this version; pass one (train it with "
                                f"`rimlens train-vae {kind}`)")
    return path


def load_vae(path, kind: str | None = None) -> tuple[VAE, str]:
    """``(VAE in eval mode, kind)`` from a VAE checkpoint (all-or-nothing).

    ``path`` None or ``'default'`` loads the shipped VAE of ``kind``; a given ``kind`` is checked.
    """
    if path is None or str(path) == "default":
        if kind is None:
            raise RimlensInputError("load_vae('default') needs kind='source' or 'kappa'")
        path = shipped_vae_path(kind)
    from rimlens.train.checkpoint import resolve_model_path

    path = resolve_model_path(path)
    ckpt = load_checkpoint(path)
    if "vae" not in ckpt or "kind" not in ckpt:
        raise RimlensInputError(f"{path} is not a VAE checkpoint")
    if kind is not None and ckpt["kind"] != kind:
        raise RimlensInputError(f"{path} is a {ckpt['kind']} VAE, but a {kind} VAE is needed")
    model = VAE(from_dict(VAEConfig, json.loads(ckpt["vae"])))
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        raise RimlensInputError(f"VAE checkpoint {path} does not match its configuration: {str(exc).splitlines()[0]}") from None
    return model.eval(), ckpt["kind"]


class VAESampler:
    """Training-data family drawn from trained VAEs (paper: 80% VAE, 20% real).

    ``sources(rng, n)``: ``relu(decoder(z)) / max``; ``kappas(rng, n)``: ``10 ** decoder(z)``
    (the lens generator then rescales them to the Einstein-radius range); ``z ~ N(0, I)`` drawn
    from the numpy generator, so data sets stay reproducible.
    """

    def __init__(self, source_vae_path=None, kappa_vae_path=None):
        self.source_vae = load_vae(source_vae_path, kind="source")[0] if source_vae_path else None
        self.kappa_vae = load_vae(kappa_vae_path, kind="kappa")[0] if kappa_vae_path else None

    @torch.no_grad()
    def sources(self, rng: np.random.Generator, n: int) -> torch.Tensor:
        if self.source_vae is None:
            raise RimlensInputError("no source VAE configured (data.source_vae)")
        z = torch.as_tensor(rng.standard_normal((n, self.source_vae.config.latent)), dtype=torch.float32)
        s = self.source_vae.decode(z).clamp_min(0)
        return s / s.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-6)

    @torch.no_grad()
    def kappas(self, rng: np.random.Generator, n: int) -> torch.Tensor:
        if self.kappa_vae is None:
            raise RimlensInputError("no kappa VAE configured (data.kappa_vae)")
        z = torch.as_tensor(rng.standard_normal((n, self.kappa_vae.config.latent)), dtype=torch.float32)
        return 10 ** self.kappa_vae.decode(z)
