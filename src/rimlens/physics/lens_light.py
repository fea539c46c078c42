"""Lens-galaxy light: an elliptical multi-Gaussian expansion (MGE) with non-negative amplitudes.

The light of the (foreground) lens galaxy is modelled as a sum of ``K`` concentric elliptical
Gaussians with fixed, log-spaced widths ``sigma_k`` sharing one centre ``(x0, y0)``, axis ratio ``q``
and position angle ``phi`` (as in MGE fits of early-type galaxies, Cappellari 2002)::

    I(x, y) = sum_k a_k G_k(x, y),   G_k = exp(-R^2 / 2 sigma_k^2) / (2 pi sigma_k^2),
    R^2 = q x'^2 + y'^2 / q,         a_k >= 0,

with ``x'`` along the major axis (``phi`` counter-clockwise from +x). Each ``G_k`` has unit total flux
(its integral over the plane is 1 arcsec^-2 * arcsec^2), so ``a_k`` is the total flux of component
``k`` in image units x arcsec^2 and the images are surface brightness (image units), as everywhere in
rimlens. The convention is lenstronomy's ``GAUSSIAN_ELLIPSE`` (product-averaged radius; ``amp`` = total
flux), so ``q`` and ``phi`` mean the same as for :func:`rimlens.physics.profiles.sersic`.

The three levels:

* :func:`mge_basis` -- the ``B x K x N x N`` PSF-convolved (pixel-integrated) basis images;
* :func:`solve_amplitudes` -- the batched non-negative least-squares amplitudes for given data and
  noise (Lawson-Hanson active set on the ``K x K`` normal equations in float64, pure torch);
* :func:`fit_lens_light` -- also fits ``(x0, y0, q, phi)``: adaptive-moment start, then batched
  Levenberg-Marquardt on the profile likelihood (amplitudes re-solved at every step, variable projection).

Intended use inside a reconstruction (the lens light and the lensed source overlap, and an arc left in
the data is partly absorbed by the MGE): the caller alternates ::

    light = fit_lens_light(observation, sigma, psf, grid)                 # or with clip_sigma, see below
    for _ in range(n_outer):
        source, kappa = fit_source_and_kappa(observation - light.image())   # the caller's own step
        arcs = simulator.forward(source, kappa, psf)
        light = light.resolve(observation - arcs, sigma)                   # fixed shape: cheap (~ms)
        # ... or, now and then, refit the shape too:
        light = fit_lens_light(observation - arcs, sigma, psf, grid, center=light.center)

Without any source model yet, ``clip_sigma`` (e.g. 3) excludes pixels brighter than the light model by
more than ``clip_sigma`` noise sigmas (arcs add light) and refits, which removes most of the arc bias.

Pixel integration and PSF: each Gaussian is integrated over the pixels and then convolved with the PSF
kernel (:meth:`rimlens.physics.PSF.convolve`), i.e. exactly the forward model of the simulator, for any
kernel (not only Gaussian PSFs, for which an analytic convolution would be possible; and the PSF is not
approximated by Gaussians). A Gaussian whose minor-axis sigma spans >= ``sampling`` (default 1.5) pixels
is sampled at the pixel centres with the pixel's variance ``s^2 / 12`` added to its covariance (the
box's second moment; the neglected fourth-order term is < 1e-3 of its peak). Narrower ones are
evaluated the same way on ``f x f`` sub-pixels (``f`` the power of two that makes the minor sigma
>= ``sampling`` sub-pixels, variance ``(s / f)^2 / 12`` added) and averaged over each pixel, on a cutout
of +-5 major-axis sigmas around the centre only: a Gaussian of sigma 0.1 px is then as accurate as a
broad one and costs about as much. Widths well below a pixel matter when the PSF is barely sampled
(e.g. 0.12"/px, FWHM 0.15"): with the true shape held fixed, a basis starting at 0.5 px leaves 2-8% of
the peak in the residual of Sersic n = 2.5-4 profiles there, one starting at 0.1 px (the default) < 1e-4.

Autograd: the amplitudes are differentiable with respect to the data, the noise and the basis (the
active set is found under ``no_grad``; a final linear solve restricted to it carries the gradient,
which is the exact derivative wherever the active set is locally constant, i.e. almost everywhere).
The non-linear parameters returned by :func:`fit_lens_light` are detached (the fit is not unrolled).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import scipy.optimize
import torch

from rimlens.errors import RimlensInputError, check_map, check_noise_sigma
from rimlens.physics.grid import PixelGrid
from rimlens.physics.likelihood import used_pixels
from rimlens.physics.psf import FWHM_TO_SIGMA, PSF
from rimlens.physics.resample import resample_density

__all__ = [
    "LensLightModel",
    "NativeFrame",
    "default_sigmas",
    "ellipticity_from_q_phi",
    "fit_lens_light",
    "gaussian_ellipticities",
    "mge_basis",
    "nnls_gram",
    "q_phi_from_ellipticity",
    "solve_amplitudes",
]

Q_MIN = 0.1
"""Smallest axis ratio the fit can reach (|e| <= (1 - Q_MIN) / (1 + Q_MIN))."""
_E_MAX = (1 - Q_MIN) / (1 + Q_MIN)
_CUTOUT_SIGMAS = 5.0  # narrow Gaussians are evaluated out to this many major-axis sigmas


# ------------------------------------------------------------------------------ parameters
def default_sigmas(
    grid: PixelGrid,
    n_gaussians: int = 30,
    min_pixels: float = 0.1,
    max_fraction: float = 0.5,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Log-spaced MGE widths from ``min_pixels`` pixels to ``max_fraction`` of the field of view.

    Args:
        grid: the image grid.
        n_gaussians: number ``K`` of Gaussians.
        min_pixels: narrowest width, in pixels.
        max_fraction: broadest width as a fraction of the field of view ``N * s``.
        dtype: dtype of the result.

    Returns:
        ``(K,)`` widths ``sigma_k`` in arcsec (geometric-mean widths: ``sigma / sqrt(q)`` along the major
        axis, ``sigma sqrt(q)`` along the minor axis).
    """
    if n_gaussians < 1:
        raise RimlensInputError(f"n_gaussians must be >= 1, got {n_gaussians}")
    lo = min_pixels * grid.pixel_scale_arcsec
    hi = max_fraction * grid.fov_arcsec
    if not 0 < lo <= hi:
        raise RimlensInputError(f"need 0 < min width ({lo} arcsec) <= max width ({hi} arcsec)")
    if n_gaussians == 1:
        return torch.tensor([math.sqrt(lo * hi)], dtype=dtype)
    return torch.logspace(math.log10(lo), math.log10(hi), n_gaussians, dtype=torch.float64).to(dtype)


