"""Test-time fine-tuning of the RIM on one observation with an Elastic-Weight-Consolidation prior
(paper section 2.5 / docs/censai_as_run.md section 7).

1. Baseline: run the RIM; encode its source and log10 kappa with the two VAEs.
2. Draw ``n_samples`` lenses around the baseline (latent ``z ~ N(z0, 0.3^2)``), simulate them with the
   observation's PSF and noise, and estimate the diagonal Fisher information of the RIM weights,
   ``F = mean_n (d l_n / d phi)^2`` with ``l_n`` the paper's summed reconstruction loss.
3. Minimise ``chi2_nu / 2 + lambda / 2 sum F (phi - phi0)^2`` with RMSprop, stopping as soon as
   chi2_nu < 1; return the best-chi2 estimate, never worse than the baseline.
With a RIM that estimates an external shear (``RIMConfig.external_shear``) the shear is part of every
model image, of the Fisher lenses (held at the baseline's shear) and of the refinement (free, with no
prior: two numbers the data constrain well).

4. Optional (not in the paper; ``refine_steps > 0``): if chi2_nu is still above the target, refine the
   estimate in pixel space: L-BFGS on source pixels and log10 kappa minimising
   ``chi2 / (2 n) + w [mean (s - s_ft)^2 + mean (eta - eta_ft)^2]`` (a proximity prior centred on the
   fine-tuned RIM estimate), stopping as soon as chi2_nu < target (the discrepancy principle), so it
   cannot fit the noise. The weight ``w`` starts at ``refine_weight`` and is divided by
   ``REFINE_WEIGHT_STEP`` each time the fit stalls above the target, down to ``refine_weight_min``: the
   largest weight of that ladder that reaches the noise (Morozov's discrepancy principle), so the
   estimate departs from the RIM's only as far as the data ask. The weight-space fine-tuning of a small
   recurrent model meets a rough loss landscape and stalls above the noise at high SNR; this stage takes
   it the rest of the way (measurements: README, "Fine-tuning to the noise level").
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.func import functional_call, grad, vmap

from rimlens.errors import RimlensInputError, check_noise_sigma
from rimlens.nn.rim import RIM, RIMOutput, rim_loss
from rimlens.nn.vae import VAE
from rimlens.physics import PSF, LensSimulator
from rimlens.physics.likelihood import chi_squared, reduced_chi_squared, used_pixels

__all__ = [
    "FinetuneOptions",
    "FinetuneResult",
    "check_vae_grids",
    "finetune",
    "fisher_diagonal",
    "fit_simulator",
    "refine",
    "refine_estimate",
]


SHEAR_UNIT = 0.01  # the refinement's step unit of the external shear (see refine)
STALL_ITERATIONS = 20  # the refinement stops after this many iterations without a relative gain of
LAPLACIAN = torch.tensor([[[[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]]])  # 5-point stencil, per pixel^2
RESTART_STEP_FACTOR = 0.1  # each restart of the refinement's L-BFGS scales its first step by this
STALL_TOLERANCE = 1e-4  # ... this much in chi2_nu
# the refinement's proximity weight is divided by this each time the fit stalls above the target (until
# FinetuneOptions.refine_weight_min): the largest weight of the ladder that reaches the noise is kept
REFINE_WEIGHT_STEP = 10.0
# ... or when a rung has used this many iterations without reaching the target (the budget is shared)
REFINE_RUNG_ITERATIONS = 100


def _fisher_loss(
    out: RIMOutput, source: torch.Tensor, eta: torch.Tensor, shear: torch.Tensor | None = None
) -> torch.Tensor:
    """The per-sample loss whose squared weight gradients make the Fisher information: the RIM loss
    (:func:`rimlens.nn.rim.rim_loss`) summed over the lenses and scaled by ``T N^2`` (the paper's
    summed, not averaged, reconstruction error)."""
    scale = out.source.shape[0] * source.shape[-1] ** 2
    return scale * rim_loss(out, source, 10**eta, reduction="none", shear=shear).sum()


@dataclass
class FinetuneOptions:
    """Paper values by default (docs/censai_as_run.md section 7)."""

    ewc_lambda: float = 1e5
    learning_rate: float = 1e-6
    n_samples: int = 100
    max_steps: int = 2000
    latent_sigma: float = 0.3
    target_chi2_nu: float = 1.0
    seed: int = 42
    sample_chunk: int = 10
    per_sample: str = "vmap"  # or "loop": one backward pass per sample
    optimizer: str = "rmsprop"  # the paper's; or "adam"
    second_order: bool = False  # also differentiate through the RIM's likelihood-gradient inputs
    refine_steps: int = 0  # pixel-space refinement after the weight fine-tuning (0: the paper's method only)
    # weight w of the proximity prior of the refinement: its start, and the floor of its ladder (the fit
    # divides it by REFINE_WEIGHT_STEP each time it stalls above the target)
    refine_weight: float = 1.0
    refine_weight_min: float = 1.0
    # weight of the refinement's smoothness prior on its change of log10 kappa: mean squared Laplacian
    # (per pixel^2) of log10 kappa minus the starting estimate's
    refine_kappa_smoothness: float = 0.0
    free_shear: bool = False  # refine an external shear (from 0) even when the model has no shear term

    def __post_init__(self):
        checks = {
            "ewc_lambda": self.ewc_lambda >= 0,
            "learning_rate": self.learning_rate >= 0,
            "n_samples": isinstance(self.n_samples, int) and self.n_samples >= 1,
            "max_steps": isinstance(self.max_steps, int) and self.max_steps >= 0,
            "latent_sigma": self.latent_sigma > 0,
            "sample_chunk": isinstance(self.sample_chunk, int) and self.sample_chunk >= 1,
            "refine_steps": isinstance(self.refine_steps, int) and self.refine_steps >= 0,
            "refine_weight": self.refine_weight >= 0,
            "refine_weight_min": 0 <= self.refine_weight_min <= self.refine_weight,
            "refine_kappa_smoothness": self.refine_kappa_smoothness >= 0,
            "target_chi2_nu": self.target_chi2_nu >= 0,
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise RimlensInputError(f"fine-tuning option {name} is out of range: {value!r}")
        if self.optimizer not in ("rmsprop", "adam"):
            raise RimlensInputError(f"fine-tuning optimizer must be 'rmsprop' or 'adam', got {self.optimizer!r}")
        if self.per_sample not in ("vmap", "loop"):
            raise RimlensInputError(f"fine-tuning per_sample must be 'vmap' or 'loop', got {self.per_sample!r}")

    @classmethod
    def fast(cls, **changes) -> FinetuneOptions:
        """The CLI's default: 50 Fisher samples, RMSprop lr 1e-5, <= 200 steps, then <= 400
        pixel-space refinement iterations (L-BFGS) with the proximity weight's ladder from 300 down to 1;
        chosen by benchmarks/bench_finetune.py and on lenstronomy's lenses (README)."""
        base = dict(n_samples=50, learning_rate=1e-5, max_steps=200, refine_steps=400, refine_weight=300.0)
        base.update(changes)
        return cls(**base)

    @classmethod
    def refine_only(cls, **changes) -> FinetuneOptions:
        """No weight fine-tuning: only the pixel-space refinement from the RIM baseline (the
        ablation of benchmarks/bench_finetune.py: the same chi2_nu, ~0.02 s instead of ~45 s)."""
        return cls.fast(max_steps=0, **changes)

    @classmethod
    def paper(cls, **changes) -> FinetuneOptions:
        """The paper's settings (lambda 1e5, RMSprop lr 1e-6, 100 samples, 2000 steps), no refinement."""
        return cls(**changes)

    @classmethod
    def for_mode(cls, mode: str = "fast", max_steps: int | None = None, refine: bool | None = None) -> FinetuneOptions:
        """Options of a named mode (``fast``, ``paper`` or ``refine``), with an optional step limit and
        the pixel refinement forced on or off (``None``: the mode's default)."""
        modes = {"fast": cls.fast, "paper": cls.paper, "refine": cls.refine_only}
        if mode not in modes:
            raise RimlensInputError(f"fine-tuning mode must be one of {sorted(modes)}, got {mode!r}")
        opts = modes[mode]()
        if max_steps is not None:
            opts = dataclasses.replace(opts, max_steps=max_steps)
        if refine is False:
            opts = dataclasses.replace(opts, refine_steps=0)
        elif refine and opts.refine_steps == 0:
            opts = dataclasses.replace(opts, refine_steps=cls.fast().refine_steps)
        return opts


