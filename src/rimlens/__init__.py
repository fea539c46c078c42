"""rimlens: strong-lens reconstruction with Recurrent Inference Machines.

Conventions (used everywhere in the package)
-------------------------------------------
* Maps are tensors of shape ``B x 1 x N x N`` (batch, channel, rows, columns).
* ``x`` runs along columns, ``y`` along rows, row 0 is the *bottom* of the image (FITS order).
* Pixel ``i`` of an ``N``-pixel axis with scale ``s`` (arcsec / pixel) has its centre at
  ``(i - (N - 1) / 2) * s``; the field of view is ``N * s`` edge to edge.
* Angles are in arcsec; convergence is dimensionless; surface brightness is in arbitrary units.
"""

from rimlens.errors import RimlensInputError

__version__ = "0.1.0"
__all__ = ["RimlensInputError", "__version__"]
