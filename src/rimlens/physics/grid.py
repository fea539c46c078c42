"""Pixel grids.

One convention for every grid in rimlens:

* ``N`` pixels per side, pixel scale ``s`` in arcsec / pixel;
* pixel ``i`` has its centre at ``(i - (N - 1) / 2) * s`` (the grid is centred on the optical axis;
  for even ``N`` the axis falls between the two central pixels);
* the field of view is ``N * s`` arcsec from edge to edge;
* ``x`` runs along columns (last tensor axis), ``y`` along rows; row 0 is the bottom (FITS order).

The convergence grid is the image grid; the source plane has its own ``PixelGrid``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.types import Device

from rimlens.errors import RimlensInputError, check_positive_scalar

__all__ = ["PixelGrid"]


@dataclass(frozen=True)
class PixelGrid:
    """A square pixel grid centred on the optical axis.

    Attributes:
        n_pixels: number of pixels per side, N.
        pixel_scale_arcsec: pixel size in arcsec.
    """

    n_pixels: int
    pixel_scale_arcsec: float

    def __post_init__(self) -> None:
        if not isinstance(self.n_pixels, int) or isinstance(self.n_pixels, bool) or self.n_pixels < 2:
            raise RimlensInputError(f"n_pixels must be an integer >= 2, got {self.n_pixels!r}")
        object.__setattr__(
            self, "pixel_scale_arcsec", check_positive_scalar(self.pixel_scale_arcsec, "pixel_scale_arcsec")
        )

    @classmethod
    def from_fov(cls, n_pixels: int, fov_arcsec: float) -> PixelGrid:
        """Grid of ``n_pixels`` per side whose edge-to-edge field of view is ``fov_arcsec`` (arcsec).

        The pixel scale is ``fov_arcsec / n_pixels`` arcsec.
        """
        fov = check_positive_scalar(fov_arcsec, "fov_arcsec")
        return cls(n_pixels, fov / n_pixels)

    @property
    def fov_arcsec(self) -> float:
        """Edge-to-edge field of view, ``N * pixel_scale``, in arcsec."""
        return self.n_pixels * self.pixel_scale_arcsec

    def axis(self, dtype: torch.dtype = torch.float32, device: Device = None) -> torch.Tensor:
        """Pixel-centre coordinates along one axis, shape ``(N,)``, arcsec."""
        i = torch.arange(self.n_pixels, dtype=torch.float64, device=device)
        return ((i - (self.n_pixels - 1) / 2) * self.pixel_scale_arcsec).to(dtype)

    def coordinates(
        self, dtype: torch.dtype = torch.float32, device: Device = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel-centre coordinates ``(x, y)``, each of shape ``N x N``, in arcsec.

        ``x[i, j]`` depends on the column ``j`` only, ``y[i, j]`` on the row ``i`` only.
        """
        a = self.axis(dtype, device)
        y, x = torch.meshgrid(a, a, indexing="ij")
        return x, y

    def to_pixel(self, x_arcsec: torch.Tensor, y_arcsec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert angular positions (arcsec) to fractional ``(column, row)`` pixel indices.

        The outputs have the shapes of ``x_arcsec`` and ``y_arcsec``; index ``i`` is the centre of
        pixel ``i``.
        """
        c = (self.n_pixels - 1) / 2
        return x_arcsec / self.pixel_scale_arcsec + c, y_arcsec / self.pixel_scale_arcsec + c

    def as_dict(self) -> dict[str, int | float]:
        """Plain-dict description, for file attributes and FITS headers.

        Keys: ``n_pixels`` (pixels per side), ``pixel_scale_arcsec`` and ``fov_arcsec`` (arcsec).
        """
        return {"n_pixels": self.n_pixels, "pixel_scale_arcsec": self.pixel_scale_arcsec, "fov_arcsec": self.fov_arcsec}
