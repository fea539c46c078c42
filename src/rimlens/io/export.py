"""Export a rimlens reconstruction to the standard strong-lensing tools: lenstronomy and COOLEST.

Coordinates: every export keeps rimlens' frame, ``x`` to the right (along columns, increasing with
the column index), ``y`` up (along rows, row 0 at the bottom), in arcsec from the optical axis, pixel
``i`` of ``N`` centred at ``(i - (N - 1) / 2) s`` (:class:`rimlens.physics.PixelGrid`). Arrays are
written as rimlens holds them: ``array[row, column] = value at (x_column, y_row)``, bottom row first.

lenstronomy (``INTERPOL`` profile)
    :func:`to_lenstronomy_interpol` gives ``(["INTERPOL"], [kwargs])`` with the lensing potential
    ``f_`` (arcsec^2, :func:`rimlens.physics.potential.lensing_potential` with the ``"deflection"``
    self term, so that it is the potential *of* rimlens' deflection), the deflection ``f_x, f_y``
    (arcsec, :func:`rimlens.physics.deflection`) and the second derivatives ``f_xx, f_yy, f_xy``
    (dimensionless, :func:`rimlens.physics.potential.lensing_hessian`, ``(f_xx + f_yy) / 2 = kappa``)
    at the pixel centres, on the ascending axes ``grid_interp_x = grid_interp_y`` (arcsec).
    lenstronomy builds ``RectBivariateSpline(grid_interp_y, grid_interp_x, f)``, i.e. it indexes
    the maps ``[y, x]`` like rimlens: no transposition or flip. Its default spline is bilinear, so
    at the pixel centres lenstronomy returns these values exactly and in between it interpolates
    linearly (measured in tests/test_export.py: ~1e-4 of max |alpha| typically, a few 1e-3 within
    ten pixels of a cusp, much more within a pixel or two of it); a bicubic spline,
    ``LensModel(["INTERPOL"], profile_kwargs_list=[{"kwargs_spline": {"kx": 3, "ky": 3, "s": 0}}])``,
    is 2-4 times closer. Beyond the outermost pixel centres lenstronomy holds the edge values.
    The lenstronomy coordinates are rimlens' ``(x, y)``: build the ``ImageData`` with
    ``transform_pix2angle = diag(s, s)`` and ``ra_at_xy_0 = dec_at_xy_0 = -(N - 1) s / 2``. In a frame
    with ``transform_pix2angle = diag(-s, s)`` (x = RA, increasing to the left, i.e. minus rimlens'
    x), mirror the model first: reverse the columns of every map and change the signs of ``f_x`` and
    ``f_xy``.

    With an external shear ``(gamma1, gamma2)`` (rimlens' :func:`rimlens.physics.profiles.shear_deflection`,
    which is lenstronomy's ``SHEAR`` about the grid's centre) the model is ``(["INTERPOL", "SHEAR"],
    [kwargs, {"gamma1": g1, "gamma2": g2, "ra_0": 0.0, "dec_0": 0.0}])``, in the same rimlens frame (in
    the mirrored ``diag(-s, s)`` frame above, change the sign of ``gamma2`` as well).

    :func:`write_lenstronomy` saves the kwargs to a ``.npz`` file; load it with::

        import numpy as np
        from lenstronomy.LensModel.lens_model import LensModel

        with np.load("lens_interpol.npz") as f:
            models = [str(m) for m in f["lens_model_list"]]  # ["INTERPOL"] or ["INTERPOL", "SHEAR"]
            kwargs_lens = [{key: f[key] for key in f["interpol_keys"]}]
            if "SHEAR" in models:
                kwargs_lens.append({str(k): float(v) for k, v in zip(f["shear_keys"], f["shear"])})
        lens_model = LensModel(models)
        beta_x, beta_y = lens_model.ray_shooting(x, y, kwargs_lens)

    (or with :func:`read_lenstronomy`). lenstronomy's ``Interpol`` builds its splines on the first
    call and keeps them: use one ``LensModel`` per exported model.

COOLEST
    :func:`write_coolest` writes FITS files and a COOLEST template (``mode = "MAP"``) readable with
    ``coolest.template.json.JSONSerializer(path_without_extension).load()``. COOLEST's regular grids
    give the field of view as the outer pixel *edges* ``[x_min, x_max]``, ``[y_min, y_max]`` (pixel
    (0, 0) is centred at ``(x_min + s/2, y_min + s/2)``, ``coolest.api.util.get_coordinates_from_regular_grid``),
    with x to the right and y up, and the arrays are indexed ``[y, x]`` with the bottom row first: the
    rimlens convention, so the maps are stored as they are (checked against coolest's own coordinate
    code in the tests). The standard has no pixelated convergence; the mass model of the lens galaxy is
    ``PixelatedRegularGridFullyDefined`` (the potential, its first and second derivatives on the
    kappa grid, exactly the arrays of the lenstronomy export; stacks ``[f_x, f_y]`` and
    ``[f_xx, f_yy, f_xy]``), or ``PixelatedRegularGridPotential`` (potential only) on request. The
    convergence map itself is written next to them and named in the template's ``meta``.
    An external shear becomes a ``MassField`` lensing entity ("external_shear", after the lens and the
    source) with COOLEST's ``ExternalShear`` profile (``gamma_ext``, ``phi_ext``; origin (0, 0), the
    grid's centre). COOLEST's ``phi_ext`` is the shear's position angle in degrees east of north in
    ]-90, 90]; with x to the right (west) and y up (north) that is the counter-clockwise angle from +x
    plus 90 degrees: ``phi_ext = degrees(atan2(gamma2, gamma1) / 2) + 90`` folded into ]-90, 90],
    ``gamma_ext = hypot(gamma1, gamma2)``; inversely ``gamma1 = gamma_ext cos(2 (phi_ext - 90 deg))``,
    ``gamma2 = gamma_ext sin(2 (phi_ext - 90 deg))``, which is what ``coolest.api.profiles.mass.ExternalShear``
    evaluates (checked in the tests against it and against lenstronomy's COOLEST conversion of the
    mirrored, x = RA, shear ``(gamma1, -gamma2)``).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from astropy.io import fits

from rimlens import __version__
from rimlens.errors import RimlensInputError, check_map
from rimlens.io.atomic import atomic_path
from rimlens.physics import PSF, PixelGrid, deflection_field
from rimlens.physics.potential import lensing_hessian, lensing_potential

__all__ = [
    "INTERPOL_KEYS",
    "MassProfile",
    "coolest_shear",
    "lens_maps",
    "read_lenstronomy",
    "to_lenstronomy_interpol",
    "write_coolest",
    "write_lenstronomy",
]

INTERPOL_KEYS = ("grid_interp_x", "grid_interp_y", "f_", "f_x", "f_y", "f_xx", "f_yy", "f_xy")
"""Keyword arguments of lenstronomy's ``INTERPOL`` lens profile, in its order."""