@dataclass
class FinetuneResult:
    baseline_source: torch.Tensor
    baseline_kappa: torch.Tensor
    baseline_chi2_nu: float
    source: torch.Tensor
    kappa: torch.Tensor
    chi2_nu: float
    chi2_history: list = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    fisher_seconds: float = 0.0
    weight_change: float = 0.0  # max |phi - phi0| at the end
    ewc_chi2_nu: float | None = None  # after the weight fine-tuning, before any pixel refinement
    refine_steps: int = 0  # pixel-space refinement iterations used
    refine_weight: float | None = None  # the proximity weight the refinement ended with
    baseline_shear: torch.Tensor | None = None  # 1 x 2 external shear of the RIM (None: no shear term)
    shear: torch.Tensor | None = None  # 1 x 2 external shear of the final estimate


def _estimates(model, obs, psf, sigma, mask=None):
    out = model(obs, psf, sigma, mask=mask, differentiable_likelihood=False)
    src, eta = out.source[-1], out.log10_kappa[-1]
    return out, src, eta, out.final_shear


def fisher_diagonal(
    model: RIM,
    observation,
    psf: PSF,
    noise_sigma,
    source_vae: VAE,
    kappa_vae: VAE,
    source_hat,
    eta_hat,
    options: FinetuneOptions,
    mask: torch.Tensor | None = None,
    shear_hat: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Diagonal Fisher information of the RIM weights from lenses drawn around the estimate.

    ``shear_hat`` (``1 x 2``): the estimate's external shear, given to every drawn lens.
    Per-sample gradients are computed in chunks with ``torch.func`` (vmap of grad) when possible.
    """
    gen = torch.Generator().manual_seed(options.seed)
    sim = model.simulator
    with torch.no_grad():
        peak = source_hat.clamp_min(0).amax().clamp_min(1e-6)
        z_s0 = source_vae.encode(source_hat.clamp_min(0) / peak)[0]
        z_k0 = kappa_vae.encode(eta_hat)[0]
        s_tilde = source_vae.sample(options.n_samples, gen, center=z_s0, scale=options.latent_sigma).clamp_min(0)
        s_tilde = s_tilde / s_tilde.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-6) * peak
        eta_tilde = kappa_vae.sample(options.n_samples, gen, center=z_k0, scale=options.latent_sigma)
        kernel = psf.kernel.expand(options.n_samples, -1, -1, -1)
        g_tilde = None if shear_hat is None else shear_hat.detach().reshape(1, 2).expand(options.n_samples, 2)
        y_clean = sim.forward(s_tilde, 10**eta_tilde, PSF.from_kernel(kernel), shear=g_tilde, check=False)
        # the observation's own noise (scalar or map); excluded pixels (sigma >= 1e6) get no noise
        sig = check_noise_sigma(noise_sigma, 1, tuple(observation.shape[-2:]), like=observation)[:1]
        used = used_pixels(sig, observation.shape, mask)
        y_tilde = y_clean + sig * used * torch.randn(y_clean.shape, generator=gen)
    if options.per_sample == "vmap":
        return _fisher_vmap(model, y_tilde, kernel, sig, s_tilde, eta_tilde, options, mask, g_tilde)
    params = [p for p in model.parameters() if p.requires_grad]
    fisher = [torch.zeros_like(p) for p in params]
    for i in range(options.n_samples):
        out = model(y_tilde[i : i + 1], PSF.from_kernel(kernel[i : i + 1]), sig, mask=mask)
        g_i = None if g_tilde is None else g_tilde[i : i + 1]
        loss = _fisher_loss(out, s_tilde[i : i + 1], eta_tilde[i : i + 1], g_i)
        grads = torch.autograd.grad(loss, params)
        for f, g in zip(fisher, grads, strict=True):
            f += g.detach() ** 2 / options.n_samples
    return fisher


def _fisher_vmap(
    model, y_tilde, kernel, sig, s_tilde, eta_tilde, options, mask=None, g_tilde=None
) -> list[torch.Tensor]:
    """Per-sample gradients with ``torch.func`` (vmap of grad), in chunks of ``sample_chunk``."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b for n, b in model.named_buffers()}

    def loss_one(params, y, k, s_true, eta_true, g_true):
        out = functional_call(
            model, (params, buffers), (y[None], PSF(k[None]), sig), {"functional": True, "mask": mask}
        )
        return _fisher_loss(out, s_true[None], eta_true[None], None if g_tilde is None else g_true[None])

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0, 0, 0, 0))
    g_all = torch.zeros(len(y_tilde), 2, dtype=y_tilde.dtype) if g_tilde is None else g_tilde
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(0, options.n_samples, options.sample_chunk):
        sl = slice(i, i + options.sample_chunk)
        g = per_sample(params, y_tilde[sl], kernel[sl], s_tilde[sl], eta_tilde[sl], g_all[sl])
        for n in names:
            fisher[n] += (g[n] ** 2).sum(0) / options.n_samples
    return [fisher[n] for n in names]


