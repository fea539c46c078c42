"""Checkpoints: written atomically, carrying their full configuration, loaded all-or-nothing.

A checkpoint is a ``torch.save`` dict: ``format``, ``preset`` (JSON: grids, data, model and
training configuration), ``model`` (state dict), and for training checkpoints ``optimizer``,
``step``, ``best_val``, ``history``, ``elapsed_s``. The configuration alone rebuilds the model.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from rimlens.config import Preset, preset_from_json
from rimlens.errors import RimlensInputError
from rimlens.io.atomic import atomic_path

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


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint dict, with clear errors for corrupt or foreign files."""
    path = resolve_model_path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated / foreign files
        raise RimlensInputError(f"{path} is not a readable checkpoint (corrupt or truncated?): {type(exc).__name__}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt or "preset" not in ckpt:
        raise RimlensInputError(f"{path} is not a rimlens checkpoint")
    return ckpt


def build_model(preset: Preset):
    """A fresh RIM for a preset (its ``model`` table is a RIMConfig)."""
    from rimlens.inference.rim import RIM, rim_config_from_dict

    return RIM(rim_config_from_dict(preset.model), preset.grid)


def load_model(path: str | Path = DEFAULT_MODEL, map_location="cpu"):
    """Rebuild a RIM from a checkpoint alone. All-or-nothing: an incompatible state dict raises
    :class:`RimlensInputError` and no partially loaded model is returned.

    Returns:
        ``(model in eval mode, preset, checkpoint dict)``.
    """
    ckpt = load_checkpoint(path, map_location)
    try:
        preset = preset_from_json(ckpt["preset"])
        model = build_model(preset)
    except (RimlensInputError, TypeError, ValueError, KeyError) as exc:
        raise RimlensInputError(f"checkpoint {path} has an unusable configuration: {exc}") from None
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise RimlensInputError(f"checkpoint {path} does not match its model configuration: {first}") from None
    model.eval()
    return model, preset, ckpt


def export_model(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "best.pt") -> Path:
    """Package a training run for distribution: ``model.pt`` (weights + configuration + history, no
    optimizer state), ``metrics.csv``, ``training_curve.png`` and ``validation.json`` (the metrics of
    the exported checkpoint and of the mean-map baseline, and how long it trained)."""
    import json
    import shutil

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    ckpt = load_checkpoint(run_dir / checkpoint)
    load_model(run_dir / checkpoint)  # all-or-nothing check before writing anything
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {k: v for k, v in ckpt.items() if k not in ("format", "optimizer")}
    save_checkpoint(out_dir / "model.pt", payload)
    history = json.loads(ckpt.get("history", "[]"))
    best = min(history, key=lambda h: h["val_loss"]) if history else {}
    summary = {"checkpoint": checkpoint, "step": ckpt.get("step"), "elapsed_s": ckpt.get("elapsed_s"),
               "validation": best, "preset": json.loads(ckpt["preset"])}
    with atomic_path(out_dir / "validation.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    for name in ("metrics.csv", "training_curve.png"):
        if (run_dir / name).exists():
            with atomic_path(out_dir / name) as tmp:
                shutil.copyfile(run_dir / name, tmp)
    return out_dir / "model.pt"