MassProfile = Literal["PixelatedRegularGridFullyDefined", "PixelatedRegularGridPotential"]
"""COOLEST mass profile used for the convergence map by :func:`write_coolest`."""

MapLike = torch.Tensor | npt.NDArray[Any]
"""A map: ``N x N`` or ``1 x 1 x N x N``, tensor or array."""

ShearLike = torch.Tensor | npt.ArrayLike
"""An external shear ``(gamma1, gamma2)``: two numbers (any shape of size 2, e.g. ``1 x 2``)."""

LensKwargs = dict[str, npt.NDArray[np.float64] | float]
"""Keyword arguments of one lenstronomy lens profile (arrays for ``INTERPOL``, floats for ``SHEAR``)."""

SHEAR_KEYS = ("gamma1", "gamma2", "ra_0", "dec_0")
"""Keyword arguments of lenstronomy's ``SHEAR`` lens profile as written by :func:`write_lenstronomy`."""

CONVENTIONS = (
    "rimlens frame: x to the right (columns), y up (rows, row 0 at the bottom), arcsec from the optical axis; "
    "pixel i of N centred at (i - (N - 1) / 2) * pixel_scale; arrays indexed [y, x]"
)


# ------------------------------------------------------------------------------ inputs
def _as_map(x: MapLike, name: str, n_pixels: int | None = None) -> torch.Tensor:
    """``1 x 1 x N x N`` float64 CPU tensor from an ``N x N`` or ``1 x 1 x N x N`` tensor / array."""
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim == 2:
        t = t[None, None]
    if t.ndim != 4 or t.shape[0] != 1:
        raise RimlensInputError(f"{name} must be one map, N x N or 1 x 1 x N x N, got shape {tuple(t.shape)}")
    t = t.to(torch.float64)
    check_map(t, name)
    if n_pixels is not None and t.shape[-1] != n_pixels:
        raise RimlensInputError(f"{name} has {t.shape[-1]} pixels per side, its grid has {n_pixels}")
    return t


