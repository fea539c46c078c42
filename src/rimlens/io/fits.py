"""FITS input and output.

Input images are 2-D (a degenerate cube with one plane is accepted); row 0 is the bottom of the
image (FITS order), which is rimlens' convention, so arrays are used as stored. The pixel scale
is read from ``CD1_1/CD1_2`` (WCS), ``CDELT1``, or ``PIXSCALE``/``PIXSCAL1``/``PIXELSCL`` keywords.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from astropy.io import fits

from rimlens.errors import RimlensInputError
from rimlens.io.atomic import atomic_path

__all__ = ["ARCSEC_PER_UNIT", "pixel_scale_from_header", "read_image", "wcs_rotation_deg", "write_image"]


def read_image(path: str | Path, name: str = "image", hdu: int | None = None) -> tuple[np.ndarray, dict]:
    """Read a 2-D float64 image and its header from a FITS file.

    Args:
        path: the file.
        name: what it is (used in error messages: "image", "PSF", "noise map", "mask").
        hdu: HDU index (default: the first HDU holding data).

    Raises:
        RimlensInputError: missing or unreadable file, no image data, a real cube, NaN/inf values.
    """

    path = Path(path)
    if not path.exists():
        raise RimlensInputError(f"{name} file not found: {path}")
    try:
        with fits.open(path, memmap=False) as hdul:
            hdus = [hdul[hdu]] if hdu is not None else [h for h in hdul if getattr(h, "data", None) is not None]
            if not hdus or hdus[0].data is None:
                raise RimlensInputError(f"{name} file {path} holds no image data")
            data = np.asarray(hdus[0].data, dtype=np.float64)
            header = dict(hdus[0].header)
    except RimlensInputError:
        raise
    except Exception as exc:  # astropy raises OSError, TypeError, IndexError... for malformed files
        raise RimlensInputError(f"{name} file {path} is not a readable FITS file: {exc}") from None
    while data.ndim > 2 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise RimlensInputError(f"{name} in {path} must be a 2-D image, got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise RimlensInputError(f"{name} in {path} contains {int((~np.isfinite(data)).sum())} NaN or infinite pixels")
    return data, header


ARCSEC_PER_UNIT = {
    "deg": 3600.0,
    "degree": 3600.0,
    "degrees": 3600.0,
    "": 3600.0,
    "arcmin": 60.0,
    "arcsec": 1.0,
    "mas": 1e-3,
    "rad": 206264.80624709636,
}


def _number(header: dict, key: str) -> float:
    try:
        v = float(header[key])
    except (TypeError, ValueError):
        raise RimlensInputError(f"FITS header keyword {key} is not a number: {header[key]!r}") from None
    if not math.isfinite(v):
        raise RimlensInputError(f"FITS header keyword {key} is not finite")
    return v


def _unit(header: dict) -> float:
    unit = str(header.get("CUNIT1", "deg")).strip().lower()
    if unit not in ARCSEC_PER_UNIT:
        raise RimlensInputError(f"unknown CUNIT1 {unit!r} in the FITS header; pass --pixel-scale")
    return ARCSEC_PER_UNIT[unit]


def pixel_scale_from_header(header: dict) -> float | None:
    """Pixel scale in arcsec from a FITS header (CD matrix or CDELT with CUNIT, else PIXSCALE-like
    keywords in arcsec), or None if it does not say.

    A rotated CD matrix is fine (the reconstruction lives in the image's own pixel frame, so maps
    come out rotated like the image; :func:`wcs_rotation_deg` says by how much). Non-square or
    skewed pixels are refused: the model's grid is square.
    """
    if "CD1_1" in header:
        cd11 = _number(header, "CD1_1")
        cd12 = _number(header, "CD1_2") if "CD1_2" in header else 0.0
        cd21 = _number(header, "CD2_1") if "CD2_1" in header else 0.0
        cd22 = _number(header, "CD2_2") if "CD2_2" in header else 0.0
        col, row = math.hypot(cd11, cd21), math.hypot(cd12, cd22)  # lengths of the pixel's two sides
        if "CD1_2" not in header and "CD2_2" not in header:  # only the first column given: take it
            row = col
        if col <= 0 or row <= 0:
            raise RimlensInputError("the FITS CD matrix is singular; pass --pixel-scale")
        if abs(col - row) > 1e-3 * max(col, row):
            raise RimlensInputError(
                f'the image has non-square pixels ({col * _unit(header):.5g}" x {row * _unit(header):.5g}"): '
                "resample it to square pixels first"
            )
        skew = abs(cd11 * cd12 + cd21 * cd22) / (col * row)
        if skew > 1e-3:
            raise RimlensInputError(f"the image's pixel axes are skewed (cos angle {skew:.3g}): resample it first")
        return col * _unit(header)
    if "CDELT1" in header and _number(header, "CDELT1") != 0:
        cdelt2 = abs(_number(header, "CDELT2")) if "CDELT2" in header else abs(_number(header, "CDELT1"))
        if abs(abs(_number(header, "CDELT1")) - cdelt2) > 1e-3 * cdelt2:
            raise RimlensInputError(
                "the image has non-square pixels (CDELT1 != CDELT2): resample it to square pixels first"
            )
        return abs(_number(header, "CDELT1")) * _unit(header)
    for key in ("PIXSCALE", "PIXSCAL1", "PIXELSCL", "PIXSCL"):
        if key in header:
            return _number(header, key)
    return None


def wcs_rotation_deg(header: dict) -> float:
    """Angle (degrees, counter-clockwise) from the image's +y (column) axis to north, from the CD
    matrix or CROTA2; 0 when the header has neither."""
    if "CD1_1" in header:
        cd12 = _number(header, "CD1_2") if "CD1_2" in header else 0.0
        cd22 = _number(header, "CD2_2") if "CD2_2" in header else 0.0
        return math.degrees(math.atan2(-cd12, cd22))
    if "CROTA2" in header:
        return _number(header, "CROTA2")
    return 0.0


def write_image(path: str | Path, data: np.ndarray, header: dict | None = None, overwrite: bool = True) -> Path:
    """Atomically write a 2-D array with header cards ``{key: value}`` or ``{key: (value, comment)}``."""

    path = Path(path)
    if path.exists() and not overwrite:
        raise RimlensInputError(f"{path} exists")
    hdu = fits.PrimaryHDU(np.asarray(data, dtype=np.float32))
    for k, v in (header or {}).items():
        hdu.header[k] = v
    with atomic_path(path, suffix=".fits.tmp") as tmp:
        hdu.writeto(tmp, overwrite=True)
    return path
