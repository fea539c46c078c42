"""A parametric mass measured on the detector's own pixels: an elliptical power law (EPL) plus external
shear, with a pixelated, curvature-regularised source, its slope ranked by the full Bayesian evidence.

The RIM's pixelated convergence gives the Einstein radius to ~1% but not the density slope (README, "The
slope ranked by the Bayesian evidence", for what this measures instead). This is the standard semi-linear method of the field (Warren & Dye 2003; Suyu et
al. 2006; Vegetti & Koopmans 2009; PyAutoLens): for a given mass the source is linear and solved exactly;
the mass's eight numbers are fitted by L-BFGS on the penalised chi2, started from the RIM's map; the
regularisation strength and finally the slope are chosen by the evidence (chi2, regularisation and the
log-determinants), each slope with its own refitted mass and a source box that follows the source-plane
scale the slope brings (a fixed box biases the evidence by up to 0.25 in the slope: README). About the
evidence's best slope, pseudo-Jaffe subhaloes are then added one at a time where the evidence asks for them
(:func:`search_subhalo`: unmodelled subhaloes at the arcs otherwise bend the power law), and the slope is
ranked again with them in the mass.

Conventions: arcsec in the cut-out's frame (x along columns, y along rows, row 0 at the bottom, origin at
the cut-out's centre); the EPL and shear as lenstronomy's ``EPL`` and ``SHEAR``
(:func:`rimlens.physics.profiles.epl_deflection`); ``gamma`` the 3-D log-slope (2 = isothermal).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from rimlens.errors import RimlensInputError
from rimlens.physics.grid import PixelGrid
from rimlens.physics.lens_light import LensLightModel, nnls_gram
from rimlens.physics.lens_metrics import einstein_radius_of_map, kappa_peak_center
from rimlens.physics.profiles import epl_deflection, pseudo_jaffe_deflection, shear_deflection
from rimlens.physics.psf import PSF

__all__ = [
    "PowerLaw",
    "PowerLawFit",
    "PowerLawMeasurement",
    "SlopeProfile",
    "SourceInversion",
    "SubhaloSearch",
    "add_subhalos",
    "fit_power_law",
    "measure_power_law",
    "power_law_start",
    "search_subhalo",
    "slope_profile",
]

# curvature regularisation: the source's discrete Laplacian, squared (zero outside the source grid)
_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64).view(1, 1, 3, 3)
# the evidence's lambda is searched on this grid (log10); the fit starts at START_LOG10_LAMBDA, a smooth
# source that follows the arcs' large-scale shape (a low lambda at a poor start lets the source absorb the
# mass's error: measured on lenstronomy lenses, README)
LOG10_LAMBDAS = tuple(float(v) for v in np.arange(0.0, 8.01, 0.5))
START_LOG10_LAMBDA = 6.0
# above this chi2_nu the power law does not describe the data (a lens light or substructure it does not
# model): on lenstronomy's lenses such fits missed the slope by 0.1-0.26 (README), so the slope is flagged
POWER_LAW_CHI2_WARN = 1.5
EVIDENCE_ROUNDS = 3
# subhaloes: a core well below HST's pixels (keeps the deflection smooth at the centre; the lensing effect of
# what is inside it is unresolved); the trial Einstein radii of the search (arcsec)
SUBHALO_CORE_ARCSEC = 0.01
SUBHALO_TRIAL_B = (0.015, 0.03, 0.06)
# a refitted subhalo lighter than this is not one (its deflection, < b, is a tenth of an HST pixel)
SUBHALO_MIN_B = 0.005
# a subhalo is kept when it raises the log-evidence (natural log) by more than this: gravitational-imaging
# surveys use ~50 (Vegetti et al. 2014; Ritondale et al. 2019), as a mis-modelled light or macro model makes
# gains of tens; on 8 lenstronomy lenses with a bright lens light and no subhalo (README, "calibrated") the
# false gains were 7-26 (and 186-210 on one the power law does not fit, chi2_nu 1.9), the true ones 80-5,000
SUBHALO_EVIDENCE_THRESHOLD = 50.0
# the best candidates (by their penalised chi2 at the trial masses) refitted jointly; the evidence picks among
# them (one alone was mislocated by 0.4-1.6" on 3 of 7 subhalo lenses: the derivative ranks at a fixed macro model)
SUBHALO_REFITS = 3
# the slope's systematic width, added in quadrature to the evidence's statistical one: on 24 lenstronomy lenses
# with a bright Sersic lens light (LL16 + LLC8) the statistical width alone held the truth within 1 sigma on
# 17% of them (|error| / width median 2.9: the light's model, subhaloes and the start move the slope by more);
# with 0.05 added, 67% (held-out LLH16: 75%; README, "the slope's width made honest")
SLOPE_SIGMA_SYSTEMATIC = 0.05


@dataclass(frozen=True)
class PowerLaw:
    """An elliptical power-law mass with external shear (lenstronomy ``EPL`` + ``SHEAR``).

    Attributes:
        theta_e_arcsec: Einstein radius (arcsec).
        slope: 3-D log-slope ``gamma`` (2: isothermal).
        e1, e2: ellipticity ``(1 - q) / (1 + q) (cos 2 phi, sin 2 phi)``, ``phi`` counter-clockwise from +x.
        center_x_arcsec, center_y_arcsec: centre (arcsec, cut-out frame).
        gamma1, gamma2: external shear.
        subhalos: ``(b, x, y)`` per subhalo (arcsec): a pseudo-Jaffe (:func:`subhalo_deflection`) of
            Einstein radius ``b`` at ``(x, y)``, truncated at ``sqrt(b theta_E)``.
    """

    theta_e_arcsec: float
    slope: float
    e1: float
    e2: float
    center_x_arcsec: float
    center_y_arcsec: float
    gamma1: float = 0.0
    gamma2: float = 0.0
    subhalos: tuple[tuple[float, float, float], ...] = ()

    @property
    def axis_ratio(self) -> float:
        """Minor over major axis."""
        e = math.hypot(self.e1, self.e2)
        return (1 - e) / (1 + e)

    @property
    def position_angle_deg(self) -> float:
        """Major axis, degrees counter-clockwise from +x, in [0, 180)."""
        return math.degrees(0.5 * math.atan2(self.e2, self.e1)) % 180.0

    def vector(self) -> torch.Tensor:
        """The ``8 + 3 n_subhalos`` parameters as a float64 tensor (the fit's order)."""
        return torch.tensor(
            [self.theta_e_arcsec, self.slope, self.e1, self.e2, self.center_x_arcsec, self.center_y_arcsec,
             self.gamma1, self.gamma2, *(p for sub in self.subhalos for p in sub)], dtype=torch.float64,
        )  # fmt: skip

    @classmethod
    def from_vector(cls, v: torch.Tensor) -> PowerLaw:
        """Inverse of :meth:`vector` (a subhalo's ``b`` as its absolute value, as the fit uses it)."""
        p = [float(x) for x in v.detach().reshape(-1)]
        subs = tuple((abs(p[k]), p[k + 1], p[k + 2]) for k in range(8, len(p) - 2, 3))
        te, g, e1, e2, cx, cy, g1, g2 = p[:8]
        return cls(te, g, e1, e2, cx, cy, g1, g2, subhalos=subs)

    def describe(self) -> dict:
        """JSON-ready parameters."""
        return {
            "einstein_radius_arcsec": round(self.theta_e_arcsec, 5),
            "log_slope": round(self.slope, 4),
            "axis_ratio": round(self.axis_ratio, 4),
            "position_angle_deg": round(self.position_angle_deg, 2),
            "center_arcsec": [round(self.center_x_arcsec, 5), round(self.center_y_arcsec, 5)],
            "external_shear": [round(self.gamma1, 5), round(self.gamma2, 5)],
            "subhalos": [
                {
                    "einstein_radius_arcsec": round(b, 5),
                    "center_arcsec": [round(x, 4), round(y, 4)],
                    "truncation_arcsec": round(math.sqrt(b * abs(self.theta_e_arcsec)), 4),
                }
                for b, x, y in self.subhalos
            ],
        }


def subhalo_deflection(
    x: torch.Tensor, y: torch.Tensor, b: torch.Tensor, theta_e_host: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A subhalo's deflection (arcsec): a pseudo-Jaffe of Einstein radius ``b`` (arcsec), core
    ``SUBHALO_CORE_ARCSEC`` and truncation radius ``sqrt(b theta_E)``, the tidal radius of an isothermal
    subhalo in an isothermal host at the Einstein radius (Metcalf & Madau 2001; the profile of Vegetti et al.
    2014's detections), at ``(cx, cy)``; positions ``x, y`` in arcsec, any shape."""
    b = b.abs()
    trunc = torch.sqrt(b * theta_e_host.abs() + (2 * SUBHALO_CORE_ARCSEC) ** 2)
    return pseudo_jaffe_deflection(x, y, b, SUBHALO_CORE_ARCSEC, trunc, cx, cy)


def _deflect(v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Source-plane positions of rays ``x, y`` (arcsec) under the mass ``v`` (:meth:`PowerLaw.vector`)."""
    te, g, e1, e2, cx, cy, g1, g2 = v[:8]
    # not lens_light.q_phi_from_ellipticity: the 1e-18 keeps L-BFGS's gradient finite at e = 0 (round masses)
    e = torch.sqrt(e1 * e1 + e2 * e2 + 1e-18)
    q = ((1 - e) / (1 + e)).clamp(0.05, 1.0)
    phi = 0.5 * torch.atan2(e2, e1)
    ax, ay = epl_deflection(x, y, te, g.clamp(1.05, 2.95), q, phi, cx, cy)
    sx, sy = shear_deflection(x, y, g1, g2, cx, cy)
    bx, by = x - ax - sx, y - ay - sy
    for k in range(8, v.shape[0] - 2, 3):
        hx, hy = subhalo_deflection(x, y, v[k], te, v[k + 1], v[k + 2])
        bx, by = bx - hx, by - hy
    return bx, by


class SourceInversion:
    """The semi-linear problem of one cut-out: data ``d``, weights ``1/sigma``, rays, PSF, source grid.

    The model image is ``P (mean over sub-pixel rays of bilinear(s, beta(theta))) + light``: ``s`` the
    ``S x S`` source on a square source-plane box, ``P`` the PSF, ``light`` the lens light re-solved in
    alternation (:meth:`refit_light`). For a given mass, ``s`` minimises
    ``chi2 + lambda s^T C s`` (``C = L^T L``, ``L`` the discrete Laplacian on the source grid).

    Args:
        image, noise_sigma: ``H x W`` data and 1-sigma map (the crop to fit); ``noise_sigma`` infinite
            or a False ``mask`` pixel: excluded.
        psf_kernel: ``K x K`` PSF at the detector's pixel scale.
        pixel_scale_arcsec: the detector's pixel size.
        origin_arcsec: ``(x, y)`` of the crop's centre in the cut-out frame.
        source_pixels: ``S``.
        supersample: rays per pixel side.
        light_basis: optional ``J x H x W`` PSF-convolved lens-light images (per unit amplitude).
    """

    def __init__(
        self,
        image: torch.Tensor,
        noise_sigma: torch.Tensor,
        psf_kernel: torch.Tensor,
        pixel_scale_arcsec: float,
        origin_arcsec: tuple[float, float] = (0.0, 0.0),
        *,
        mask: torch.Tensor | None = None,
        source_pixels: int = 40,
        supersample: int = 2,
        light_basis: torch.Tensor | None = None,
    ) -> None:
        if image.ndim != 2 or image.shape != noise_sigma.shape:
            raise RimlensInputError(
                f"image and noise map must be equal 2-D shapes, got {tuple(image.shape)} and {tuple(noise_sigma.shape)}"
            )
        self.data = image.to(torch.float64)
        w = 1.0 / noise_sigma.to(torch.float64)
        w = torch.where(torch.isfinite(w) & torch.isfinite(self.data), w, torch.zeros_like(w))
        if mask is not None:
            w = w * mask.to(torch.float64)
        self.data = torch.where(w > 0, self.data, torch.zeros_like(self.data))
        self.w2 = w * w
        self.n_used = int((w > 0).sum())
        if self.n_used < 10:
            raise RimlensInputError("fewer than 10 usable pixels in the power-law fit's crop")
        self.h, self.w = image.shape
        self.s = int(source_pixels)
        self.ss = int(supersample)
        sc = float(pixel_scale_arcsec)
        off = (torch.arange(self.ss, dtype=torch.float64) + 0.5) / self.ss - 0.5
        ys = (torch.arange(self.h, dtype=torch.float64) - (self.h - 1) / 2) * sc + origin_arcsec[1]
        xs = (torch.arange(self.w, dtype=torch.float64) - (self.w - 1) / 2) * sc + origin_arcsec[0]
        # rays ordered (row, col, sub-row, sub-col)
        self.y = (
            (ys[:, None, None, None] + off[None, None, :, None] * sc)
            .expand(self.h, self.w, self.ss, self.ss)
            .reshape(-1)
        )
        self.x = (
            (xs[None, :, None, None] + off[None, None, None, :] * sc)
            .expand(self.h, self.w, self.ss, self.ss)
            .reshape(-1)
        )
        self.pixel_x = xs[None, :].expand(self.h, self.w)
        self.pixel_y = ys[:, None].expand(self.h, self.w)
        self.psf = PSF.from_kernel(torch.as_tensor(psf_kernel, dtype=torch.float64))
        # the lens light: non-negative amplitudes of the PSF-convolved Gaussians (as the RIM pipeline's; with
        # free signs their differences make rings that absorb the arcs -- measured: theta_E off by 65%)
        self.light = None if light_basis is None else light_basis.to(torch.float64)
        self.light_image = torch.zeros_like(self.data)
        self.light_amplitudes: torch.Tensor | None = None  # of the last NNLS solve (refit_light)
        self.light_given = False  # light_image holds a fitted model's light (else: solve it from the data first)
        self.box: tuple[float, float, float] | None = None  # source box centre x, y and half-size (arcsec)

    @classmethod
    def from_cutout(
        cls,
        image: np.ndarray,
        noise_sigma: np.ndarray,
        psf_kernel: np.ndarray,
        pixel_scale_arcsec: float,
        center_arcsec: tuple[float, float],
        half_size_arcsec: float,
        *,
        mask: np.ndarray | None = None,
        light: LensLightModel | None = None,
        light_frame_center_arcsec: tuple[float, float] = (0.0, 0.0),
        light_to_data: float | None = None,
        **kwargs,
    ) -> SourceInversion:
        """The inversion of the square of half-size ``half_size_arcsec`` around ``center_arcsec`` of a
        cut-out (``H x W`` arrays, row 0 at the bottom, ``mask`` True = use); pixels beyond the cut-out are
        excluded. ``light``: a fitted lens-light model whose grid is centred at
        ``light_frame_center_arcsec`` (cut-out frame); its Gaussians are re-solved with non-negative amplitudes,
        starting from the model's own (times ``light_to_data``, its units to the cut-out's) when given."""
        img = np.asarray(image, dtype=np.float64)
        h, w = img.shape
        sc = float(pixel_scale_arcsec)
        m = max(4, math.ceil(half_size_arcsec / sc))
        col = round(center_arcsec[0] / sc + (w - 1) / 2)
        row = round(center_arcsec[1] / sc + (h - 1) / 2)
        # a square reaching beyond the cut-out needs only the PSF's half-width past it: farther pixels carry no
        # data and blur into none (exact; on a 96-px cut-out ~1.8x fewer pixels for every operator)
        reach = max(row, h - 1 - row, col, w - 1 - col) + np.asarray(psf_kernel).shape[-1] // 2
        m = max(4, min(m, reach))
        n = 2 * m + 1
        crop = np.zeros((n, n))
        sigma = np.full((n, n), np.inf)
        use = np.zeros((n, n), dtype=bool)
        r0, r1 = max(0, row - m), min(h, row + m + 1)
        c0, c1 = max(0, col - m), min(w, col + m + 1)
        if r0 >= r1 or c0 >= c1:
            raise RimlensInputError(f"the power-law fit's centre {center_arcsec} lies outside the cut-out")
        dst = (slice(r0 - (row - m), r1 - (row - m)), slice(c0 - (col - m), c1 - (col - m)))
        crop[dst] = img[r0:r1, c0:c1]
        sigma[dst] = np.asarray(noise_sigma, dtype=np.float64)[r0:r1, c0:c1]
        use[dst] = True if mask is None else np.asarray(mask, dtype=bool)[r0:r1, c0:c1]
        origin = ((col - (w - 1) / 2) * sc, (row - (h - 1) / 2) * sc)
        kernel = torch.as_tensor(np.asarray(psf_kernel, dtype=np.float64))
        basis = None
        if light is not None:
            offset = (origin[0] - light_frame_center_arcsec[0], origin[1] - light_frame_center_arcsec[1])
            basis = light.basis_on(PixelGrid(n, sc), offset, PSF.from_kernel(kernel))
        inv = cls(torch.as_tensor(crop), torch.as_tensor(sigma), kernel, sc, origin,
                  mask=torch.as_tensor(use), light_basis=basis, **kwargs)  # fmt: skip
        if light is not None and basis is not None and light_to_data is not None:
            amps = light.amplitudes[0].detach().to(torch.float64)
            inv.light_image = torch.einsum("j,jhw->hw", amps, basis) * float(light_to_data)
            inv.light_given = True
        return inv

    # ------------------------------------------------------------------ source grid
    def place_source_box(self, v: torch.Tensor, threshold_sigma: float = 5.0, pad: float = 1.5) -> None:
        """Centre and size the source box on where the pixels brighter than ``threshold_sigma`` map under
        the mass ``v`` (the 98th percentile of their extent, times ``pad``: lone noise peaks do not set it).
        With a lens light only pixels 0.4-2 theta_E from the mass centre count: what the light's model
        leaves nearer and farther maps far out in the source plane (measured: a box 2.3" wide instead of
        ~0.4")."""
        with torch.no_grad():
            bx, by = _deflect(v, self.pixel_x.reshape(-1), self.pixel_y.reshape(-1))
            d = self.data - self.light_image
            sel = ((d * self.w2.sqrt()) > threshold_sigma).reshape(-1)
            if self.light is not None:
                r = torch.hypot(self.pixel_x - v[4], self.pixel_y - v[5]).reshape(-1)
                sel = sel & (r > 0.4 * v[0].abs()) & (r < 2.0 * v[0].abs())
            if int(sel.sum()) < 5:
                sel = (d * self.w2.sqrt()).reshape(-1) >= torch.quantile((d * self.w2.sqrt()).reshape(-1), 0.99)
            wt = d.reshape(-1)[sel].clamp_min(0) + 1e-30
            cx = float((wt * bx[sel]).sum() / wt.sum())
            cy = float((wt * by[sel]).sum() / wt.sum())
            ext = torch.maximum((bx[sel] - cx).abs(), (by[sel] - cy).abs())
            half = float(torch.quantile(ext, 0.98)) * pad
        self.box = (cx, cy, max(half, 0.05))

    def refit_light(self, v: torch.Tensor | None = None, x: torch.Tensor | None = None) -> None:
        """Re-solve the lens light's non-negative amplitudes against the data minus the arcs of mass ``v``
        and source ``x`` (none given: against the data), by weighted NNLS."""
        if self.light is None:
            return
        with torch.no_grad():
            arcs = (
                torch.zeros_like(self.data)
                if v is None or x is None
                else self._lensed(x[: self.s * self.s], self._coords(v))
            )
            g = self.light.reshape(self.light.shape[0], -1)
            w2 = self.w2.reshape(1, -1)
            gram = (g * w2) @ g.T
            rhs = (g * w2) @ (self.data - arcs).reshape(-1)
            amps, _ = nnls_gram(gram[None], rhs[None])
            self.light_amplitudes = amps[0].to(torch.float64)
            self.light_image = torch.einsum("j,jhw->hw", self.light_amplitudes, self.light)

    def _coords(self, v: torch.Tensor) -> torch.Tensor:
        assert self.box is not None, "place_source_box first"
        bx, by = _deflect(v, self.x, self.y)
        cx, cy, half = self.box
        return torch.stack([(bx - cx) / half, (by - cy) / half], -1).view(1, 1, -1, 2)

    # ------------------------------------------------------------------ linear operators
    def _lensed(self, s: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Images of sources ``s`` (``S^2`` or ``B x S^2``): ``H x W`` or ``B x H x W``."""
        b = 1 if s.ndim == 1 else s.shape[0]
        v = F.grid_sample(
            s.reshape(b, 1, self.s, self.s), coords.expand(b, -1, -1, -1), mode="bilinear", padding_mode="zeros",
            align_corners=True,
        )  # fmt: skip
        img = v.view(b, 1, self.h, self.w, self.ss * self.ss).mean(-1)
        out = self.psf.convolve(img).reshape(b, self.h, self.w)
        return out[0] if s.ndim == 1 else out

    def model(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Model image of the flattened source ``x`` plus the held lens light."""
        return self._lensed(x[: self.s * self.s], coords) + self.light_image

    def regularise(self, x: torch.Tensor) -> torch.Tensor:
        """``C x`` for the flattened source ``x`` (``S^2``, or ``B x S^2`` row by row)."""
        n = self.s * self.s
        s = x[..., :n].reshape(-1, 1, self.s, self.s)
        cs = F.conv2d(F.conv2d(s, _LAPLACIAN, padding=1), _LAPLACIAN, padding=1)
        return cs.reshape(x[..., :n].shape)

    def _ray_matrix(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse CSR ``(H W) x S^2`` and its transpose: the mean over each pixel's rays of the bilinear weights
        :meth:`_lensed`'s ``grid_sample`` gives them (``align_corners=True``, zero outside the box)."""
        c = coords.reshape(-1, 2)
        gx = (c[:, 0] + 1) * 0.5 * (self.s - 1)
        gy = (c[:, 1] + 1) * 0.5 * (self.s - 1)
        x0, y0 = torch.floor(gx), torch.floor(gy)
        fx, fy = gx - x0, gy - y0
        pixel = torch.arange(c.shape[0]) // (self.ss * self.ss)  # rays are ordered (row, col, sub-row, sub-col)
        rows, cols, vals = [], [], []
        for dx, dy, wt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            xi, yi = x0.long() + dx, y0.long() + dy
            inside = (xi >= 0) & (xi < self.s) & (yi >= 0) & (yi < self.s)
            rows.append(pixel[inside])
            cols.append((yi * self.s + xi)[inside])
            vals.append(wt[inside] / (self.ss * self.ss))
        index = torch.stack([torch.cat(rows), torch.cat(cols)])
        shape = (self.h * self.w, self.s * self.s)
        coo = torch.sparse_coo_tensor(index, torch.cat(vals), shape, check_invariants=False).coalesce()
        with warnings.catch_warnings():  # CSR is "beta" in torch; its matrix-vector product is ~10x COO's here
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return coo.to_sparse_csr(), coo.t().coalesce().to_sparse_csr()

    def _operators(self, v: torch.Tensor, coords: torch.Tensor | None = None) -> tuple[Callable, Callable]:
        """The lensing operator ``A`` at the mass ``v`` (``S^2`` or ``B x S^2`` sources to ``H x W`` images)
        and its adjoint, through the rays' sparse bilinear matrix and the PSF (its adjoint: the flipped kernel).
        The same map as :meth:`_lensed`, ~3x faster in the CG solves than autograd's vector-Jacobian product.
        ``coords``: ``v``'s :meth:`_coords` when already computed."""
        with torch.no_grad():
            ray, ray_t = self._ray_matrix(self._coords(v.detach()) if coords is None else coords.detach())
        psf_t = PSF(torch.flip(self.psf.kernel, dims=(-2, -1)), None)

        def forward(x: torch.Tensor) -> torch.Tensor:
            flat = x[..., : self.s * self.s].reshape(-1, self.s * self.s)
            img = (ray @ flat.T).T.reshape(-1, 1, self.h, self.w)
            out = self.psf.convolve(img).reshape(-1, self.h, self.w)
            return out[0] if x.ndim == 1 else out

        def adjoint(r: torch.Tensor) -> torch.Tensor:
            img = psf_t.convolve(r.reshape(-1, 1, self.h, self.w)).reshape(-1, self.h * self.w)
            out = (ray_t @ img.T).T
            return out[0] if r.ndim == 2 else out

        return forward, adjoint

    def solve(
        self,
        v: torch.Tensor,
        lam: float,
        start: torch.Tensor | None = None,
        rtol: float = 1e-9,
        max_iter: int = 400,
        coords: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The unknowns minimising ``chi2 + lam s^T C s`` for the mass ``v`` (preconditioned CG; ``coords``:
        ``v``'s :meth:`_coords` when already computed)."""
        with torch.no_grad():
            a_op, at_op = self._operators(v, coords)

            def normal(x: torch.Tensor) -> torch.Tensor:
                return at_op(self.w2 * a_op(x)) + lam * self.regularise(x)

            b = at_op(self.w2 * (self.data - self.light_image))
            # Jacobi preconditioner: A^T W^2 A applied to ones (row sums; positive) plus C's diagonal (20)
            diag = at_op(self.w2 * a_op(torch.ones_like(b))).abs().clamp_min(1e-12)
            diag[: self.s * self.s] += 20.0 * lam
            x = torch.zeros_like(b) if start is None else start.clone()
            r = b - normal(x)
            z = r / diag
            d = z.clone()
            rz = (r * z).sum()
            b_norm = float(b.norm()) + 1e-300
            for _ in range(max_iter):
                nd = normal(d)
                alpha = rz / (d * nd).sum()
                x = x + alpha * d
                r = r - alpha * nd
                if float(r.norm()) < rtol * b_norm:
                    break
                z = r / diag
                rz_new = (r * z).sum()
                d = z + (rz_new / rz) * d
                rz = rz_new
        return x

    def penalised_chi2(
        self, v: torch.Tensor, x: torch.Tensor, lam: float, coords: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chi2 + lam s^T C s, chi2)``, differentiable in the mass ``v`` (``x`` held); ``coords``: ``v``'s
        :meth:`_coords` when already computed (with their graph, for the derivative)."""
        coords = self._coords(v) if coords is None else coords
        r = (self.data - self.model(x, coords)) * self.w2.sqrt()
        chi2 = (r * r).sum()
        return chi2 + lam * (x * self.regularise(x)).sum(), chi2

    def design_matrix(self, v: torch.Tensor, batch: int = 128) -> torch.Tensor:
        """``(H W) x S^2``: column ``k`` is the weighted image (``w * P B e_k``) of source pixel ``k`` under
        the mass ``v`` (the rays' sparse matrix of :meth:`_ray_matrix`, blurred ``batch`` columns at a time:
        the map of :meth:`model`, without its ``grid_sample`` over every ray for every column)."""
        with torch.no_grad():
            ray_t = self._ray_matrix(self._coords(v))[1]  # row k: the rays' weights of source pixel k
            ptr, col, val = ray_t.crow_indices(), ray_t.col_indices(), ray_t.values()
            n = self.s * self.s
            w = self.w2.sqrt().reshape(1, -1)
            cols = []
            for start in range(0, n, batch):
                stop = min(start + batch, n)
                lo, hi = int(ptr[start]), int(ptr[stop])
                row = torch.repeat_interleave(torch.arange(stop - start), ptr[start + 1 : stop + 1] - ptr[start:stop])
                dense = torch.zeros(stop - start, self.h * self.w, dtype=torch.float64)
                dense[row, col[lo:hi]] = val[lo:hi]
                blurred = self.psf.convolve(dense.reshape(-1, 1, self.h, self.w)).reshape(-1, self.h * self.w)
                cols.append((blurred * w).T)
        return torch.cat(cols, 1)

    def regularisation_matrix(self) -> torch.Tensor:
        """``S^2 x S^2``: ``C`` of :meth:`regularise` (symmetric, positive definite)."""
        return self.regularise(torch.eye(self.s * self.s, dtype=torch.float64))

    def log_evidence(self, v: torch.Tensor, lambdas: tuple[float, ...]) -> list[float]:
        """``log P(d - light | v, lambda)`` up to a constant that depends on neither, for each lambda (Suyu
        et al. 2006, eq. 19: ``-chi2/2 - lambda E_s - log det(F + lambda C)/2 + log det(lambda C)/2``;
        dense), the lens light held at :attr:`light_image`."""
        with torch.no_grad():
            b = self.design_matrix(v)
            c = self.regularisation_matrix()
            n = c.shape[0]
            used = self.w2.reshape(-1) > 0  # unused pixels' rows are zero: ~3x fewer operations in B^T B
            b = b[used]
            fisher = b.T @ b
            dw = ((self.data - self.light_image).reshape(-1) * self.w2.sqrt().reshape(-1))[used]
            rhs = b.T @ dw
            logdet_c = float(torch.linalg.slogdet(c)[1])
            ridge = 1e-9 * float(torch.diagonal(fisher).mean())
            out = []
            for lam in lambdas:
                m = fisher + lam * c + ridge * torch.eye(n, dtype=torch.float64)
                chol, info = torch.linalg.cholesky_ex(m)
                if int(info) != 0:
                    out.append(-math.inf)
                    continue
                x = torch.cholesky_solve(rhs[:, None], chol)[:, 0]
                res = dw - b @ x
                value = (
                    -0.5 * float(res @ res) - 0.5 * lam * float(x @ (c @ x))
                    - float(torch.log(torch.diagonal(chol)).sum())
                    + 0.5 * (n * math.log(lam) + logdet_c)
                )  # fmt: skip
                out.append(value)
        return out


@dataclass
class PowerLawFit:
    """The fitted power law and its pixelated source.

    Attributes:
        mass: the best :class:`PowerLaw`.
        chi2_nu: chi2 per used pixel of the final model.
        regularisation: the evidence's ``lambda``.
        log_evidence: its value (up to a constant).
        source: ``S x S`` source (data units) on ``source_box`` = ``(x, y, half-size)`` arcsec.
        model_image: ``H x W`` model of the crop (arcs plus fitted light).
        seconds, evaluations: cost.
        lambda_history: the lambdas the fit went through.
    """

    mass: PowerLaw
    chi2_nu: float
    regularisation: float
    log_evidence: float
    source: torch.Tensor
    source_box: tuple[float, float, float]
    model_image: torch.Tensor
    seconds: float
    evaluations: int
    lambda_history: list[float]


def _lbfgs(inv: SourceInversion, v0: torch.Tensor, lam: float, free: torch.Tensor, max_iter: int,
           warm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:  # fmt: skip
    p = v0.clone().requires_grad_(True)
    state: dict = {"x": warm, "n": 0, "best": (math.inf, v0, warm)}
    opt = torch.optim.LBFGS([p], lr=1, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-10)  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        v = torch.where(free, p, v0)
        if not bool(torch.isfinite(v).all()):
            raise FloatingPointError("non-finite mass parameters")
        coords = inv._coords(v)  # once for the solve and the derivative (the deflection is a third of the cost)
        x = inv.solve(v.detach(), lam, state["x"], coords=coords.detach())
        state["x"] = x
        state["n"] += 1
        value = inv.penalised_chi2(v, x, lam, coords)[0] / inv.n_used
        if not torch.isfinite(value):
            raise FloatingPointError("non-finite objective")
        if value.item() < state["best"][0]:
            state["best"] = (value.item(), v.detach().clone(), x)
        value.backward()
        return value

    with contextlib.suppress(FloatingPointError):  # a line search that left the physical range: keep the best point
        opt.step(closure)
    _, v, x = state["best"]
    return v, inv.solve(v, lam, x), state["n"]


def fit_power_law(inv: SourceInversion, start: PowerLaw, *, max_iter: int = 50) -> PowerLawFit:
    """Fit an EPL + shear to ``inv``'s data from ``start``.

    Stages: (1) slope fixed at ``start``'s, everything else free, at a strong regularisation (the source
    is smooth, so the mass follows the arcs' overall shape); (2) all eight free; (3) lambda set by the
    evidence at the current mass and the fit repeated, until lambda stops changing (at most
    ``EVIDENCE_ROUNDS`` times). A lens light is re-solved (non-negative) between the stages. Returns the
    :class:`PowerLawFit`.
    """
    t0 = time.perf_counter()
    v = start.vector()
    if not inv.light_given:  # against the data alone the light also takes some of the arcs: a start only
        inv.refit_light()
    inv.place_source_box(v)
    lam = 10.0**START_LOG10_LAMBDA
    free = torch.ones(v.shape[0], dtype=torch.bool)
    fixed_slope = free.clone()
    fixed_slope[1] = False
    v, x, n1 = _lbfgs(inv, v, lam, fixed_slope, max_iter // 2, None)
    inv.refit_light(v, x)
    v, x, n2 = _lbfgs(inv, v, lam, free, max_iter, x)
    evaluations = n1 + n2
    history = [lam]
    lambdas = tuple(10.0**k for k in LOG10_LAMBDAS)
    best_ev = -math.inf
    for _ in range(EVIDENCE_ROUNDS):
        inv.refit_light(v, x)
        evs = inv.log_evidence(v, lambdas)
        k = int(np.argmax(evs))
        best_ev = evs[k]
        if lambdas[k] == lam and inv.light is None:
            break
        lam = lambdas[k]
        history.append(lam)
        v, x, n = _lbfgs(inv, v, lam, free, max_iter, x)
        evaluations += n
    return _power_law_fit(inv, v, x, lam, best_ev, time.perf_counter() - t0, evaluations, history)


def _power_law_fit(inv: SourceInversion, v: torch.Tensor, x: torch.Tensor, lam: float, log_evidence: float,
                   seconds: float, evaluations: int, history: list[float]) -> PowerLawFit:  # fmt: skip
    """The :class:`PowerLawFit` of mass ``v`` and source ``x`` on ``inv`` (model image and chi2 computed)."""
    with torch.no_grad():
        model = inv.model(x, inv._coords(v))
        chi2 = float(inv.penalised_chi2(v, x, lam)[1])
    return PowerLawFit(
        mass=PowerLaw.from_vector(v), chi2_nu=chi2 / inv.n_used, regularisation=lam, log_evidence=log_evidence,
        source=x[: inv.s * inv.s].reshape(inv.s, inv.s), source_box=inv.box or (0.0, 0.0, 0.0),
        model_image=model, seconds=seconds, evaluations=evaluations, lambda_history=history,
    )  # fmt: skip


@dataclass
class SlopeProfile:
    """The evidence's profile along the slope (the other seven parameters refitted at each node).

    Attributes:
        slope: the evidence's maximum (parabola through the best node and its neighbours).
        slope_sigma: ``1 / sqrt(-d^2 log E / d gamma^2)`` of that parabola (inf when it is not concave).
        mass: the refitted mass at ``slope``.
        nodes: ``(slope, log evidence, chi2_nu)`` of every node.
        seconds: cost.
    """

    slope: float
    slope_sigma: float
    mass: PowerLaw
    nodes: list[tuple[float, float, float]]
    seconds: float


def _fixed_slope_fit(
    inv: SourceInversion, v0: torch.Tensor, lam: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The other seven parameters at ``v0``'s slope, the source box re-placed before and after (the box
    follows the source-plane scale a change of slope brings; a fixed box biases the evidence)."""
    free = torch.ones(v0.shape[0], dtype=torch.bool)
    free[1] = False
    return _refit(inv, v0, lam, free, (max_iter, max_iter))


def _refit(
    inv: SourceInversion, v: torch.Tensor, lam: float, free: torch.Tensor, iterations: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``free`` parameters of ``v`` refitted in two L-BFGS runs of ``iterations``, the source box placed
    before each (the box follows the source-plane scale the mass brings; a fixed box biases the evidence)."""
    x = None
    for n in iterations:
        inv.place_source_box(v)
        v, x, _ = _lbfgs(inv, v, lam, free, n, None)
    assert x is not None
    return v, x


@dataclass
class SubhaloSearch:
    """One round of the subhalo search: the candidates tried and the evidence's verdict.

    Attributes:
        accepted: whether the best candidate raised the evidence by more than the threshold.
        delta_log_evidence: the best candidate's log-evidence minus the model's without it (``-inf`` when no
            candidate was refitted).
        subhalo: its ``(b, x, y)`` after the joint fit (arcsec).
        candidates: ``(x, y, b_trial, delta penalised chi2)`` of each candidate tried at fixed macro-model.
        seconds: cost.
    """

    accepted: bool
    delta_log_evidence: float
    subhalo: tuple[float, float, float]
    candidates: list[tuple[float, float, float, float]]
    seconds: float


def _subhalo_candidates(
    inv: SourceInversion, v: torch.Tensor, x: torch.Tensor, n_best: int, spacing: float, separation: float,
    annulus: tuple[float, float],
) -> list[tuple[float, float]]:  # fmt: skip
    """Where a small added mass lowers the penalised chi2 fastest: its first derivative with respect to a
    subhalo's ``b`` at ``b = 0`` (the source held: at the source's optimum that is the profiled chi2's
    derivative), on a lattice ``spacing`` apart in the ``annulus`` (in theta_E) about the mass centre; the
    ``n_best`` most negative, at least ``separation`` apart."""
    with torch.no_grad():
        theta = v[0].abs()
        coords = inv._coords(v)
    coords = coords.detach().requires_grad_(True)
    r = (inv.data - inv.model(x, coords)) * inv.w2.sqrt()
    (r * r).sum().backward()
    assert coords.grad is not None
    half = inv.box[2] if inv.box is not None else 1.0
    g = coords.grad.view(-1, 2) / half  # d chi2 / d beta (per arcsec) per ray
    with torch.no_grad():
        # lattice over the annulus
        lim = annulus[1] * float(theta)
        ax = torch.arange(-lim, lim + 1e-9, spacing, dtype=torch.float64)
        py, px = torch.meshgrid(ax + float(v[5]), ax + float(v[4]), indexing="ij")
        rr = torch.hypot(px - v[4], py - v[5])
        keep = (rr >= annulus[0] * theta) & (rr <= annulus[1] * theta)
        px, py = px[keep], py[keep]
        unit = torch.tensor(1.0, dtype=torch.float64)
        score = torch.empty(px.shape[0], dtype=torch.float64)
        for start in range(0, px.shape[0], 64):
            cx, cy = px[start : start + 64, None], py[start : start + 64, None]
            hx, hy = subhalo_deflection(inv.x[None], inv.y[None], unit, theta, cx, cy)
            # beta = theta - ... - b alpha_hat: d chi2 / d b = -sum g . alpha_hat
            score[start : start + 64] = -(g[None, :, 0] * hx + g[None, :, 1] * hy).sum(-1)
    order = torch.argsort(score)
    picked: list[tuple[float, float]] = []
    for k in order.tolist():
        if float(score[k]) >= 0 or len(picked) >= n_best:
            break
        p = (float(px[k]), float(py[k]))
        if all(math.hypot(p[0] - q[0], p[1] - q[1]) >= separation for q in picked):
            picked.append(p)
    return picked


def search_subhalo(
    inv: SourceInversion, v: torch.Tensor, x: torch.Tensor, lam: float, *,
    threshold: float = SUBHALO_EVIDENCE_THRESHOLD,
    n_candidates: int = 6, n_refined: int = SUBHALO_REFITS, max_iter: int = 50, spacing: float = 0.1,
    annulus: tuple[float, float] = (0.4, 1.8),
) -> tuple[torch.Tensor, torch.Tensor, SubhaloSearch]:  # fmt: skip
    """Look for one more subhalo in the mass ``v`` (source ``x``, regularisation ``lam``), the gravitational
    imaging way (Koopmans 2005; Vegetti & Koopmans 2009) in its parametric form: rank positions by the
    penalised chi2's derivative in a subhalo's mass, try the ``n_candidates`` best at the trial masses
    ``SUBHALO_TRIAL_B`` with the macro-model held, refit the ``n_refined`` best of those that lower the
    penalised chi2 by more than ``threshold`` jointly with every parameter free (L-BFGS), and keep the one
    whose Bayesian evidence is highest if it beats the model without it by more than ``threshold`` (natural
    log) after the same refit. Returns the mass, source and :class:`SubhaloSearch` (when rejected: ``v`` and
    ``x`` refitted without a subhalo)."""
    t0 = time.perf_counter()
    lambdas = tuple(lam * 2.0**k for k in (-1, 0, 1))
    # the model without the subhalo gets the same refit first: else the candidate's refit also wins what
    # more L-BFGS steps give any mass (measured: "subhaloes" of b < 0.005" "raised" the evidence by 160-468)
    v, x = _refit(inv, v, lam, torch.ones(v.shape[0], dtype=torch.bool), (max_iter, max_iter // 2))
    base_box = inv.box
    base_ev = max(inv.log_evidence(v, lambdas))
    base_pchi2 = float(inv.penalised_chi2(v, x, lam)[0])
    positions = _subhalo_candidates(inv, v, x, n_candidates, spacing, 0.3, annulus)
    tried: list[tuple[float, float, float, float]] = []
    trials: list[tuple[float, torch.Tensor]] = []
    for px, py in positions:
        best: tuple[float, torch.Tensor] | None = None
        for b in SUBHALO_TRIAL_B:
            vt = torch.cat([v, torch.tensor([b, px, py], dtype=torch.float64)])
            xt = inv.solve(vt, lam, x)
            d = float(inv.penalised_chi2(vt, xt, lam)[0]) - base_pchi2
            tried.append((px, py, b, d))
            if best is None or d < best[0]:
                best = (d, vt)
        assert best is not None
        trials.append(best)
    trials.sort(key=lambda t: t[0])
    # a candidate that lowers the penalised chi2 by less than the threshold at its trial masses is not refitted
    # (the joint refit is most of the search's cost; a smooth lens then costs a refit and a few source solves)
    trials = [t for t in trials if -t[0] > threshold]
    result = (v, x, -math.inf, (0.0, 0.0, 0.0), base_box)
    for _, vt in trials[:n_refined]:
        vf, xf = _refit(inv, vt, lam, torch.ones(vt.shape[0], dtype=torch.bool), (max_iter, max_iter // 2))
        ev = max(inv.log_evidence(vf, lambdas))
        if abs(float(vf[-3])) < SUBHALO_MIN_B:  # the refit let the mass go: no subhalo, whatever else improved
            continue
        if ev - base_ev > result[2]:
            found = (abs(float(vf[-3])), float(vf[-2]), float(vf[-1]))
            result = (vf, xf, ev - base_ev, found, inv.box)
    vn, xn, delta, sub, box = result
    accepted = delta > threshold
    inv.box = box if accepted else base_box
    search = SubhaloSearch(accepted, delta, sub, tried, time.perf_counter() - t0)
    return (vn, xn, search) if accepted else (v, x, search)  # rejected: the refitted model without it


def add_subhalos(
    inv: SourceInversion, fit: PowerLawFit, *, max_subhalos: int = 2, threshold: float = SUBHALO_EVIDENCE_THRESHOLD,
    n_refined: int = SUBHALO_REFITS,
) -> tuple[PowerLawFit, list[SubhaloSearch]]:  # fmt: skip
    """Add subhaloes to ``fit``'s mass one at a time (:func:`search_subhalo`, refitting the ``n_refined``
    best candidates of each round) while the evidence asks for them, at most ``max_subhalos``; a lens light
    is re-solved after each. Returns the new fit (``fit`` itself when none was accepted) and every round's
    :class:`SubhaloSearch`."""
    t0 = time.perf_counter()
    v, x, lam = fit.mass.vector(), fit.source.reshape(-1).clone(), fit.regularisation
    inv.box = fit.source_box
    searches: list[SubhaloSearch] = []
    for _ in range(max_subhalos):
        v, x, search = search_subhalo(inv, v, x, lam, threshold=threshold, n_refined=n_refined)
        searches.append(search)
        if not search.accepted:
            break
        inv.refit_light(v, x)
        x = inv.solve(v, lam, x)
    if not any(s.accepted for s in searches):
        return fit, searches
    ev = inv.log_evidence(v, (lam,))[0]
    seconds = fit.seconds + time.perf_counter() - t0
    return _power_law_fit(inv, v, x, lam, ev, seconds, fit.evaluations, fit.lambda_history), searches


def slope_profile(inv: SourceInversion, fit: PowerLawFit, *, step: float = 0.1, max_nodes: int = 9,
                  max_iter: int = 25, slope_range: tuple[float, float] = (1.4, 2.8)) -> SlopeProfile:  # fmt: skip
    """Rank slopes by the full Bayesian evidence (Suyu et al. 2006: chi2, regularisation and the
    log-determinants), each with its own refitted mass and source box, starting from ``fit``: nodes
    ``step`` apart about ``fit``'s slope, extended towards the higher evidence until it falls on both
    sides (at most ``max_nodes``), then the parabola through the best three. A lens light is held at
    ``fit``'s (re-solving it per node would change the data the nodes are ranked on)."""
    t0 = time.perf_counter()
    lam = fit.regularisation
    lambdas = tuple(lam * 2.0**k for k in (-2, -1, 0, 1, 2))
    nodes: dict[float, tuple[float, float, torch.Tensor]] = {}
    base = fit.mass.vector()

    def evaluate(g: float) -> None:
        near = min(nodes, key=lambda h: abs(h - g)) if nodes else None
        v0 = (nodes[near][2] if near is not None else base).clone()
        v0[1] = g
        v, x = _fixed_slope_fit(inv, v0, lam, max_iter)
        ev = max(inv.log_evidence(v, lambdas))
        chi2 = float(inv.penalised_chi2(v, x, lam)[1]) / inv.n_used
        nodes[g] = (ev, chi2, v)

    g0 = round(fit.mass.slope / step) * step
    for g in (g0 - step, g0, g0 + step):
        evaluate(g)
    while len(nodes) < max_nodes:
        ordered = sorted(nodes)
        best = max(ordered, key=lambda h: nodes[h][0])
        if best == ordered[0] and best - step >= slope_range[0]:
            evaluate(best - step)
        elif best == ordered[-1] and best + step <= slope_range[1]:
            evaluate(best + step)
        else:
            break
    ordered = sorted(nodes)
    best = max(ordered, key=lambda h: nodes[h][0])
    i = ordered.index(best)
    slope, sigma = best, math.inf
    if 0 < i < len(ordered) - 1:
        ym, y0, yp = (nodes[ordered[j]][0] for j in (i - 1, i, i + 1))
        curv = (yp + ym - 2 * y0) / step**2
        if curv < 0:
            slope = best - (yp - ym) / (2 * step) / curv
            sigma = 1.0 / math.sqrt(-curv)
    v0 = nodes[best][2].clone()
    v0[1] = slope
    v, _ = _fixed_slope_fit(inv, v0, lam, max_iter)
    return SlopeProfile(
        slope=slope, slope_sigma=sigma, mass=PowerLaw.from_vector(v),
        nodes=[(g, nodes[g][0], nodes[g][1]) for g in ordered], seconds=time.perf_counter() - t0,
    )  # fmt: skip


def _profile_fit(inv: SourceInversion, profile: SlopeProfile, fit: PowerLawFit) -> PowerLawFit:
    """A :class:`PowerLawFit` of the slope profile's mass (at the evidence's slope), its source solved at
    ``fit``'s regularisation in a box placed for that mass; the light re-solved for them."""
    t0 = time.perf_counter()
    v, lam = profile.mass.vector(), fit.regularisation
    inv.place_source_box(v)
    x = inv.solve(v, lam)
    inv.refit_light(v, x)
    x = inv.solve(v, lam, x)
    ev = inv.log_evidence(v, (lam,))[0]
    seconds = fit.seconds + time.perf_counter() - t0
    return _power_law_fit(inv, v, x, lam, ev, seconds, fit.evaluations, fit.lambda_history)


def power_law_start(kappa: np.ndarray, grid: PixelGrid, einstein_radius_arcsec: float,
                    kappa_center_arcsec: tuple[float, float], field_center_arcsec: tuple[float, float]) -> PowerLaw:  # fmt: skip
    """An isothermal start from a convergence map: its Einstein radius and centre (cut-out frame), and
    the ellipticity of its second moments in the annulus 0.5-1.5 theta_E (``kappa``: ``N x N`` on ``grid``,
    centred at ``field_center_arcsec``)."""
    n, s = grid.n_pixels, grid.pixel_scale_arcsec
    ax = (np.arange(n) - (n - 1) / 2) * s
    xx, yy = np.meshgrid(ax - (kappa_center_arcsec[0] - field_center_arcsec[0]),
                         ax - (kappa_center_arcsec[1] - field_center_arcsec[1]))  # fmt: skip
    r = np.hypot(xx, yy)
    w = np.where((r > 0.5 * einstein_radius_arcsec) & (r < 1.5 * einstein_radius_arcsec), kappa, 0.0)
    qxx, qyy, qxy = (w * xx * xx).sum(), (w * yy * yy).sum(), (w * xx * yy).sum()
    total = qxx + qyy
    e1 = e2 = 0.0
    if total > 0 and np.isfinite(total):
        c1, c2 = (qxx - qyy) / total, 2 * qxy / total
        chi = min(math.hypot(c1, c2), 0.6)
        q = math.sqrt((1 - chi) / (1 + chi))
        e = (1 - q) / (1 + q)
        phi = 0.5 * math.atan2(c2, c1)
        e1, e2 = e * math.cos(2 * phi), e * math.sin(2 * phi)
    return PowerLaw(
        float(einstein_radius_arcsec), 2.0, e1, e2, float(kappa_center_arcsec[0]), float(kappa_center_arcsec[1])
    )


@dataclass
class PowerLawMeasurement:
    """``summary.json``'s ``power_law`` block: the evidence-ranked slope's mass and how it was reached.

    Attributes:
        mass: the :class:`PowerLaw` at the evidence's slope (other parameters refitted there).
        slope_sigma: the evidence profile's curvature width (statistical only; ``inf`` if not concave);
            :attr:`slope_sigma_total` adds :data:`SLOPE_SIGMA_SYSTEMATIC` in quadrature.
        chi2_nu: chi2 per used pixel of the first fit (all eight parameters free).
        fit: the first fit (:class:`PowerLawFit`); profile: the :class:`SlopeProfile`.
        seconds: total cost.
        subhalo_searches: each round of the subhalo search.
        inversion: the :class:`SourceInversion` the fit ran on (its data, light and source box).
    """

    mass: PowerLaw
    slope_sigma: float
    chi2_nu: float
    fit: PowerLawFit
    profile: SlopeProfile
    seconds: float
    subhalo_searches: list[SubhaloSearch] = field(default_factory=list)
    # the fit's data, light and source grid, for sampling the posterior about the measurement
    inversion: SourceInversion | None = field(default=None, repr=False)

    @property
    def slope_sigma_total(self) -> float:
        """The slope's 1-sigma width, statistical and systematic in quadrature (``inf`` if not concave)."""
        return math.hypot(self.slope_sigma, SLOPE_SIGMA_SYSTEMATIC)

    def describe(self) -> dict:
        """JSON-ready summary (arcsec, cut-out frame)."""
        sigma = self.slope_sigma if math.isfinite(self.slope_sigma) else None
        warning = None
        if self.chi2_nu > POWER_LAW_CHI2_WARN:
            warning = (
                f"the power law does not fit the data (chi2_nu {self.chi2_nu:.2f} > {POWER_LAW_CHI2_WARN}): "
                "a lens light or substructure it does not model; its slope is not reliable"
            )
        elif sigma is None:
            warning = "the evidence has no maximum inside the slopes scanned: the slope is at the scan's edge"
        return {
            **self.mass.describe(),
            "log_slope_sigma": None if sigma is None else round(self.slope_sigma_total, 4),
            "log_slope_sigma_statistical": None if sigma is None else round(sigma, 4),
            "log_slope_sigma_systematic": SLOPE_SIGMA_SYSTEMATIC,
            "chi2_nu": round(self.chi2_nu, 4),
            "source_regularisation": self.fit.regularisation,
            "evidence_nodes": [
                {"log_slope": round(g, 3), "log_evidence": round(e, 2), "chi2_nu": round(c, 4)}
                for g, e, c in self.profile.nodes
            ],
            "subhalo_search": [
                {
                    # None: no candidate lowered the penalised chi2 by the threshold, so none was refitted
                    "delta_log_evidence": round(sr.delta_log_evidence, 2)
                    if math.isfinite(sr.delta_log_evidence)
                    else None,
                    "accepted": sr.accepted,
                    "best_trial_delta_chi2": round(min((c[3] for c in sr.candidates), default=0.0), 2),
                }
                for sr in self.subhalo_searches
            ],
            "seconds": round(self.seconds, 1),
            "warning": warning,
            "method": "EPL + external shear (+ pseudo-Jaffe subhaloes where the evidence asks for them) with a pixelated curvature-regularised source on the detector's pixels; "
            "slope at the maximum of the Bayesian evidence (rimlens.inference.power_law)",
            "definitions": "lenstronomy EPL + SHEAR conventions; log_slope: 3-D gamma (2 = isothermal); "
            "log_slope_sigma: statistical (the evidence's curvature) and systematic (calibrated on lenstronomy "
            "lenses with a bright lens light) in quadrature; "
            "centre: arcsec from the cut-out's centre",
        }


def measure_power_law(
    image: np.ndarray,
    noise_sigma: np.ndarray,
    psf_kernel: np.ndarray,
    pixel_scale_arcsec: float,
    kappa: np.ndarray,
    grid: PixelGrid,
    field_center_arcsec: tuple[float, float],
    *,
    mask: np.ndarray | None = None,
    light: LensLightModel | None = None,
    light_flux_scale: float | None = None,
    max_subhalos: int = 2,
    subhalo_threshold: float = SUBHALO_EVIDENCE_THRESHOLD,
    subhalo_refits: int = SUBHALO_REFITS,
) -> PowerLawMeasurement:
    """Measure an EPL + shear on a cut-out's own pixels, started from a convergence map.

    Args:
        image, noise_sigma: ``H x W`` cut-out and its 1-sigma map (data units; row 0 at the bottom).
        psf_kernel: ``K x K`` PSF at the cut-out's pixel scale.
        pixel_scale_arcsec: the cut-out's pixel size.
        kappa: ``N x N`` convergence on ``grid`` (the RIM's map), centred at ``field_center_arcsec``
            (arcsec from the cut-out's centre); its Einstein radius, centre and second-moment
            ellipticity start the fit.
        mask: optional ``H x W``, True = use.
        light: the reconstruction's fitted lens light (on ``grid``; its Gaussians are re-solved against the
            data, non-negative, in alternation with the mass and source).
        light_flux_scale: ``grid``'s units per input flux per ``grid`` pixel
            (:attr:`rimlens.io.observation.PreparedObservation.flux_scale`): the fit then starts from the
            light's own amplitudes. Without it the light is first solved against the data alone, where
            it also takes some of the arcs (a worse start with a bright lens galaxy).
        max_subhalos: subhaloes the evidence may add to the mass (:func:`add_subhalos`) before the slope is
            ranked (0: none; measured on lenstronomy's lenses in the README).
        subhalo_threshold: the rise of the log-evidence (natural log) a subhalo must bring to be kept.
        subhalo_refits: candidates of each search round refitted jointly before the evidence chooses.

    Returns:
        :class:`PowerLawMeasurement`. The fit uses the square of half-size ``2 theta_E + 0.4"`` about the
        map's centre (at most the cut-out's farthest edge plus the PSF's half-width).

    Raises:
        RimlensInputError: a map with no Einstein radius, or a crop without usable pixels.
    """
    t0 = time.perf_counter()
    kappa = np.asarray(kappa, dtype=np.float64)
    if not np.isfinite(kappa).all():
        raise RimlensInputError("the convergence map to start the power-law fit from is not finite")
    center = kappa_peak_center(kappa, grid)
    theta = einstein_radius_of_map(kappa, grid, center)
    if not (math.isfinite(theta) and theta > 0):
        raise RimlensInputError("the convergence map has no Einstein radius to start the power-law fit from")
    center_cut = (field_center_arcsec[0] + float(center[0]), field_center_arcsec[1] + float(center[1]))
    start = power_law_start(kappa, grid, theta, center_cut, field_center_arcsec)
    inv = SourceInversion.from_cutout(
        image, noise_sigma, psf_kernel, pixel_scale_arcsec, center_cut, 2.0 * theta + 0.4, mask=mask,
        light=light, light_frame_center_arcsec=field_center_arcsec,
        light_to_data=None if light_flux_scale is None
        else (pixel_scale_arcsec / grid.pixel_scale_arcsec) ** 2 / light_flux_scale,
    )  # fmt: skip
    fit = fit_power_law(inv, start)
    profile = slope_profile(inv, fit)
    searches: list[SubhaloSearch] = []
    if max_subhalos > 0:
        # the subhaloes are looked for about the evidence's best macro model, not the first fit's: a first
        # fit caught at a wrong slope (0.34 off on a smooth lenstronomy lens) leaves residuals that
        # "subhaloes" then take, with evidence gains of 150+ that no threshold separates from true ones
        base = _profile_fit(inv, profile, fit)
        found, searches = add_subhalos(
            inv, base, max_subhalos=max_subhalos, threshold=subhalo_threshold, n_refined=subhalo_refits
        )
        if found is not base:  # the slope is ranked again with the subhaloes in the mass
            fit = found
            profile = slope_profile(inv, found)
    return PowerLawMeasurement(
        mass=profile.mass, slope_sigma=profile.slope_sigma, chi2_nu=fit.chi2_nu, fit=fit, profile=profile,
        seconds=time.perf_counter() - t0, subhalo_searches=searches, inversion=inv,
    )  # fmt: skip
