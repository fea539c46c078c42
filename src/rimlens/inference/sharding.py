"""Resumable work split over processes: the pattern behind ``predict`` and ``evaluate``.

Work on ``n`` items is cut into chunks; each chunk's result (a dict of numpy arrays) is written
atomically to ``parts/chunk_<start>_<size>.h5`` as soon as it is done, so a killed run resumes
without redoing finished chunks. Under ``torchrun`` (torch.distributed initialised) rank ``r`` of
``W`` takes chunks ``c`` with ``c mod W = r``; once every rank is done rank 0 reads every chunk back.
An error on one rank (in ``compute``, or rank 0 refusing the work folder) ends every rank: the
others raise :class:`rimlens.distributed.RankFailedError` instead of waiting at a barrier for ever.

The process-group helpers live in :mod:`rimlens.distributed`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from rimlens.distributed import collective_failure, rank_and_world
from rimlens.io.atomic import atomic_path, claim_work_folder

__all__ = ["run_chunks"]


def run_chunks(
    n: int,
    chunk_size: int,
    parts: str | Path,
    settings: dict,
    compute: Callable[[int, int], dict],
    what: str = "run",
    progress: bool = True,
    desc: str = "working",
) -> list[dict] | None:
    """Compute ``compute(start, stop)`` for every chunk of ``range(n)``, resumably and sharded.

    Args:
        n: number of items; chunk_size: items per chunk (the last may be shorter).
        parts: work folder; it is claimed with ``settings`` (a folder left by other settings is refused).
        compute: returns a dict of arrays for items ``start:stop`` (first axis = item unless the
            caller concatenates otherwise).

    Returns:
        On rank 0 the list of chunk results in item order; ``None`` on other ranks. The folder is
        left in place: the caller removes it once its final product is written.

    Raises:
        Whatever ``compute`` (or the claim of ``parts``) raised, on the rank where it was raised,
        once every rank has finished its own chunks; :class:`rimlens.distributed.RankFailedError`
        on the other ranks. Chunks finished before the error are kept for a resumed run.
    """
    rank, world = rank_and_world()
    parts = Path(parts)
    with collective_failure(f"{what} (work folder {parts})"):  # also the barrier before any chunk
        if rank == 0:
            claim_work_folder(parts, settings, what)
    starts = list(range(0, n, chunk_size))
    mine = [s for c, s in enumerate(starts) if c % world == rank]
    with collective_failure(what):  # also the barrier before rank 0 reads the chunks back
        for start in tqdm(mine, disable=not progress or rank != 0, desc=desc, unit="chunk"):
            path = parts / f"chunk_{start:09d}_{chunk_size}.h5"
            if path.exists():
                continue
            result = compute(start, min(start + chunk_size, n))
            with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
                for key, value in result.items():
                    f.create_dataset(key, data=np.asarray(value))
    if rank != 0:
        return None
    out = []
    for start in starts:
        with h5py.File(parts / f"chunk_{start:09d}_{chunk_size}.h5", "r") as f:
            out.append({k: f[k][()] for k in f})
    return out
