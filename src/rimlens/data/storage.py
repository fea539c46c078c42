"""HDF5 storage of simulated lenses, resumable generation, and torch datasets.

File layout (format ``rimlens-lenses-1``): datasets ``observation``, ``source``, ``kappa``, ``psf``
(``n x 1 x N x N`` / ``n x 1 x K x K`` float32), ``psf_fwhm``, ``noise_sigma``, ``snr``, ``theta_e``
(``(n,)``), ``source_family``, ``kappa_family`` (strings); attributes ``format``, ``preset`` (JSON
of the full configuration), ``seed``, ``count``, ``split``, ``noise``, ``rimlens_version``, grid
descriptions, and the validation statistics.

Generation is split in blocks; block ``b`` depends only on ``(seed, b)``. Each finished block is
written atomically to ``FILE.parts/`` and the final file is assembled atomically at the end, so a
killed run resumes where it stopped and produces exactly the file an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from rimlens import __version__
from rimlens.config import Preset, get_preset, preset_from_json
from rimlens.data.lenses import REJECTION_REASONS, LensBatch, LensGenerator
from rimlens.data.random import child_rng
from rimlens.errors import RimlensInputError
from rimlens.io.atomic import atomic_path, claim_work_folder
from rimlens.io.figures import lens_panels

__all__ = [
    "LensDataset",
    "SimulationSummary",
    "generate_dataset",
    "open_lens_file",
    "read_lenses",
    "show_lenses",
    "simulate_lenses",
]

FORMAT = "rimlens-lenses-1"
ARRAYS = ("observation", "source", "kappa", "psf", "psf_fwhm", "noise_sigma", "snr", "theta_e", "shear")
OPTIONAL = ("shear",)  # absent from files written before it existed: read as zeros (no external shear)
STRINGS = ("source_family", "kappa_family")


def _write_batch(h5: h5py.File, batch: LensBatch, compression: str | None = "gzip") -> None:
    for k in ARRAYS:
        a = getattr(batch, k).detach().cpu().numpy().astype(np.float32)
        chunks = (1, *a.shape[1:]) if a.ndim > 1 else None
        h5.create_dataset(k, data=a, chunks=chunks, compression=compression if a.ndim > 1 else None)
    for k in STRINGS:
        h5.create_dataset(k, data=np.asarray(getattr(batch, k), dtype="S"))


def _read_arrays(h5: h5py.File, sl=slice(None)) -> dict:
    out = {k: h5[k][sl] for k in ARRAYS + STRINGS if k in h5}
    if "shear" not in out:
        out["shear"] = np.zeros((*np.shape(out["snr"]), 2), dtype=np.float32)
    return out


def generate_dataset(
    path: str | Path,
    preset: Preset,
    count: int,
    seed: int,
    *,
    split: str = "train",
    noise: str | None = None,
    block_size: int = 64,
    progress: bool = True,
    bank_seed: int | None = None,
) -> Path:
    """Generate ``count`` validated lenses into ``path`` (resumable; see module docstring).

    Returns:
        The path of the finished file.
    """
    path = Path(path)
    if count < 1:
        raise RimlensInputError(f"count must be >= 1, got {count}")
    parts = path.with_name(path.name + ".parts")
    settings = {
        "preset": preset.to_json(),
        "count": count,
        "seed": seed,
        "split": split,
        "noise": noise or preset.data.noise,
        "block_size": block_size,
        "bank_seed": seed if bank_seed is None else bank_seed,
    }
    # build the generator first: a configuration error must not leave a parts folder behind
    gen = LensGenerator(preset, split=split, bank_seed=settings["bank_seed"], noise=settings["noise"])
    claim_work_folder(parts, settings, "simulation")
    n_blocks = -(-count // block_size)
    bar = tqdm(total=count, unit="lens", disable=not progress, desc=f"simulating {path.name}")
    for b in range(n_blocks):
        size = min(block_size, count - b * block_size)
        block = parts / f"block_{b:06d}.h5"
        if block.exists():
            bar.update(size)
            continue
        gen.rejections.clear()
        gen.n_drawn = 0
        batch = gen.draw(child_rng(seed, b), size)
        with atomic_path(block) as tmp, h5py.File(tmp, "w") as h5:
            _write_batch(h5, batch, compression=None)
            for k, v in gen.stats().items():
                h5.attrs[k] = v
        bar.update(size)
    bar.close()
    _assemble(path, parts, n_blocks, settings, preset)
    shutil.rmtree(parts)
    return path


@dataclass
class SimulationSummary:
    """What :func:`simulate_lenses` wrote: lenses kept, candidates drawn and rejections by reason."""

    path: Path
    count: int
    drawn: int
    rejected: dict[str, int] = field(default_factory=dict)


def _mix(name: str, weights: dict | None) -> dict | None:
    if not weights:
        return None
    bad = {
        k: v
        for k, v in weights.items()
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf")
    }
    if bad:
        raise RimlensInputError(f"--{name.replace('_', '-')} weights must be finite numbers >= 0, got {bad}")
    return {k: float(v) for k, v in weights.items()}


def simulate_lenses(
    path: str | Path,
    preset_name: str,
    count: int,
    seed: int,
    *,
    split: str = "train",
    noise: str | None = None,
    block_size: int = 64,
    kappa_mix: dict | None = None,
    source_mix: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SimulationSummary:
    """``rimlens simulate``: :func:`generate_dataset` for a named preset, with optional family mixes
    (``{family: weight}``), refusing to replace a finished file unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise RimlensInputError(f"{path} exists; pass --overwrite to replace it")
    preset = get_preset(preset_name)
    mixes = {
        k: v
        for k, v in (("kappa_mix", _mix("kappa_mix", kappa_mix)), ("source_mix", _mix("source_mix", source_mix)))
        if v is not None
    }
    if mixes:
        preset = dataclasses.replace(preset, data=dataclasses.replace(preset.data, **mixes))
    generate_dataset(path, preset, count, seed, split=split, noise=noise, block_size=block_size, progress=progress)
    with open_lens_file(path) as h5:
        attrs = dict(h5.attrs)
    rejected = {k[len("stats_rejected_") :]: int(v) for k, v in attrs.items() if k.startswith("stats_rejected_")}
    return SimulationSummary(path, count, int(attrs["stats_drawn"]), rejected)


