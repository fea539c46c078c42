"""Posterior samples of the power-law measurement (:mod:`rimlens.inference.power_law`): the mass's
parameters, the pixelated source and the convergence they make.

The semi-linear problem is Gaussian once linearised about the measurement: the image is linear in the source
``s`` and the lens light's amplitudes ``l``, and nearly so in the mass ``v`` over its posterior's width. The
joint precision of ``(v, s, l)`` is (whitened by the noise)

    P = [[J^T J, J^T B], [B^T J, B^T B + lambda C]],   B = [lensing operator, light basis],

with ``J`` the image's derivative in the mass (central differences, the source held), ``C`` the source's
curvature regularisation (zero for the light). The mass's marginal covariance (source and light integrated
out) is the inverse of the Schur complement ``J^T J - J^T B (B^T B + lambda C)^-1 B^T J``; each sample draws the
mass from it, then its source from the exact solve at that mass plus a draw of the conditional covariance.
This is the Laplace approximation of the semi-linear evidence (Suyu et al. 2006; Vegetti & Koopmans 2009):
what the data alone say, given the model. On lenses the model does not describe exactly (a Sersic light
fitted by Gaussians, subhaloes missed, the start) the truth lies farther than that (README, "the slope's
width made honest"), so the slope's marginal width is brought to the measurement's total
(:attr:`~rimlens.inference.power_law.PowerLawMeasurement.slope_sigma_total`: the evidence's curvature plus the
calibrated :data:`~rimlens.inference.power_law.SLOPE_SIGMA_SYSTEMATIC`), the other parameters following the
slope along their regression on it, so that each sample still fits the data. The other parameters' errors
are as far beyond their statistical widths (median |error| / width ~3 for every one of them, on lenstronomy's
lenses), so the whole Laplace covariance is first scaled by :data:`COVARIANCE_INFLATION`, calibrated on
lenstronomy lenses and checked on others (README, "Posterior samples of the power law"). The samples still
fit: the data barely constrain these directions (chi2 rises by ~the number of mass parameters times it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from rimlens.errors import RimlensInputError
from rimlens.inference.power_law import PowerLaw, PowerLawMeasurement, SourceInversion, _deflect
from rimlens.physics.grid import PixelGrid
from rimlens.physics.lens_metrics import pixel_mean_kappa

__all__ = [
    "COVARIANCE_INFLATION",
    "PowerLawImages",
    "PowerLawPosterior",
    "power_law_images",
    "sample_about_mass",
    "sample_power_law_posterior",
]

# the factor on the Laplace mass covariance (before the slope is widened to its total width): chosen on
# lenstronomy's LLC8 and LLH16 lenses (README) so that the non-slope parameters' fits lie within one posterior
# sigma of the truth 68% of the time (measured: 0.62 at 9, 0.73 at 20); judged on held-out lenses
COVARIANCE_INFLATION = 16.0

# central-difference steps of the mass's parameters (arcsec, or dimensionless for slope, ellipticity, shear)
_JACOBIAN_STEP = 1e-4

PARAMETER_NAMES = ("theta_e_arcsec", "slope", "e1", "e2", "center_x_arcsec", "center_y_arcsec", "gamma1", "gamma2")


def parameter_names(n_subhalos: int) -> list[str]:
    """Names of :meth:`PowerLaw.vector`'s entries for ``n_subhalos`` subhaloes."""
    subs = [f"subhalo{k}_{p}" for k in range(n_subhalos) for p in ("b_arcsec", "x_arcsec", "y_arcsec")]
    return [*PARAMETER_NAMES, *subs]