def lens_maps(kappa: MapLike, grid: PixelGrid) -> dict[str, npt.NDArray[np.float64]]:
    """Potential, deflection and Hessian of a convergence map at its pixel centres (float64).

    Args:
        kappa: convergence on ``grid`` (dimensionless), ``N x N`` or ``1 x 1 x N x N``.
        grid: the map's grid.

    Returns:
        ``{"kappa", "psi", "alpha_x", "alpha_y", "psi_xx", "psi_yy", "psi_xy"}``, each ``N x N``
        indexed ``[y, x]``: ``psi`` in arcsec^2 (the ``"deflection"`` self term of
        :func:`rimlens.physics.potential.lensing_potential`), ``alpha`` in arcsec, the Hessian and
        ``kappa`` dimensionless.
    """
    k = _as_map(kappa, "kappa", grid.n_pixels)
    s = grid.pixel_scale_arcsec
    psi = lensing_potential(k, s, self_term="deflection")[0, 0]
    alpha = deflection_field(k, s)[0]
    hess = lensing_hessian(k)[0]
    maps = {
        "kappa": k[0, 0],
        "psi": psi,
        "alpha_x": alpha[0],
        "alpha_y": alpha[1],
        "psi_xx": hess[0],
        "psi_yy": hess[1],
        "psi_xy": hess[2],
    }
    return {key: v.numpy().astype(np.float64) for key, v in maps.items()}


def _shear(shear: ShearLike | None) -> tuple[float, float] | None:
    """``(gamma1, gamma2)`` as two finite floats, or ``None``."""
    if shear is None:
        return None
    a = shear.detach().cpu().numpy() if isinstance(shear, torch.Tensor) else np.asarray(shear)
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    if a.size != 2 or not np.all(np.isfinite(a)):
        raise RimlensInputError(f"shear must be two finite numbers (gamma1, gamma2), got {a.tolist()}")
    return float(a[0]), float(a[1])


def coolest_shear(gamma1: float, gamma2: float) -> tuple[float, float]:
    """COOLEST ``(gamma_ext, phi_ext)`` of a shear ``(gamma1, gamma2)`` in rimlens' frame (lenstronomy's ``SHEAR``).

    ``gamma_ext = hypot(gamma1, gamma2)`` and ``phi_ext = degrees(atan2(gamma2, gamma1) / 2) + 90``
    folded into ]-90, 90]: the position angle east of north in degrees, for x to the right (west)
    and y up (north), as COOLEST defines it (see the module docstring).
    """
    phi = math.degrees(0.5 * math.atan2(gamma2, gamma1)) + 90.0
    if phi > 90.0:
        phi -= 180.0
    return math.hypot(gamma1, gamma2), phi


