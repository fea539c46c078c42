"""Errors raised by rimlens and the input checks that raise them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "RimlensInputError",
    "TrainingDivergedError",
    "check_batch",
    "check_map",
    "check_noise_sigma",
    "check_positive_scalar",
]


class RimlensInputError(ValueError):
    """Raised when user input is malformed (shape, finiteness, sign, size...).

    The message always names the offending argument and what was wrong with it, so the CLI
    can print it as a one-line error.
    """


def check_map(x: torch.Tensor, name: str, *, square: bool = True, finite: bool = True) -> torch.Tensor:
    """Check that ``x`` is a finite ``B x 1 x N x N`` tensor and return it.

    Args:
        x: tensor to check.
        name: argument name used in the error message.
        square: require the two spatial sizes to be equal.
        finite: require all values to be finite (no NaN / inf).
    """
    if not isinstance(x, torch.Tensor):
        raise RimlensInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 1:
        raise RimlensInputError(
            f"{name} must have shape B x 1 x N x N (rank 4, one channel), got shape {tuple(x.shape)}"
        )
    if square and x.shape[-1] != x.shape[-2]:
        raise RimlensInputError(f"{name} must be square, got {x.shape[-2]} x {x.shape[-1]} pixels")
    if not x.is_floating_point():
        raise RimlensInputError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if finite and not bool(torch.isfinite(x).all()):
        raise RimlensInputError(f"{name} contains NaN or infinite values")
    return x


def check_positive_scalar(value: float, name: str) -> float:
    """Check that ``value`` is a finite number > 0 and return it as float."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise RimlensInputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise RimlensInputError(f"{name} must be finite and > 0, got {value!r}")
    return v


def check_batch(batch_sizes: dict[str, int]) -> int:
    """Check that all named batch sizes agree (1 broadcasts) and return the common size."""
    sizes = {k: v for k, v in batch_sizes.items() if v != 1}
    distinct = set(sizes.values())
    if len(distinct) > 1:
        detail = ", ".join(f"{k}={v}" for k, v in batch_sizes.items())
        raise RimlensInputError(f"mismatched batch sizes: {detail}")
    return distinct.pop() if distinct else 1


def check_noise_sigma(
    noise_sigma: float | torch.Tensor, batch: int, shape: Sequence[int], *, like: torch.Tensor
) -> torch.Tensor:
    """Return the noise standard deviation as a tensor broadcastable to ``B x 1 x N x N``.

    ``noise_sigma`` may be a float, a tensor of shape ``(B,)`` (one sigma per example) or a
    noise map of shape ``B x 1 x N x N`` (per pixel). All values must be finite and > 0.

    Args:
        noise_sigma: noise standard deviation, in the units of the images.
        batch: batch size ``B`` of the images.
        shape: spatial shape ``(N, N)`` of the images, in pixels.
        like: tensor whose dtype and device the result takes.

    Returns:
        ``1 x 1 x 1 x 1``, ``B x 1 x 1 x 1`` or ``B x 1 x N x N`` tensor (``B`` may be 1).
    """
    sigma = torch.as_tensor(noise_sigma, dtype=like.dtype, device=like.device)
    if sigma.ndim == 0:
        sigma = sigma.reshape(1, 1, 1, 1)
    elif sigma.ndim == 1:
        if sigma.shape[0] not in (1, batch):
            raise RimlensInputError(f"noise_sigma has {sigma.shape[0]} values but the batch has {batch} examples")
        sigma = sigma.reshape(-1, 1, 1, 1)
    elif sigma.ndim == 4:
        spatial_ok = tuple(sigma.shape[-2:]) in (tuple(shape), (1, 1))
        if sigma.shape[1] != 1 or not spatial_ok or sigma.shape[0] not in (1, batch):
            raise RimlensInputError(
                f"noise_sigma map must have shape {batch} x 1 x {shape[0]} x {shape[1]}, got {tuple(sigma.shape)}"
            )
    else:
        raise RimlensInputError(
            f"noise_sigma must be a scalar, a (B,) vector or a B x 1 x N x N map, got shape {tuple(sigma.shape)}"
        )
    if not bool(torch.isfinite(sigma).all()):
        raise RimlensInputError("noise_sigma contains NaN or infinite values")
    if not bool((sigma > 0).all()):
        raise RimlensInputError("noise_sigma must be > 0 everywhere")
    return sigma


class TrainingDivergedError(RuntimeError):
    """Raised when training meets a non-finite loss or gradient. Not an input error: the data and
    settings were valid, the optimisation diverged (resume with a lower learning rate)."""