def show_lenses(path: str | Path, out_png: str | Path | None = None, start: int = 0, count: int = 4) -> Path:
    """``rimlens show``: a PNG of lenses ``start .. start + count - 1`` of a lens file (observation,
    source, log10 kappa, with SNR, Einstein radius and families). Returns the PNG's path."""
    path = Path(path)
    d = read_lenses(path, slice(start, start + count))
    grid = d["preset"].grid
    rows = [
        {
            "observation": d["observation"][i, 0],
            "source": d["source"][i, 0],
            "kappa": d["kappa"][i, 0],
            "image_scale": grid.image_grid.pixel_scale_arcsec,
            "source_scale": grid.source_grid.pixel_scale_arcsec,
            "title": f'#{start + i}  SNR {d["snr"][i]:.0f}  $\\theta_E$ {d["theta_e"][i]:.2f}"  '
            f"({d['kappa_family'][i].decode()}, {d['source_family'][i].decode()})",
        }
        for i in range(len(d["snr"]))
    ]
    if not rows:
        raise RimlensInputError(f"{path} has no lens at index {start}")
    out_png = Path(out_png) if out_png is not None else path.with_suffix(".png")
    return lens_panels(rows, out_png)


def _assemble(path: Path, parts: Path, n_blocks: int, settings: dict, preset: Preset) -> None:
    stats = {"drawn": 0, **{f"rejected_{k}": 0 for k in REJECTION_REASONS}}
    data = {k: [] for k in ARRAYS + STRINGS}
    for b in range(n_blocks):
        with h5py.File(parts / f"block_{b:06d}.h5", "r") as h5:
            for k, v in _read_arrays(h5).items():
                data[k].append(v)
            for k in stats:
                stats[k] += int(h5.attrs[k])
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        for k in ARRAYS:
            a = np.concatenate(data[k])
            h5.create_dataset(
                k,
                data=a,
                chunks=((1, *a.shape[1:])) if a.ndim > 1 else None,
                compression="gzip" if a.ndim > 1 else None,
            )
        for k in STRINGS:
            h5.create_dataset(k, data=np.concatenate(data[k]))
        grid = preset.grid
        h5.attrs.update(
            {
                "format": FORMAT,
                "rimlens_version": __version__,
                "preset": settings["preset"],
                "preset_name": preset.name,
                "seed": settings["seed"],
                "count": settings["count"],
                "split": settings["split"],
                "noise": settings["noise"],
                "bank_seed": settings["bank_seed"],
                "image_grid": json.dumps(grid.image_grid.as_dict()),
                "source_grid": json.dumps(grid.source_grid.as_dict()),
                "conventions": "B x 1 x N x N, row 0 at the bottom (FITS order), x along columns; arcsec",
                **{f"stats_{k}": v for k, v in stats.items()},
            }
        )


def open_lens_file(path: str | Path) -> h5py.File:
    """Open a rimlens lens file read-only, with clear errors for missing, truncated or foreign files."""
    path = Path(path)
    if not path.exists():
        raise RimlensInputError(f"no such file: {path}")
    try:
        h5 = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise RimlensInputError(f"{path} is not a readable HDF5 file (truncated or corrupt?): {exc}") from None
    if h5.attrs.get("format") != FORMAT:
        h5.close()
        raise RimlensInputError(f"{path} is not a rimlens lens file (format attribute {FORMAT!r} missing)")
    missing = [k for k in ARRAYS + STRINGS if k not in h5 and k not in OPTIONAL]
    n = {h5[k].shape[0] for k in ARRAYS + STRINGS if k in h5}
    if missing or len(n) != 1 or n.pop() != int(h5.attrs["count"]):
        h5.close()
        raise RimlensInputError(
            f"{path} is incomplete or inconsistent (missing {missing or 'nothing'}, lengths differ)"
        )
    return h5


def read_lenses(path: str | Path, index=slice(None)) -> dict:
    """Arrays of a lens file (``index`` selects examples) plus its ``attrs`` and ``preset``."""
    with open_lens_file(path) as h5:
        out = _read_arrays(h5, index)
        out["attrs"] = dict(h5.attrs)
    out["preset"] = preset_from_json(out["attrs"]["preset"])
    return out


class LensDataset(Dataset):
    """A lens file as a torch Dataset of dicts of tensors (``observation``, ``source``, ``kappa``,
    ``psf``, ``noise_sigma``, ...). The HDF5 file is opened lazily in each worker."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open_lens_file(self.path) as h5:
            self.length = int(h5.attrs["count"])
            self.preset = preset_from_json(h5.attrs["preset"])
        self._h5 = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if self._h5 is None:
            self._h5 = h5py.File(self.path, "r")
        out = {k: torch.as_tensor(self._h5[k][i]) for k in ARRAYS if k in self._h5}
        out.setdefault("shear", torch.zeros(2))
        return out

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_h5"] = None
        return state
