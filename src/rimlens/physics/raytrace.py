"""Ray tracing through the lens equation, bilinear sampling of a pixelated source, and the
supersampled ray grid with its pixel average (pixel-integrated images)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rimlens.errors import RimlensInputError
from rimlens.physics.grid import PixelGrid

__all__ = ["lens_equation", "pixel_average", "sample_bilinear", "sample_lensed", "supersampled_grid"]


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


def sample_lensed(source: torch.Tensor, source_grid: PixelGrid, xy: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Trace rays through the lens equation and sample the source there: :func:`lens_equation` then
    :func:`sample_bilinear` (bit-for-bit), in one pass over channels-last memory.

    Args:
        source: ``B x 1 x M x M`` surface brightness (any units).
        source_grid: grid of the source (M pixels).
        xy: image-plane positions of the rays, ``H x W x 2`` in arcsec (last axis: x, y).
        alpha: deflection at the rays, ``B x 2 x H x W`` in arcsec (any memory layout; a
            channels-last one avoids a copy). A batch of 1 in ``source`` or ``alpha`` broadcasts.

    Returns:
        ``B x 1 x H x W`` sampled brightness, in the units of ``source``.
    """
    m = source_grid.n_pixels
    half_extent = (m - 1) / 2 * source_grid.pixel_scale_arcsec
    grid = (xy - alpha.permute(0, 2, 3, 1)) / half_extent  # beta / half extent, B x H x W x 2
    if source.shape[0] != grid.shape[0]:
        n = max(source.shape[0], grid.shape[0])
        source, grid = source.expand(n, -1, -1, -1), grid.expand(n, -1, -1, -1)
    return F.grid_sample(source, grid.to(source.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)


def supersampled_grid(grid: PixelGrid, factor: int) -> PixelGrid:
    """The grid of the ``factor x factor`` sub-pixel centres of every pixel of ``grid``.

    It is ``PixelGrid(factor * N, s / factor)``: the same field of view, whose pixel ``i f + k``
    (``k = 0 .. f-1``) is centred at ``x_i + ((k + 1/2) / f - 1/2) s`` arcsec, i.e. on sub-pixel ``k``
    of pixel ``i`` (``grid`` itself for ``factor = 1``).
    """
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise RimlensInputError(f"supersampling factor must be an integer >= 1, got {factor!r}")
    if factor == 1:
        return grid
    return PixelGrid(grid.n_pixels * factor, grid.pixel_scale_arcsec / factor)


def pixel_average(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Mean over each ``factor x factor`` block: a ``B x C x fN x fN`` supersampled image to ``B x C x N x N``.

    The result is the pixel-integrated surface brightness (the mean over the sub-pixel samples of
    each pixel), in the units of ``image``; ``factor = 1`` returns ``image`` itself.
    """
    if factor == 1:
        return image
    return F.avg_pool2d(image, factor)