def check_vae_grids(model: RIM, source_vae: VAE, kappa_vae: VAE) -> None:
    """Refuse VAEs whose maps do not match the RIM's source and image grids."""
    for vae, name, n in (
        (source_vae, "source", model.grid.source_pixels),
        (kappa_vae, "kappa", model.grid.image_pixels),
    ):
        if vae.config.image_pixels != n:
            raise RimlensInputError(
                f"the {name} VAE works on {vae.config.image_pixels} px maps but the model's {name} grid "
                f"has {n} px; pass a matching {name} VAE"
            )


def fit_simulator(model: RIM, supersample: int | None = None) -> LensSimulator:
    """The forward model of the fits that follow the RIM (fine-tuning's chi2, refinement, posterior):
    the model's grids with ``supersample`` x ``supersample`` rays per image pixel (``None``: the
    model's own setting). Real and peer-simulated images are integrated over their pixels; a model
    trained on point-sampled images keeps that in its own simulator (its learned updates expect it),
    while a fit of the data needs the integrated image (README, "Posterior samples")."""
    if supersample is None or supersample == model.simulator.supersample:
        return model.simulator
    return LensSimulator(model.simulator.image_grid, model.simulator.source_grid, supersample=supersample)


def finetune(
    model: RIM,
    observation: torch.Tensor,
    psf,
    noise_sigma,
    source_vae: VAE,
    kappa_vae: VAE,
    options: FinetuneOptions | None = None,
    mask: torch.Tensor | None = None,
    fisher: list[torch.Tensor] | None = None,
    simulator: LensSimulator | None = None,
    simulator_psf=None,
) -> FinetuneResult:
    """Fine-tune a copy of ``model`` on one observation (``1 x 1 x N x N``); the model is not modified.
    A batch of several observations is refused (fine-tune each lens on its own).

    ``fisher`` (one tensor per trainable weight, as returned by :func:`fisher_diagonal`) skips the
    Fisher estimate, e.g. to compare optimiser settings on the same observation. ``simulator`` is the
    forward model of the fit's chi2 and refinement (:func:`fit_simulator`; default the model's own) and
    ``simulator_psf`` its PSF (default ``psf``, the RIM's; a pixel-integrating simulator wants the PSF
    sampled at pixel centres, :meth:`rimlens.io.observation.PreparedObservation.kernel_for`).
    """
    options = options or FinetuneOptions()
    if not isinstance(observation, torch.Tensor) or observation.ndim != 4 or observation.shape[0] != 1:
        shape = tuple(observation.shape) if isinstance(observation, torch.Tensor) else type(observation).__name__
        raise RimlensInputError(
            f"finetune works on one observation (1 x 1 x N x N), got {shape}; fine-tune each lens of a batch on its own"
        )
    check_vae_grids(model, source_vae, kappa_vae)
    t0 = time.time()
    psf = psf if isinstance(psf, PSF) else PSF.from_kernel(psf)
    sim = simulator or model.simulator
    sim_psf = psf if simulator_psf is None else simulator_psf
    sim_psf = sim_psf if isinstance(sim_psf, PSF) else PSF.from_kernel(sim_psf)
    sigma = torch.as_tensor(noise_sigma, dtype=observation.dtype)
    sigma_b = sigma.reshape(-1, 1, 1, 1) if sigma.ndim <= 1 else sigma
    work = copy.deepcopy(model).train()
    with torch.no_grad():
        _, s0, eta0, g0 = _estimates(work, observation, psf, sigma, mask)
        base_src, base_eta = s0.clamp_min(0), eta0
        base_img = sim.forward(base_src, 10**base_eta, sim_psf, shear=g0, check=False)
        base_chi2 = float(reduced_chi_squared(base_img, observation, sigma_b, mask)[0])
    result = FinetuneResult(base_src, 10**base_eta, base_chi2, base_src, 10**base_eta, base_chi2, [base_chi2])
    result.baseline_shear = result.shear = g0
    if base_chi2 < options.target_chi2_nu:
        result.ewc_chi2_nu = base_chi2
        result.seconds = time.time() - t0
        return result
    t1 = time.time()
    if fisher is None and options.max_steps > 0:
        fisher = fisher_diagonal(work, observation, psf, sigma, source_vae, kappa_vae, s0, eta0, options, mask, g0)
    result.fisher_seconds = time.time() - t1
    params = [p for p in work.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params]
    if options.optimizer == "rmsprop":  # Keras RMSprop as run: rho 0.9, eps 1e-7, no momentum
        opt = torch.optim.RMSprop(params, lr=options.learning_rate, alpha=0.9, eps=1e-7)
    else:  # "adam" (FinetuneOptions admits no other)
        opt = torch.optim.Adam(params, lr=options.learning_rate, eps=1e-7)
    best = base_chi2
    for step in range(options.max_steps):
        out = work(observation, psf, sigma, mask=mask, differentiable_likelihood=options.second_order)
        src, eta, g = out.source[-1], out.log10_kappa[-1], out.final_shear
        model_img = sim.forward(src, 10**eta, sim_psf, shear=g, check=False)
        chi2_nu = reduced_chi_squared(model_img, observation, sigma_b, mask)[0]
        with torch.no_grad():
            reported = float(
                reduced_chi_squared(
                    sim.forward(src.clamp_min(0), 10**eta, sim_psf, shear=g, check=False), observation, sigma_b, mask
                )[0]
            )
        result.chi2_history.append(reported)
        if reported < best:
            best = reported
            result.source, result.kappa, result.chi2_nu = src.detach().clamp_min(0), (10**eta).detach(), reported
            result.shear = None if g is None else g.detach()
        if reported < options.target_chi2_nu:
            result.steps = step
            break
        penalty = sum((f * (p - a) ** 2).sum() for f, p, a in zip(fisher, params, anchor, strict=True))
        loss = chi2_nu / 2 + options.ewc_lambda / 2 * penalty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        result.steps = step + 1
    result.weight_change = max(float((p.detach() - a).abs().max()) for p, a in zip(params, anchor, strict=True))
    result.ewc_chi2_nu = result.chi2_nu
    if options.refine_steps > 0 and result.chi2_nu >= options.target_chi2_nu:
        if result.shear is None and options.free_shear:
            result.shear = observation.new_zeros(1, 2)
        refine(sim, observation, sim_psf, sigma_b, result, options, mask)
    result.seconds = time.time() - t0
    return result


