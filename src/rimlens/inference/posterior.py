"""Posterior samples of the source, log10 kappa (and external shear) by perturb-and-MAP (issue 13).

Each sample minimises, from its own random perturbations of the data and of the prior mean,

    1/2 sum_p (y_p + eps_p - f(x)_p)^2 / sigma_p^2  +  1/2 sum_k (x_k - m_k - delta_k)^2 / tau_k^2,

with ``eps ~ N(0, sigma^2)`` (the noise model), ``delta ~ N(0, tau^2)`` (the prior) and ``f`` the
simulator. For a linear ``f`` and the Gaussian prior ``N(m, tau^2)`` every minimiser is an exact,
independent draw of the Gaussian posterior ("randomise-then-optimise", Bardsley et al. 2014;
perturbation-optimisation, Orieux et al. 2012); for the mildly non-linear lensing operator around a
good estimate it is the linearised posterior's sampler. The prior is centred on a reconstruction
(the RIM's, refined), with per-parameter widths ``tau`` (source in the data's units, log10 kappa in
dex, shear dimensionless) and, for log10 kappa, a correlation length: a reconstruction's kappa errors
are smooth (a slope, an ellipticity, a mass sheet over the arcs), so the prior's perturbations are
Gaussian-smoothed white noise rather than independent pixels, and the data then constrain the smooth
modes they see. Widths and length set the calibration, which is measured (README), not assumed.

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
from dataclasses import dataclass

import torch

from rimlens.errors import RimlensInputError, check_noise_sigma
from rimlens.physics import PSF
from rimlens.physics.likelihood import chi_squared, used_pixels

__all__ = ["PosteriorOptions", "PosteriorSamples", "perturb_and_map"]

CHUNK = 25  # L-BFGS iterations between convergence checks


@dataclass(frozen=True)
class PosteriorOptions:
    """Settings of :func:`perturb_and_map`.

    Attributes:
        n_samples: number of posterior samples.
        source_prior_sigma: prior width ``tau`` of each source pixel (the data's units).
        log10_kappa_prior_sigma: prior width of each log10 kappa pixel (dex); 0 holds kappa fixed.
        log10_kappa_correlation_arcsec: correlation length of the log10 kappa prior (arcsec): its
            perturbations are white noise smoothed by a Gaussian of this standard deviation (scaled
            to keep the per-pixel width), since a reconstruction's kappa errors are smooth, not
            pixel-to-pixel; 0 makes the pixels independent.
        shear_prior_sigma: prior width of each external-shear component; 0 holds the shear fixed.
        max_iter: L-BFGS iterations at most (all samples together).
        gradient_tolerance: stop when every whitened gradient component is below this.
        seed: seed of the perturbations.
    """

    n_samples: int = 16
    # defaults calibrated by coverage on rimlens's held-out simulations (README, "Posterior samples")
    source_prior_sigma: float = 0.2
    log10_kappa_prior_sigma: float = 0.1
    log10_kappa_correlation_arcsec: float = 0.3
    shear_prior_sigma: float = 0.01
    max_iter: int = 300
    gradient_tolerance: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.n_samples, int) or self.n_samples < 1:
            raise RimlensInputError(f"n_samples must be an integer >= 1, got {self.n_samples!r}")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise RimlensInputError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        if not (math.isfinite(self.source_prior_sigma) and self.source_prior_sigma > 0):
            raise RimlensInputError(f"source_prior_sigma must be > 0, got {self.source_prior_sigma!r}")
        for name in ("log10_kappa_prior_sigma", "log10_kappa_correlation_arcsec", "shear_prior_sigma"):
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
    options = options or PosteriorOptions()
    if observation.ndim != 4 or observation.shape[0] != 1:
        raise RimlensInputError(
            f"perturb_and_map samples one observation (1 x 1 x N x N), got {tuple(observation.shape)}"
        )
    psf = psf if isinstance(psf, PSF) else PSF.from_kernel(psf)
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

    def kappa_offset(w: torch.Tensor) -> torch.Tensor:
        return tau_e * correlated_field(w, corr)

    xi_s = normal(source)
    m_s = source.detach() + tau_s * xi_s
    xi_e = normal(log10_kappa)
    free_shear = shear is not None and tau_g > 0
    xi_g = None if shear is None else normal(shear.reshape(1, 2))
    m_g = None if shear is None or xi_g is None else shear.detach().reshape(1, 2) + tau_g * xi_g
    # optimise whitened offsets from the perturbed prior means: every variable then has unit prior
    # variance, which L-BFGS's scalar initial Hessian suits. Each sample starts at the reconstruction
    # itself (offset -xi), not at its perturbed prior mean: the minimiser is the same, but from there
    # the stiff, data-constrained directions are already near their optimum and only the soft,
    # prior-dominated ones (well conditioned) have far to go -- a random kappa perturbation of the
    # prior's width changes the image by chi2 in the thousands, which L-BFGS is slow to undo.
    z_s = (-xi_s).requires_grad_(True)
    z_e = (-xi_e).requires_grad_(tau_e > 0)
    z_g = None if xi_g is None else (-xi_g).requires_grad_(free_shear)
    free = [z for z in (z_s, z_e, z_g) if z is not None and z.requires_grad]
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
        return m_s + tau_s * z_s, log10_kappa.detach() + kappa_offset(xi_e + z_e), g

    def closure() -> torch.Tensor:
        opt.zero_grad()
        s, e, g = current()
        model = simulator.forward(s, torch.pow(10.0, e), psf, shear=g, check=False)
        prior = (z_s**2).sum() + (z_e**2).sum() * (tau_e > 0) + (0 if z_g is None else (z_g**2).sum() * free_shear)
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