def ellipticity_from_q_phi(q: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ellipticity components ``e1, e2 = (1 - q) / (1 + q) * (cos 2 phi, sin 2 phi)`` (lenstronomy's).

    ``q`` (dimensionless) and ``phi`` (radians) are tensors of any common shape; so are ``e1, e2``.
    """
    e = (1 - q) / (1 + q)
    return e * torch.cos(2 * phi), e * torch.sin(2 * phi)


def q_phi_from_ellipticity(e1: torch.Tensor, e2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`ellipticity_from_q_phi`: axis ratio ``q`` and angle ``phi`` in ``(-pi/2, pi/2]`` (radians).

    Tensors of any common shape in and out.
    """
    e = torch.sqrt(e1**2 + e2**2)
    return (1 - e) / (1 + e), 0.5 * torch.atan2(e2, e1)


def _as_batch(v: float | torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """A float or tensor of shape (), (1,), (B,) or B x 1 x 1 x 1, as a float64 (B,) tensor."""
    t = torch.as_tensor(v, dtype=torch.float64) if not isinstance(v, torch.Tensor) else v.to(torch.float64)
    t = t.reshape(-1)
    if batch is not None and t.shape[0] == 1 and batch > 1:
        t = t.expand(batch)
    return t


# ------------------------------------------------------------------------------ basis
@dataclass(frozen=True)
class _GaussianTerms:
    """Per-Gaussian constants of :func:`_gaussian_stack`, all ``B x K x 1 x 1`` (``coefs``: ``B x K x 12``,
    the amplitude-free coefficients of the model's derivatives; ``None`` when not asked for)."""

    ixx: torch.Tensor
    iyy: torch.Tensor
    ixy: torch.Tensor
    log_norm: torch.Tensor
    coefs: torch.Tensor | None

    def __getitem__(self, k: slice) -> _GaussianTerms:
        """The Gaussians ``k`` of the stack."""
        return _GaussianTerms(
            self.ixx[:, k], self.iyy[:, k], self.ixy[:, k], self.log_norm[:, k],
            None if self.coefs is None else self.coefs[:, k],
        )  # fmt: skip


def _gaussian_terms(
    e1: torch.Tensor, e2: torch.Tensor, sig2: torch.Tensor, var_pix: torch.Tensor, derivatives: bool
) -> _GaussianTerms:
    """The inverse covariances and log-normalisations of elliptical Gaussians of squared widths ``sig2``
    (``1 x K x 1 x 1``, arcsec^2) and ellipticities ``e1, e2`` (``B x K x 1 x 1``) with an extra isotropic
    variance ``var_pix`` (``1 x K x 1 x 1``, arcsec^2), computed once for the whole stack (they are tiny
    tensors: done per supersampling group, these few dozen operations cost more than the images)."""
    ee = e1**2 + e2**2
    den = 1 - ee
    a = (1 + ee) / den
    bc = -2 * e1 / den
    bs = -2 * e2 / den
    # R^2 = d^T M d with M = [[a + bc, bs], [bs, a - bc]], det M = 1; covariance C = sigma^2 M^-1 + var_pix I.
    cxx = sig2 * (a - bc) + var_pix
    cyy = sig2 * (a + bc) + var_pix
    cxy = -sig2 * bs
    det = cxx * cyy - cxy**2
    ixx, iyy, ixy = cyy / det, cxx / det, -cxy / det  # C^-1, B x K x 1 x 1
    log_norm = torch.log(2 * math.pi * torch.sqrt(det))
    if not derivatives:
        return _GaussianTerms(ixx, iyy, ixy, log_norm, None)
    # dG/dx0 = G (C^-1 d)_x, dG/dy0 = G (C^-1 d)_y, dG/dp = G (d^T C^-1 C_p C^-1 d - tr(C^-1 C_p)) / 2:
    # all are G times a quadratic form in (dx, dy) with per-Gaussian coefficients
    coefs = [torch.ones_like(ixx), ixx, ixy, iyy]
    den2 = den**2
    for da, dbc, dbs in (
        (4 * e1 / den2, -2 * (1 + e1**2 - e2**2) / den2, -4 * e1 * e2 / den2),
        (4 * e2 / den2, -4 * e1 * e2 / den2, -2 * (1 - e1**2 + e2**2) / den2),
    ):
        pxx, pyy, pxy = sig2 * (da - dbc), sig2 * (da + dbc), -sig2 * dbs  # dC/de
        t00, t01 = ixx * pxx + ixy * pxy, ixx * pxy + ixy * pyy  # C^-1 C_p
        t10, t11 = ixy * pxx + iyy * pxy, ixy * pxy + iyy * pyy
        coefs += [t00 * ixx + t01 * ixy, t00 * ixy + t01 * iyy, t10 * ixy + t11 * iyy, t00 + t11]
    b, k = ixx.shape[:2]
    return _GaussianTerms(ixx, iyy, ixy, log_norm, torch.cat([c.expand(b, k, 1, 1) for c in coefs], dim=-1)[:, :, 0])


def _gaussian_stack(
    dx: torch.Tensor, dy: torch.Tensor, terms: _GaussianTerms, amps: torch.Tensor | None
) -> torch.Tensor:
    """Unit-flux elliptical Gaussians (arcsec^-2) of the given :class:`_GaussianTerms`.

    ``dx``: ``B x 1 x 1 x W``, ``dy``: ``B x 1 x H x 1``, offsets from the centre in arcsec. Returns the
    ``B x K x H x W`` Gaussians, or with ``amps`` (``B x K``) the ``B x 5 x H x W`` stack of
    ``sum_k a_k G_k`` and its analytic derivatives with respect to ``(x0, y0, e1, e2)``.
    """
    # log G = -(ixx dx^2 + iyy dy^2 + 2 ixy dx dy) / 2 - log(2 pi sqrt(det C)): one full-size temporary
    g = (-0.5 * terms.ixx * dx**2 - terms.log_norm) + (-0.5 * terms.iyy) * dy**2
    g = g.addcmul_(-terms.ixy, dx * dy).exp_()
    if amps is None:
        return g
    assert terms.coefs is not None
    b = g.shape[0]
    coef = terms.coefs * amps[:, :, None]  # B x K x 12: sum over k first
    s = (coef.transpose(1, 2) @ g.flatten(2)).reshape(b, 12, *g.shape[-2:])
    dxy = dx * dy
    out = [
        s[:, 0],
        dx[:, 0] * s[:, 1] + dy[:, 0] * s[:, 2],
        dx[:, 0] * s[:, 2] + dy[:, 0] * s[:, 3],
    ]
    for j in (4, 8):
        qxx, qxy, qyy, tr = s[:, j], s[:, j + 1], s[:, j + 2], s[:, j + 3]
        out.append(0.5 * (dx[:, 0] ** 2 * qxx + dy[:, 0] ** 2 * qyy + 2 * dxy[:, 0] * qxy - tr))
    return torch.stack(out, dim=1)


def _render(
    grid: PixelGrid,
    x0: torch.Tensor,
    y0: torch.Tensor,
    e1: torch.Tensor,
    e2: torch.Tensor,
    sigmas: torch.Tensor,
    sampling: float,
    amps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pixel-averaged unit-flux Gaussians before the PSF (arcsec^-2); parameters ``(B,)`` float64, the
    ellipticity also ``B x K`` (one per Gaussian; the derivatives are then with respect to a common shift).

    Returns the ``B x K x N x N`` basis, or with ``amps`` (``B x K``) the ``B x 5 x N x N`` stack of
    the model ``sum_k a_k G_k`` and its derivatives with respect to ``(x0, y0, e1, e2)``.

    The Gaussians whose minor-axis sigma (at the smallest ``q`` of the batch) is >= ``sampling``
    pixels are sampled at the pixel centres with the pixel's variance ``s^2 / 12`` added to their
    covariance. The narrower ones are grouped by a supersampling factor ``f`` (the power of two that
    makes the minor sigma >= ``sampling`` sub-pixels), evaluated likewise on ``f x f`` sub-pixels
    (variance ``(s / f)^2 / 12`` added) over a cutout of +-5 major-axis sigmas around the pixel nearest
    the centre, averaged over each pixel and placed in the image.
    """
    n, s = grid.n_pixels, grid.pixel_scale_arcsec
    dtype, device = x0.dtype, x0.device
    b = x0.shape[0]
    sigmas = sigmas.to(dtype=dtype, device=device)
    x0r, y0r = (v.reshape(-1, 1, 1, 1) for v in (x0, y0))
    # one ellipticity per example, or one per Gaussian (B x K: an ellipticity gradient)
    e1r, e2r = (v.reshape(b, -1, 1, 1).expand(b, sigmas.shape[0], 1, 1) for v in (e1, e2))
    ampsr = None if amps is None else amps.to(dtype)
    sig_px = [float(v) / s for v in sigmas.detach().cpu()]
    with torch.no_grad():
        e_max = min(float(torch.sqrt(e1**2 + e2**2).max()), _E_MAX)
        sqrt_q_min = math.sqrt((1 - e_max) / (1 + e_max))
        col_c = torch.round(x0.detach() / s + (n - 1) / 2).clamp(0, n - 1).long()
        row_c = torch.round(y0.detach() / s + (n - 1) / 2).clamp(0, n - 1).long()
    # groups of consecutive Gaussians sharing a supersampling factor: (start, stop, f)
    groups: list[tuple[int, int, int]] = []
    for k, sp in enumerate(sig_px):
        minor = sp * sqrt_q_min
        f = 1 if minor >= sampling else 2 ** math.ceil(math.log2(sampling / minor))
        if groups and groups[-1][2] == f:
            groups[-1] = (groups[-1][0], k + 1, f)
        else:
            groups.append((k, k + 1, f))
    idx = torch.arange(n, device=device)
    # each Gaussian's sub-pixel variance (s / f)^2 / 12, and every per-Gaussian constant computed once
    var_pix = torch.tensor(
        [(s / f) ** 2 / 12 for start, stop, f in groups for _ in range(start, stop)], dtype=dtype, device=device
    ).reshape(1, -1, 1, 1)
    terms = _gaussian_terms(e1r, e2r, (sigmas**2).reshape(1, -1, 1, 1), var_pix, amps is not None)
    parts = []
    for start, stop, f in groups:
        amp_g = None if ampsr is None else ampsr[:, start:stop]
        if f == 1:
            axis = grid.axis(dtype, device)
            dx = axis.reshape(1, 1, 1, -1) - x0r
            dy = axis.reshape(1, 1, -1, 1) - y0r
            parts.append(_gaussian_stack(dx, dy, terms[start:stop], amp_g))
            continue
        half = min(n - 1, math.ceil(_CUTOUT_SIGMAS * sig_px[stop - 1] / sqrt_q_min) + 1)
        m = 2 * half + 1
        fine = (torch.arange(m * f, dtype=dtype, device=device) - (m * f - 1) / 2) * (s / f)
        xc = ((col_c.to(dtype) - (n - 1) / 2) * s).reshape(-1, 1, 1, 1)  # centre of the cutout, arcsec
        yc = ((row_c.to(dtype) - (n - 1) / 2) * s).reshape(-1, 1, 1, 1)
        dx = (xc - x0r) + fine.reshape(1, 1, 1, -1)
        dy = (yc - y0r) + fine.reshape(1, 1, -1, 1)
        cut = _gaussian_stack(dx, dy, terms[start:stop], amp_g)
        cut = torch.nn.functional.avg_pool2d(cut, f)
        # image pixel i <- cutout pixel i - centre + half (zero outside the cutout)
        c = cut.shape[1]
        rows = idx[None, :] - row_c[:, None] + half  # B x N
        cols = idx[None, :] - col_c[:, None] + half
        rows_ok = ((rows >= 0) & (rows < m)).to(dtype)
        cols_ok = ((cols >= 0) & (cols < m)).to(dtype)
        cut = cut.gather(2, rows.clamp(0, m - 1)[:, None, :, None].expand(b, c, n, m))
        cut = cut.gather(3, cols.clamp(0, m - 1)[:, None, None, :].expand(b, c, n, n))
        parts.append(cut * rows_ok[:, None, :, None] * cols_ok[:, None, None, :])
    if amps is not None:
        return torch.stack(parts).sum(0)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


@dataclass(frozen=True)
class NativeFrame:
    """The detector's own pixels, for data that were resampled onto the model grid.

    A prepared observation (:func:`rimlens.io.observation.prepare_observation`) is the detector image
    resampled onto the model grid by area overlap. Rendering the light there directly and convolving with
    a PSF sampled on the model grid only approximates that operator: at 0.12" model pixels an HST PSF
    (FWHM ~0.1") is undersampled, and where a lens galaxy is hundreds of times brighter than the noise the
    approximation leaves tens of sigma (README, "Lens light"). This frame renders the Gaussians on the
    detector's pixel grid (``grid``, square, its pixel edges on the detector's), convolves them with the
    PSF at that scale and resamples them to the model grid exactly as the data were
    (:func:`rimlens.physics.resample.resample_density`): the data's own forward model.

    Attributes:
        grid: the square detector-scale grid rendered (``R`` pixels of the detector's size ``s_in``).
        offset_arcsec: ``(x, y)`` of ``grid``'s centre relative to the model grid's centre (arcsec).
        psf: the PSF at the detector's pixel scale.
        model_grid: the model grid the images are resampled to.
    """

    grid: PixelGrid
    offset_arcsec: tuple[float, float]
    psf: PSF
    model_grid: PixelGrid

    @classmethod
    def for_cutout(
        cls,
        model_grid: PixelGrid,
        pixel_scale_arcsec: float,
        shape: tuple[int, int],
        center_arcsec: tuple[float, float],
        psf_kernel: torch.Tensor,
    ) -> NativeFrame:
        """The frame of a cut-out of ``shape = (rows, cols)`` detector pixels of ``pixel_scale_arcsec``
        whose point ``center_arcsec`` (arcsec from the cut-out's centre) is the model grid's centre, with
        the PSF ``psf_kernel`` (``K x K`` or ``1 x 1 x K x K`` at the detector's scale). The rendered grid
        covers the model field plus the PSF's reach, its pixel edges on the cut-out's."""
        s = float(pixel_scale_arcsec)
        kernel = torch.as_tensor(psf_kernel, dtype=torch.float64).reshape(1, 1, *psf_kernel.shape[-2:])
        size = math.ceil(model_grid.fov_arcsec / s - 1e-9) + 2 + kernel.shape[-1]
        offset = []
        for n_in, c in zip((shape[1], shape[0]), center_arcsec, strict=True):
            # grid centres that put its edges on the cut-out's: s * ((size - n_in) / 2 + k), k integer
            base = s * (size - n_in) / 2
            offset.append(base + s * round((c - base) / s) - c)
        return cls(PixelGrid(size, s), (offset[0], offset[1]), PSF.from_kernel(kernel), model_grid)

    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        """Resample ``B x C x R x R`` detector-grid images (surface brightness) to ``B x C x N x N``
        model-grid pixel means, as the data were."""
        ox, oy = self.offset_arcsec
        return resample_density(
            images,
            self.grid.pixel_scale_arcsec,
            self.model_grid.n_pixels,
            self.model_grid.pixel_scale_arcsec,
            (-ox, -oy),
        )


def _basis_images(
    grid: PixelGrid,
    psf: PSF | None,
    native: NativeFrame | None,
    x0: torch.Tensor,
    y0: torch.Tensor,
    e1: torch.Tensor,
    e2: torch.Tensor,
    sigmas: torch.Tensor,
    sampling: float,
    amps: torch.Tensor | None = None,
    convolve: bool = True,
) -> torch.Tensor:
    """:func:`_render` (then the PSF unless ``convolve`` is False) on the model ``grid``, or, with a
    ``native`` frame, on the detector's grid, convolved with its PSF and resampled to the model grid."""
    if native is None:
        if convolve and psf is not None:
            return _render_convolved(grid, psf, x0, y0, e1, e2, sigmas, sampling, amps)
        return _render(grid, x0, y0, e1, e2, sigmas, sampling, amps)
    ox, oy = native.offset_arcsec
    out = _render(native.grid, x0 - ox, y0 - oy, e1, e2, sigmas, sampling, amps)
    if convolve:
        out = _convolve_stack(out, native.psf)
    return native.to_model(out)


def _render_convolved(
    grid: PixelGrid,
    psf: PSF,
    x0: torch.Tensor,
    y0: torch.Tensor,
    e1: torch.Tensor,
    e2: torch.Tensor,
    sigmas: torch.Tensor,
    sampling: float,
    amps: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`_render` convolved with ``psf``, the ``B x C x N x N`` result on ``grid``.

    Rendered on a canvas larger by the PSF's half-size on every side (same centre and pixel scale) and
    cropped after the convolution, so that the field's edge pixels receive the light the PSF scatters in
    from beyond the edge, as a detector's do. A zero-padded convolution on ``grid`` itself loses it: a
    broad lens galaxy is then too faint along the edges by up to the PSF's wings times its brightness
    there (chi2 3.4 per edge pixel on a lenstronomy Sersic light 49x the arcs, README "Lens light").
    """
    margin = psf.size // 2
    n = grid.n_pixels
    canvas = PixelGrid(n + 2 * margin, grid.pixel_scale_arcsec)
    return _convolve_stack(_render(canvas, x0, y0, e1, e2, sigmas, sampling, amps), psf, margin)


def _convolve_stack(images: torch.Tensor, psf: PSF, margin: int = 0) -> torch.Tensor:
    """Convolve ``B x K x N x N`` images with a PSF of batch 1 or ``B`` (each channel alike); with a
    ``margin``, keep only the central ``N - 2 margin`` pixels (:meth:`PSF.convolve_interior`)."""
    b, k = images.shape[:2]
    flat = images.reshape(b * k, 1, *images.shape[-2:])
    if psf.batch_size == b and b > 1:
        psf = psf.select(torch.arange(b, device=psf.kernel.device).repeat_interleave(k))
    elif psf.batch_size != 1:
        raise RimlensInputError(f"PSF batch ({psf.batch_size}) does not match the batch ({b})")
    out = psf.convolve_interior(flat, margin) if margin else psf.convolve(flat)
    return out.reshape(b, k, *out.shape[-2:])


def _check_sigmas(sigmas: torch.Tensor | Sequence[float]) -> torch.Tensor:
    sig = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    if sig.numel() == 0 or not bool(torch.isfinite(sig).all()) or bool((sig <= 0).any()):
        raise RimlensInputError("sigmas must be a non-empty sequence of finite widths > 0 (arcsec)")
    if sig.numel() > 1 and not bool((sig[1:] > sig[:-1]).all()):
        raise RimlensInputError("sigmas must be strictly increasing")
    return sig


def mge_basis(
    grid: PixelGrid,
    x0: float | torch.Tensor,
    y0: float | torch.Tensor,
    q: float | torch.Tensor,
    phi: float | torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    psf: PSF | None,
    *,
    sampling: float = 1.5,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Pixel-integrated, PSF-convolved elliptical Gaussians of unit total flux.

    Args:
        grid: the image grid (``N`` pixels of ``s`` arcsec).
        x0, y0: centre in arcsec, floats or ``(B,)`` tensors.
        q: axis ratio (0 < q <= 1), float or ``(B,)``.
        phi: position angle of the major axis, radians counter-clockwise from +x, float or ``(B,)``.
        sigmas: ``(K,)`` increasing widths in arcsec (the Gaussian is ``exp(-R^2 / 2 sigma^2)`` with
            ``R^2 = q x'^2 + y'^2 / q``); see :func:`default_sigmas`.
        psf: PSF of batch 1 or ``B``; ``None`` for the unconvolved basis.
        sampling: minimum number of (sub-)pixels per minor-axis sigma; narrower Gaussians are
            supersampled by the smallest power of two that achieves it.
        dtype: dtype of the computation and of the result (on the device of the tensor parameters,
            else of the PSF).

    Returns:
        ``B x K x N x N`` surface brightness per unit flux (arcsec^-2): each image sums to
        ``1 / s^2`` (times the fraction of the Gaussian inside the field). Differentiable with respect
        to ``x0, y0, q, phi``.
    """
    sig = _check_sigmas(sigmas)
    vals = [torch.as_tensor(v).reshape(-1) for v in (x0, y0, q, phi)]
    batch = max(v.shape[0] for v in vals)
    tensors = [v for v in (x0, y0, q, phi) if isinstance(v, torch.Tensor)]
    device = tensors[0].device if tensors else (psf.kernel.device if psf is not None else sig.device)
    x0t, y0t, qt, phit = (_as_batch(v, batch).to(dtype=dtype, device=device) for v in (x0, y0, q, phi))
    if bool((qt <= 0).any()) or bool((qt > 1).any()):
        raise RimlensInputError(f"axis ratio q must be in (0, 1], got {qt.tolist()}")
    e1, e2 = ellipticity_from_q_phi(qt, phit)
    if psf is None:
        return _render(grid, x0t, y0t, e1, e2, sig.to(dtype), sampling)
    return _render_convolved(grid, psf, x0t, y0t, e1, e2, sig.to(dtype), sampling)


# ------------------------------------------------------------------------------ NNLS
def _solve_on_set(gram: torch.Tensor, rhs: torch.Tensor, passive: torch.Tensor) -> torch.Tensor:
    """Solve ``gram[P, P] z[P] = rhs[P]`` per example, ``z = 0`` off ``P``.

    ``gram``: ``B x K x K``; ``rhs``: ``B x K`` or ``B x K x R``; ``passive``: ``B x K`` bool.
    """
    pf = passive.to(gram.dtype)
    m = gram * pf[:, :, None] * pf[:, None, :] + torch.diag_embed(1 - pf)
    if rhs.ndim == 2:
        return torch.linalg.solve(m, rhs * pf)
    return torch.linalg.solve(m, rhs * pf[:, :, None])


def _nnls_scipy(
    g: torch.Tensor, h: torch.Tensor, usable: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nnls_gram` by SciPy's Lawson-Hanson, per example, on the least-squares problem ``min |R x - c|^2`` whose normal
    equations are the scaled ``g x = h``: ``R = Lambda^1/2 V^T``, ``c = Lambda^-1/2 V^T h`` from the
    eigendecomposition of ``g`` (eigenvalues below 1e-13 of the largest dropped: a semi-definite ``g``
    has no Cholesky factor)."""
    x = torch.zeros_like(h)
    for i in range(h.shape[0]):
        keep = usable[i]
        gi, hi = g[i][keep][:, keep], h[i][keep]
        lam, vec = torch.linalg.eigh(gi)
        ok = lam > 1e-13 * lam[-1].clamp_min(1e-300)
        root = lam[ok].sqrt()
        r = (root[:, None] * vec[:, ok].T).numpy()
        c = ((vec[:, ok].T @ hi) / root).numpy()
        sol, _ = scipy.optimize.nnls(r, c, maxiter=50 * gi.shape[0])
        x[i, keep] = torch.as_tensor(sol, dtype=h.dtype)
    passive = x > 0
    return x * scale, passive


def nnls_gram(
    gram: torch.Tensor,
    rhs: torch.Tensor,
    max_iter: int | None = None,
    tol: float = 1e-11,
    passive_start: torch.Tensor | None = None,
    method: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched non-negative least squares on the normal equations (Lawson-Hanson active set).

    Minimises ``x^T G x / 2 - h^T x`` subject to ``x >= 0`` for each example (``G = A^T W A``,
    ``h = A^T W d`` for the problem ``min ||W^1/2 (A x - d)||^2``). Runs in float64 under ``no_grad``
    (columns are scaled to unit diagonal first); see :func:`solve_amplitudes` for the differentiable
    wrapper.

    Args:
        gram: ``B x K x K`` symmetric positive (semi-)definite matrices ``G``.
        rhs: ``B x K`` vectors ``h``.
        max_iter: maximum number of active-set steps (default ``5 K + 10``).
        tol: a variable enters the set when its scaled negative gradient exceeds ``tol`` times the
            largest ``|h_k| / sqrt(G_kk)``.
        passive_start: optional ``B x K`` bool guess of the passive set (e.g. the solution's of a nearby
            problem, as in a shape fit's successive steps): the unconstrained solution on it, with the
            variables that come out non-positive dropped until none does, is the feasible start of the
            active-set iterations, which then usually need one or two steps instead of one per
            passive variable. The solution is the same (it is unique for a positive definite ``G``).
            The torch method only (SciPy's needs no warm start).
        method: ``"torch"`` (the batched active-set loop here, any device), ``"scipy"`` (SciPy's
            compiled Lawson-Hanson per example, CPU: ~50x faster for ``K = 30``, where the loop's small
            operations cost ~8 ms; ``max_iter`` and ``tol`` unused) or ``"auto"`` (SciPy on the CPU).

    Returns:
        ``(x, passive)``: the ``B x K`` float64 solution (in the units of ``h / G``) and the ``B x K``
        boolean passive set (``x > 0`` there, ``x = 0`` elsewhere).
    """
    with torch.no_grad():
        g = gram.detach().to(torch.float64)
        h = rhs.detach().to(torch.float64)
        b, k = h.shape
        diag = torch.diagonal(g, dim1=-2, dim2=-1)
        usable = diag > 1e-14 * diag.amax(dim=-1, keepdim=True).clamp_min(1e-300)
        scale = torch.where(usable, diag.clamp_min(1e-300).rsqrt(), torch.zeros_like(diag))
        g = g * scale[:, :, None] * scale[:, None, :]
        h = h * scale
        if method not in ("auto", "scipy", "torch"):
            raise RimlensInputError(f"NNLS method must be 'auto', 'scipy' or 'torch', got {method!r}")
        if method == "scipy" or (method == "auto" and h.device.type == "cpu"):
            x, passive = _nnls_scipy(g.cpu(), h.cpu(), usable.cpu(), scale.cpu())
            return x.to(h.device), passive.to(h.device)
        thresh = tol * h.abs().amax(dim=-1).clamp_min(1e-300)  # (B,)
        x = torch.zeros_like(h)
        passive = torch.zeros_like(h, dtype=torch.bool)
        if passive_start is not None:
            passive = passive_start.to(device=h.device, dtype=torch.bool).expand_as(h) & usable
            for _ in range(k):
                z = _solve_on_set(g, h, passive)
                negative = passive & ~(z > 0)
                if not bool(negative.any()):
                    break
                passive = passive & ~negative
            x = torch.where(passive, z, torch.zeros_like(z)) if bool(passive.any()) else x
        blocked = torch.zeros_like(passive)
        need_add = torch.ones(b, dtype=torch.bool, device=h.device)
        done = torch.zeros_like(need_add)
        rows = torch.arange(b, device=h.device)
        for _ in range(max_iter if max_iter is not None else 5 * k + 10):
            w = h - (g @ x[:, :, None])[..., 0]
            cand = ~passive & ~blocked & usable & (w > thresh[:, None])
            done = done | (need_add & ~cand.any(dim=-1))
            if bool(done.all()):
                break
            adding = need_add & ~done
            j = torch.where(cand, w, torch.full_like(w, -torch.inf)).argmax(dim=-1)
            added = torch.zeros_like(passive)
            added[rows[adding], j[adding]] = True
            passive = passive | added
            z = _solve_on_set(g, h, passive)
            bad = passive & (z <= 0)
            feasible = ~bad.any(dim=-1)
            # The variable just added has a non-positive solution: a round-off artefact of the KKT test.
            # Drop it, block it until the solution changes, and keep the current x.
            fresh_bad = adding & (bad & added).any(dim=-1)
            upd = ~done & ~fresh_bad
            # feasible: accept z and go back to the KKT test
            acc = upd & feasible
            x = torch.where(acc[:, None], z, x)
            blocked = blocked & ~acc[:, None]
            # infeasible: move towards z until the first variable hits zero, and drop it
            step = upd & ~feasible
            ratio = torch.where(bad, x / (x - z).clamp_min(1e-300), torch.full_like(x, torch.inf))
            alpha = ratio.amin(dim=-1).clamp(0, 1)
            hit = ratio.argmin(dim=-1)
            x_new = x + alpha[:, None] * (z - x)
            keep = passive & (x_new > 1e-300)
            keep[rows, hit] = False
            keep = keep | (passive & ~step[:, None])  # only the stepping examples lose variables
            x = torch.where(step[:, None], torch.where(keep, x_new, torch.zeros_like(x_new)), x)
            passive = torch.where(step[:, None], keep, passive)
            passive = torch.where(fresh_bad[:, None], passive & ~added, passive)
            blocked = blocked | (fresh_bad[:, None] & added)
            need_add = torch.where(done, need_add, acc | fresh_bad)
        x = torch.where(passive, x, torch.zeros_like(x)) * scale
    return x, passive


def _weights(
    noise_sigma: float | torch.Tensor, mask: torch.Tensor | None, shape: Sequence[int], like: torch.Tensor
) -> torch.Tensor:
    """``B x 1 x N x N`` inverse variances (0 on excluded pixels), float64."""
    sigma = check_noise_sigma(noise_sigma, shape[0], shape[-2:], like=like)
    used = used_pixels(sigma, shape, mask)
    safe = torch.where(used > 0, sigma, torch.ones_like(sigma))
    return (used / safe**2).to(torch.float64)


def _normal_equations(
    basis: torch.Tensor, data: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``G = A^T W A`` (``B x K x K``) and ``h = A^T W d`` (``B x K``) in float64."""
    a = basis.flatten(2).to(torch.float64)  # B x K x P
    aw = a * weights.flatten(2).to(torch.float64)  # B x K x P (weights B x 1 x P)
    gram = aw @ a.transpose(-1, -2)
    rhs = (aw @ data.flatten(2).to(torch.float64).transpose(-1, -2))[..., 0]
    return gram, rhs


def _amplitudes_from_system(
    gram: torch.Tensor, rhs: torch.Tensor, passive_start: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """NNLS under no_grad (:func:`nnls_gram`, optionally warm-started), then a differentiable solve on
    the passive set (float64 ``B x K``, passive)."""
    _, passive = nnls_gram(gram, rhs, passive_start=passive_start)
    diag = torch.diagonal(gram, dim1=-2, dim2=-1).detach()
    scale = torch.where(passive, diag.clamp_min(1e-300).rsqrt(), torch.zeros_like(diag))
    z = _solve_on_set(gram * scale[:, :, None] * scale[:, None, :], rhs * scale, passive)
    return z * scale, passive


def solve_amplitudes(
    basis: torch.Tensor,
    data: torch.Tensor,
    noise_sigma: float | torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-negative amplitudes minimising ``chi^2 = sum_p w_p (sum_k a_k A_kp - d_p)^2 / sigma_p^2``.

    Args:
        basis: ``B x K x N x N`` (or ``1 x K x N x N``, shared) basis images, e.g. from :func:`mge_basis`.
        data: ``B x 1 x N x N`` image to fit (e.g. the observation minus the lensed-source model).
        noise_sigma: float, ``(B,)`` or ``B x 1 x N x N`` noise sigma in the units of ``data``; pixels
            with sigma >= 1e6 are excluded.
        mask: optional boolean ``B x 1 x N x N`` (broadcastable), True = pixel used.

    Returns:
        ``B x K`` amplitudes ``a_k >= 0`` (units of ``data`` / units of ``basis``; total fluxes in image
        units x arcsec^2 for the MGE basis), in the promoted dtype of ``basis`` and ``data``.
        Differentiable w.r.t. ``data``, ``basis`` and ``noise_sigma`` (fixed active set).
    """
    check_map(data, "data")
    if basis.ndim != 4 or basis.shape[-2:] != data.shape[-2:] or basis.shape[0] not in (1, data.shape[0]):
        raise RimlensInputError(
            f"basis must be B x K x N x N matching data {tuple(data.shape)}, got {tuple(basis.shape)}"
        )
    out_dtype = torch.promote_types(basis.dtype, data.dtype)
    b = data.shape[0]
    if basis.shape[0] != b:
        basis = basis.expand(b, -1, -1, -1)
    w = _weights(noise_sigma, mask, data.shape, data)
    gram, rhs = _normal_equations(basis, data, w)
    amps, _ = _amplitudes_from_system(gram, rhs)
    return amps.to(out_dtype)


# ------------------------------------------------------------------------------ the model
@dataclass(eq=False)
class LensLightModel:
    """A fitted MGE lens-light model (all per-example tensors float64, detached except ``amplitudes``).

    Attributes:
        center_x, center_y: ``(B,)`` centre in arcsec.
        q: ``(B,)`` axis ratio.
        phi: ``(B,)`` position angle of the major axis, radians counter-clockwise from +x.
        sigmas: ``(K,)`` Gaussian widths in arcsec.
        amplitudes: ``B x K`` non-negative total fluxes (image units x arcsec^2); carries the gradient
            w.r.t. the fitted data.
        grid: the image grid.
        psf: the PSF.
        chi2: ``(B,)`` chi-square of the fit (over the used pixels).
        dtype: dtype of the images returned by :meth:`image` and :meth:`unconvolved` (that of the data).
        sampling: minimum number of (sub-)pixels per minor-axis sigma (see :func:`mge_basis`).
        native: the detector's frame (:class:`NativeFrame`): the basis is rendered there and resampled
            to ``grid`` (``psf`` is then unused); ``None``: rendered on ``grid``, convolved with ``psf``.
        ellipticity_gradient: ``B x 2`` change of ``(e1, e2)`` per dex of Gaussian width
            (:func:`gaussian_ellipticities`; ``q`` and ``phi`` are then the shape at the mean log-width),
            or ``None`` (one shape for all).
    """

    center_x: torch.Tensor
    center_y: torch.Tensor
    q: torch.Tensor
    phi: torch.Tensor
    sigmas: torch.Tensor
    amplitudes: torch.Tensor
    grid: PixelGrid
    psf: PSF
    chi2: torch.Tensor
    dtype: torch.dtype = torch.float64
    sampling: float = 1.5
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    native: NativeFrame | None = None
    ellipticity_gradient: torch.Tensor | None = None

    @property
    def center(self) -> torch.Tensor:
        """``B x 2`` centre ``(x0, y0)`` in arcsec."""
        return torch.stack([self.center_x, self.center_y], dim=-1)

    @property
    def total_flux(self) -> torch.Tensor:
        """``(B,)`` total flux (image units x arcsec^2) of the unconvolved model over the whole plane."""
        return self.amplitudes.sum(dim=-1)

    def basis(self, convolved: bool = True) -> torch.Tensor:
        """The ``B x K x N x N`` float64 basis (arcsec^-2) at the fitted shape, cached."""
        key = "convolved" if convolved else "unconvolved"
        if key not in self._cache:
            e1, e2 = gaussian_ellipticities(
                *ellipticity_from_q_phi(self.q, self.phi), self.ellipticity_gradient, self.sigmas
            )
            if self.native is not None:  # convolved on the detector's grid, so each is rendered apart
                self._cache[key] = _basis_images(
                    self.grid, self.psf, self.native, self.center_x, self.center_y, e1, e2, self.sigmas,
                    self.sampling, convolve=convolved,
                )  # fmt: skip
                return self._cache[key]
            if convolved:
                self._cache[key] = _render_convolved(
                    self.grid, self.psf, self.center_x, self.center_y, e1, e2, self.sigmas, self.sampling
                )
            else:
                self._cache[key] = _render(self.grid, self.center_x, self.center_y, e1, e2, self.sigmas, self.sampling)
        return self._cache[key]

    def image(self) -> torch.Tensor:
        """PSF-convolved, pixel-integrated model, ``B x 1 x N x N`` surface brightness (image units)."""
        return torch.einsum("bk,bkij->bij", self.amplitudes.to(torch.float64), self.basis(True))[:, None].to(self.dtype)

    def unconvolved(self) -> torch.Tensor:
        """Pixel-integrated model before the PSF, ``B x 1 x N x N`` surface brightness (image units)."""
        return torch.einsum("bk,bkij->bij", self.amplitudes.to(torch.float64), self.basis(False))[:, None].to(
            self.dtype
        )

    def resolve(
        self, data: torch.Tensor, noise_sigma: float | torch.Tensor, mask: torch.Tensor | None = None
    ) -> LensLightModel:
        """Re-solve the amplitudes for new data at the same (cached) shape; the cheap inner step.

        ``data``: ``B x 1 x N x N`` (e.g. observation minus the current lensed-source model);
        ``noise_sigma`` and ``mask`` as in :func:`solve_amplitudes`. Returns a new model sharing the
        basis cache; its amplitudes are differentiable w.r.t. ``data``.
        """
        basis = self.basis(True)
        w = _weights(noise_sigma, mask, data.shape, data)
        gram, rhs = _normal_equations(basis, data, w)
        # the current amplitudes' support starts the active set (same solution, fewer steps)
        start = self.amplitudes > 0 if bool((self.amplitudes > 0).any()) else None
        amps, _ = _amplitudes_from_system(gram, rhs, start)
        model = (amps[:, :, None] * basis.flatten(2)).sum(1).reshape(data.shape)
        chi2 = (w * (model - data.to(torch.float64)) ** 2).sum(dim=(-3, -2, -1))
        return LensLightModel(
            self.center_x,
            self.center_y,
            self.q,
            self.phi,
            self.sigmas,
            amps,
            self.grid,
            self.psf,
            chi2.detach(),
            data.dtype,
            self.sampling,
            self._cache,
            native=self.native,
            ellipticity_gradient=self.ellipticity_gradient,
        )

    def profiled(
        self, noise_sigma: float | torch.Tensor, mask: torch.Tensor | None = None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """``data -> image``: the model at this shape with its amplitudes re-solved for ``data``
        (``B x 1 x N x N``), differentiably, as :meth:`resolve` followed by :meth:`image` -- but with the
        normal matrix computed once and each solve started from the previous active set, for a
        caller that re-solves at every step of an optimisation (the light profiled out of the
        refinement's objective, :func:`rimlens.inference.finetune.refine`). The warm start serves the
        torch NNLS (GPU); on the CPU SciPy's solver needs none (:func:`nnls_gram`)."""
        basis = self.basis(True).flatten(2)  # B x K x P, float64
        shape = (basis.shape[0], 1, self.grid.n_pixels, self.grid.n_pixels)
        weighted = basis * _weights(noise_sigma, mask, shape, basis).flatten(2)
        gram = weighted @ basis.transpose(-1, -2)
        passive = [self.amplitudes.detach() > 0 if bool((self.amplitudes > 0).any()) else None]

        def image(data: torch.Tensor) -> torch.Tensor:
            rhs = (weighted @ data.flatten(2).to(torch.float64).transpose(-1, -2))[..., 0]
            amps, passive[0] = _amplitudes_from_system(gram, rhs, passive[0])
            return (amps[:, :, None] * basis).sum(1).reshape(data.shape).to(data.dtype)

        return image

    def basis_on(self, grid: PixelGrid, offset_arcsec: tuple[float, float], psf: PSF) -> torch.Tensor:
        """The first example's Gaussians at the fitted shape rendered on another ``grid`` (e.g. a
        detector crop) whose centre lies at ``offset_arcsec`` from this model's grid centre, convolved
        with ``psf`` (at that grid's scale): ``K x M x M`` float64 per unit flux (arcsec^-2).

        Rendered with a margin of the PSF's half-size on every side and cropped after the convolution: a
        crop's edge pixels then receive the light the PSF scatters in from beyond it (zero padding lost
        it: on a lenstronomy Sersic light 49x the arcs, chi2 3.4 per edge pixel at the true shape)."""
        e1, e2 = gaussian_ellipticities(
            *ellipticity_from_q_phi(self.q[:1], self.phi[:1]),
            None if self.ellipticity_gradient is None else self.ellipticity_gradient[:1],
            self.sigmas,
        )
        x0 = self.center_x[:1].to(torch.float64) - offset_arcsec[0]
        y0 = self.center_y[:1].to(torch.float64) - offset_arcsec[1]
        return _render_convolved(grid, psf, x0, y0, e1, e2, self.sigmas.to(torch.float64), self.sampling)[0]

    def on_detector(self, native: NativeFrame) -> LensLightModel:
        """The same model (shape, amplitudes) rendered from now on in the detector's frame ``native``."""
        return dataclasses.replace(self, native=native, _cache={})

    def refit(
        self,
        data: torch.Tensor,
        noise_sigma: float | torch.Tensor,
        mask: torch.Tensor | None = None,
        max_iter: int = 10,
        fit_center: bool = True,
        fit_gradient: bool = False,
    ) -> LensLightModel:
        """Re-fit the shape ``(x0, y0, q, phi)`` and the amplitudes to new data, starting from this model.

        Meant for data from which the lensed source has been subtracted (``observation - arcs``): then
        nothing needs clipping, and the whole image constrains the shape, which a first fit -- clipped,
        on a crop, before any source model existed -- only approximates. Batched Levenberg-Marquardt as
        :func:`fit_lens_light`, at most ``max_iter`` steps, whole grid, same widths; returns a new model.
        With ``fit_gradient`` (or when this model has one) the ellipticity gradient is fitted too
        (:func:`gaussian_ellipticities`: six parameters instead of four).
        """
        check_map(data, "data")
        weights = _weights(noise_sigma, mask, data.shape, data)
        d64 = data.detach().to(torch.float64)
        with torch.no_grad():
            g1, g2 = _to_free(*ellipticity_from_q_phi(self.q, self.phi))
            theta = torch.stack([self.center_x, self.center_y, g1, g2], dim=-1)
            if fit_gradient or self.ellipticity_gradient is not None:
                gradient = self.ellipticity_gradient
                theta = torch.cat([theta, torch.zeros_like(theta[:, :2]) if gradient is None else gradient], dim=-1)
            start_set = self.amplitudes.detach() > 0
            start = _evaluate(
                theta, self.grid, self.sigmas, self.psf, d64, weights, self.sampling, start_set, self.native
            )
            best, _ = _levenberg_marquardt(
                start, self.grid, self.sigmas, self.psf, d64, weights, self.sampling, fit_center, max_iter, 1e-6, 1e-3,
                self.native,
            )  # fmt: skip
            q, phi = q_phi_from_ellipticity(*_from_free(best.theta[:, 2], best.theta[:, 3]))
        model = LensLightModel(
            best.theta[:, 0].clone(),
            best.theta[:, 1].clone(),
            q,
            phi,
            self.sigmas,
            best.amps,
            self.grid,
            self.psf,
            best.chi2,
            data.dtype,
            self.sampling,
            native=self.native,
            ellipticity_gradient=best.theta[:, 4:6].clone() if best.theta.shape[1] > 4 else None,
        )
        return model.resolve(data, noise_sigma, mask)


# ------------------------------------------------------------------------------ the fit
def _initial_shape(
    data: torch.Tensor, weights: torch.Tensor, grid: PixelGrid, center: torch.Tensor | None, n_iter: int = 40
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adaptive (Gaussian-weighted) moments of the positive light: ``(x0, y0, e1, e2)``, each ``(B,)``.

    The weight is an elliptical Gaussian matched to the measured covariance (Bernstein & Jarvis 2002),
    which converges to the best-fitting Gaussian and is little affected by light far from the centre
    (arcs). The start is ``center``, or the brightest pixel of the image smoothed by a Gaussian of
    sigma = 8% of the field of view: at that scale an extended lens galaxy, and a ring of arcs around
    it, both peak near the lens centre even when an arc outshines the lens in the raw image.
    """
    s = grid.pixel_scale_arcsec
    x, y = grid.coordinates(torch.float64, data.device)
    f = data.to(torch.float64).clamp_min(0) * (weights > 0).to(torch.float64)
    f = f[:, 0]
    b = f.shape[0]
    if center is None:
        fwhm = 0.08 * grid.fov_arcsec / FWHM_TO_SIGMA
        size = min(2 * math.ceil(0.32 * grid.n_pixels) + 1, grid.n_pixels - 1 + grid.n_pixels % 2)
        smooth = PSF.gaussian(fwhm, s, size=size, dtype=f.dtype, device=f.device).convolve(f[:, None])
        peak = smooth.flatten(1).argmax(dim=-1)
        xc, yc = x.flatten()[peak], y.flatten()[peak]
    else:
        xc, yc = center[:, 0].clone(), center[:, 1].clone()
    w0 = max(3 * s, 0.05 * grid.fov_arcsec) ** 2
    cxx = torch.full((b,), w0, dtype=torch.float64, device=data.device)
    cyy, cxy = cxx.clone(), torch.zeros_like(cxx)
    floor = (0.5 * s) ** 2
    for _ in range(n_iter):
        dx, dy = x - xc[:, None, None], y - yc[:, None, None]
        det = (cxx * cyy - cxy**2)[:, None, None]
        quad = (cyy[:, None, None] * dx**2 - 2 * cxy[:, None, None] * dx * dy + cxx[:, None, None] * dy**2) / det
        wf = f * torch.exp(-0.5 * quad)
        tot = wf.sum(dim=(-2, -1)).clamp_min(1e-300)
        if center is None:
            xc = xc + (wf * dx).sum(dim=(-2, -1)) / tot
            yc = yc + (wf * dy).sum(dim=(-2, -1)) / tot
            dx, dy = x - xc[:, None, None], y - yc[:, None, None]
        mxx = (wf * dx**2).sum(dim=(-2, -1)) / tot
        myy = (wf * dy**2).sum(dim=(-2, -1)) / tot
        mxy = (wf * dx * dy).sum(dim=(-2, -1)) / tot
        # For a Gaussian image of covariance C and a weight of covariance C, the weighted moments are C / 2.
        previous = torch.stack([cxx, cyy, cxy, xc * s, yc * s])
        cxx, cyy, cxy = (2 * mxx).clamp_min(floor), (2 * myy).clamp_min(floor), 2 * mxy
        cxy = cxy.clamp(-0.999 * torch.sqrt(cxx * cyy), 0.999 * torch.sqrt(cxx * cyy))
        # converged to 1e-4 of the size (arcsec^2): a start, which the Levenberg-Marquardt fit then refines
        change = (torch.stack([cxx, cyy, cxy, xc * s, yc * s]) - previous).abs().max()
        if float(change) <= 1e-4 * float(torch.minimum(cxx, cyy).min()):
            break
    # covariance ~ sigma^2 M^-1: major / minor variances sigma^2 / q and sigma^2 q
    tr = cxx + cyy
    disc = torch.sqrt(((cxx - cyy) / 2) ** 2 + cxy**2)
    lam_max, lam_min = tr / 2 + disc, (tr / 2 - disc).clamp_min(1e-300)
    q = torch.sqrt(lam_min / lam_max).clamp(min=Q_MIN + 0.01, max=1.0)
    phi = 0.5 * torch.atan2(2 * cxy, cxx - cyy)
    e1, e2 = ellipticity_from_q_phi(q, phi)
    return xc, yc, e1, e2


def _to_free(e1: torch.Tensor, e2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ellipticity -> unconstrained ``g = e / sqrt(e_max^2 - |e|^2)``."""
    e2sq = (e1**2 + e2**2).clamp_max((0.999 * _E_MAX) ** 2)
    d = torch.sqrt(_E_MAX**2 - e2sq)
    return e1 / d, e2 / d


def _from_free(g1: torch.Tensor, g2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unconstrained ``g`` -> ellipticity ``e = e_max g / sqrt(1 + |g|^2)`` (|e| < e_max, smooth)."""
    d = _E_MAX / torch.sqrt(1 + g1**2 + g2**2)
    return g1 * d, g2 * d


@dataclass
class _Eval:
    """One profile-likelihood evaluation at parameters theta = (x0, y0, g1, g2), all float64."""

    theta: torch.Tensor  # B x 4
    basis: torch.Tensor  # B x K x P (convolved)
    gram: torch.Tensor  # B x K x K
    amps: torch.Tensor  # B x K
    passive: torch.Tensor  # B x K
    model: torch.Tensor  # B x P
    chi2: torch.Tensor  # B


def _log_widths(sigmas: torch.Tensor) -> torch.Tensor:
    """``(K,)`` ``log10(sigma_k)`` about its mean: the abscissa of the ellipticity gradient."""
    lg = torch.log10(sigmas.to(torch.float64))
    return lg - lg.mean()


def gaussian_ellipticities(
    e1: torch.Tensor, e2: torch.Tensor, gradient: torch.Tensor | None, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each Gaussian's ellipticity ``e_k = e + gradient * (log10 sigma_k - mean log10 sigma)``:
    ``B x K`` each, from ``e1, e2`` ``(B,)`` and ``gradient`` ``B x 2`` (per dex of width; ``None``: the
    ``(B,)`` inputs unchanged). An ellipticity gradient and an isophote twist -- outer isophotes rounder
    or flatter or turned, as in real early-type galaxies -- in two numbers; every ``|e_k|`` is kept
    below the fit's bound (``Q_MIN``)."""
    if gradient is None:
        return e1, e2
    lw = _log_widths(sigmas).to(e1)
    e1k = e1[:, None] + gradient[:, :1] * lw
    e2k = e2[:, None] + gradient[:, 1:2] * lw
    factor = (0.999 * _E_MAX / torch.hypot(e1k, e2k).clamp_min(1e-300)).clamp(max=1.0)
    return e1k * factor, e2k * factor


def _shape_of(theta: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-Gaussian (or per-example) ellipticities of LM parameters ``(x0, y0, g1, g2[, d1, d2])``."""
    e1, e2 = _from_free(theta[:, 2], theta[:, 3])
    return gaussian_ellipticities(e1, e2, theta[:, 4:6] if theta.shape[1] > 4 else None, sigmas)


def _shape_derivatives(
    grid: PixelGrid,
    psf: PSF,
    native: NativeFrame | None,
    theta: torch.Tensor,
    e1: torch.Tensor,
    e2: torch.Tensor,
    sigmas: torch.Tensor,
    sampling: float,
    amps: torch.Tensor,
) -> torch.Tensor:
    """d/d(x0, y0, e1, e2) of the convolved ``sum_k amps_k G_k`` (``e``: a common shift of every
    Gaussian's ellipticity), ``B x 4 x P``."""
    stack = _basis_images(grid, psf, native, theta[:, 0], theta[:, 1], e1, e2, sigmas, sampling, amps)
    return stack[:, 1:].flatten(2)


def _evaluate(
    theta: torch.Tensor,
    grid: PixelGrid,
    sigmas: torch.Tensor,
    psf: PSF,
    data: torch.Tensor,
    weights: torch.Tensor,
    sampling: float,
    passive_start: torch.Tensor | None = None,
    native: NativeFrame | None = None,
) -> _Eval:
    e1, e2 = _shape_of(theta, sigmas)
    basis = _basis_images(grid, psf, native, theta[:, 0], theta[:, 1], e1, e2, sigmas, sampling).flatten(2)
    gram, rhs = _normal_equations(basis, data, weights)
    amps, passive = nnls_gram(gram, rhs, passive_start=passive_start)
    model = (amps[:, :, None] * basis).sum(1)
    chi2 = (weights.flatten(1) * (model - data.flatten(1)) ** 2).sum(-1)
    return _Eval(theta, basis, gram, amps, passive, model, chi2)


def _select(ev: _Eval, keep: torch.Tensor, other: _Eval) -> _Eval:
    """Per example: ``ev`` where ``keep``, else ``other``."""

    def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(keep.reshape(-1, *([1] * (a.ndim - 1))), a, b)

    return _Eval(*(pick(getattr(ev, n), getattr(other, n)) for n in _Eval.__dataclass_fields__))


def _levenberg_marquardt(
    start: _Eval,
    grid: PixelGrid,
    sigmas: torch.Tensor,
    psf: PSF,
    data: torch.Tensor,
    weights: torch.Tensor,
    sampling: float,
    fit_center: bool,
    max_iter: int,
    rtol: float,
    chi2_tol: float,
    native: NativeFrame | None = None,
) -> tuple[_Eval, int]:
    """Batched LM on the profile chi^2 (Kaufman's variable-projection Jacobian), per-example damping.

    Only the examples not yet converged are evaluated at each iteration.
    """
    cur = start
    b = data.shape[0]
    dev = data.device
    lam = torch.full((b,), 1e-3, dtype=torch.float64, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    n_par = start.theta.shape[1]  # 4, or 6 with the ellipticity gradient
    eye4 = torch.eye(n_par, dtype=torch.float64, device=dev)
    fm = torch.tensor([fit_center, fit_center, True, True, True, True][:n_par], dtype=torch.float64, device=dev)
    n_done = 0
    for it in range(max_iter):
        n_done = it + 1
        act = (~done).nonzero().squeeze(1)
        c = _Eval(*(getattr(cur, name)[act] for name in _Eval.__dataclass_fields__))
        psf_a = psf if psf.batch_size == 1 else psf.select(act)
        d, w, lam_a = data[act].flatten(1), weights[act].flatten(1), lam[act]
        theta = c.theta
        e1, e2 = _shape_of(theta, sigmas)
        shape = (grid, psf_a, native, theta, e1, e2, sigmas, sampling)
        jm = _shape_derivatives(*shape, c.amps)
        # de_i / dg_j = e_max (delta_ij / r - g_i g_j / r^3), r = sqrt(1 + |g|^2)
        g = theta[:, 2:4]
        r = torch.sqrt(1 + (g**2).sum(-1))[:, None, None]
        de = _E_MAX * (torch.eye(2, dtype=g.dtype, device=dev) / r - g[:, :, None] * g[:, None, :] / r**3)
        parts = [jm[:, :2], de.transpose(-1, -2) @ jm[:, 2:]]
        if n_par > 4:  # d e_k / d gradient = the Gaussian's log-width: the same shift, amplitudes times it
            parts.append(_shape_derivatives(*shape, c.amps * _log_widths(sigmas).to(c.amps))[:, 2:])
        jm = torch.cat(parts, dim=1)
        # project out what the (passive) amplitudes can absorb: J <- J - A (A^T W A)^-1 A^T W J
        coef = _solve_on_set(c.gram, (c.basis * w[:, None]) @ jm.transpose(-1, -2), c.passive)
        jac = jm - coef.transpose(-1, -2) @ c.basis
        jw = jac * w[:, None]
        hess = jw @ jac.transpose(-1, -2)  # B' x 4 x 4
        grad = (jw @ (d - c.model)[:, :, None])[..., 0]  # B' x 4
        hess = hess * fm[:, None] * fm[None, :] + torch.diag(1 - fm)
        grad = grad * fm
        dh = torch.diagonal(hess, dim1=-2, dim2=-1)
        floor = (1e-12 * dh.amax(-1)).clamp_min(1e-300)[:, None, None]
        damped = hess + lam_a[:, None, None] * torch.diag_embed(dh) + floor * eye4
        delta = torch.nan_to_num(torch.linalg.solve_ex(damped, grad)[0], nan=0.0, posinf=0.0, neginf=0.0)
        # Gauss-Newton predicted decrease of chi^2 for the undamped model (>= 0)
        predicted = 2 * (delta * grad).sum(-1) - (delta[:, None, :] @ hess @ delta[:, :, None])[:, 0, 0]
        trial = _evaluate(theta + delta, grid, sigmas, psf_a, data[act], weights[act], sampling, c.passive, native)
        better = trial.chi2 < c.chi2
        gain = (c.chi2 - trial.chi2) / c.chi2.clamp_min(1e-300)
        new = _select(trial, better, c)
        for name in _Eval.__dataclass_fields__:
            getattr(cur, name)[act] = getattr(new, name)
        lam[act] = torch.where(better, (lam_a * 0.3).clamp_min(1e-7), lam_a * 10)
        small = (c.chi2 - trial.chi2 < chi2_tol) | (gain < rtol)
        done[act] = (better & small) | (predicted.abs() < chi2_tol) | (lam[act] > 1e8)
        if bool(done.all()):
            break
    return cur, n_done


def fit_lens_light(
    data: torch.Tensor,
    noise_sigma: float | torch.Tensor,
    psf: PSF,
    grid: PixelGrid,
    mask: torch.Tensor | None = None,
    center: torch.Tensor | Sequence[float] | None = None,
    *,
    sigmas: torch.Tensor | Sequence[float] | None = None,
    n_gaussians: int = 30,
    fit_center: bool = True,
    max_iter: int = 30,
    rtol: float = 1e-6,
    chi2_tol: float = 1e-3,
    clip_sigma: float | None = None,
    clip_rounds: int = 3,
    sampling: float = 1.5,
    shape_pixels: int | None = None,
    shape_gaussians: int | None = None,
    native: NativeFrame | None = None,
) -> LensLightModel:
    """Fit the MGE lens-light model (shape and non-negative amplitudes) to a batch of images.

    Starts from adaptive moments of the positive light, then refines ``(x0, y0, q, phi)`` by a batched
    Levenberg-Marquardt on the profile chi^2 (the amplitudes are re-solved by NNLS at every step).

    Args:
        data: ``B x 1 x N x N`` image (surface brightness): the observation, or -- the intended use --
            the observation minus the current lensed-source model (see the module docstring).
        noise_sigma: float, ``(B,)`` or ``B x 1 x N x N`` noise sigma (units of ``data``); pixels with
            sigma >= 1e6 are excluded.
        psf: PSF of batch 1 or ``B``.
        grid: image grid (``N`` pixels).
        mask: optional boolean mask broadcastable to ``data``, True = pixel used.
        center: optional initial centre (arcsec), ``(2,)`` or ``B x 2``; default: the light peak.
        sigmas: ``(K,)`` increasing widths (arcsec); default :func:`default_sigmas` (``n_gaussians``).
        n_gaussians: ``K`` when ``sigmas`` is not given.
        fit_center: False keeps the centre at ``center`` (which must then be given).
        max_iter: maximum LM iterations.
        rtol, chi2_tol: an example stops when an accepted step lowers chi^2 by less than ``rtol`` times
            chi^2 or by less than ``chi2_tol`` (absolute), or when the Gauss-Newton model predicts a
            decrease below ``chi2_tol``; ``chi2_tol = 1e-3`` is far below the statistical resolution
            (shape changes of ~0.03 sigma).
        clip_sigma: if set, after the fit exclude the pixels brighter than the model by more than
            ``clip_sigma`` noise sigmas (e.g. unsubtracted arcs) and refit, ``clip_rounds`` times.
            Only meaningful with a realistic noise sigma.
        clip_rounds: number of clip-and-refit rounds.
        sampling: minimum number of (sub-)pixels per minor-axis sigma (see :func:`mge_basis`).
        shape_pixels: if set (``< N``, ``N - shape_pixels`` even), the shape ``(x0, y0, q, phi)`` is
            fitted on the central ``shape_pixels x shape_pixels`` pixels only, with
            ``shape_gaussians`` Gaussians (default ``n_gaussians``) spanning that crop
            (:func:`default_sigmas` of the crop): the light's shape is set where it is bright, and
            each step then costs ~(N / shape_pixels)^2 less. The amplitudes of the full basis
            (``sigmas``) are solved on the whole image at that shape, with ``clip_sigma`` clipping
            re-applied there once. The grid must be centred on the lens (as a prepared observation's is).
        native: the detector's frame (:class:`NativeFrame`) of resampled data: the basis is rendered,
            convolved (with ``native.psf``) there and resampled like the data. The crop of
            ``shape_pixels``, a first guess, is still fitted on the model grid with ``psf``.

    Returns:
        The :class:`LensLightModel`; its amplitudes are differentiable w.r.t. ``data`` (at the fitted,
        detached shape parameters).
    """
    check_map(data, "data")
    b, n = data.shape[0], data.shape[-1]
    if n != grid.n_pixels:
        raise RimlensInputError(f"data has {n} pixels per side, the grid has {grid.n_pixels}")
    if psf.batch_size not in (1, b):
        raise RimlensInputError(f"PSF batch ({psf.batch_size}) does not match the data batch ({b})")
    sig = _check_sigmas(sigmas) if sigmas is not None else default_sigmas(grid, n_gaussians)
    sig = sig.to(device=data.device)
    weights = _weights(noise_sigma, mask, data.shape, data)
    if bool((weights.flatten(1).sum(-1) <= 0).any()):
        raise RimlensInputError("an example has no used pixel (all masked or sigma >= 1e6)")
    center_t: torch.Tensor | None = None
    if center is not None:
        center_t = torch.as_tensor(center, dtype=torch.float64, device=data.device).detach().reshape(-1, 2)
        if center_t.shape[0] not in (1, b):
            raise RimlensInputError(f"center must be (2,) or {b} x 2, got {tuple(torch.as_tensor(center).shape)}")
        center_t = center_t.expand(b, 2)
    elif not fit_center:
        raise RimlensInputError("fit_center=False needs a center")
    d64 = data.detach().to(torch.float64)
    # where the shape is fitted: the whole grid, or its centre (see shape_pixels)
    fit_grid, fit_d, fit_weights, fit_sig = grid, d64, weights, sig
    if shape_pixels is not None and shape_pixels < n:
        if shape_pixels < 8 or (n - shape_pixels) % 2:
            raise RimlensInputError(
                f"shape_pixels must be >= 8 and differ from {n} by an even number, got {shape_pixels}"
            )
        lo = (n - shape_pixels) // 2
        crop = slice(lo, lo + shape_pixels)
        fit_grid = PixelGrid(shape_pixels, grid.pixel_scale_arcsec)
        fit_d, fit_weights = d64[..., crop, crop], weights[..., crop, crop]
        fit_sig = default_sigmas(fit_grid, shape_gaussians or sig.shape[0]).to(device=data.device)
        if bool((fit_weights.flatten(1).sum(-1) <= 0).any()):
            raise RimlensInputError("an example has no used pixel in the central crop of the shape fit")
    with torch.no_grad():
        x0, y0, e1, e2 = _initial_shape(fit_d, fit_weights, fit_grid, center_t)
        g1, g2 = _to_free(e1, e2)
        theta = torch.stack([x0, y0, g1, g2], dim=-1)
        fit_w = fit_weights
        for rnd in range((clip_rounds if clip_sigma is not None else 0) + 1):
            shape_native = native if fit_grid is grid else None
            start = _evaluate(theta, fit_grid, fit_sig, psf, fit_d, fit_w, sampling, native=shape_native)
            best, _ = _levenberg_marquardt(
                start,
                fit_grid,
                fit_sig,
                psf,
                fit_d,
                fit_w,
                sampling,
                fit_center,
                max_iter,
                rtol,
                chi2_tol,
                shape_native,
            )
            theta = best.theta
            if clip_sigma is not None and rnd < clip_rounds:
                resid = (fit_d.flatten(1) - best.model) * fit_weights.flatten(1).sqrt()
                fit_w = fit_weights * (resid <= clip_sigma).to(torch.float64).reshape(fit_weights.shape)
        e1, e2 = _from_free(theta[:, 2], theta[:, 3])
        q, phi = q_phi_from_ellipticity(e1, e2)
    model = LensLightModel(
        theta[:, 0].clone(),
        theta[:, 1].clone(),
        q,
        phi,
        sig,
        torch.zeros(b, sig.shape[0], dtype=torch.float64, device=data.device),
        grid,
        psf,
        torch.zeros(b, dtype=torch.float64, device=data.device),
        data.dtype,
        sampling,
        native=native,
    )
    if fit_grid is not grid:  # the crop's clipping does not cover the whole image: clip once on it
        if clip_sigma is None:
            return model.resolve(data, noise_sigma, mask)
        first = model.resolve(data, noise_sigma, mask)
        with torch.no_grad():
            resid = (d64 - first.image().detach().to(torch.float64)) * weights.sqrt()
            fit_w = weights * (resid <= clip_sigma).to(torch.float64)
        return first.resolve(data, noise_sigma, _final_mask(mask, fit_w, weights))
    return model.resolve(data, noise_sigma, _final_mask(mask, fit_w, weights))


def _final_mask(mask: torch.Tensor | None, fit_w: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
    """The mask of the final amplitude solve: the user's, and the clipped pixels if clipping was on."""
    if fit_w is weights:
        return mask
    return fit_w > 0  # False on the clipped pixels and on those excluded from the start
