"""The on-the-fly training stream: the one way rimlens feeds simulated lenses to a training loop.

The batch of training step ``t`` is the concatenation, over data shards ``k`` in ``shards``, of
``LensGenerator.draw(child_rng(seed, k, 0, t), shard_batch)``: a pure function of the step. Under
DDP with ``W`` processes rank ``r`` draws shard ``r``; one process emulates the same global batch
with shards ``0..W-1``. Hence resume is exact, a W-process run equals a one-process run with the
same global batch, and DataLoader workers can draw batches ahead of the model without changing them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from rimlens.data.lenses import LensBatch, LensGenerator
from rimlens.data.random import child_rng
from rimlens.errors import RimlensInputError

__all__ = ["StepBatches", "draw_step_batch", "step_batches"]


def draw_step_batch(
    generator: LensGenerator, seed: int, shards: Sequence[int], shard_batch: int, step: int
) -> LensBatch:
    """The training batch of ``step``: ``shard_batch`` lenses from each shard in ``shards``, each
    drawn from its own ``(seed, shard, 0, step)`` stream (``len(shards) * shard_batch`` lenses)."""
    parts = [generator.draw(child_rng(seed, k, 0, step), shard_batch) for k in shards]
    return LensBatch.concat(parts) if len(parts) > 1 else parts[0]


@dataclass
class _WorkerInputError:  # a worker's input error, carried to the main process as data (picklable)
    message: str


class StepBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``i`` is the batch of step ``start + i`` (:func:`draw_step_batch`)."""

    def __init__(
        self, generator: LensGenerator, seed: int, shards: Sequence[int], shard_batch: int, start: int, stop: int
    ):
        self.generator, self.seed, self.shards, self.shard_batch = generator, seed, list(shards), shard_batch
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __getitem__(self, i: int) -> LensBatch | _WorkerInputError:
        try:
            return draw_step_batch(self.generator, self.seed, self.shards, self.shard_batch, self.start + i)
        except RimlensInputError as exc:  # re-raised by the main process as the same one-line error
            return _WorkerInputError(str(exc))


def _keep_batch(batch):  # DataLoader collate for ready-made batches (module level: picklable)
    return batch


def _one_thread_worker(_):  # each worker draws with one thread: no oversubscription of the cores
    torch.set_num_threads(1)


class _Batches:
    """Iterator over step batches that re-raises worker input errors and can shut its workers down."""

    def __init__(self, source: Iterator):
        self._source = source

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> LensBatch:
        batch = next(self._source)
        if isinstance(batch, _WorkerInputError):
            raise RimlensInputError(batch.message)
        return batch

    def close(self) -> None:
        """End the DataLoader workers now (also on errors and early stops, not at garbage collection)."""
        shutdown = getattr(self._source, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def step_batches(
    generator: LensGenerator,
    seed: int,
    shards: Sequence[int],
    shard_batch: int,
    start: int,
    stop: int,
    workers: int = 0,
) -> _Batches:
    """Iterator over the batches of steps ``start .. stop - 1``; drawn by ``workers`` DataLoader
    processes ahead of the consumer when ``workers > 0`` (the same batches either way). Call
    ``.close()`` when done."""
    if workers == 0:
        return _Batches(draw_step_batch(generator, seed, shards, shard_batch, s) for s in range(start, stop))
    generator.prepare()  # built once here, shared by the forked workers (a bad mix fails here, in-process)
    data = StepBatches(generator, seed, shards, shard_batch, start, stop)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_keep_batch,
        worker_init_fn=_one_thread_worker,
        prefetch_factor=4,
        persistent_workers=False,
    )
    return _Batches(iter(loader))
