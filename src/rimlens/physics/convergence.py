"""The logarithm of the convergence, as every part of rimlens takes it.

The RIM estimates ``eta = log10 kappa``; truth maps can hold pixels of exactly zero convergence
(outside a truncated profile, or a particle map far from the lens), whose logarithm is ``-inf``
and would poison a loss or a metric. Every log10 of a convergence map goes through
:func:`log10_kappa`, which floors it at :data:`KAPPA_FLOOR`.
"""

from __future__ import annotations

import torch

__all__ = ["KAPPA_FLOOR", "log10_kappa"]

KAPPA_FLOOR = 1e-4
"""Smallest convergence taken in log10 (dimensionless): log10 kappa >= -4."""


def log10_kappa(kappa: torch.Tensor) -> torch.Tensor:
    """``log10(max(kappa, KAPPA_FLOOR))`` of a convergence map (any shape, dimensionless)."""
    return torch.log10(kappa.clamp_min(KAPPA_FLOOR))