@dataclass
class PowerLawPosterior:
    """Samples of the power-law model's posterior.

    Attributes:
        masses: ``S x P`` mass parameters (:meth:`PowerLaw.vector`'s order; :attr:`names`).
        sources: ``S x M x M`` sources (the data's units per pixel) on the box ``source_box`` = ``(x, y,
            half-size)`` arcsec (pixel centres from ``x - half`` to ``x + half``, ``M`` of them along each side).
        chi2_nu: ``S`` chi2 per used pixel of each sample's model image (mass, source and light of the sample).
        best: the measurement's mass (the samples' centre).
        covariance_statistical: ``P x P`` the Laplace approximation's mass covariance (source and light
            marginalised); ``covariance``: the one sampled (scaled by ``covariance_scale``, the slope's width made total).
        names: the parameters' names.
        seconds: cost of the sampling.
    """

    masses: torch.Tensor
    sources: torch.Tensor
    source_box: tuple[float, float, float]
    chi2_nu: np.ndarray
    best: PowerLaw
    covariance_statistical: np.ndarray
    covariance: np.ndarray
    names: list[str]
    seconds: float

    @property
    def source_grid(self) -> PixelGrid:
        """The sources' pixel grid (centred at the box's centre ``source_box[:2]``)."""
        m = self.sources.shape[-1]
        return PixelGrid(m, 2 * self.source_box[2] / (m - 1))

    def kappa_maps(self, grid: PixelGrid, center_arcsec: tuple[float, float], order: int = 6) -> np.ndarray:
        """``S x N x N`` exact pixel-mean convergence of each sample's mass on ``grid`` centred at
        ``center_arcsec`` (cut-out frame), by :func:`~rimlens.physics.lens_metrics.pixel_mean_kappa` with
        ``order`` Gauss-Legendre points per graded edge piece (half its default: samples differ by far more)."""
        out = []
        for v in self.masses:
            with torch.no_grad():

                def alpha(x: np.ndarray, y: np.ndarray, v: torch.Tensor = v) -> tuple[torch.Tensor, torch.Tensor]:
                    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
                    bx, by = _deflect(v, xt, yt)
                    return xt - bx, yt - by

                cusps = [(float(v[4]), float(v[5]))] + [
                    (float(v[k + 1]), float(v[k + 2])) for k in range(8, v.shape[0] - 2, 3)
                ]
                out.append(pixel_mean_kappa(alpha, grid, center_arcsec, singular_points=cusps, order=order))
        return np.stack(out)

    def percentiles(self) -> dict:
        """16/50/84 percentiles of the Einstein radius (arcsec), slope, axis ratio and external shear's magnitude."""
        rows = [PowerLaw.from_vector(v) for v in self.masses]
        values = {
            "einstein_radius_arcsec": [m.theta_e_arcsec for m in rows],
            "log_slope": [m.slope for m in rows],
            "axis_ratio": [m.axis_ratio for m in rows],
            "external_shear_magnitude": [math.hypot(m.gamma1, m.gamma2) for m in rows],
        }
        return {k: [round(float(p), 5) for p in np.percentile(vals, [16, 50, 84])] for k, vals in values.items()}


