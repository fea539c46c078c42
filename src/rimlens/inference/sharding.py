"""Resumable work split over processes: the pattern behind ``predict`` and ``evaluate``, and the
process-group set-up every ``torchrun``-aware command shares.

Work on ``n`` items is cut into chunks; each chunk's result (a dict of numpy arrays) is written
atomically to ``parts/chunk_<start>_<size>.h5`` as soon as it is done, so a killed run resumes
without redoing finished chunks. Under ``torchrun`` (torch.distributed initialised) rank ``r`` of
``W`` takes chunks ``c`` with ``c mod W = r``; after a barrier rank 0 reads every chunk back.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from rimlens.io.atomic import atomic_path, claim_work_folder


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def process_group(backend: str = "gloo"):
    """Join the ``torchrun`` process group for the duration of a command (a no-op in a plain run or
    when a group already exists); the group is destroyed on exit, also on errors."""
    import torch.distributed as dist

    started = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if started:
        dist.init_process_group(backend)
    try:
        yield rank_and_world()
    finally:
        if started:
            dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def run_chunks(n: int, chunk_size: int, parts: str | Path, settings: dict, compute: Callable[[int, int], dict],
               what: str = "run", progress: bool = True, desc: str = "working") -> list[dict] | None:
    """Compute ``compute(start, stop)`` for every chunk of ``range(n)``, resumably and sharded.

    Args:
        n: number of items; chunk_size: items per chunk (the last may be shorter).
        parts: work folder; it is claimed with ``settings`` (a folder left by other settings is refused).
        compute: returns a dict of arrays for items ``start:stop`` (first axis = item unless the
            caller concatenates otherwise).

    Returns:
        On rank 0 the list of chunk results in item order; ``None`` on other ranks. The folder is
        left in place: the caller removes it once its final product is written.
    """
    from tqdm import tqdm

    rank, world = rank_and_world()
    parts = Path(parts)
    if rank == 0:
        claim_work_folder(parts, settings, what)
    barrier()
    starts = list(range(0, n, chunk_size))
    mine = [s for c, s in enumerate(starts) if c % world == rank]
    for start in tqdm(mine, disable=not progress or rank != 0, desc=desc, unit="chunk"):
        path = parts / f"chunk_{start:09d}_{chunk_size}.h5"
        if path.exists():
            continue
        result = compute(start, min(start + chunk_size, n))
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                for key, value in result.items():
                    f.create_dataset(key, data=np.asarray(value))
    barrier()
    if rank != 0:
        return None
    out = []
    for start in starts:
        with h5py.File(parts / f"chunk_{start:09d}_{chunk_size}.h5", "r") as f:
            out.append({k: f[k][()] for k in f})
    return out
