"""Seeded random draws shared by the data generators (numpy Generators everywhere: one seed
reproduces a data set bit for bit)."""

from __future__ import annotations

import numpy as np
from scipy.stats import truncnorm

__all__ = ["child_rng", "truncated_normal"]


def truncated_normal(
    rng: np.random.Generator, mean: float, std: float, low: float, high: float, size=None
) -> np.ndarray:
    """Draws from a normal(mean, std) truncated to [low, high] (scipy's truncnorm convention)."""
    a, b = (low - mean) / std, (high - mean) / std
    return truncnorm.rvs(a, b, loc=mean, scale=std, size=size, random_state=rng)


def child_rng(seed: int, *keys: int) -> np.random.Generator:
    """Independent generator for a (seed, keys...) tuple: block b of a data set uses child_rng(seed, b)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, keys)]))
