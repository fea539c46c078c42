"""Gaussian likelihood of an observation given a model image.

``chi2 = sum_p w_p (model_p - obs_p)^2 / sigma_p^2`` over the used pixels ``w_p = 1``; a pixel is
unused when it is masked out or its noise sigma is >= ``EXCLUDE_SIGMA`` (the convention of noise
maps that flag bad pixels with a huge sigma). The reduced chi-square divides by the number of used
pixels (as the paper, which takes every pixel as a degree of freedom; this slightly overestimates
the degrees of freedom, so chi2_nu is biased low for a perfect fit to very few pixels).
The negative log-likelihood used by the RIM is ``chi2 / 2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["EXCLUDE_SIGMA", "chi_squared", "degrees_of_freedom", "peak_snr", "reduced_chi_squared", "used_pixels"]

EXCLUDE_SIGMA = 1e6


def used_pixels(noise_sigma: torch.Tensor, shape: Sequence[int], mask: torch.Tensor | None = None) -> torch.Tensor:
    """Float weights (1 = used, 0 = excluded), broadcast to ``shape`` (``B x 1 x N x N``).

    Args:
        noise_sigma: noise standard deviation (image units), broadcastable to ``shape``.
        shape: shape of the images, ``B x 1 x N x N``.
        mask: optional boolean / 0-1 tensor broadcastable to ``shape``, True = pixel used.
    """
    w = (noise_sigma < EXCLUDE_SIGMA).to(noise_sigma.dtype).expand(shape)
    if mask is not None:
        w = w * mask.to(noise_sigma.dtype)
    return w


def chi_squared(
    model: torch.Tensor, observation: torch.Tensor, noise_sigma: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Chi-square per example, shape ``(B,)``, dimensionless.

    Args:
        model, observation: ``B x 1 x N x N`` images, in the same units.
        noise_sigma: tensor broadcastable to the images (``B x 1 x 1 x 1`` or a noise map), in the
            units of the images.
        mask: optional boolean / 0-1 tensor broadcastable to the images, True = pixel used.
    """
    w = used_pixels(noise_sigma, model.shape, mask)
    sigma = torch.where(w > 0, noise_sigma, torch.ones_like(noise_sigma))
    return (w * ((model - observation) / sigma) ** 2).sum(dim=(-3, -2, -1))


def degrees_of_freedom(
    noise_sigma: torch.Tensor, shape: Sequence[int], mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Number of used pixels per example, shape ``(B,)`` (float), for images of ``shape`` ``B x 1 x N x N``.

    Arguments as in :func:`used_pixels`.
    """
    return used_pixels(noise_sigma, shape, mask).sum(dim=(-3, -2, -1))


def reduced_chi_squared(
    model: torch.Tensor, observation: torch.Tensor, noise_sigma: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``chi2 / n_used_pixels`` per example, shape ``(B,)``; ~1 for a fit at the noise level.

    Arguments as in :func:`chi_squared` (``B x 1 x N x N`` images, sigma in image units).
    """
    return chi_squared(model, observation, noise_sigma, mask) / degrees_of_freedom(
        noise_sigma, model.shape, mask
    ).clamp_min(1)


def peak_snr(noiseless: torch.Tensor, noise_sigma: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio ``max(noiseless image) / sigma`` per example, shape ``(B,)``.

    Args:
        noiseless: ``B x 1 x N x N`` noiseless images.
        noise_sigma: ``B x 1 x 1 x 1`` (or ``1 x 1 x 1 x 1``) sigmas or a ``B x 1 x N x N`` noise
            map, in the units of the images.

    For a noise map the median sigma over all pixels is taken.
    """
    peak = noiseless.amax(dim=(-3, -2, -1))
    if noise_sigma.shape[-2:] == (1, 1):
        return peak / noise_sigma.reshape(-1)
    sigma = noise_sigma.expand(noiseless.shape).contiguous().flatten(1)
    return peak / sigma.median(dim=1).values
