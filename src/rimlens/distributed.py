"""The ``torch.distributed`` plumbing every ``torchrun``-aware command shares.

Process-group set-up (:func:`process_group`, :func:`rank_and_world`, :func:`barrier`) and the
collective helpers that let all ranks take the same stop decision (:func:`any_rank`,
:func:`broadcast_object`, :func:`collective_failure`). Everything here is a no-op (or the
identity) in a plain single-process run, so callers need no ``if distributed`` branches.

This is a low-level module: it imports nothing from rimlens but :mod:`rimlens.errors`.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

__all__ = [
    "RankFailedError",
    "any_rank",
    "barrier",
    "broadcast_object",
    "collective_failure",
    "process_group",
    "rank_and_world",
]


class RankFailedError(RuntimeError):
    """Raised by :func:`collective_failure` on the ranks whose peer failed.

    The peer's own exception (with its traceback) is raised, and reported, by the peer itself.
    """


def _group_active() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def process_group(backend: str = "gloo"):
    """Join the ``torchrun`` process group for the duration of a command.

    A no-op in a plain run (``WORLD_SIZE`` unset or 1) or when a group already exists; a group
    started here is destroyed on exit (after a barrier on success; at once on errors).

    Yields:
        ``(rank, world size)`` as :func:`rank_and_world` gives it.
    """
    started = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if started:
        if backend == "nccl":  # one GPU per rank: collectives and DDP must not all land on cuda:0
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    try:
        yield rank_and_world()
    except BaseException:
        if started:  # no barrier here: another rank may never arrive
            dist.destroy_process_group()
        raise
    if started:
        # On success every rank arrives: waiting for all of them before tearing down keeps one rank's
        # gloo teardown from aborting a peer that is still finishing its last collective.
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (a no-op without a process group of several ranks).

    A rank that raises before its barrier leaves the others waiting here for good; wrap work that
    may fail in :func:`collective_failure` instead, which synchronises the ranks as well.
    """
    if _group_active():
        dist.barrier()


def _flag_device() -> torch.device:
    """Device of the small tensors the collectives below exchange: the current CUDA device for
    an NCCL group (NCCL reduces CUDA tensors only), the CPU otherwise (gloo, mixed backends)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _flagged_ranks(flag: bool) -> list[int]:
    """Collective: the ranks (sorted) on which ``flag`` is true; every rank gets the same list."""
    if not _group_active():
        return [0] if flag else []
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=_flag_device())
    flags[dist.get_rank()] = int(bool(flag))
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [r for r, f in enumerate(flags.tolist()) if f]


def any_rank(flag: bool) -> bool:
    """Collective: True on every rank if ``flag`` is true on any rank.

    The way to take one stop decision under DDP (e.g. a non-finite loss seen by one rank only).
    Every rank must call it, the same number of times. Without an initialised process group, or
    with a single rank, it returns ``bool(flag)``.
    """
    return bool(_flagged_ranks(flag))


def broadcast_object(obj, src: int = 0):
    """Collective: every rank gets ``obj`` as rank ``src`` holds it (the value passed on the other
    ranks is ignored). ``obj`` must be picklable. The identity without a process group of several
    ranks."""
    if not _group_active():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def collective_failure(what: str):
    """Run the body; if it raises on any rank, every rank raises.

    On exit every rank takes part in one collective (:func:`any_rank` of "my body raised"), which
    also synchronises the ranks like a :func:`barrier`. Then:

    * the rank(s) whose body raised re-raise their own exception, unchanged;
    * the other ranks raise :class:`RankFailedError` naming the failed rank(s), instead of waiting
      for ever at a later barrier or collective that the failed rank never reaches;
    * if no rank failed, all carry on.

    Every rank must enter and leave it the same number of times, in the same order as any other
    collective (a body that returns early or raises still leaves it once). Without a process group
    of several ranks it just runs the body.

    Example:
        with collective_failure("prediction"):
            for chunk in my_chunks:
                compute(chunk)   # a ValueError here ends every rank, not just this one
    """
    try:
        yield
    except BaseException:
        # tell the others; if the collective itself breaks (e.g. a peer process died), this rank's
        # own exception is still the one to report
        with contextlib.suppress(Exception):
            _flagged_ranks(True)
        raise
    failed = _flagged_ranks(False)
    if failed:
        ranks = ", ".join(str(r) for r in failed)
        raise RankFailedError(f"{what}: another process (rank {ranks}) failed; see its error")
