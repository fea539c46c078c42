"""Posterior samples of the source, log10 kappa (and external shear) by randomise-then-optimise (issue 13).

Two samplers of the same objective: :func:`laplace_samples` (the default: Gauss-Newton steps with
preconditioned conjugate gradients, see its docstring) and :func:`perturb_and_map` (L-BFGS on each
sample; far from converged within its iteration budget on the stiff lensing problem, kept for
comparison). Each sample minimises, from its own random perturbations of the data and of the prior
mean,

    1/2 sum_p (y_p + eps_p - f(x)_p)^2 / sigma_p^2  +  1/2 sum_k (x_k - m_k - delta_k)^2 / tau_k^2,

with ``eps ~ N(0, sigma^2)`` (the noise model), ``delta ~ N(0, tau^2)`` (the prior) and ``f`` the
simulator. For a linear ``f`` and the Gaussian prior ``N(m, tau^2)`` every minimiser is an exact,
independent draw of the Gaussian posterior ("randomise-then-optimise", Bardsley et al. 2014;
perturbation-optimisation, Orieux et al. 2012); for the mildly non-linear lensing operator around a
good estimate it is the linearised posterior's sampler. The prior is centred on a reconstruction
(the RIM's, refined), with per-parameter widths ``tau`` (source in the data's units, log10 kappa in
dex, shear dimensionless) and, for log10 kappa, a correlation length: a reconstruction's kappa errors
are smooth (a slope, an ellipticity, a mass sheet over the arcs), so the prior's perturbations are
Gaussian-smoothed white noise rather than independent pixels, plus six global "error modes" about the
estimate's centre (an offset, a slope change, two quadrupoles and their radial gradients:
:func:`kappa_error_modes`), which carry most of a refined RIM estimate's error and which a short
correlation alone nearly forbids; the data then constrain the combinations they see. Widths and
length set the calibration, which is measured (README), not assumed.

All samples are optimised together as one batch (their objectives are independent sums), with
L-BFGS: the lensing simulator is batched, so N samples cost far less than N separate fits. The
optimisation runs until the largest whitened gradient component falls below ``gradient_tolerance``
or ``max_iter`` iterations; both are reported (a sample that has not converged keeps part of its prior
perturbation, which would widen the spread).

Limitation, said plainly: the prior is centred on the reconstruction, itself a function of the data,
so the data are used twice; the prior widths are read as the reconstruction's error scale (how far
the truth typically lies from the RIM's estimate) and must be calibrated by coverage on simulated
lenses (README), not trusted a priori.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rimlens.errors import RimlensInputError, check_noise_sigma
from rimlens.physics import PSF
from rimlens.physics.grid import PixelGrid
from rimlens.physics.lens_metrics import einstein_radius_of_map, kappa_peak_center
from rimlens.physics.likelihood import chi_squared, used_pixels

__all__ = [
    "PosteriorOptions",
    "PosteriorSamples",
    "dilate_source",
    "kappa_error_modes",
    "laplace_samples",
    "marginal_samples",
    "perturb_and_map",
    "sample_posterior",
]

CHUNK = 25  # L-BFGS iterations between convergence checks
POSTERIOR_METHODS = ("laplace", "perturb-and-map", "marginal")
SOURCE_PRIOR_MEANS = ("estimate", "zero")
FD_STEP = 1e-4  # central-difference step (whitened units) of the Jacobian products (no forward AD for grid_sample)
BATCH = 256  # columns per batched simulator call of the randomised SVD
MARGINAL_CG_TOLERANCE = 1e-6  # marginal_samples: relative residual at which its source solves stop
MARGINAL_DIAGONAL_PROBES = 32  # marginal_samples: Rademacher probes of its Jacobi preconditioner


@dataclass(frozen=True)
class PosteriorOptions:
    """Settings of :func:`perturb_and_map`.

    Attributes:
        n_samples: number of posterior samples.
        source_prior_sigma: prior width ``tau`` of each source pixel (the data's units).
        source_prior_mean: ``"estimate"`` (the source prior is centred on the reconstruction's source)
            or ``"zero"`` (a zero-mean Gaussian source prior, the regularising prior of a linear
            source inversion, Suyu et al. 2006: not centred on anything the data made, so the source
            follows a change of kappa freely and kappa's spread is set by the data, not by the
            estimate's source). With ``"zero"`` the source dilation is left out (redundant).
        log10_kappa_prior_sigma: prior width of each log10 kappa pixel (dex); 0 holds kappa fixed.
        log10_kappa_correlation_arcsec: correlation length of the log10 kappa prior (arcsec): its
            perturbations are white noise smoothed by a Gaussian of this standard deviation (scaled
            to keep the per-pixel width), since a reconstruction's kappa errors are smooth, not
            pixel-to-pixel; 0 makes the pixels independent.
        log10_kappa_offset_sigma: prior width (dex) of one offset of log10 kappa over the whole map
            (a mass-sheet-like rescaling, which the data barely constrain).
        slope_prior_sigma: prior width of a change of the radial log-slope ``gamma`` about the
            estimate's centre: ``delta log10 kappa = -delta_gamma * log10(r / theta_E)``.
        quadrupole_prior_sigma: prior width (dex) of each of the two m = 2 (cos 2phi, sin 2phi)
            terms of log10 kappa at the Einstein radius (an ellipticity or shear-like error).
        quadrupole_slope_sigma: prior width (dex per dex of radius) of each m = 2 term's radial
            gradient, ``log10(r / theta_E) * (cos 2phi, sin 2phi)``.
            These four "error modes" (:func:`kappa_error_modes`) are added to the correlated field
            only when ``log10_kappa_prior_sigma`` > 0; their widths are the measured error scale of
            the refined RIM estimate on rimlens's simulated lenses (README, "Posterior samples").
        source_dilation_sigma: prior width of a relative dilation of the source about the source
            plane's centre, ``S'(beta) = S(beta / (1 + d))``: with the offset and slope modes it spans
            the mass-sheet degeneracy (kappa -> lambda kappa + 1 - lambda moves the source to
            lambda beta), which a per-pixel source prior would otherwise pin; used only when kappa is
            free (``log10_kappa_prior_sigma`` > 0).
        shear_prior_sigma: prior width of each external-shear component; 0 holds the shear fixed.
        max_iter: perturb-and-MAP: L-BFGS iterations at most (all samples together).
        gradient_tolerance: perturb-and-MAP: stop when every whitened gradient component is below
            this; laplace: stop CG when the preconditioned residual per parameter is below this.
        seed: seed of the perturbations.
        method: ``"laplace"`` (:func:`laplace_samples`, the default) or ``"perturb-and-map"``
            (:func:`perturb_and_map`).
        rank: laplace: number of data-informed directions kept (the largest eigenvalues of the
            whitened Gauss-Newton Hessian, found by a randomised SVD).
        power_iterations: laplace: power iterations of the randomised SVD.
        gauss_newton_steps: laplace: Gauss-Newton steps of each sample (1: the linearised posterior).
        cg_iterations: laplace: conjugate-gradient iterations at most per Gauss-Newton step.
    """

    n_samples: int = 16
    # widths chosen so that the samples fit the data (samples' chi2_nu ~ 1); NOT calibrated: their
    # coverage of the truth is measured in the README ("Posterior samples") and falls short
    source_prior_sigma: float = 0.1
    source_prior_mean: str = "estimate"
    log10_kappa_prior_sigma: float = 0.05
    log10_kappa_correlation_arcsec: float = 0.3
    log10_kappa_offset_sigma: float = 0.09
    slope_prior_sigma: float = 0.25
    quadrupole_prior_sigma: float = 0.04
    quadrupole_slope_sigma: float = 0.09
    source_dilation_sigma: float = 0.1
    shear_prior_sigma: float = 0.01
    max_iter: int = 300
    gradient_tolerance: float = 1e-3
    seed: int = 0
    method: str = "laplace"
    rank: int = 200
    power_iterations: int = 2
    gauss_newton_steps: int = 4
    cg_iterations: int = 100

    def __post_init__(self) -> None:
        if not isinstance(self.n_samples, int) or self.n_samples < 1:
            raise RimlensInputError(f"n_samples must be an integer >= 1, got {self.n_samples!r}")
        if self.method not in POSTERIOR_METHODS:
            raise RimlensInputError(f"posterior method must be one of {POSTERIOR_METHODS}, got {self.method!r}")
        for name in ("rank", "power_iterations", "gauss_newton_steps", "cg_iterations"):
            value = getattr(self, name)
            least = 0 if name == "power_iterations" else 1
            if not isinstance(value, int) or value < least:
                raise RimlensInputError(f"{name} must be an integer >= {least}, got {value!r}")
        if self.source_prior_mean not in SOURCE_PRIOR_MEANS:
            raise RimlensInputError(
                f"source_prior_mean must be one of {SOURCE_PRIOR_MEANS}, got {self.source_prior_mean!r}"
            )
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise RimlensInputError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        if not (math.isfinite(self.source_prior_sigma) and self.source_prior_sigma > 0):
            raise RimlensInputError(f"source_prior_sigma must be > 0, got {self.source_prior_sigma!r}")
        for name in (
            "log10_kappa_prior_sigma",
            "log10_kappa_correlation_arcsec",
            "log10_kappa_offset_sigma",
            "slope_prior_sigma",
            "quadrupole_prior_sigma",
            "quadrupole_slope_sigma",
            "source_dilation_sigma",
            "shear_prior_sigma",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise RimlensInputError(f"{name} must be >= 0, got {value!r}")


@dataclass
class PosteriorSamples:
    """Samples ``source`` (``S x 1 x M x M``), ``log10_kappa`` (``S x 1 x N x N``), ``shear``
    (``S x 2`` or ``None``) and each sample's ``chi2_nu`` against the unperturbed data (``(S,)``)."""

    source: torch.Tensor
    log10_kappa: torch.Tensor
    shear: torch.Tensor | None
    chi2_nu: torch.Tensor
    iterations: int = 0
    max_gradient: float = float("nan")  # largest whitened gradient component at the end
    method: str = "perturb-and-map"
    smallest_kept_eigenvalue: float = float("nan")  # laplace: data information of the last kept direction

    @property
    def kappa(self) -> torch.Tensor:
        """Convergence samples ``S x 1 x N x N``."""
        return 10**self.log10_kappa

    def mean_std(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel mean and standard deviation (``1 x ...``) of ``source``, ``kappa`` or ``log10_kappa``."""
        if name not in ("source", "kappa", "log10_kappa"):
            raise RimlensInputError(f"no samples named {name!r}")
        x = getattr(self, name)
        return x.mean(0, keepdim=True), x.std(0, keepdim=True, unbiased=x.shape[0] > 1)


def correlated_field(white: torch.Tensor, correlation_pixels: float) -> torch.Tensor:
    """White noise ``B x 1 x N x N`` smoothed by a Gaussian of ``correlation_pixels`` standard
    deviation, normalised so that each pixel keeps unit variance (away from the edges, where the
    zero padding lowers it); the identity for ``correlation_pixels`` = 0. Linear in ``white``."""
    if correlation_pixels <= 0:
        return white
    half = max(1, math.ceil(3 * correlation_pixels))
    r = torch.arange(-half, half + 1, dtype=white.dtype, device=white.device)
    g = torch.exp(-0.5 * (r / correlation_pixels) ** 2)
    g = g / torch.sqrt((g**2).sum())  # separable: the 2-D kernel's squares then sum to 1 as well
    out = torch.nn.functional.conv2d(white, g.reshape(1, 1, 1, -1), padding=(0, half))
    return torch.nn.functional.conv2d(out, g.reshape(1, 1, -1, 1), padding=(half, 0))


def kappa_error_modes(log10_kappa: torch.Tensor, grid: PixelGrid, options: PosteriorOptions) -> torch.Tensor:
    """The prior's global modes of log10 kappa, each scaled by its width: ``J x N x N`` (dex per unit
    whitened coefficient; ``J`` <= 6, modes of zero width left out).

    About the estimate's own centre (:func:`kappa_peak_center`) and Einstein radius ``theta_E``
    (:func:`einstein_radius_of_map`; a quarter of the field if the map has none or one under a
    pixel), with
    ``L = log10(max(r, one pixel) / theta_E)``: an offset (1), a radial slope change (``-L``), two
    quadrupoles (``cos 2phi``, ``sin 2phi``) and their radial gradients (``L cos 2phi``,
    ``L sin 2phi``). Measured on rimlens's simulated lenses, these six modes carry ~90% of the refined
    RIM estimate's log10 kappa error in 0.5-2 theta_E, an error that a prior of short correlation alone
    nearly forbids (a coherent offset over the field costs as many prior sigmas as the field has
    correlation areas) -- hence an over-confident posterior without them.
    """
    k = torch.pow(10.0, log10_kappa.detach().double()).reshape(grid.n_pixels, grid.n_pixels).cpu().numpy()
    center = kappa_peak_center(k, grid)
    try:
        theta_e = einstein_radius_of_map(k, grid, center)
    except RimlensInputError:  # a centre at the edge
        theta_e = float("nan")
    if not (math.isfinite(theta_e) and theta_e >= grid.pixel_scale_arcsec):  # sub-critical or no crossing
        theta_e = grid.fov_arcsec / 4
    x, y = grid.coordinates(torch.float64)
    x, y = x - center[0], y - center[1]
    r = torch.hypot(x, y).clamp_min(grid.pixel_scale_arcsec)
    big_l, phi = torch.log10(r / theta_e), torch.atan2(y, x)
    c2, s2 = torch.cos(2 * phi), torch.sin(2 * phi)
    modes = [
        (options.log10_kappa_offset_sigma, torch.ones_like(r)),
        (options.slope_prior_sigma, -big_l),
        (options.quadrupole_prior_sigma, c2),
        (options.quadrupole_prior_sigma, s2),
        (options.quadrupole_slope_sigma, big_l * c2),
        (options.quadrupole_slope_sigma, big_l * s2),
    ]
    kept = [width * mode for width, mode in modes if width > 0]
    out = torch.stack(kept) if kept else torch.zeros(0, grid.n_pixels, grid.n_pixels, dtype=torch.float64)
    return out.to(device=log10_kappa.device, dtype=log10_kappa.dtype)


def dilate_source(source: torch.Tensor, dilation: torch.Tensor) -> torch.Tensor:
    """``S'(beta) = S(beta / (1 + d))`` for sources ``B x 1 x M x M`` and relative dilations ``d``
    (``(B,)``), bilinear, zero outside the grid; exact at ``d = 0``. Differentiable in both."""
    b = source.shape[0]
    inverse = 1.0 / (1.0 + dilation.reshape(-1).to(source.dtype)).expand(b)
    theta = torch.zeros(b, 2, 3, dtype=source.dtype, device=source.device)
    theta[:, 0, 0], theta[:, 1, 1] = inverse, inverse
    coords = torch.nn.functional.affine_grid(theta, list(source.shape), align_corners=False)
    return torch.nn.functional.grid_sample(source, coords, mode="bilinear", padding_mode="zeros", align_corners=False)


def _one_observation(observation: torch.Tensor, psf: PSF | torch.Tensor, sampler: str) -> PSF:
    """Refuse anything but one ``1 x 1 x N x N`` observation; the PSF as a :class:`PSF`."""
    if observation.ndim != 4 or observation.shape[0] != 1:
        raise RimlensInputError(f"{sampler} samples one observation (1 x 1 x N x N), got {tuple(observation.shape)}")
    return psf if isinstance(psf, PSF) else PSF.from_kernel(psf)


def perturb_and_map(
    simulator,
    observation: torch.Tensor,
    psf: PSF | torch.Tensor,
    noise_sigma,
    source: torch.Tensor,
    log10_kappa: torch.Tensor,
    shear: torch.Tensor | None = None,
    options: PosteriorOptions | None = None,
    mask: torch.Tensor | None = None,
) -> PosteriorSamples:
    """Posterior samples around a reconstruction (see the module docstring).

    Args:
        simulator: a :class:`rimlens.physics.LensSimulator`.
        observation: ``1 x 1 x N x N`` data; ``noise_sigma`` a float, ``(1,)`` or a ``1 x 1 x N x N``
            map (image units); ``mask`` optional (True = used pixel).
        psf: a :class:`PSF` or a ``1 x 1 x K x K`` kernel.
        source, log10_kappa: the prior means ``1 x 1 x M x M`` / ``1 x 1 x N x N`` (a reconstruction).
        shear: the prior mean of the external shear ``1 x 2``, or ``None`` (no shear in the model).
        options: widths, sample count, iterations, seed.

    Returns:
        :class:`PosteriorSamples` with ``options.n_samples`` samples.
    """
    options, psf = options or PosteriorOptions(), _one_observation(observation, psf, "perturb_and_map")
    n = options.n_samples
    gen = torch.Generator().manual_seed(options.seed)
    dtype = observation.dtype

    def normal(like: torch.Tensor) -> torch.Tensor:
        return torch.randn((n, *like.shape[1:]), generator=gen, dtype=dtype).to(like.device)

    sigma = check_noise_sigma(noise_sigma, 1, tuple(observation.shape[-2:]), like=observation)
    used = used_pixels(sigma, observation.shape, mask)
    y = observation + sigma * used * normal(observation)  # excluded pixels (sigma >= 1e6) stay unperturbed
    tau_s, tau_e, tau_g = options.source_prior_sigma, options.log10_kappa_prior_sigma, options.shear_prior_sigma
    # log10 kappa = mean + tau_e * C(w): w ~ N(0, I) whitened, C the (linear) correlation operator
    corr = options.log10_kappa_correlation_arcsec / simulator.image_grid.pixel_scale_arcsec

    modes = kappa_error_modes(log10_kappa, simulator.image_grid, options)  # J x N x N

    def kappa_offset(w: torch.Tensor, w_modes: torch.Tensor) -> torch.Tensor:
        return tau_e * correlated_field(w, corr) + torch.einsum("bj,jhw->bhw", w_modes, modes).unsqueeze(1)

    xi_s = normal(source)
    zero_mean = options.source_prior_mean == "zero"
    m_s = (0.0 if zero_mean else source.detach()) + tau_s * xi_s
    xi_e = normal(log10_kappa)
    xi_m = torch.randn((n, modes.shape[0]), generator=gen, dtype=dtype).to(log10_kappa.device)
    dilating = tau_e > 0 and options.source_dilation_sigma > 0 and not zero_mean
    xi_d = torch.randn((n,), generator=gen, dtype=dtype).to(source.device)
    free_shear = shear is not None and tau_g > 0
    xi_g = None if shear is None else normal(shear.reshape(1, 2))
    m_g = None if shear is None or xi_g is None else shear.detach().reshape(1, 2) + tau_g * xi_g
    # optimise whitened offsets from the perturbed prior means: every variable then has unit prior
    # variance, which L-BFGS's scalar initial Hessian suits. Each sample starts at the reconstruction
    # itself (offset -xi), not at its perturbed prior mean: the minimiser is the same, but from there
    # the stiff, data-constrained directions are already near their optimum and only the soft,
    # prior-dominated ones (well conditioned) have far to go -- a random kappa perturbation of the
    # prior's width changes the image by chi2 in the thousands, which L-BFGS is slow to undo.
    z_s = ((source.detach() - m_s) / tau_s).requires_grad_(True)  # -xi_s, or the estimate under a zero mean
    z_e = (-xi_e).requires_grad_(tau_e > 0)
    z_m = (-xi_m).requires_grad_(tau_e > 0 and modes.shape[0] > 0)
    z_d = (-xi_d).requires_grad_(dilating)
    z_g = None if xi_g is None else (-xi_g).requires_grad_(free_shear)
    free = [z for z in (z_s, z_e, z_m, z_d, z_g) if z is not None and z.requires_grad]
    opt = torch.optim.LBFGS(
        free,
        lr=1,
        max_iter=CHUNK,
        line_search_fn="strong_wolfe",
        history_size=50,
        tolerance_grad=0.0,
        tolerance_change=0.0,
    )

    def current() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        g = None if m_g is None or z_g is None else m_g + tau_g * z_g
        offset = kappa_offset(xi_e + z_e, xi_m + z_m) if tau_e > 0 else 0.0
        src = m_s + tau_s * z_s
        if dilating:
            stretched = dilate_source(source.detach().expand_as(src), options.source_dilation_sigma * (xi_d + z_d))
            src = src - source.detach() + stretched
        return src, log10_kappa.detach() + offset, g

    def closure() -> torch.Tensor:
        opt.zero_grad()
        s, e, g = current()
        model = simulator.forward(s, torch.pow(10.0, e), psf, shear=g, check=False)
        prior = (z_s**2).sum() + ((z_e**2).sum() + (z_m**2).sum()) * (tau_e > 0) + (z_d**2).sum() * dilating
        prior = prior + (0 if z_g is None else (z_g**2).sum() * free_shear)
        loss = 0.5 * chi_squared(model, y, sigma, mask).sum() + 0.5 * prior
        loss.backward()
        return loss

    iterations, max_grad = 0, float("inf")
    with torch.enable_grad():  # callable under torch.no_grad()
        while iterations < options.max_iter:
            opt.step(closure)
            iterations += CHUNK
            max_grad = max(float(z.grad.abs().max()) for z in free if z.grad is not None)
            if max_grad < options.gradient_tolerance:
                break
    with torch.no_grad():
        s, e, g = current()
        model = simulator.forward(s, torch.pow(10.0, e), psf, shear=g, check=False)
        chi2_nu = chi_squared(model, observation.expand_as(model), sigma, mask) / used.sum().clamp_min(1)
    return PosteriorSamples(s.detach(), e.detach(), None if g is None else g.detach(), chi2_nu, iterations, max_grad)


def sample_posterior(
    simulator,
    observation: torch.Tensor,
    psf: PSF | torch.Tensor,
    noise_sigma,
    source: torch.Tensor,
    log10_kappa: torch.Tensor,
    shear: torch.Tensor | None = None,
    options: PosteriorOptions | None = None,
    mask: torch.Tensor | None = None,
) -> PosteriorSamples:
    """Posterior samples by ``options.method`` (arguments as :func:`perturb_and_map`)."""
    options = options or PosteriorOptions()
    sampler = {"laplace": laplace_samples, "perturb-and-map": perturb_and_map, "marginal": marginal_samples}[
        options.method
    ]
    return sampler(simulator, observation, psf, noise_sigma, source, log10_kappa, shear, options, mask)


def laplace_samples(
    simulator,
    observation: torch.Tensor,
    psf: PSF | torch.Tensor,
    noise_sigma,
    source: torch.Tensor,
    log10_kappa: torch.Tensor,
    shear: torch.Tensor | None = None,
    options: PosteriorOptions | None = None,
    mask: torch.Tensor | None = None,
) -> PosteriorSamples:
    """Exact samples of the Gauss-Newton (Laplace) posterior about a reconstruction.

    In whitened variables ``w`` (``x = x_hat + L w``, ``L`` the prior's square root: widths ``tau``
    and, for log10 kappa, the correlation of :func:`correlated_field`), the prior is ``N(0, I)`` and
    the whitened residuals ``r(w) = (f(x) - y) / sigma`` are linearised about ``w = 0``:
    ``r ~ r0 + A w``; the posterior precision is ``I + A^T A``. Each sample is the randomise-then-
    optimise solution of ``(I + A^T A) w = xi + A^T (eps - r0)`` (``xi``, ``eps`` standard normal),
    an exact draw of this Gaussian, solved by conjugate gradients for all samples at once (``A v`` by
    central differences of batched simulator calls -- grid_sample has no forward-mode derivative --
    and ``A^T u`` by back-propagation, in float64). The preconditioner is the Hessian's ``rank``
    largest data-informed directions ``V``, ``lambda`` (a randomised SVD of ``A``; Halko et al. 2011):
    ``(I + V diag(lambda) V^T)^-1`` is exact, and CG is left with the spectrum below ``lambda_rank``
    (low-rank data-informed updates of the prior: Flath et al. 2011; Bui-Thanh et al. 2013). CG stops
    when the preconditioned residual per parameter, ``sqrt(r^T M^-1 r / n)``, falls below
    ``gradient_tolerance`` or after ``cg_iterations`` iterations.

    Args and returns as :func:`perturb_and_map`: ``iterations`` are the CG iterations (all steps),
    ``max_gradient`` the largest preconditioned residual per parameter at the end and
    ``smallest_kept_eigenvalue`` is ``lambda_rank``.
    """
    options, psf = options or PosteriorOptions(), _one_observation(observation, psf, "laplace_samples")
    dt, out_dtype = torch.float64, observation.dtype
    psf64 = PSF.from_kernel(psf.kernel.to(dt))
    y = observation.detach().to(dt)
    sigma = check_noise_sigma(noise_sigma, 1, tuple(observation.shape[-2:]), like=y)
    used = used_pixels(sigma, y.shape, mask)
    s0, e0 = source.detach().to(dt), log10_kappa.detach().to(dt)
    tau_s, tau_e, tau_g = options.source_prior_sigma, options.log10_kappa_prior_sigma, options.shear_prior_sigma
    free_shear = shear is not None and tau_g > 0
    g0 = None if shear is None else shear.detach().reshape(1, 2).to(dt)
    corr = options.log10_kappa_correlation_arcsec / simulator.image_grid.pixel_scale_arcsec
    modes = kappa_error_modes(e0, simulator.image_grid, options)  # J x N x N
    n_s, n_e, n_g = s0[0].numel(), e0[0].numel() if tau_e > 0 else 0, 2 if free_shear else 0
    n_m = modes.shape[0] if tau_e > 0 else 0
    zero_mean = options.source_prior_mean == "zero"
    n_d = 1 if tau_e > 0 and options.source_dilation_sigma > 0 and not zero_mean else 0
    n_par = n_s + n_e + n_m + n_d + n_g
    # the prior's mean in whitened variables (w = 0 is the reconstruction): 0, or for a zero-mean
    # source prior the source block at -s0 / tau_s
    prior_mean = torch.zeros(n_par, 1, dtype=dt)
    if zero_mean:
        prior_mean[:n_s, 0] = -s0.reshape(-1) / tau_s

    def unpack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        b = w.shape[0]
        # w = [source | correlated field | error modes | source dilation | shear]
        base = (
            s0
            if n_d == 0
            else dilate_source(s0.expand(b, *s0.shape[1:]), options.source_dilation_sigma * w[:, n_s + n_e + n_m])
        )
        src = base + tau_s * w[:, :n_s].reshape(b, *s0.shape[1:])
        eta = e0
        if n_e > 0:
            field = correlated_field(w[:, n_s : n_s + n_e].reshape(b, *e0.shape[1:]), corr)
            global_modes = torch.einsum("bj,jhw->bhw", w[:, n_s + n_e : n_s + n_e + n_m], modes).unsqueeze(1)
            eta = e0 + tau_e * field + global_modes
        g = g0 if g0 is None or n_g == 0 else g0 + tau_g * w[:, n_s + n_e + n_m + n_d :]
        if g is not None and g.shape[0] != b:
            g = g.expand(b, 2)
        return src, eta.expand(b, *e0.shape[1:]), g

    def residual(w: torch.Tensor) -> torch.Tensor:
        src, eta, g = unpack(w)
        model = simulator.forward(src, torch.pow(10.0, eta), psf64, shear=g, check=False)
        return ((model - y) / sigma * used).reshape(w.shape[0], -1)

    def a_times(v: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        """A v for columns v (n_par x k) -> n_pix x k, A the Jacobian at ``at`` (n_par x k, one
        point per column; None: w = 0)."""
        cols = []
        with torch.no_grad():
            for j in range(0, v.shape[1], BATCH):
                # unit directions: the difference step stays FD_STEP prior sigmas whatever v's norm
                block = v[:, j : j + BATCH].T
                base = 0.0 if at is None else at[:, j : j + BATCH].T
                norm = block.norm(dim=1, keepdim=True).clamp_min(1e-300)
                step = FD_STEP * block / norm
                cols.append((norm * (residual(base + step) - residual(base - step)) / (2 * FD_STEP)).T)
        return torch.cat(cols, dim=1)

    def at_times(u: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        """A^T u for columns u (n_pix x k) -> n_par x k, A the Jacobian at ``at`` as in a_times."""
        cols = []
        for j in range(0, u.shape[1], BATCH):
            block = u[:, j : j + BATCH].T
            w = torch.zeros(block.shape[0], n_par, dtype=dt) if at is None else at[:, j : j + BATCH].T.clone()
            w.requires_grad_(True)
            with torch.enable_grad():
                residual(w).backward(block)
            assert w.grad is not None
            cols.append(w.grad.T)
        return torch.cat(cols, dim=1)

    gen = torch.Generator().manual_seed(options.seed)
    k = min(options.rank, n_par)
    width = min(k + 16, n_par)
    q, _ = torch.linalg.qr(a_times(torch.randn(n_par, width, generator=gen, dtype=dt)))
    for _ in range(options.power_iterations):
        z, _ = torch.linalg.qr(at_times(q))
        q, _ = torch.linalg.qr(a_times(z))
    _, sv, vt = torch.linalg.svd(at_times(q).T, full_matrices=False)  # Q^T A = U S V^T
    v, lam = vt[:k].T, sv[:k] ** 2

    def inverse_preconditioner(x: torch.Tensor) -> torch.Tensor:
        """(I + V diag(lambda) V^T)^-1 x for columns x (n_par x m)."""
        return x - v @ ((lam / (1 + lam))[:, None] * (v.T @ x))

    iterations, relative = 0, 0.0

    def solve(rhs: torch.Tensor, at: torch.Tensor | None) -> torch.Tensor:
        """(I + A^T A) x = rhs per column by preconditioned conjugate gradients (A at ``at``)."""
        nonlocal iterations, relative

        def hessian_times(rows: torch.Tensor) -> torch.Tensor:
            x = rows.T
            return (x + at_times(a_times(x, at), at)).T

        # stop on the residual in the preconditioned norm, per parameter: the error is then measured
        # in prior standard deviations in the uninformed directions (a residual relative to the
        # right-hand side, dominated by the data-informed terms, leaves errors of many sigmas there)
        x, its, relative = _batched_cg(
            hessian_times,
            rhs.T,
            lambda rows: inverse_preconditioner(rows.T).T,
            lambda res, rz: float((rz / n_par).sqrt().max()),
            options.gradient_tolerance,
            options.cg_iterations,
        )
        iterations += its
        return x.T

    # randomise-then-optimise: sample i minimises phi_i(w) = 1/2 |r(w) - eps_i|^2 + 1/2 |w - xi_i|^2.
    # The first Gauss-Newton step, from w = 0, is the linearised (Laplace) posterior's exact draw; the
    # next ones re-linearise about each sample (batched: every column at its own point), since a
    # draw of the linear posterior's width can leave the region where the lensing is linear
    n = options.n_samples
    with torch.no_grad():
        r0 = residual(torch.zeros(1, n_par, dtype=dt))
    eps = torch.randn(n, r0.shape[1], generator=gen, dtype=dt) * used.reshape(1, -1)
    xi = torch.randn(n_par, n, generator=gen, dtype=dt) + prior_mean  # perturbed prior means

    def objective(w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return 0.5 * ((residual(w.T) - eps) ** 2).sum(1) + 0.5 * ((w - xi) ** 2).sum(0)

    w = solve(xi + at_times((eps - r0).T), None)
    for _ in range(options.gauss_newton_steps - 1):
        with torch.no_grad():
            r = residual(w.T)
        gradient = at_times((r - eps).T, w) + (w - xi)
        step = solve(-gradient, w)
        current, scale = objective(w), torch.ones(n, dtype=dt)
        for _ in range(4):  # halve the step of the samples whose objective it does not lower
            trial = objective(w + scale * step)
            worse = ~(trial <= current)
            if not worse.any():
                break
            scale = torch.where(worse, scale / 2, scale)
        w = torch.where(worse, w, w + scale * step)
    with torch.no_grad():
        src, eta, g = unpack(w.T)
        model = simulator.forward(src, torch.pow(10.0, eta), psf64, shear=g, check=False)
        chi2_nu = chi_squared(model, y.expand_as(model), sigma, mask) / used.sum().clamp_min(1)
    return PosteriorSamples(
        src.to(out_dtype),
        eta.to(out_dtype),
        None if g is None else g.to(out_dtype),
        chi2_nu.to(out_dtype),
        iterations,
        relative,
        method="laplace",
        smallest_kept_eigenvalue=float(lam[-1]),
    )


def _batched_cg(
    apply: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    precondition: Callable[[torch.Tensor], torch.Tensor],
    error: Callable[[torch.Tensor, torch.Tensor], float],
    tolerance: float,
    max_iter: int,
) -> tuple[torch.Tensor, int, float]:
    """Solve ``H x = rhs`` for each row of ``rhs`` (``B x M``) by preconditioned conjugate gradients:
    ``apply`` computes ``H`` on rows, ``precondition`` an approximate ``H^-1`` on rows, and the
    iterations stop once ``error(residual, rz) <= tolerance`` (``rz``: each row's residual in the
    preconditioner's norm, ``B``) or after ``max_iter``. The first iterate is ``precondition(rhs)``.
    Returns ``(x, iterations, final error)``."""
    x = precondition(rhs)
    res = rhs - apply(x)
    z = precondition(res)
    d, rz = z.clone(), (res * z).sum(1)
    relative = error(res, rz)
    it = 0
    while it < max_iter and relative > tolerance:
        hd = apply(d)
        alpha = rz / (d * hd).sum(1).clamp_min(1e-300)
        x, res = x + alpha[:, None] * d, res - alpha[:, None] * hd
        z = precondition(res)
        rz_new = (res * z).sum(1)
        d, rz = z + (rz_new / rz.clamp_min(1e-300))[:, None] * d, rz_new
        it += 1
        relative = error(res, rz)
    return x, it, relative


def marginal_samples(
    simulator,
    observation: torch.Tensor,
    psf: PSF | torch.Tensor,
    noise_sigma,
    source: torch.Tensor,
    log10_kappa: torch.Tensor,
    shear: torch.Tensor | None = None,
    options: PosteriorOptions | None = None,
    mask: torch.Tensor | None = None,
) -> PosteriorSamples:
    """Posterior samples with the source marginalised exactly for each kappa (a collapsed sampler).

    The lensed image is linear in the source: for a fixed kappa (and shear) the whitened data
    ``y~ = y / sigma`` are ``A(kappa) s + noise``. With the zero-mean Gaussian source prior of a linear
    source inversion, ``s ~ N(0, tau_s^2 I)`` (Warren & Dye 2003; Suyu et al. 2006), the source's
    posterior given kappa is exactly Gaussian, precision ``H = A^T A + I / tau_s^2`` and mean
    ``H^-1 A^T y~`` -- no linearisation. Kappa varies in the global "error modes" of
    :func:`kappa_error_modes` about the reconstruction's log10 kappa (offset, slope, two quadrupoles and
    their gradients, widths as measured for the refined RIM estimate) and, when the model has one, the
    external shear (prior width ``shear_prior_sigma``), whitened to ``theta ~ N(0, I)``. Their
    marginal posterior -- the source integrated out -- is approximated by Gauss-Newton (Laplace):
    linearising ``A(theta) s`` in ``theta`` about the source-marginal fit with Jacobian ``J`` (central
    differences), the marginal precision is the Schur complement ``I + J^T J - (A^T J)^T H^-1 (A^T J)``
    and the step ``P^-1 (J^T r - theta)``, ``r`` the residual of the source inversion at ``theta``
    (``gauss_newton_steps`` steps from ``theta = 0``). Each sample draws ``theta`` from that Gaussian,
    then the source exactly from ``s | theta, y`` by perturbation-optimisation:
    ``H s = A^T (y~ + eps) + xi / tau_s``, ``eps``, ``xi`` standard normal (Papandreou & Yuille 2010;
    Orieux et al. 2012), all solves by Jacobi-preconditioned conjugate gradients batched over samples
    (``A^T`` by back-propagation; the Jacobi diagonal estimated with 32 Rademacher probes).

    Since the source follows every kappa exactly, a change of kappa that the source can absorb (the
    mass-sheet-like directions) costs only what the data and the priors say -- unlike a source prior
    centred on the estimate, which pinned kappa (README, "Posterior samples"). Kappa is confined to the
    estimate times the modes: errors of other shapes are not represented.

    Args and returns as :func:`perturb_and_map` (``source`` only sets where the modes' Jacobian is
    taken, the first Gauss-Newton step's source being the inversion's own); ``iterations`` are the CG
    iterations of all solves, ``max_gradient`` the largest relative CG residual at the end.
    """
    options, psf = options or PosteriorOptions(), _one_observation(observation, psf, "marginal_samples")
    dt, out_dtype = torch.float64, observation.dtype
    psf64 = PSF.from_kernel(psf.kernel.to(dt))
    y = observation.detach().to(dt)
    sigma = check_noise_sigma(noise_sigma, 1, tuple(observation.shape[-2:]), like=y)
    used = used_pixels(sigma, y.shape, mask)
    weight = used / sigma  # whitening, 0 on excluded pixels
    y_w = (y * weight).reshape(1, -1)
    s_shape = tuple(source.shape[1:])
    n_s = source[0].numel()
    e0 = log10_kappa.detach().to(dt)
    modes = kappa_error_modes(e0, simulator.image_grid, options)  # J x N x N (widths applied)
    tau_g = options.shear_prior_sigma
    g0 = None if shear is None else shear.detach().reshape(1, 2).to(dt)
    n_m, n_g = modes.shape[0], (2 if g0 is not None and tau_g > 0 else 0)
    n_par = n_m + n_g
    tau_s = options.source_prior_sigma
    gen = torch.Generator().manual_seed(options.seed)
    tol, max_cg = MARGINAL_CG_TOLERANCE, options.cg_iterations
    cg_total, cg_residual = 0, 0.0

    def lens_of(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """kappa (B x 1 x N x N) and shear (B x 2 or None) at whitened parameters theta (B x n_par)."""
        eta = e0 + torch.einsum("bj,jhw->bhw", theta[:, :n_m], modes).unsqueeze(1)
        if g0 is None:
            return torch.pow(10.0, eta), None
        g = g0.expand(theta.shape[0], 2) + (tau_g * theta[:, n_m:] if n_g else 0.0)
        return torch.pow(10.0, eta), g

    def image_w(src: torch.Tensor, kappa: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """Whitened model images (B x P) of sources B x n_s."""
        b = src.shape[0]
        out = simulator.forward(
            src.reshape(b, *s_shape), kappa.expand(b, *kappa.shape[1:]), psf64, shear=g, check=False
        )
        return (out * weight).reshape(b, -1)

    def adjoint(u: torch.Tensor, kappa: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """A^T u for rows u (B x P), A the (linear) source-to-whitened-image operator at kappa, g."""
        v = torch.zeros(u.shape[0], n_s, dtype=dt, requires_grad=True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad((image_w(v, kappa, g) * u).sum(), v)
        return grad

    def precision_diagonal(kappa: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """Rademacher estimate of diag(A^T A) (B x n_s), per lens configuration in the batch, plus 1/tau^2."""
        b, probes = kappa.shape[0], MARGINAL_DIAGONAL_PROBES
        z = (torch.randint(0, 2, (b * probes, n_s), generator=gen) * 2 - 1).to(dt)
        kz = kappa.repeat_interleave(probes, 0)
        gz = None if g is None else g.repeat_interleave(probes, 0)
        hz = adjoint(image_w(z, kz, gz), kz, gz)
        return (z * hz).reshape(b, probes, n_s).mean(1).clamp_min(0) + 1 / tau_s**2

    def solve(rhs: torch.Tensor, kappa: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """H x = rhs per row (rows share kappa, g when these have batch 1, else one each)."""
        nonlocal cg_total, cg_residual
        diag = precision_diagonal(kappa, g)  # one per lens configuration (batch 1 or b)
        b = rhs.shape[0]
        kb = kappa.expand(b, *kappa.shape[1:])
        gb = None if g is None else g.expand(b, 2)

        def apply(v: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                image = image_w(v, kb, gb)
            return adjoint(image, kb, gb) + v / tau_s**2

        jacobi = diag.expand(b, n_s)
        scale = rhs.norm(dim=1).clamp_min(1e-300)
        x, its, rel = _batched_cg(
            apply,
            rhs,
            lambda rows: rows / jacobi,
            lambda res, rz: float((res.norm(dim=1) / scale).max()),  # relative to the right-hand side
            tol,
            max_cg,
        )
        cg_total, cg_residual = cg_total + its, max(cg_residual, rel)
        return x

    # Gauss-Newton on the source-marginal objective 1/2 |r(theta)|^2 + 1/2 |theta|^2
    theta = torch.zeros(1, n_par, dtype=dt)
    precision = torch.eye(n_par, dtype=dt)
    for _ in range(max(1, options.gauss_newton_steps) if n_par else 0):
        kappa, g = lens_of(theta)
        s_hat = solve(adjoint(y_w, kappa, g), kappa, g)  # the source inversion at theta
        with torch.no_grad():
            resid = y_w - image_w(s_hat, kappa, g)  # 1 x P
            # J: d(whitened image of s_hat)/d theta_j, central differences (n_par x P)
            steps = FD_STEP * torch.eye(n_par, dtype=dt)
            k_plus, g_plus = lens_of(theta + steps)
            k_minus, g_minus = lens_of(theta - steps)
            jac = (
                image_w(s_hat.expand(n_par, -1), k_plus, g_plus) - image_w(s_hat.expand(n_par, -1), k_minus, g_minus)
            ) / (2 * FD_STEP)
        at_j = adjoint(jac, kappa.expand(n_par, *kappa.shape[1:]), None if g is None else g.expand(n_par, 2))
        h_inv_at_j = solve(at_j, kappa, g)
        precision = torch.eye(n_par, dtype=dt) + jac @ jac.T - at_j @ h_inv_at_j.T
        precision = 0.5 * (precision + precision.T)
        gradient = jac @ resid[0] - theta[0]  # minus the objective's gradient (the source at its optimum)
        theta = theta + torch.linalg.solve(precision, gradient)[None]
    # samples: theta from the Laplace marginal, then the source exactly given theta
    n = options.n_samples
    chol = torch.linalg.cholesky(torch.linalg.inv(precision)) if n_par else precision
    thetas = theta + torch.randn(n, n_par, generator=gen, dtype=dt) @ chol.T
    kappa, g = lens_of(thetas)
    eps = torch.randn(n, y_w.shape[1], generator=gen, dtype=dt) * used.reshape(1, -1)
    xi = torch.randn(n, n_s, generator=gen, dtype=dt)
    src = solve(adjoint(y_w + eps, kappa, g) + xi / tau_s, kappa, g).reshape(n, *s_shape)
    with torch.no_grad():
        model = simulator.forward(src, kappa, psf64, shear=g, check=False)
        chi2_nu = chi_squared(model, y.expand_as(model), sigma, mask) / used.sum().clamp_min(1)
    return PosteriorSamples(
        src.to(out_dtype),
        torch.log10(kappa).to(out_dtype),
        None if g is None else g.to(out_dtype),
        chi2_nu.to(out_dtype),
        cg_total,
        cg_residual,
        method="marginal",
    )