def _mass_jacobian(inv: SourceInversion, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``n x P`` derivative of the weighted model image (used pixels) in the mass, the source held."""
    w = inv.w2.sqrt().reshape(-1)
    used = w > 0
    cols = []
    with torch.no_grad():
        for k in range(v.shape[0]):
            dv = torch.zeros_like(v)
            dv[k] = _JACOBIAN_STEP
            plus = inv.model(x, inv._coords(v + dv)).reshape(-1)
            minus = inv.model(x, inv._coords(v - dv)).reshape(-1)
            cols.append(((plus - minus) / (2 * _JACOBIAN_STEP) * w)[used])
    return torch.stack(cols, 1)


def _linear_block(
    inv: SourceInversion, v: torch.Tensor, lam: float, with_light: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, Q, G)``: the weighted design matrix of the linear unknowns (source pixels, then the light's
    active Gaussians) on the used pixels, their prior precision ``Q`` (``lambda C`` for the source, zero for
    the light) and the active Gaussians' images ``G`` (``J x H x W``; ``J = 0`` without light)."""
    w = inv.w2.sqrt().reshape(-1)
    used = w > 0
    b = inv.design_matrix(v)[used]
    q = lam * inv.regularisation_matrix()
    basis = torch.zeros(0, inv.h, inv.w, dtype=torch.float64)
    if with_light and inv.light is not None and inv.light_amplitudes is not None:
        # the Gaussians the NNLS kept; the others sit at their bound (zero), and freed they trade with the arcs
        basis = inv.light[inv.light_amplitudes > 0]
        b = torch.cat([b, (basis.reshape(basis.shape[0], -1) * w[None, :]).T[used]], 1)
        q = torch.block_diag(q, torch.zeros(basis.shape[0], basis.shape[0], dtype=q.dtype))
    return b, q, basis


@dataclass
class PowerLawImages:
    """The measurement's best fit on its crop: ``data``, ``model`` (arcs and light), its ``light`` and the
    ``residuals`` ((data - model) / sigma, zero where unused), all ``H x W``; the ``source`` (``M x M``) on ``source_box``;
    the crop's centre ``origin_arcsec`` and ``pixel_scale_arcsec`` (cut-out frame)."""

    data: np.ndarray
    model: np.ndarray
    light: np.ndarray
    residuals: np.ndarray
    source: np.ndarray
    source_box: tuple[float, float, float]
    origin_arcsec: tuple[float, float]
    pixel_scale_arcsec: float


def power_law_images(measurement: PowerLawMeasurement) -> PowerLawImages:
    """The measurement's mass with its source and light solved on its inversion (as its final fit places
    the source box). Raises :class:`RimlensInputError` for a measurement without its inversion."""
    inv = measurement.inversion
    if inv is None:
        raise RimlensInputError("the power-law measurement does not hold its inversion")
    v, lam = measurement.mass.vector(), measurement.fit.regularisation
    inv.place_source_box(v)
    x = inv.solve(v, lam)
    inv.refit_light(v, x)
    x = inv.solve(v, lam, x)
    with torch.no_grad():
        model = inv.model(x, inv._coords(v))
    w = inv.w2.sqrt()
    assert inv.box is not None
    scale = float(inv.pixel_x[0, 1] - inv.pixel_x[0, 0])
    origin = (float(inv.pixel_x[0].mean()), float(inv.pixel_y[:, 0].mean()))
    return PowerLawImages(
        data=inv.data.numpy(), model=model.numpy(), light=inv.light_image.numpy(), residuals=((inv.data - model) * w).numpy(),
        source=x[: inv.s * inv.s].reshape(inv.s, inv.s).numpy(), source_box=inv.box, origin_arcsec=origin,
        pixel_scale_arcsec=scale,
    )  # fmt: skip


def sample_power_law_posterior(
    measurement: PowerLawMeasurement,
    n_samples: int,
    *,
    seed: int = 0,
    covariance_scale: float = COVARIANCE_INFLATION,
    total_slope_width: bool = True,
    marginalise_light: bool = True,
    resolve_source: bool = True,
) -> PowerLawPosterior:
    """Draw ``n_samples`` of (mass, source) about a power-law measurement (module docstring for the method).

    Args:
        measurement: from :func:`~rimlens.inference.power_law.measure_power_law` (its ``inversion`` kept).
        n_samples: samples to draw (>= 2).
        seed: the draws' random seed.
        covariance_scale: factor on the Laplace mass covariance before the slope is widened (1: the data's
            statistical width; the default :data:`COVARIANCE_INFLATION` is calibrated on lenstronomy's lenses).
        total_slope_width: bring the slope's marginal width to the measurement's total (statistical and
            systematic; the other parameters follow the slope along their regression on it).
        marginalise_light: integrate the lens light's amplitudes out with the source (else held fixed).
        resolve_source: centre each sample's source on the exact solve at its mass (:func:`sample_about_mass`).

    Returns:
        :class:`PowerLawPosterior`.

    Raises:
        RimlensInputError: fewer than two samples, a measurement without its inversion, or one whose parameters
            the data do not constrain there (a slope at the deflection's bound: no Laplace posterior).
    """
    if n_samples < 2:
        raise RimlensInputError(f"the posterior needs at least 2 samples, got {n_samples}")
    inv = measurement.inversion
    if inv is None:
        raise RimlensInputError("the power-law measurement does not hold its inversion")
    power_law_images(measurement)  # the source box and light of the measurement's mass, as its final fit has them
    v_hat = measurement.mass.vector()
    lam = measurement.fit.regularisation
    slope_total = (
        measurement.slope_sigma_total if total_slope_width and math.isfinite(measurement.slope_sigma) else None
    )
    return sample_about_mass(
        inv, v_hat, lam, n_samples, seed=seed, covariance_scale=covariance_scale, slope_sigma_total=slope_total,
        marginalise_light=marginalise_light, resolve_source=resolve_source,
    )  # fmt: skip


def sample_about_mass(
    inv: SourceInversion,
    v_hat: torch.Tensor,
    lam: float,
    n_samples: int,
    *,
    seed: int = 0,
    covariance_scale: float = 1.0,
    slope_sigma_total: float | None = None,
    marginalise_light: bool = True,
    resolve_source: bool = True,
) -> PowerLawPosterior:
    """The linearised posterior of :func:`sample_power_law_posterior` about the mass ``v_hat`` (``P``,
    :meth:`PowerLaw.vector`) on ``inv`` as it stands (its source box and lens light), at regularisation ``lam``.

    ``slope_sigma_total``: the slope's marginal width to widen to (None: the Laplace width times
    ``sqrt(covariance_scale)``). ``resolve_source``: each sample's source centred on the exact solve at its
    mass (else on the linear prediction, exact for a model linear in the mass; measured on a lenstronomy lens,
    the linear prediction let one sample in 32 reach chi2_nu 1.93 against 1.18 for the fit, the exact solve
    none above 1.21). Returns :class:`PowerLawPosterior`.
    """
    t0 = time.perf_counter()
    if n_samples < 2:
        raise RimlensInputError(f"the posterior needs at least 2 samples, got {n_samples}")
    x_hat = inv.solve(v_hat, lam)
    jac = _mass_jacobian(inv, v_hat, x_hat)
    b, q, basis = _linear_block(inv, v_hat, lam, marginalise_light)
    p_ss = b.T @ b + q
    p_ss = p_ss + 1e-10 * float(torch.diagonal(p_ss).mean()) * torch.eye(p_ss.shape[0], dtype=p_ss.dtype)
    chol = torch.linalg.cholesky(p_ss)
    p_sv = b.T @ jac
    gain = torch.cholesky_solve(p_sv, chol)  # P_ss^-1 P_sv: how the linear unknowns follow the mass
    schur = jac.T @ jac - p_sv.T @ gain
    schur = 0.5 * (schur + schur.T)
    names = parameter_names((v_hat.shape[0] - 8) // 3)
    free = torch.diagonal(schur) > 1e-12 * float(torch.diagonal(schur).max())
    if not bool(free.all()) or int(torch.linalg.cholesky_ex(schur)[1]) != 0:
        # e.g. a slope driven to the deflection's bound, where the image no longer changes with it
        flat = [n for n, ok in zip(names, free.tolist(), strict=True) if not ok]
        raise RimlensInputError(
            "the data do not constrain the power law's "
            + (", ".join(flat) if flat else "parameters (a degenerate combination)")
            + " at the measurement: it has no Laplace posterior (is the fit warned?)"
        )
    cov_stat = torch.linalg.inv(schur)
    cov_stat = 0.5 * (cov_stat + cov_stat.T)
    cov = covariance_scale * cov_stat
    if slope_sigma_total is not None:
        # widen along the slope's regression direction: the other parameters follow it as the data ask
        u = cov[:, 1] / cov[1, 1]
        extra = slope_sigma_total**2 - float(cov[1, 1])
        if extra > 0:
            cov = cov + extra * torch.outer(u, u)
    gen = torch.Generator().manual_seed(int(seed))
    # eigen-decomposition rather than Cholesky: the widened covariance is positive semi-definite
    evals, evecs = torch.linalg.eigh(cov)
    dv = (
        torch.randn(n_samples, v_hat.shape[0], generator=gen, dtype=torch.float64)
        @ (evecs * evals.clamp_min(0).sqrt()).T
    )
    masses = v_hat + dv
    # the linear unknowns given each mass: the conditional mean (linearised about the measurement) plus a
    # draw of N(0, P_ss^-1) (L^-T xi for P_ss = L L^T)
    xi = torch.randn(n_samples, p_ss.shape[0], generator=gen, dtype=torch.float64)
    fluct = torch.linalg.solve_triangular(chol.T, xi.T, upper=True).T
    n_src, n_light = inv.s * inv.s, basis.shape[0]
    centre = torch.cat([x_hat[:n_src], torch.zeros(n_light, dtype=torch.float64)])
    unknowns = centre - dv @ gain.T + fluct
    if resolve_source:
        # the light's fluctuation is kept, its mean held at the measurement's (it is smooth and barely moves)
        unknowns[:, n_src:] = fluct[:, n_src:]
        for j in range(n_samples):
            linear = unknowns[j, :n_src] - fluct[j, :n_src]  # the linear prediction: a warm start
            unknowns[j, :n_src] = inv.solve(masses[j], lam, linear)[:n_src] + fluct[j, :n_src]
    sources = unknowns[:, :n_src]
    w = inv.w2.sqrt()
    chi2 = []
    with torch.no_grad():
        for j in range(n_samples):
            img = inv.model(sources[j], inv._coords(masses[j]))
            if n_light:
                img = img + torch.einsum("j,jhw->hw", unknowns[j, n_src:], basis)
            r = (inv.data - img) * w
            chi2.append(float((r * r).sum()) / inv.n_used)
    assert inv.box is not None
    return PowerLawPosterior(
        masses=masses, sources=sources.reshape(n_samples, inv.s, inv.s), source_box=inv.box,
        chi2_nu=np.asarray(chi2), best=PowerLaw.from_vector(v_hat), covariance_statistical=cov_stat.numpy(),
        covariance=cov.numpy(), names=names,
        seconds=time.perf_counter() - t0,
    )  # fmt: skip
