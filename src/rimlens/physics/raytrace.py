"""Ray tracing through the lens equation and bilinear sampling of a pixelated source."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rimlens.physics.grid import PixelGrid

__all__ = ["lens_equation", "sample_bilinear"]


def lens_equation(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Source-plane positions ``beta = theta - alpha``.

    Args:
        x, y: image-plane coordinates in arcsec, shape ``N x N`` (broadcast over the batch).
        alpha: deflection, ``B x 2 x N x N`` in arcsec (channel 0 = x, 1 = y).

    Returns:
        ``(beta_x, beta_y)``, each ``B x N x N``, in arcsec.
    """
    return x - alpha[:, 0], y - alpha[:, 1]


def sample_bilinear(
    source: torch.Tensor, source_grid: PixelGrid, beta_x: torch.Tensor, beta_y: torch.Tensor
) -> torch.Tensor:
    """Bilinearly interpolate a pixelated source at angular positions.

    The source pixel values sit at the pixel centres of ``source_grid``. Between centres the
    brightness is bilinear; beyond the outermost centres it falls linearly to zero over one pixel
    (the source is zero-padded), and it is zero further out: rays that leave the source grid see no
    light.

    Args:
        source: ``B x 1 x M x M`` surface brightness (any units).
        source_grid: grid of the source (M pixels).
        beta_x, beta_y: positions in arcsec, shape ``B x H x W``.

    Returns:
        ``B x 1 x H x W`` sampled brightness, in the units of ``source``.
    """
    m = source_grid.n_pixels
    half_extent = (m - 1) / 2 * source_grid.pixel_scale_arcsec
    # align_corners=True maps -1 / +1 to the centres of the first / last pixel; row 0 is y minimum.
    grid = torch.stack([beta_x / half_extent, beta_y / half_extent], dim=-1)
    return F.grid_sample(source, grid.to(source.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)