# ------------------------------------------------------------------------------ lenstronomy
def to_lenstronomy_interpol(
    kappa: MapLike, grid: PixelGrid, shear: ShearLike | None = None
) -> tuple[list[str], list[LensKwargs]]:
    """lenstronomy ``INTERPOL`` lens model of a rimlens convergence map (plus ``SHEAR`` if given).

    Args:
        kappa: convergence (dimensionless) on ``grid``, ``N x N`` or ``1 x 1 x N x N``.
        grid: the kappa (image) grid.
        shear: optional external shear ``(gamma1, gamma2)`` (dimensionless), lenstronomy's ``SHEAR``
            about the grid's centre in rimlens' frame (:func:`rimlens.physics.profiles.shear_deflection`).

    Returns:
        ``(lens_model_list, kwargs_lens)`` = ``(["INTERPOL"], [kwargs])``: ``grid_interp_x`` and
        ``grid_interp_y`` are the ``(N,)`` ascending pixel-centre axes (arcsec); ``f_`` (arcsec^2),
        ``f_x, f_y`` (arcsec), ``f_xx, f_yy, f_xy`` (dimensionless) are ``N x N`` float64 arrays
        indexed ``[y, x]`` (see the module docstring for the conventions). With ``shear``,
        ``(["INTERPOL", "SHEAR"], [kwargs, {"gamma1": g1, "gamma2": g2, "ra_0": 0.0, "dec_0": 0.0}])``.
    """
    gamma = _shear(shear)
    maps = lens_maps(kappa, grid)
    axis = grid.axis(torch.float64).numpy()
    kwargs: LensKwargs = {
        "grid_interp_x": axis.copy(),
        "grid_interp_y": axis.copy(),
        "f_": maps["psi"],
        "f_x": maps["alpha_x"],
        "f_y": maps["alpha_y"],
        "f_xx": maps["psi_xx"],
        "f_yy": maps["psi_yy"],
        "f_xy": maps["psi_xy"],
    }
    if gamma is None:
        return ["INTERPOL"], [kwargs]
    kwargs_shear: LensKwargs = dict(zip(SHEAR_KEYS, (gamma[0], gamma[1], 0.0, 0.0), strict=True))
    return ["INTERPOL", "SHEAR"], [kwargs, kwargs_shear]


def write_lenstronomy(path: str | Path, kappa: MapLike, grid: PixelGrid, shear: ShearLike | None = None) -> Path:
    """Write the lenstronomy ``INTERPOL`` model of ``kappa`` (plus ``SHEAR``) to a NumPy ``.npz`` file (atomically).

    The archive holds the eight ``INTERPOL`` arrays (:data:`INTERPOL_KEYS`, float64), their names as
    ``interpol_keys``, ``lens_model_list`` (``["INTERPOL"]``), ``kappa`` (the input map),
    ``pixel_scale_arcsec``, ``n_pixels``, ``conventions`` and ``rimlens_version``; with ``shear``,
    ``lens_model_list`` is ``["INTERPOL", "SHEAR"]`` and ``shear`` (float64 ``[gamma1, gamma2, 0, 0]``)
    and ``shear_keys`` (:data:`SHEAR_KEYS`) hold the ``SHEAR`` kwargs. All plain arrays (``np.load``
    needs no pickle). Load it with :func:`read_lenstronomy` or as in the module docstring.

    Args:
        path: output file (``.npz`` recommended; the name is used as given).
        kappa: convergence (dimensionless) on ``grid``, ``N x N`` or ``1 x 1 x N x N``.
        grid: the kappa grid.
        shear: optional external shear ``(gamma1, gamma2)``, as in :func:`to_lenstronomy_interpol`.

    Returns:
        The path written.
    """
    lens_model_list, kwargs_lens = to_lenstronomy_interpol(kappa, grid, shear)
    arrays: dict[str, Any] = dict(kwargs_lens[0])
    arrays["interpol_keys"] = np.array(INTERPOL_KEYS)
    arrays["lens_model_list"] = np.array(lens_model_list)
    arrays["kappa"] = _as_map(kappa, "kappa")[0, 0].numpy()
    arrays["pixel_scale_arcsec"] = np.array(grid.pixel_scale_arcsec)
    arrays["n_pixels"] = np.array(grid.n_pixels)
    arrays["conventions"] = np.array(CONVENTIONS)
    arrays["rimlens_version"] = np.array(__version__)
    if len(kwargs_lens) > 1:
        arrays["shear"] = np.array([kwargs_lens[1][k] for k in SHEAR_KEYS], dtype=np.float64)
        arrays["shear_keys"] = np.array(SHEAR_KEYS)
    path = Path(path)
    with atomic_path(path, suffix=".npz.tmp") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def read_lenstronomy(path: str | Path) -> tuple[list[str], list[LensKwargs]]:
    """Read a file of :func:`write_lenstronomy`: ``(lens_model_list, kwargs_lens)`` for lenstronomy's ``LensModel``
    (``(["INTERPOL"], [kwargs])``, or ``(["INTERPOL", "SHEAR"], [kwargs, kwargs_shear])`` with float shear kwargs)."""
    path = Path(path)
    if not path.exists():
        raise RimlensInputError(f"lenstronomy export not found: {path}")
    with np.load(path, allow_pickle=False) as f:
        keys = [str(k) for k in f["interpol_keys"]]
        kwargs: LensKwargs = {k: np.asarray(f[k], dtype=np.float64) for k in keys}
        models = [str(m) for m in f["lens_model_list"]]
        kwargs_lens = [kwargs]
        if "SHEAR" in models:
            kwargs_lens.append({str(k): float(v) for k, v in zip(f["shear_keys"], f["shear"], strict=True)})
    return models, kwargs_lens