def refine(
    simulator,
    observation,
    psf,
    sigma_b,
    result: FinetuneResult,
    options: FinetuneOptions,
    mask=None,
    background: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Pixel-space refinement of ``result``'s estimate (in place): L-BFGS on source pixels and
    log10 kappa with a proximity prior to the starting estimate, stopping at chi2_nu < target, the prior's
    weight lowered down a ladder each time the fit stalls above it; only a better chi2_nu replaces the
    estimate (see the module docstring). ``result.refine_weight`` records the weight it ended with.

    ``background``, if given, maps ``observation - arcs`` (``1 x 1 x N x N``, the arcs being the
    simulated lensed source) to the best fit of everything else in the data -- e.g. the lens light with
    its amplitudes re-solved (:meth:`rimlens.physics.lens_light.LensLightModel.resolve`), differentiably.
    The model image is then ``arcs + background(observation - arcs)``: the background's linear
    parameters are profiled out of the objective (variable projection), so they move with the source
    and kappa instead of by turns, which left the light holding part of the ring (README, "Lens light").
    """

    def full(arcs: torch.Tensor) -> torch.Tensor:
        return arcs if background is None else arcs + background(observation - arcs)

    s_ref, eta_ref = result.source.detach(), torch.log10(result.kappa.detach())
    s, eta = s_ref.clone().requires_grad_(True), eta_ref.clone().requires_grad_(True)
    # the external shear (when the model has one) is free, without a prior; L-BFGS moves it in units of
    # SHEAR_UNIT: in natural units its gradient is so large that the first trial step sends the rays
    # off the source grid, where the objective is flat and the line search gives up
    u = None if result.shear is None else (result.shear.detach() / SHEAR_UNIT).clone().requires_grad_(True)
    free = [s, eta] if u is None else [s, eta, u]

    def shear() -> torch.Tensor | None:
        return None if u is None else u * SHEAR_UNIT

    def new_lbfgs(lr: float = 1.0):
        return torch.optim.LBFGS(free, lr=lr, max_iter=1, line_search_fn="strong_wolfe", history_size=20)

    lr = 1.0
    opt = new_lbfgs(lr)
    n_used = float(used_pixels(sigma_b, observation.shape, mask).sum())
    w, smooth = options.refine_weight, options.refine_kappa_smoothness
    result.refine_weight = w

    def closure():
        opt.zero_grad()
        model_img = full(simulator.forward(s.clamp_min(0), 10**eta, psf, shear=shear(), check=False))
        loss = 0.5 * chi_squared(model_img, observation, sigma_b, mask).sum() / n_used + w * (
            ((s - s_ref) ** 2).mean() + ((eta - eta_ref) ** 2).mean()
        )
        if smooth > 0:
            lap = torch.nn.functional.conv2d(eta - eta_ref, LAPLACIAN.to(eta.dtype), padding=1)
            loss = loss + smooth * (lap**2).mean()
        loss.backward()
        return loss

    previous, stalled, rung_iterations = None, 0, 0
    last_good = [v.detach().clone() for v in free]
    for it in range(options.refine_steps):
        with torch.enable_grad():  # callable under torch.no_grad()
            objective = float(opt.step(closure).detach())
        # the source clamp makes the objective kinked; when the line search then makes no progress, the
        # curvature history is stale: restart from a gradient step (without it the refinement
        # stalled far above the noise on some high-SNR lenses; README, fine-tuning)
        if previous is not None and abs(previous - objective) <= 1e-12 * abs(objective):
            # ... with a smaller first step each time: L-BFGS's first trial step, 1 / |gradient|_1, can
            # overshoot so far (log10 kappa's gradient peaks at a few pixels) that the strong-Wolfe search
            # returns a zero step, again and again (seen with lens light: stuck at chi2_nu 20 whose data
            # gradient pointed downhill; README, "Lens light")
            lr = max(lr * RESTART_STEP_FACTOR, 1e-6)
            opt = new_lbfgs(lr)
        previous = objective
        with torch.no_grad():
            src, g = s.detach().clamp_min(0), shear()
            chi2_nu = float(
                reduced_chi_squared(
                    full(simulator.forward(src, 10**eta, psf, shear=g, check=False)), observation, sigma_b, mask
                )[0]
            )
        result.refine_steps = it + 1
        if not math.isfinite(objective) or not math.isfinite(chi2_nu):
            # a trial step can overflow 10^eta where log10 kappa's gradient is steep (seen from the exact
            # pixel means of a cuspy lenstronomy lens: NaN at the second iteration, which used to end
            # the refinement where it started): back to the last finite point, restart with a smaller step
            with torch.no_grad():
                for v, good in zip(free, last_good, strict=True):
                    v.copy_(good)
            lr = max(lr * RESTART_STEP_FACTOR, 1e-6)
            opt, previous = new_lbfgs(lr), None
            stalled += 1
            if stalled >= STALL_ITERATIONS:
                break
            continue
        last_good = [v.detach().clone() for v in free]
        result.chi2_history.append(chi2_nu)
        improved = chi2_nu < result.chi2_nu * (1 - STALL_TOLERANCE)
        if chi2_nu < result.chi2_nu:
            result.source, result.kappa, result.chi2_nu = src.clone(), (10**eta).detach().clone(), chi2_nu
            result.shear = None if g is None else g.detach().clone()
        if chi2_nu < options.target_chi2_nu:
            break
        # a refinement stuck at a kink of the clamped objective repeats the same chi2_nu for the rest of
        # its budget (seen: 260 of 300 iterations on a lenstronomy lens); stop once restarts stop helping
        stalled = 0 if improved else stalled + 1
        rung_iterations += 1
        if stalled >= STALL_ITERATIONS or (rung_iterations >= REFINE_RUNG_ITERATIONS and w > options.refine_weight_min):
            if w <= options.refine_weight_min:
                break
            # stalled above the noise under this prior: the next, weaker weight of the ladder, from here
            w = max(w / REFINE_WEIGHT_STEP, options.refine_weight_min)
            result.refine_weight = w
            stalled, previous, lr, rung_iterations = 0, None, 1.0, 0  # a new objective: a fresh first step
            opt = new_lbfgs(lr)


def refine_estimate(
    simulator,
    observation: torch.Tensor,
    psf: PSF,
    sigma,
    source: torch.Tensor,
    kappa: torch.Tensor,
    shear: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    options: FinetuneOptions | None = None,
) -> FinetuneResult:
    """The pixel refinement (:func:`refine`, ``refine_only`` options unless given) of an estimate
    that did not come from :func:`finetune`, e.g. the RIM's maps before posterior sampling.

    Args:
        observation: ``1 x 1 x N x N`` data in the RIM's units; ``sigma`` its noise (scalar, ``(1,)``
            or a map); ``source`` ``1 x 1 x M x M``, ``kappa`` ``1 x 1 x N x N``, ``shear`` ``1 x 2``.

    Returns:
        A :class:`FinetuneResult` whose ``source`` / ``kappa`` / ``shear`` / ``chi2_nu`` are the refined
        estimate (the starting one when refinement did not lower chi2_nu) and ``refine_steps`` its iterations.
    """
    sigma = check_noise_sigma(sigma, 1, tuple(observation.shape[-2:]), like=observation)
    with torch.no_grad():
        model_img = simulator.forward(source, kappa, psf, shear=shear, check=False)
        chi2 = float(reduced_chi_squared(model_img, observation, sigma, mask)[0])
    result = FinetuneResult(source, kappa, chi2, source, kappa, chi2, baseline_shear=shear, shear=shear)
    refine(simulator, observation, psf, sigma, result, options or FinetuneOptions.refine_only(), mask)
    return result
