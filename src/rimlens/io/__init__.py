"""Files in and out: atomic writes, FITS."""

from rimlens.io.atomic import atomic_path, claim_work_folder

__all__ = ["atomic_path", "claim_work_folder"]
