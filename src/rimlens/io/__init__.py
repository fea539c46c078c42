"""Files in and out: atomic writes, FITS."""

from rimlens.io.atomic import atomic_path

__all__ = ["atomic_path"]