# ------------------------------------------------------------------------------ COOLEST
def _fov(grid: PixelGrid) -> list[float]:
    """COOLEST field of view of a rimlens grid: outer pixel edges ``[-N s / 2, N s / 2]`` (arcsec)."""
    half = grid.fov_arcsec / 2
    return [-half, half]


def _header(grid: PixelGrid, bunit: str, what: str) -> fits.Header:
    """FITS cards for a map on ``grid``: linear offsets from the optical axis in arcsec (x = axis 1)."""
    c = (grid.n_pixels + 1) / 2
    h = fits.Header()
    h["BUNIT"] = (bunit, "map units")
    h["CTYPE1"] = ("OFFSET-X", "x offset from the lens axis (to the right)")
    h["CTYPE2"] = ("OFFSET-Y", "y offset from the lens axis (up)")
    h["CUNIT1"], h["CUNIT2"] = "arcsec", "arcsec"
    h["CRPIX1"], h["CRPIX2"] = c, c
    h["CRVAL1"], h["CRVAL2"] = 0.0, 0.0
    h["CDELT1"], h["CDELT2"] = grid.pixel_scale_arcsec, grid.pixel_scale_arcsec
    h["PIXSCALE"] = (grid.pixel_scale_arcsec, "arcsec / pixel")
    h["COOLEST"] = (what[:68], "content")
    h["ORIGIN"] = f"rimlens {__version__}"
    return h


def _write_fits(path: Path, data: npt.NDArray[Any], header: fits.Header) -> None:
    """Atomically write a float64 image (2-D, or a 3-D stack of maps) with ``header``."""
    hdu = fits.PrimaryHDU(np.ascontiguousarray(data, dtype=np.float64), header=header)
    with atomic_path(path, suffix=".fits.tmp") as tmp:
        hdu.writeto(tmp, overwrite=True)


def _psf_kernel(psf: PSF | MapLike) -> npt.NDArray[np.float64]:
    """``K x K`` unit-sum kernel (row 0 at the bottom) of a rimlens PSF or of a kernel array."""
    p = psf if isinstance(psf, PSF) else PSF.from_kernel(torch.as_tensor(np.asarray(psf, dtype=np.float64)))
    if p.batch_size != 1:
        raise RimlensInputError(f"psf must be a single kernel, got a batch of {p.batch_size}")
    return np.asarray(p.kernel[0, 0].detach().cpu().numpy(), dtype=np.float64)


def _noise(noise_sigma: float | MapLike, n_pixels: int) -> float | npt.NDArray[np.float64]:
    """A positive scalar sigma, or an ``N x N`` noise map."""
    a = noise_sigma.detach().cpu().numpy() if isinstance(noise_sigma, torch.Tensor) else np.asarray(noise_sigma)
    a = np.asarray(a, dtype=np.float64)
    if a.size == 1:
        v = float(a.reshape(()))
        if not np.isfinite(v) or v <= 0:
            raise RimlensInputError(f"noise_sigma must be finite and > 0, got {v}")
        return v
    m = _as_map(a, "noise_sigma", n_pixels)[0, 0].numpy()
    if not np.all(m > 0):
        raise RimlensInputError("noise_sigma map must be > 0 everywhere")
    return m


