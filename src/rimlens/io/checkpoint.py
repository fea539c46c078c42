"""Checkpoints: written atomically, carrying their full configuration, loaded all-or-nothing.

A checkpoint is a ``torch.save`` dict (read back with ``weights_only=True``: no pickled code):
``format``, ``model`` (state dict) and the JSON configuration that alone rebuilds the network —
``preset`` (grids, data, model and training) for a RIM; ``kind``, ``vae`` and ``train`` for a VAE —
and for training checkpoints ``optimizer``, ``step``, ``best_val``, ``history``, ``elapsed_s``.
This module is the one place that reads and writes them, for every layer above ``nn``.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import torch

from rimlens.config import VAEConfig, from_dict, preset_from_json
from rimlens.errors import RimlensInputError
from rimlens.io.atomic import atomic_path
from rimlens.nn.rim import RIM
from rimlens.nn.vae import VAE

__all__ = [
    "DEFAULT_MODEL",
    "default_model_path",
    "export_model",
    "load_checkpoint",
    "load_model",
    "load_vae",
    "resolve_model_path",
    "save_checkpoint",
    "shipped_vae_path",
]

FORMAT = "rimlens-checkpoint-1"
DEFAULT_MODEL = "default"


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Atomically write a checkpoint dict (adds the format marker)."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)


def default_model_path() -> Path:
    """Path of the model shipped with rimlens (trained on the cpu64 preset)."""
    with resources.as_file(resources.files("rimlens") / "models" / "cpu64" / "model.pt") as p:
        return Path(p)


def resolve_model_path(path: str | Path) -> Path:
    """``default`` -> the shipped model; a folder -> its ``best.pt`` (else ``latest.pt``/``model.pt``)."""
    if str(path) == DEFAULT_MODEL:
        path = default_model_path()
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "model.pt", "latest.pt"):
            if (path / name).exists():
                return path / name
        raise RimlensInputError(f"{path} holds no checkpoint (best.pt, model.pt or latest.pt)")
    if not path.exists():
        raise RimlensInputError(f"no such checkpoint: {path}")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint dict, with clear errors for corrupt or foreign files."""
    path = resolve_model_path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated / foreign files
        raise RimlensInputError(
            f"{path} is not a readable checkpoint (corrupt or truncated?): {type(exc).__name__}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt or "preset" not in ckpt:
        raise RimlensInputError(f"{path} is not a rimlens checkpoint")
    return ckpt


def load_model(path: str | Path = DEFAULT_MODEL, map_location: str | torch.device = "cpu") -> RIM:
    """Rebuild a RIM from a checkpoint alone (``'default'``: the shipped model; a run folder: its
    ``best.pt``). All-or-nothing: an incompatible state dict raises :class:`RimlensInputError` and
    no partially loaded model is returned.

    Returns:
        the RIM in eval mode; ``model.preset`` is its whole configuration and
        ``model.checkpoint_path`` the file read.
    """
    path = resolve_model_path(path)
    ckpt = load_checkpoint(path, map_location)
    try:
        model = RIM.from_preset(preset_from_json(ckpt["preset"]))
    except (RimlensInputError, TypeError, ValueError, KeyError) as exc:
        raise RimlensInputError(f"checkpoint {path} has an unusable configuration: {exc}") from None
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise RimlensInputError(f"checkpoint {path} does not match its model configuration: {first}") from None
    model.checkpoint_path = path
    return model.eval()


def shipped_vae_path(kind: str) -> Path:
    """Path of the VAE (``kind`` 'source' or 'kappa') shipped with the default model."""
    if kind not in ("source", "kappa"):
        raise RimlensInputError(f"VAE kind must be 'source' or 'kappa', got {kind!r}")
    path = default_model_path().parent / f"vae_{kind}.pt"  # shipped beside the default RIM
    if not path.exists():
        raise RimlensInputError(
            f"no {kind} VAE is shipped with this version; pass one (train it with `rimlens train-vae {kind}`)"
        )
    return path


def load_vae(path: str | Path | None, kind: str | None = None) -> VAE:
    """A VAE in eval mode from a VAE checkpoint (all-or-nothing); ``vae.kind`` says which.

    ``path`` None or ``'default'`` loads the shipped VAE of ``kind``; a given ``kind`` is checked.
    """
    if path is None or str(path) == "default":
        if kind is None:
            raise RimlensInputError("load_vae('default') needs kind='source' or 'kappa'")
        path = shipped_vae_path(kind)
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
        raise RimlensInputError(
            f"VAE checkpoint {path} does not match its configuration: {str(exc).splitlines()[0]}"
        ) from None
    model.kind = ckpt["kind"]
    return model.eval()


def export_model(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "best.pt") -> Path:
    """Package a training run for distribution: ``model.pt`` (weights + configuration + history, no
    optimizer state), ``metrics.csv``, ``training_curve.png`` and ``validation.json`` (the metrics of
    the exported checkpoint and of the mean-map baseline, and how long it trained)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    ckpt = load_checkpoint(run_dir / checkpoint)
    load_model(run_dir / checkpoint)  # all-or-nothing check before writing anything
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {k: v for k, v in ckpt.items() if k not in ("format", "optimizer", "ema")}
    if "ema" in ckpt:  # a latest.pt of a run with a weight average: export the average, as best.pt holds it
        payload["model"] = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k != "n_averaged"}
    save_checkpoint(out_dir / "model.pt", payload)
    load_model(out_dir / "model.pt")  # the exported weights rebuild the model
    history = json.loads(ckpt.get("history", "[]"))
    # the evaluation of the exported weights (a run may select best.pt on another metric than val_loss)
    same_step = [h for h in history if h.get("step") == ckpt.get("step")]
    best = same_step[-1] if same_step else min(history, key=lambda h: h["val_loss"]) if history else {}
    summary = {
        "checkpoint": checkpoint,
        "step": ckpt.get("step"),
        "elapsed_s": ckpt.get("elapsed_s"),
        "validation": best,
        "preset": json.loads(ckpt["preset"]),
    }
    with atomic_path(out_dir / "validation.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    for name in ("metrics.csv", "training_curve.png"):
        if (run_dir / name).exists():
            with atomic_path(out_dir / name) as tmp:
                shutil.copyfile(run_dir / name, tmp)
    return out_dir / "model.pt"
