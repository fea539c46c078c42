"""Helpers shared by the benchmark scripts: timing with medians, a machine description, and rimlens's own
lenses written as a peer validation file."""

from __future__ import annotations

import os
import platform
import statistics
import time

import numpy as np
import torch


def set_threads(n: int | None = None) -> int:
    n = int(n or os.environ.get("OMP_NUM_THREADS", "2"))
    torch.set_num_threads(n)
    return n


def median_time(fn, repeats: int = 7, warmup: int = 2, min_time: float = 0.05) -> float:
    """Median wall time of ``fn()`` in seconds; each sample loops until ``min_time`` has passed."""
    return compare_times({"fn": fn}, repeats, warmup, min_time)["fn"]


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def compare_times(fns: dict, repeats: int = 7, warmup: int = 2, min_time: float = 0.05) -> dict:
    """Median wall time (s) of each callable, measured round-robin so that machine noise hits all
    of them alike (the ratio of medians is then far more stable than separate runs)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            n, t0 = 0, time.perf_counter()
            while True:
                fn()
                n += 1
                dt = time.perf_counter() - t0
                if dt >= min_time:
                    break
            samples[k].append(dt / n)
    return {k: statistics.median(v) for k, v in samples.items()}


def write_peer_file(lenses, preset, path) -> None:
    """rimlens's own simulated lenses (a :class:`rimlens.data.lenses.LensBatch` of ``preset``'s grid) as a
    peer validation file (:func:`rimlens.train.peer.load_peer_validation` reads it: truth Einstein radii and
    slopes from the maps, as for a peer's lenses); every pixel used."""
    n = preset.grid.image_pixels
    np.savez(
        path,
        observation=lenses.observation.numpy(),
        noise_sigma=lenses.noise_sigma.reshape(-1, 1, 1, 1).expand(-1, 1, n, n).numpy(),
        mask=np.ones((len(lenses), 1, n, n), dtype=bool),
        psf=lenses.psf.numpy(),
        kappa=lenses.kappa.numpy(),
        image_pixels=n,
        image_fov_arcsec=preset.grid.image_fov_arcsec,
    )