def write_coolest(
    out_dir: str | Path,
    *,
    source: MapLike,
    kappa: MapLike,
    image_grid: PixelGrid,
    source_grid: PixelGrid,
    observation: MapLike,
    noise_sigma: float | MapLike,
    psf: PSF | MapLike,
    lens_light: MapLike | None = None,
    mask: MapLike | None = None,
    name: str = "coolest",
    mass_profile: MassProfile = "PixelatedRegularGridFullyDefined",
    z_lens: float | None = None,
    z_source: float | None = None,
    cosmology: tuple[float, float] | None = None,
    origin_ra_dec: tuple[str, str] = ("0h0m0s", "0d0m0s"),
    instrument_name: str = "",
    band: str = "",
    shear: ShearLike | None = None,
) -> dict[str, str]:
    """Write a rimlens reconstruction as a COOLEST template (``mode="MAP"``) and its FITS files.

    Files in ``out_dir`` (all float64 FITS, maps indexed ``[y, x]`` with the bottom row first):
    ``{name}.json`` (the template), ``{name}-observation.fits``, ``{name}-psf.fits``,
    ``{name}-noise_map.fits`` (only for a noise map), ``{name}-mask.fits`` (only with ``mask``),
    ``{name}-source.fits``, ``{name}-lens_light.fits`` (only with ``lens_light``),
    ``{name}-potential.fits`` (arcsec^2), ``{name}-deflection.fits`` (stack ``[alpha_x, alpha_y]``,
    arcsec) and ``{name}-hessian.fits`` (stack ``[psi_xx, psi_yy, psi_xy]``), the last two only for
    ``PixelatedRegularGridFullyDefined``, and ``{name}-kappa.fits`` (not part of the standard; named
    in ``meta``).

    The template has two lensing entities, the ``Galaxy`` "lens" (mass: ``mass_profile`` on the
    image grid; light: a ``PixelatedRegularGrid`` on the image grid if ``lens_light`` is given) and
    the ``Galaxy`` "source" (light: a ``PixelatedRegularGrid`` on ``source_grid``), and with ``shear`` a
    third, the ``MassField`` "external_shear" (redshift ``z_lens``) with an ``ExternalShear`` profile:
    ``gamma_ext = hypot(gamma1, gamma2)``, ``phi_ext = degrees(atan2(gamma2, gamma1) / 2) + 90`` folded
    into ]-90, 90] (degrees east of north, :func:`coolest_shear`); an ``Observation``
    (the image, ``UniformGaussianNoise`` for a scalar sigma or ``NoiseMap``), an ``Instrument`` (pixel
    size, ``PixelatedPSF``), the ``Cosmology`` if given and, with ``mask``, an ``ImagingDataLikelihood``.
    Light maps keep the observation's units: COOLEST evaluates a ``PixelatedRegularGrid`` by
    interpolation without a pixel-area factor, as rimlens maps the source onto the image.

    Reading it back with coolest 0.1.11 works, with two harmless quirks of that version: it warns
    "Image dimensions do not match the FITS header" for each 3-D stack (it compares the array shape
    ``(K, N, N)`` with ``(NAXIS1, NAXIS2, NAXIS3)``), and it reads the 2-D potential of
    ``PixelatedRegularGridFullyDefined`` as a stack, with ``num_stack = N``.

    Args:
        out_dir: output folder (created).
        source: source surface brightness on ``source_grid``, ``M x M`` or ``1 x 1 x M x M``.
        kappa: convergence (dimensionless) on ``image_grid``, ``N x N`` or ``1 x 1 x N x N``.
        image_grid: grid of the observation, of kappa and of the lens light.
        source_grid: grid of the source.
        observation: the image on ``image_grid``.
        noise_sigma: noise standard deviation, a positive scalar or a map on ``image_grid``.
        psf: a :class:`rimlens.physics.PSF` (one kernel) or an odd ``K x K`` kernel (normalised to unit sum),
            on the image pixel scale.
        lens_light: optional lens-light map on ``image_grid``.
        mask: optional map on ``image_grid``, nonzero / True where a pixel is used in the likelihood.
        name: prefix of the file names.
        mass_profile: ``"PixelatedRegularGridFullyDefined"`` (default) or ``"PixelatedRegularGridPotential"``.
        z_lens, z_source: redshifts, if known.
        cosmology: ``(H0 [km/s/Mpc], Om0)`` of a flat Lambda-CDM cosmology, if any.
        origin_ra_dec: RA and Dec (ICRS, strings with units, e.g. ``("10h21m3.5s", "-12d3m4s")``) of the
            optical axis, the origin of the x, y offsets.
        instrument_name, band: instrument metadata.
        shear: optional external shear ``(gamma1, gamma2)`` in rimlens' frame (lenstronomy's ``SHEAR`` about
            the grid's centre); ``hypot(gamma1, gamma2)`` must not exceed 1 (COOLEST's range for ``gamma_ext``).

    Returns:
        ``{"json": path, "<file name>": path, ...}`` of the files written (strings).
    """
    from coolest.template.lazy import (
        CoordinatesOrigin,
        Cosmology,
        DataLikelihoodList,
        Galaxy,
        ImagingDataLikelihood,
        Instrument,
        LensingEntityList,
        LightModel,
        MassField,
        MassModel,
        NoiseMap,
        Observation,
        PixelatedPSF,
        PixelatedRegularGrid,
        PixelatedRegularGridStack,
        UniformGaussianNoise,
    )
    from coolest.template.standard import COOLEST

    if mass_profile not in ("PixelatedRegularGridFullyDefined", "PixelatedRegularGridPotential"):
        raise RimlensInputError(
            "mass_profile must be 'PixelatedRegularGridFullyDefined' or 'PixelatedRegularGridPotential', "
            f"got {mass_profile!r}"
        )
    if not name or "/" in name or name.startswith("."):
        raise RimlensInputError(f"name must be a plain file-name prefix, got {name!r}")
    gamma = _shear(shear)
    if gamma is not None and math.hypot(*gamma) > 1.0:
        raise RimlensInputError(f"shear magnitude must be <= 1 for COOLEST, got {math.hypot(*gamma)} from {gamma}")
    out = Path(out_dir).resolve()  # COOLEST wants absolute template paths
    out.mkdir(parents=True, exist_ok=True)
    n = image_grid.n_pixels
    obs = _as_map(observation, "observation", n)[0, 0].numpy()
    src = _as_map(source, "source", source_grid.n_pixels)[0, 0].numpy()
    light = None if lens_light is None else _as_map(lens_light, "lens_light", n)[0, 0].numpy()
    msk = None if mask is None else (_as_map(mask, "mask", n)[0, 0].numpy() != 0).astype(np.float64)
    sigma = _noise(noise_sigma, n)
    kernel = _psf_kernel(psf)
    if kernel.shape[0] > n:
        raise RimlensInputError(f"PSF kernel ({kernel.shape[0]} px) is larger than the image ({n} px)")
    maps = lens_maps(kappa, image_grid)
    psf_grid = PixelGrid(kernel.shape[0], image_grid.pixel_scale_arcsec)

    paths: dict[str, str] = {}

    def put(suffix: str, data: npt.NDArray[Any], grid: PixelGrid, bunit: str, what: str) -> str:
        fname = f"{name}-{suffix}.fits"
        _write_fits(out / fname, data, _header(grid, bunit, what))
        paths[fname] = str(out / fname)
        return fname

    def regular(fname: str, grid: PixelGrid, stack: bool = False) -> Any:
        cls = PixelatedRegularGridStack if stack else PixelatedRegularGrid
        with warnings.catch_warnings():
            # coolest 0.1.11 compares a stack's shape (K, N, N) with (NAXIS1, NAXIS2, NAXIS3) = (N, N, K)
            warnings.filterwarnings("ignore", message="Image dimensions do not match the FITS header")
            return cls(
                fname,
                field_of_view_x=_fov(grid),
                field_of_view_y=_fov(grid),
                num_pix_x=grid.n_pixels,
                num_pix_y=grid.n_pixels,
                check_fits_file=True,
                fits_file_dir=str(out),
            )

    # observation, noise, PSF, likelihood mask
    obs_grid = regular(put("observation", obs, image_grid, "image units", "observed image"), image_grid)
    if isinstance(sigma, float):
        noise = UniformGaussianNoise(std_dev=sigma)
    else:
        noise = NoiseMap(
            noise_map=regular(put("noise_map", sigma, image_grid, "image units", "noise sigma"), image_grid)
        )
    observation_c = Observation(pixels=obs_grid, noise=noise)
    psf_c = PixelatedPSF(
        pixels=regular(put("psf", kernel, psf_grid, "unit sum", "PSF kernel, image pixel scale"), psf_grid),
        description="rimlens PSF kernel (unit sum, convolution, row 0 at the bottom)",
    )
    instrument = Instrument(pixel_size=image_grid.pixel_scale_arcsec, name=instrument_name, band=band, psf=psf_c)
    likelihoods = None
    if msk is not None:
        mask_grid = regular(put("mask", msk, image_grid, "1 = used", "likelihood mask"), image_grid)
        likelihoods = DataLikelihoodList(ImagingDataLikelihood(mask=mask_grid))

    # lens galaxy: mass (and light)
    lens_mass = MassModel(mass_profile)
    lens_mass[0].parameters["pixels"] = regular(
        put("potential", maps["psi"], image_grid, "arcsec^2", "lensing potential"), image_grid
    )
    if mass_profile == "PixelatedRegularGridFullyDefined":
        deriv = np.stack([maps["alpha_x"], maps["alpha_y"]])
        hess = np.stack([maps["psi_xx"], maps["psi_yy"], maps["psi_xy"]])
        lens_mass[0].parameters["pixels_derivative"] = regular(
            put("deflection", deriv, image_grid, "arcsec", "potential derivatives [x, y]"), image_grid, stack=True
        )
        lens_mass[0].parameters["pixels_hessian"] = regular(
            put("hessian", hess, image_grid, "", "potential Hessian [xx, yy, xy]"), image_grid, stack=True
        )
    kappa_file = put("kappa", maps["kappa"], image_grid, "", "convergence (not a COOLEST field)")
    lens_light_model = LightModel("PixelatedRegularGrid") if light is not None else LightModel()
    if light is not None:
        lens_light_model[0].parameters["pixels"] = regular(
            put("lens_light", light, image_grid, "image units", "lens light"), image_grid
        )
    lens = Galaxy("lens", z_lens, light_model=lens_light_model, mass_model=lens_mass)

    # source galaxy
    source_light = LightModel("PixelatedRegularGrid")
    source_light[0].parameters["pixels"] = regular(
        put("source", src, source_grid, "image units", "source surface brightness"), source_grid
    )
    source_gal = Galaxy("source", z_source, light_model=source_light, mass_model=MassModel())
    entities = [lens, source_gal]
    if gamma is not None:
        shear_mass = MassModel("ExternalShear")
        gamma_ext, phi_ext = coolest_shear(*gamma)
        shear_mass[0].parameters["gamma_ext"].set_point_estimate(gamma_ext)
        shear_mass[0].parameters["phi_ext"].set_point_estimate(phi_ext)
        entities.append(MassField("external_shear", z_lens, mass_model=shear_mass))

    meta = {
        "name": name,
        "rimlens_version": __version__,
        "conventions": CONVENTIONS,
        "kappa_fits": kappa_file,
        "potential": "rimlens.physics.potential.lensing_potential, self_term='deflection' (arcsec^2)",
        "hessian_stack_order": "xx, yy, xy",
        "derivative_stack_order": "x, y",
    }
    if gamma is not None:
        meta["external_shear"] = (
            f"gamma1 = {gamma[0]!r}, gamma2 = {gamma[1]!r} (lenstronomy SHEAR in the rimlens frame, about (0, 0)); "
            "phi_ext = degrees(atan2(gamma2, gamma1) / 2) + 90 folded into ]-90, 90] (east of north)"
        )
    template = COOLEST(
        "MAP",
        CoordinatesOrigin(*origin_ra_dec),
        LensingEntityList(*entities),
        observation_c,
        instrument,
        cosmology=None if cosmology is None else Cosmology(H0=float(cosmology[0]), Om0=float(cosmology[1])),
        likelihoods=likelihoods,
        metadata=meta,
    )
    json_path = out / f"{name}.json"
    with atomic_path(json_path) as tmp:
        tmp.write_text(template.to_JSON(indent=2, exclude_keys=template.exclude_keys))
    paths["json"] = str(json_path)
    return paths
