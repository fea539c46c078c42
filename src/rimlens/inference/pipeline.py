"""From observations to reconstructions and their products: one FITS observation, a folder of
lenses (resumable, sharded over torchrun ranks), and the demo. The CLI's ``reconstruct`` and
``demo`` commands call these functions and only print."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import h5py
import numpy as np
import torch

from rimlens.config import GridConfig
from rimlens.data.lenses import LensGenerator
from rimlens.data.random import child_rng
from rimlens.distributed import collective_failure, rank_and_world
from rimlens.errors import RimlensInputError
from rimlens.inference.finetune import (
    FinetuneOptions,
    check_vae_grids,
    finetune,
    fit_simulator,
    refine,
    refine_estimate,
)
from rimlens.inference.posterior import PosteriorOptions, PosteriorSamples, sample_posterior
from rimlens.inference.power_law import measure_power_law
from rimlens.inference.power_law_posterior import COVARIANCE_INFLATION, power_law_images, sample_power_law_posterior
from rimlens.inference.quality import assess, rim_input
from rimlens.io.atomic import atomic_path
from rimlens.io.checkpoint import load_vae
from rimlens.io.export import write_coolest, write_lenstronomy
from rimlens.io.observation import (
    Observation,
    PreparedObservation,
    find_lens_center,
    load_observation,
    prepare_observation,
)
from rimlens.io.products import write_power_law_products, write_products
from rimlens.nn.rim import RIM
from rimlens.nn.vae import VAE
from rimlens.physics import PSF
from rimlens.physics.convergence import log10_kappa
from rimlens.physics.grid import PixelGrid
from rimlens.physics.lens_light import LensLightModel, fit_lens_light
from rimlens.physics.lens_metrics import einstein_radius_of_map, kappa_peak_center, log_slope
from rimlens.physics.likelihood import chi_squared, reduced_chi_squared
from rimlens.physics.profiles import shear_deflection
from rimlens.physics.simulator import LensSimulator

__all__ = [
    "FinetuneSetup",
    "FolderSummary",
    "Reconstruction",
    "describe_mass",
    "describe_posterior",
    "describe_power_law",
    "describe_shear",
    "reconstruct_folder",
    "reconstruct_observation",
    "reconstruct_prepared",
    "run_demo",
    "total_deflection",
    "write_posterior_samples",
]


@dataclass
class FinetuneSetup:
    """What fine-tuning needs besides the model: the two VAEs of its prior and its options."""

    source_vae: VAE
    kappa_vae: VAE
    options: FinetuneOptions = field(default_factory=FinetuneOptions.fast)

    @classmethod
    def load(
        cls,
        source_vae: str | Path | None = None,
        kappa_vae: str | Path | None = None,
        options: FinetuneOptions | None = None,
        model: RIM | None = None,
    ) -> FinetuneSetup:
        """The VAEs from checkpoints (``None``: the shipped ones), checked against ``model``'s grids if given."""
        setup = cls(
            load_vae(source_vae, kind="source"), load_vae(kappa_vae, kind="kappa"), options or FinetuneOptions.fast()
        )
        if model is not None:
            check_vae_grids(model, setup.source_vae, setup.kappa_vae)
        return setup


@dataclass
class Reconstruction:
    """One reconstruction on the model grid (maps ``1 x 1 x N x N``; ``alpha`` ``1 x 2 x N x N`` arcsec).

    ``baseline_chi2_nu`` is the RIM's; ``chi2_nu`` that of the returned maps (equal unless fine-tuned).
    The fine-tuning fields are ``None`` without fine-tuning.
    """

    source: torch.Tensor
    kappa: torch.Tensor
    model_image: torch.Tensor
    alpha: torch.Tensor
    chi2_nu: float
    baseline_chi2_nu: float
    seconds: float
    finetune_steps: int | None = None
    chi2_history: list[float] | None = None
    ewc_chi2_nu: float | None = None
    refine_steps: int | None = None
    refine_weight: float | None = None  # the refinement's proximity weight at its end (its ladder's rung)
    lens_light: torch.Tensor | None = None  # 1 x 1 x N x N, PSF-convolved, when modelled
    lens_light_model: LensLightModel | None = None
    shear: torch.Tensor | None = None  # 1 x 2 external shear (gamma1, gamma2) when the model estimates one
    posterior: PosteriorSamples | None = None  # samples (data units) when asked; the maps are then their means
    fit_supersample: int = 1  # rays per pixel side of the forward model after the RIM

    @property
    def lensed_source(self) -> torch.Tensor:
        """The PSF-convolved lensed source alone (model image minus lens light), ``1 x 1 x N x N``."""
        return self.model_image if self.lens_light is None else self.model_image - self.lens_light

    def summary(self, finetune_options: FinetuneOptions | None = None) -> dict:
        """The JSON-ready figures of this reconstruction (``summary.json``)."""
        out: dict = {
            "chi2_nu": self.chi2_nu,
            "baseline_chi2_nu": self.baseline_chi2_nu,
            "seconds": round(self.seconds, 3),
            "fit_supersample": self.fit_supersample,
        }
        if self.shear is not None:
            out["external_shear"] = describe_shear(self.shear)
        if self.finetune_steps is not None:
            out.update(
                finetune_steps=self.finetune_steps,
                chi2_history=self.chi2_history,
                ewc_chi2_nu=self.ewc_chi2_nu,
                refine_steps=self.refine_steps,
                refine_weight=self.refine_weight,
            )
            if finetune_options is not None:
                out["finetune_options"] = dataclasses.asdict(finetune_options)
        elif self.refine_steps is not None:  # the pixel refinement that starts posterior sampling
            out["refine_steps"] = self.refine_steps
        return out


LENS_LIGHT_MODES = ("auto", "mge", "none")
POSTERIOR_FIT_FACTOR = 2.0  # samples' median chi2_nu above this times max(chi2_nu of their mean, 1): warn
# RIM <-> lens-light alternations before any fine-tuning: on 16 lenstronomy lenses with lens light, 1 round
# measured as 3 within the noise (theta_E 1.5% vs 1.7%, slope 0.077 vs 0.068) at a third of the cost (README)
LENS_LIGHT_ROUNDS = 1
# refinement <-> lens-light alternations with --finetune: each re-fits the light's shape and amplitudes to
# the observation minus the arcs (nothing to clip then), then refines the maps; they stop when a round
# gains less than REFINE_LIGHT_GAIN in chi2 (measured on SLACS J1430+4105: chi2_nu 2.55 after 2 rounds,
# 2.08 after 4, 1.85 after 6, 1.84 after 8, before the core mask below)
REFINE_LIGHT_ROUNDS = 8
REFINE_LIGHT_GAIN = 0.02
# rays per pixel side of the fits after the RIM: data are integrated over pixels, and f = 4 is the
# smallest factor at the pixelated-kappa floor against lenstronomy (issue 10); measured in the README
FIT_SUPERSAMPLE: int | None = 4
# the RIM sees the data minus the first light fit without the pixels this close to the light's centre: that
# fit (model grid, a guess) leaves tens of sigma at a bright galaxy's cusp, which the RIM, trained without
# lens light, would take for source (16 lenstronomy lenses: theta_E error 1.5% -> 1.2%, source 0.57 ->
# 0.51; README). The fits after it (detector frame) use every pixel.
RIM_CORE_MASK_ARCSEC = 0.3


def describe_shear(shear: torch.Tensor) -> dict:
    """``summary.json``'s external shear: components, magnitude and angle (degrees, counter-clockwise
    from +x, lenstronomy's convention: ``phi = atan2(gamma2, gamma1) / 2``)."""
    g1, g2 = (float(v) for v in shear.reshape(-1)[:2])
    return {
        "gamma1": g1,
        "gamma2": g2,
        "magnitude": math.hypot(g1, g2),
        "angle_deg": math.degrees(0.5 * math.atan2(g2, g1)),
        "convention": "lenstronomy SHEAR about the model grid's centre (ra_0 = dec_0 = 0)",
    }


def total_deflection(sim: LensSimulator, kappa: torch.Tensor, shear: torch.Tensor | None) -> torch.Tensor:
    """Deflection ``B x 2 x N x N`` (arcsec) at the pixel centres: the convergence map's plus the
    external shear's (when given, ``B x 2``)."""
    alpha = sim.deflection(kappa, check=False)
    if shear is None:
        return alpha
    x, y = sim.image_grid.coordinates(alpha.dtype, alpha.device)
    ax, ay = shear_deflection(x, y, shear[:, 0, None, None], shear[:, 1, None, None])
    return alpha + torch.stack([ax, ay], dim=1)


def _rim(
    model: RIM, data: torch.Tensor, prep: PreparedObservation, psf: PSF
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """RIM estimates (source in ``data``'s units, kappa, external shear or ``None``) for ``data`` on the
    model grid (:func:`rim_input`)."""
    scaled, sigma, gain = rim_input(data, prep)
    with torch.no_grad():
        out = model(scaled, psf, sigma, mask=prep.mask)
    return out.final_source / gain, out.final_kappa, out.final_shear


def _without_core(prep: PreparedObservation, light: LensLightModel, radius_arcsec: float) -> PreparedObservation:
    """``prep`` with the pixels within ``radius_arcsec`` of the lens light's centre excluded."""
    x, y = prep.grid.coordinates(torch.float64)
    cx, cy = float(light.center_x[0]), float(light.center_y[0])
    core = (torch.hypot(x - cx, y - cy) < radius_arcsec).reshape(prep.mask.shape)
    return dataclasses.replace(prep, mask=prep.mask & ~core)


def _central_half(n: int) -> int:
    """About half of ``n`` pixels, differing from ``n`` by an even number (a centred crop)."""
    half = n // 2
    return half + (n - half) % 2


def _choose_light_shape(
    light: LensLightModel, residual: torch.Tensor, arcs: torch.Tensor, prep: PreparedObservation
) -> LensLightModel:
    """Re-fit ``light`` to ``residual`` (observation minus ``arcs``) with one shape and with an ellipticity
    gradient; keep the gradient only if, over the pixels the arcs leave alone (model arcs < 1 sigma), it
    lowers chi2 by more than the Bayesian information criterion's price of two parameters, 2 ln(pixels).
    Real galaxies' isophotes turn (SLACS J1430: chi2_nu 1.62 -> 0.95). Judged on all pixels the two
    numbers also absorbed what the arcs' model leaves (taken by 15 of 16 single-shape Sersic galaxies);
    on the arc-free pixels still by 12 of 16, at S/N in the thousands, with no systematic cost (README)."""
    plain = light.refit(residual, prep.noise_sigma, prep.mask)
    twisted = light.refit(residual, prep.noise_sigma, prep.mask, fit_gradient=True)
    quiet = prep.mask & (arcs.abs() < prep.noise_sigma)
    price = 2 * math.log(max(int(quiet.sum()), 2))

    def chi2(model: LensLightModel) -> float:
        return float(chi_squared(model.image(), residual, prep.noise_sigma, quiet)[0])

    return twisted if chi2(plain) - chi2(twisted) > price else plain


def _profiled_light(
    light: LensLightModel, prep: PreparedObservation, gain: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """For :func:`rimlens.inference.finetune.refine`: data minus arcs (the RIM's units, ``gain`` times the
    observation's) to the lens light at ``light``'s shape with its amplitudes re-solved (differentiable)."""

    image = light.profiled(prep.noise_sigma, prep.mask)

    def background(residual: torch.Tensor) -> torch.Tensor:
        return image(residual / gain) * gain

    return background


def _fit_light(prep: PreparedObservation, data: torch.Tensor, psf: PSF, light: LensLightModel | None) -> LensLightModel:
    if light is None:  # first fit: no source model yet, so pixels far brighter than the light (arcs) are clipped
        # the model field is centred on the lens: start there (a bright arc could otherwise attract the start).
        # Its shape on the central half of the grid with 12 Gaussians, no clip round there (the whole image
        # is clipped once at the end), 6 Levenberg-Marquardt steps: a first guess the RIM's subtraction needs,
        # not the final shape (the refinement re-fits it); 0.06 s against 0.70 s for a full fit on J1430 (README)
        return fit_lens_light(
            data,
            prep.noise_sigma,
            psf,
            prep.grid,
            mask=prep.mask,
            center=(0.0, 0.0),
            clip_sigma=3.0,
            shape_pixels=_central_half(prep.grid.n_pixels),
            shape_gaussians=12,
            clip_rounds=0,
            max_iter=6,
        )
    return light.resolve(data, prep.noise_sigma, prep.mask)


def reconstruct_prepared(
    model: RIM,
    prep: PreparedObservation,
    finetune_with: FinetuneSetup | None = None,
    lens_light: str = "none",
    posterior: PosteriorOptions | None = None,
    fit_supersample: int | None = FIT_SUPERSAMPLE,
) -> Reconstruction:
    """Reconstruct one prepared observation with the RIM, then fine-tune if ``finetune_with`` is given.

    Args:
        model: trained RIM (its grid must be ``prep.grid``).
        prep: the observation on the model grid (:func:`rimlens.io.observation.prepare_observation`).
        finetune_with: the VAEs and options of the fine-tuning, or ``None``.
        lens_light: ``"none"`` (the data hold the lensed source only, e.g. lens light subtracted),
            ``"mge"`` (model the lens galaxy's light: an elliptical multi-Gaussian expansion with
            non-negative amplitudes, :mod:`rimlens.physics.lens_light`), or ``"auto"`` (``mge`` when
            a lens galaxy dominates the centre, as :func:`rimlens.io.observation.find_lens_center`
            judges, else ``none``). With lens light the RIM sees the observation minus the current
            lens-light model, and the light is re-solved against the observation minus the lensed
            source, ``LENS_LIGHT_ROUNDS`` times; fine-tuning then works on the subtracted data, the
            refinement alternating ``REFINE_LIGHT_ROUNDS`` times with a re-fit of the light's shape and
            amplitudes to the observation minus the arcs, and the light is re-solved once more.
        posterior: draw posterior samples around the final estimate
            (:func:`rimlens.inference.posterior.sample_posterior`, on the lens-subtracted data); the
            returned maps are then the posterior means and ``posterior`` holds the samples. Without
            ``finetune_with`` the RIM's estimate is first refined in pixel space (the samples start
            from, and must match, a fit to the data).
        fit_supersample: rays per pixel side of the forward model of everything after the RIM (the
            model image, chi2, lens-light fit, fine-tuning, refinement, posterior:
            :func:`rimlens.inference.finetune.fit_simulator`); ``None``: the model's own.
    """
    if lens_light not in LENS_LIGHT_MODES:
        raise RimlensInputError(f"lens light must be one of {LENS_LIGHT_MODES}, got {lens_light!r}")
    t0 = time.time()
    sim = fit_simulator(model, fit_supersample)
    psf = PSF.from_kernel(prep.psf)  # the RIM's: area-averaged, for its point-sampled simulator
    fit_psf = PSF.from_kernel(prep.kernel_for(sim.supersample))  # the fits'
    obs = prep.observation
    if lens_light == "auto":
        lens_light = "mge" if prep.center_method == "light" or _light_dominates(prep) else "none"
    light: LensLightModel | None = None
    light_image = torch.zeros_like(obs)
    arcs = torch.zeros_like(obs)
    for _ in range(LENS_LIGHT_ROUNDS if lens_light == "mge" else 1):
        if lens_light == "mge":
            light = _fit_light(prep, obs - arcs, fit_psf, light)
            light_image = light.image().detach().to(obs.dtype)
        rim_prep = prep if light is None else _without_core(prep, light, RIM_CORE_MASK_ARCSEC)
        source, kappa, shear = _rim(model, obs - light_image, rim_prep, psf)
        with torch.no_grad():
            arcs = sim.forward(source, kappa, fit_psf, shear=shear, check=False)
    with torch.no_grad():
        if light is not None:
            light = light.resolve(obs - arcs, prep.noise_sigma, prep.mask)
            light_image = light.image().detach().to(obs.dtype)
        image = arcs + light_image
        chi2 = float(reduced_chi_squared(image, obs, prep.noise_sigma, prep.mask)[0])
    extra: dict = {}
    if finetune_with is not None:
        scaled, sigma, gain = rim_input(obs - light_image, prep)
        ft = finetune(
            model,
            scaled,
            psf,
            sigma,
            finetune_with.source_vae,
            finetune_with.kappa_vae,
            finetune_with.options,
            mask=prep.mask,
            simulator=sim,
            simulator_psf=fit_psf,
        )
        # with lens light, the pixel refinement alternates with a re-fit of the light's shape, until a round
        # lowers chi2 by less than REFINE_LIGHT_GAIN (relative) or REFINE_LIGHT_ROUNDS are done; within a
        # round the light's amplitudes are re-solved at every step of the refinement (profiled out of its
        # objective), so that they and the source move jointly
        previous = float("inf")
        whole = obs.masked_fill(~prep.mask, 0.0) * gain
        if light is not None and prep.native is not None:
            # from here on the light is drawn on the detector's pixels and resampled like the data: at the
            # refinement's precision the model grid's discrete PSF convolution leaves tens of sigma where
            # the galaxy is bright (README, "Lens light"); the RIM's estimate did not gain from it (θ_E,
            # slope and κ errors equal within the scatter on 16 lenses) and it costs ~0.1 s, so not earlier
            light = light.on_detector(prep.native)
        for _ in range(REFINE_LIGHT_ROUNDS if light is not None and finetune_with.options.refine_steps else 0):
            if ft.chi2_nu > (1 - REFINE_LIGHT_GAIN) * previous:
                break
            with torch.no_grad():
                assert light is not None
                arcs = sim.forward(ft.source / gain, ft.kappa, fit_psf, shear=ft.shear, check=False)
                residual = obs - arcs
                if previous == float("inf"):  # first round: is an ellipticity gradient worth its two numbers?
                    light = _choose_light_shape(light, residual, arcs, prep)
                else:  # later rounds keep the choice (refit fits a gradient when the model has one)
                    light = light.refit(residual, prep.noise_sigma, prep.mask)
                previous = ft.chi2_nu
                background = _profiled_light(light, prep, gain)
                model_img = sim.forward(ft.source, ft.kappa, fit_psf, shear=ft.shear, check=False)
                ft.chi2_nu = float(
                    reduced_chi_squared(model_img + background(whole - model_img), whole, sigma, prep.mask)[0]
                )
            done = ft.refine_steps
            refine(sim, whole, fit_psf, sigma, ft, finetune_with.options, prep.mask, background=background)
            ft.refine_steps += done  # refine() counts its own iterations only
        source, kappa, shear = ft.source / gain, ft.kappa, ft.shear
        with torch.no_grad():
            arcs = sim.forward(source, kappa, fit_psf, shear=shear, check=False)
            if light is not None:
                light = light.resolve(obs - arcs, prep.noise_sigma, prep.mask)
                light_image = light.image().detach().to(obs.dtype)
            image = arcs + light_image
            ft_chi2 = float(reduced_chi_squared(image, obs, prep.noise_sigma, prep.mask)[0])
        extra = {
            "chi2_nu": ft_chi2,
            "finetune_steps": ft.steps,
            "chi2_history": ft.chi2_history,
            "ewc_chi2_nu": ft.ewc_chi2_nu,
            "refine_steps": ft.refine_steps,
            "refine_weight": ft.refine_weight,
        }
    samples, baseline_chi2 = None, chi2
    if posterior is not None:
        scaled, sigma, gain = rim_input(obs - light_image, prep)
        if finetune_with is None:
            # samples must fit the data (a sample that does not is no posterior sample), and the sampler
            # linearises about a fit, not about the RIM's first guess: refine its pixels first (no VAEs needed)
            fit = refine_estimate(sim, scaled, fit_psf, sigma, source * gain, kappa, shear, prep.mask)
            source, kappa, shear = fit.source / gain, fit.kappa, fit.shear
            extra["refine_steps"] = fit.refine_steps
        samples = sample_posterior(
            sim, scaled, fit_psf, sigma, source * gain, log10_kappa(kappa), shear, posterior, mask=prep.mask
        )
        samples.source = samples.source / gain
        # the plain sample mean, not clipped at zero: where the source is empty the samples scatter about 0
        # (~40% of its pixels), and clipping their mean adds flux everywhere -- measured on lenstronomy
        # lenses it doubled the mean's chi2_nu (1.18 -> 2.44); the negative pixels are within source_std
        source, kappa = samples.source.mean(0, keepdim=True), samples.kappa.mean(0, keepdim=True)
        shear = None if samples.shear is None else samples.shear.mean(0, keepdim=True)
        with torch.no_grad():
            image = sim.forward(source, kappa, fit_psf, shear=shear, check=False) + light_image
            chi2 = float(reduced_chi_squared(image, obs, prep.noise_sigma, prep.mask)[0])
        if "chi2_nu" in extra:
            extra["chi2_nu"] = chi2
    with torch.no_grad():
        alpha = total_deflection(sim, kappa, shear)
    return Reconstruction(
        **{
            "source": source,
            "kappa": kappa,
            "model_image": image,
            "alpha": alpha,
            "chi2_nu": chi2,
            "baseline_chi2_nu": baseline_chi2,
            "seconds": time.time() - t0,
            "lens_light": None if light is None else light_image,
            "lens_light_model": light,
            "shear": shear,
            "posterior": samples,
            "fit_supersample": sim.supersample,
            **extra,
        }
    )


def _light_dominates(prep: PreparedObservation) -> bool:
    """Whether a lens galaxy dominates the centre of the prepared data (its light, not arcs)."""
    data = prep.observation[0, 0].double().numpy()
    sigma = prep.noise_sigma[0, 0].double().numpy()
    used = prep.mask[0, 0].numpy()
    n, s = data.shape[0], prep.grid.pixel_scale_arcsec
    obs = Observation(data, np.where(used, sigma, 1e7), np.ones((1, 1)), s)
    try:
        _, method = find_lens_center(obs, search_radius_arcsec=min(2.0, n * s / 2))
    except RimlensInputError:
        return False
    return method == "light"


def _model_name(model: RIM) -> str:
    return str(model.checkpoint_path) if model.checkpoint_path is not None else "(in memory)"


def _write(
    model: RIM,
    prep: PreparedObservation,
    rec: Reconstruction,
    out_dir: Path,
    summary: dict,
    finetune_with: FinetuneSetup | None,
    truth: dict | None = None,
    title: str = "",
    obs: Observation | None = None,
) -> dict:
    grid = model.grid
    quality = assess(model, prep, rec.model_image, rec.lensed_source, rec.chi2_nu, obs, rec.lens_light)
    summary = {
        **summary,
        "model": _model_name(model),
        "preset": model.preset.name if model.preset else "",
        **rec.summary(finetune_with.options if finetune_with else None),
        **prep.describe(),
        "input": obs.meta if obs is not None else {},
        "lens_light": _describe_light(rec.lens_light_model, prep),
        "lens_mass": describe_mass(rec.kappa[0, 0].double().numpy(), grid.image_grid, prep.center_arcsec),
        "quality": quality.as_dict(),
        "warnings": [w for w in (quality.warning(), (summary.get("power_law") or {}).get("warning")) if w],
    }
    extra_maps: dict[str, tuple[torch.Tensor, str]] = {}
    if rec.lens_light is not None:
        extra_maps["lens_light.fits"] = (rec.lens_light, "normalised flux per pixel")
        extra_maps["lens_subtracted.fits"] = (prep.observation - rec.lens_light, "normalised flux per pixel")
    std_maps = None
    if rec.posterior is not None:
        summary["posterior"] = describe_posterior(rec.posterior, grid.image_grid)
        sample_chi2 = summary["posterior"]["chi2_nu_p16_p50_p84"][1]
        if sample_chi2 > POSTERIOR_FIT_FACTOR * max(rec.chi2_nu, 1.0):
            # samples that do not fit the data are no posterior samples: say so rather than report their spread
            summary["warnings"].append(
                f"posterior samples do not fit the data (median chi2_nu {sample_chi2:.1f} against "
                f"{rec.chi2_nu:.2f} for their mean): the lensing is too non-linear over the prior's widths "
                "for the sampler here; read kappa_std / source_std as indicative only"
            )
        std_maps = {"source": rec.posterior.mean_std("source")[1], "kappa": rec.posterior.mean_std("kappa")[1]}
        write_posterior_samples(out_dir / "posterior_samples.h5", rec.posterior, grid)
    if truth is not None:
        summary["source_mse"] = float(((rec.source - truth["source"]) ** 2).mean())
        summary["log10_kappa_mse"] = float(((log10_kappa(rec.kappa) - log10_kappa(truth["kappa"])) ** 2).mean())
    export(out_dir, model, prep, rec)  # before summary.json: a folder run counts a lens done by its summary
    write_products(
        out_dir,
        observation=prep.observation,
        noise_sigma=prep.noise_sigma,
        mask=prep.mask,
        source=rec.source,
        kappa=rec.kappa,
        model_image=rec.model_image,
        alpha=rec.alpha,
        image_grid=grid.image_grid,
        source_grid=grid.source_grid,
        chi2_nu=rec.chi2_nu,
        summary=summary,
        truth=truth,
        title=title,
        extra_maps=extra_maps,
        std_maps=std_maps,
    )
    return summary


def _einstein_radius(kappa: np.ndarray, grid: PixelGrid, center) -> float:
    """:func:`einstein_radius_of_map`, NaN where it is undefined (a centre too close to the map's edge):
    a summary figure missing, not the products."""
    try:
        return einstein_radius_of_map(kappa, grid, center)
    except RimlensInputError:
        return float("nan")


def _slope(kappa: np.ndarray, grid: PixelGrid, theta_e: float, center) -> float:
    """:func:`log_slope` over 0.5-2 ``theta_e``, NaN where it is undefined (no positive radius)."""
    try:
        return log_slope(kappa, grid, theta_e, center) if math.isfinite(theta_e) else float("nan")
    except RimlensInputError:
        return float("nan")


def describe_mass(kappa: np.ndarray, grid: PixelGrid, field_center_arcsec: Sequence[float] = (0.0, 0.0)) -> dict:
    """``summary.json``'s ``lens_mass`` block: the Einstein radius and log-slope of one convergence map.

    Args:
        kappa: ``N x N`` convergence on ``grid`` (the model field).
        grid: the model's image grid.
        field_center_arcsec: the model field's centre in the cut-out's frame (arcsec from the cut-out's
            centre, x along columns), to report the mass centre there.

    Returns:
        ``einstein_radius_arcsec`` (the circle about the smoothed kappa peak inside which the mean kappa
        is 1, :func:`rimlens.physics.lens_metrics.einstein_radius_of_map`), ``log_slope`` (gamma of
        ``kappa ∝ r^(1 - gamma)`` fitted to the azimuthal means over 0.5-2 theta_E,
        :func:`rimlens.physics.lens_metrics.log_slope`; 2 = isothermal), ``kappa_center_arcsec`` (the
        peak, cut-out frame). The radius is 0 for a map sub-critical at its peak (then no slope) and
        ``None`` with the slope where the mean stays above 1 out to the field's edge.
    """

    def finite(v: float) -> float | None:
        return float(v) if math.isfinite(v) else None

    try:
        center = kappa_peak_center(kappa, grid)
    except RimlensInputError:  # a non-finite map: no figures, but the products are still written
        return {"einstein_radius_arcsec": None, "log_slope": None, "kappa_center_arcsec": None}
    theta = _einstein_radius(kappa, grid, center)
    slope = _slope(kappa, grid, theta, center)
    return {
        "einstein_radius_arcsec": finite(theta),
        "log_slope": finite(slope),
        "kappa_center_arcsec": [float(field_center_arcsec[i]) + float(center[i]) for i in range(2)],
        "definitions": "theta_E: mean kappa 1 inside the circle about the smoothed kappa peak; log_slope: "
        "gamma of kappa ~ r^(1 - gamma) over 0.5-2 theta_E (2 = isothermal); centre: arcsec from the cut-out's centre",
    }


def describe_posterior(samples: PosteriorSamples, grid: PixelGrid) -> dict:
    """``summary.json``'s posterior block: the Einstein radius (arcsec) and log-slope of every
    kappa sample (about the posterior mean's own centre; slope over 0.5-2 of the median Einstein
    radius), the external shear, and the samples' chi2_nu, as 16/50/84 percentiles."""
    mean_kappa = samples.kappa.mean(0)[0].numpy()
    center = kappa_peak_center(mean_kappa, grid)

    theta = np.array([_einstein_radius(k[0].numpy(), grid, center) for k in samples.kappa])
    finite = theta[np.isfinite(theta)]
    theta_mid = float(np.median(finite)) if len(finite) else float("nan")
    slope = np.array([_slope(k[0].numpy(), grid, theta_mid, center) for k in samples.kappa])

    def pct(v: np.ndarray) -> list[float]:
        v = np.asarray(v, dtype=float)
        v = v[np.isfinite(v)]
        return [float(x) for x in np.percentile(v, [16, 50, 84])] if len(v) else [float("nan")] * 3

    out = {
        "samples": int(samples.source.shape[0]),
        "method": f"{samples.method} about the reconstruction (rimlens.inference.posterior)",
        "einstein_radius_arcsec_p16_p50_p84": pct(theta),
        "log_slope_p16_p50_p84": pct(slope),
        "kappa_center_arcsec": [float(c) for c in center],
        "chi2_nu_p16_p50_p84": pct(samples.chi2_nu.numpy()),
    }
    # the optimiser's own account: CG iterations and final preconditioned residual (laplace), or
    # L-BFGS iterations and largest whitened gradient (perturb-and-map)
    out.update(optimiser_iterations=samples.iterations, optimiser_final_residual=samples.max_gradient)
    if samples.method == "laplace":
        out["smallest_kept_eigenvalue"] = samples.smallest_kept_eigenvalue
    if samples.shear is not None:
        out["shear_gamma1_p16_p50_p84"] = pct(samples.shear[:, 0].numpy())
        out["shear_gamma2_p16_p50_p84"] = pct(samples.shear[:, 1].numpy())
    return out


def write_posterior_samples(path: Path, samples: PosteriorSamples, grid: GridConfig) -> Path:
    """The samples as HDF5 (atomically): ``source`` ``S x M x M`` (the data's normalised units),
    ``kappa`` ``S x N x N``, ``shear`` ``S x 2`` if estimated, ``chi2_nu`` ``(S,)``; grids in attributes."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("source", data=samples.source[:, 0].numpy().astype(np.float32), compression="gzip")
        h5.create_dataset("kappa", data=samples.kappa[:, 0].numpy().astype(np.float32), compression="gzip")
        if samples.shear is not None:
            h5.create_dataset("shear", data=samples.shear.numpy().astype(np.float32))
        h5.create_dataset("chi2_nu", data=samples.chi2_nu.numpy().astype(np.float32))
        h5.attrs["image_grid"] = json.dumps(grid.image_grid.as_dict())
        h5.attrs["source_grid"] = json.dumps(grid.source_grid.as_dict())
        h5.attrs["conventions"] = "row 0 at the bottom (FITS order), x along columns; arcsec"
    return path


def _describe_light(light: LensLightModel | None, prep: PreparedObservation) -> dict | str:
    if light is None:
        return "none"
    dx, dy = light.center[0].tolist()
    return {
        "model": "elliptical MGE (non-negative amplitudes)",
        "center_arcsec": [prep.center_arcsec[0] + dx, prep.center_arcsec[1] + dy],  # from the cut-out's centre
        "axis_ratio": float(light.q[0]),
        "phi_rad": float(light.phi[0]),
        # change of (e1, e2) per dex of Gaussian width (q, phi: the shape at the mean log-width); 0 if not fitted
        "ellipticity_gradient_per_dex": [0.0, 0.0]
        if light.ellipticity_gradient is None
        else [float(v) for v in light.ellipticity_gradient[0]],
        "gaussians": int(light.sigmas.shape[0]),
        "sigmas_arcsec": [round(float(v), 5) for v in light.sigmas],
        "amplitudes": [float(v) for v in light.amplitudes[0].detach()],
        "total_flux": float(light.total_flux[0].detach()),
    }


def export(out_dir: Path, model: RIM, prep: PreparedObservation, rec: Reconstruction) -> dict[str, str]:
    """Write the reconstruction for the standard tools beside the products: a COOLEST template
    (``coolest.json`` + ``coolest-*.fits``; kappa as a fully defined pixelated potential) and a
    lenstronomy ``INTERPOL`` lens model (``lenstronomy_interpol.npz``), both with the external shear
    when the reconstruction has one (COOLEST ``ExternalShear``, lenstronomy ``SHEAR``). Returns the paths."""
    grid = model.grid
    shear = None if rec.shear is None else tuple(float(v) for v in rec.shear.detach().reshape(-1)[:2])
    paths = write_coolest(
        out_dir,
        source=rec.source,
        kappa=rec.kappa,
        image_grid=grid.image_grid,
        source_grid=grid.source_grid,
        observation=prep.observation,
        noise_sigma=prep.noise_sigma,
        psf=prep.psf,
        lens_light=rec.lens_light,
        mask=prep.mask,
        # COOLEST admits gamma_ext < 1 only; a (nonsensical) larger estimate is left out there, kept below
        shear=shear if shear is not None and math.hypot(*shear) < 1 else None,
    )
    paths["lenstronomy_interpol.npz"] = str(
        write_lenstronomy(out_dir / "lenstronomy_interpol.npz", rec.kappa, grid.image_grid, shear=shear)
    )
    return paths


def reconstruct_observation(
    model: RIM,
    image: str | Path,
    psf: str | Path | None,
    out_dir: str | Path,
    *,
    noise: str | Path | None = None,
    sigma: float | None = None,
    pixel_scale_arcsec: float | None = None,
    mask: str | Path | None = None,
    center_arcsec: tuple[float, float] | str | None = "auto",
    lens_light: str = "auto",
    finetune_with: FinetuneSetup | None = None,
    posterior: PosteriorOptions | None = None,
    fit_supersample: int | None = FIT_SUPERSAMPLE,
    power_law: bool = False,
    power_law_subhalos: int = 2,
    power_law_posterior: int = 0,
) -> dict:
    """Reconstruct one FITS observation and write its products (FITS maps, PNG, ``summary.json``)
    into ``out_dir``. Returns the summary (``chi2_nu``, ``baseline_chi2_nu``, ``seconds``, ...).
    With ``posterior``: posterior-mean maps, their standard deviations and the samples as well.
    With ``power_law``: an EPL + shear (+ up to ``power_law_subhalos`` subhaloes) measured on the cut-out's
    pixels (:func:`describe_power_law`; its products written beside the others), with ``power_law_posterior``
    samples of its posterior."""
    if psf is None:
        raise RimlensInputError("a PSF is required (--psf)")
    obs = load_observation(image, psf, noise, sigma, pixel_scale_arcsec, mask)
    prep = prepare_observation(obs, model.grid.image_grid, center_arcsec)
    rec = reconstruct_prepared(model, prep, finetune_with, lens_light, posterior, fit_supersample)
    head: dict = {"image": str(image)}
    if power_law:
        head["power_law"] = describe_power_law(
            obs, prep, rec, model.grid.image_grid, power_law_subhalos,
            posterior_samples=power_law_posterior, out_dir=Path(out_dir),
        )  # fmt: skip
    return _write(model, prep, rec, Path(out_dir), head, finetune_with, title=obs.name, obs=obs)


def describe_power_law(
    obs: Observation,
    prep: PreparedObservation,
    rec: Reconstruction,
    grid: PixelGrid,
    max_subhalos: int = 2,
    *,
    posterior_samples: int = 0,
    out_dir: Path | None = None,
    seed: int = 0,
) -> dict:
    """``summary.json``'s ``power_law`` block: :func:`rimlens.inference.power_law.measure_power_law` on the
    observation's own pixels, started from ``rec``'s convergence (``grid``: the model's image grid) and
    with its lens light, at most ``max_subhalos`` subhaloes added by the evidence; ``{"error": why}`` where the
    measurement is impossible (no Einstein radius). With ``out_dir``, its products are written there
    (:func:`rimlens.io.products.write_power_law_products`); with ``posterior_samples`` (and ``out_dir``),
    that many posterior samples (:func:`rimlens.inference.power_law_posterior.sample_power_law_posterior`), their
    percentiles in the block's ``posterior``."""
    try:
        m = measure_power_law(
            obs.image,
            obs.noise_sigma,
            obs.psf,
            obs.pixel_scale_arcsec,
            rec.kappa[0, 0].double().numpy(),
            grid,
            prep.center_arcsec,
            mask=obs.mask,
            light=rec.lens_light_model,
            light_flux_scale=prep.flux_scale,
            max_subhalos=max_subhalos,
        )
    except RimlensInputError as exc:
        return {"error": str(exc)}
    block = m.describe()
    if out_dir is None:
        return block
    axis = prep.center_arcsec
    samples: dict | None = None
    images = power_law_images(m)
    source = images.source
    post = None
    if posterior_samples:
        try:
            post = sample_power_law_posterior(m, posterior_samples, seed=seed)
        except RimlensInputError as exc:  # the measurement's other products are still written
            block["posterior"] = {"error": str(exc)}
    if post is not None:
        kappa = post.kappa_maps(grid, axis)
        samples = {
            "parameters": post.masses.numpy(), "names": post.names, "kappa": kappa, "source": post.sources.numpy(),
            "chi2_nu": post.chi2_nu, "covariance": post.covariance, "covariance_statistical": post.covariance_statistical,
        }  # fmt: skip
        source = post.sources.numpy().mean(0)
        sample_chi2 = [round(float(v), 4) for v in np.percentile(post.chi2_nu, [16, 50, 84])]
        block["posterior"] = {
            "samples": posterior_samples,
            **{f"{k}_p16_p50_p84": v for k, v in post.percentiles().items()},
            "chi2_nu_p16_p50_p84": sample_chi2,
            "seconds": round(post.seconds, 1),
            "covariance_inflation": COVARIANCE_INFLATION,
            "method": "Laplace approximation of the semi-linear evidence (source and lens light marginalised), "
            "mass covariance scaled by covariance_inflation (calibrated on lenstronomy lenses) and the slope "
            "widened to its total width (rimlens.inference.power_law_posterior)",
        }
        if sample_chi2[1] > POSTERIOR_FIT_FACTOR * max(m.chi2_nu, 1.0):
            block["posterior"]["warning"] = (
                f"the power-law samples do not fit the data (median chi2_nu {sample_chi2[1]:.2f}): "
                "read their spread as indicative only"
            )
    box = images.source_box
    n_src = images.source.shape[0]
    block["products"] = write_power_law_products(
        out_dir,
        data=images.data,
        model=images.model,
        residuals=images.residuals,
        light=images.light if rec.lens_light_model is not None else None,
        crop_grid=PixelGrid(images.data.shape[0], images.pixel_scale_arcsec),
        crop_center_arcsec=(images.origin_arcsec[0] - axis[0], images.origin_arcsec[1] - axis[1]),
        source=source,
        source_grid=PixelGrid(n_src, 2 * box[2] / (n_src - 1)),
        source_center_arcsec=(box[0] - axis[0], box[1] - axis[1]),
        chi2_nu=m.chi2_nu,
        samples=samples,
        image_grid=grid,
        title=obs.name,
    )
    return block


@dataclass
class FolderSummary:
    """Outcome of :func:`reconstruct_folder` (on rank 0): lenses found and done, the table written."""

    lenses: int
    done: int
    table: Path
    errors: dict[str, str] = field(default_factory=dict)


SUMMARY_COLUMNS = (
    "chi2_nu",
    "baseline_chi2_nu",
    "einstein_radius_arcsec",
    "log_slope",
    "chi2_nu_arcs",
    "poor_fit",
    "uneven_chi2",
    "likely_causes",
    "center_method",
    "padded_fraction",
    "lens_light",
    "shear_gamma1",
    "shear_gamma2",
    "power_law_einstein_radius_arcsec",
    "power_law_log_slope",
    "power_law_log_slope_sigma",
    "power_law_subhalos",
    "seconds",
    "used_pixels",
)


def reconstruct_folder(
    model: RIM,
    folder: str | Path,
    out_dir: str | Path,
    *,
    sigma: float | None = None,
    pixel_scale_arcsec: float | None = None,
    center_arcsec: str | None = "auto",
    lens_light: str = "auto",
    finetune_with: FinetuneSetup | None = None,
    on_error=None,
    posterior: PosteriorOptions | None = None,
    fit_supersample: int | None = FIT_SUPERSAMPLE,
    power_law: bool = False,
    power_law_subhalos: int = 2,
    power_law_posterior: int = 0,
) -> FolderSummary | None:
    """Reconstruct every lens sub-folder of ``folder`` (``image.fits``, ``psf.fits`` and
    ``noise_map.fits`` unless ``sigma``) into ``out_dir/<name>/``, then write ``out_dir/summary.csv``.

    Resumable (lenses with a ``summary.json`` are skipped) and sharded over the ranks of an
    initialised process group (lens ``i`` on rank ``i mod W``). A lens with bad input is reported
    through ``on_error(name, message)`` and skipped, so one bad lens does not stop a survey-sized
    run. Returns the summary on rank 0, ``None`` on other ranks.
    """
    folder, out_dir = Path(folder), Path(out_dir)
    lenses = sorted(d for d in folder.iterdir() if (d / "image.fits").exists()) if folder.is_dir() else []
    if not lenses:
        raise RimlensInputError(f"{folder} holds no lens sub-folders with an image.fits")
    rank, world = rank_and_world()
    errors = {}
    with collective_failure("folder reconstruction"):  # any other failure on one rank ends every rank
        for i, lens in enumerate(lenses):
            target = out_dir / lens.name
            if i % world != rank or (target / "summary.json").exists():
                continue
            try:
                reconstruct_observation(
                    model,
                    lens / "image.fits",
                    lens / "psf.fits",
                    target,
                    noise=lens / "noise_map.fits" if sigma is None else None,
                    sigma=sigma,
                    pixel_scale_arcsec=pixel_scale_arcsec,
                    center_arcsec=center_arcsec,
                    lens_light=lens_light,
                    finetune_with=finetune_with,
                    posterior=posterior,
                    fit_supersample=fit_supersample,
                    power_law=power_law,
                    power_law_subhalos=power_law_subhalos,
                    power_law_posterior=power_law_posterior,
                )
            except RimlensInputError as exc:
                errors[lens.name] = str(exc)
                if on_error is not None:
                    on_error(lens.name, str(exc))
    if rank != 0:
        return None
    rows = []
    for lens in lenses:
        f = out_dir / lens.name / "summary.json"
        summary = json.loads(f.read_text()) if f.exists() else {}
        q = summary.get("quality", {})
        light = summary.get("lens_light", "")
        summary.update(
            lens_light=light if isinstance(light, str) else "mge",
            chi2_nu_arcs=q.get("chi2_nu_arcs", ""),
            poor_fit=q.get("poor", ""),
            uneven_chi2=q.get("uneven", ""),
            likely_causes="; ".join(q.get("causes", [])),
            einstein_radius_arcsec=(summary.get("lens_mass") or {}).get("einstein_radius_arcsec", ""),
            log_slope=(summary.get("lens_mass") or {}).get("log_slope", ""),
            shear_gamma1=(summary.get("external_shear") or {}).get("gamma1", ""),
            shear_gamma2=(summary.get("external_shear") or {}).get("gamma2", ""),
            power_law_einstein_radius_arcsec=(summary.get("power_law") or {}).get("einstein_radius_arcsec", ""),
            power_law_log_slope=(summary.get("power_law") or {}).get("log_slope", ""),
            power_law_log_slope_sigma=(summary.get("power_law") or {}).get("log_slope_sigma", ""),
            power_law_subhalos=len(summary["power_law"]["subhalos"])
            if "subhalos" in (summary.get("power_law") or {})
            else "",
        )
        rows.append({"lens": lens.name, **{k: summary.get(k, "") for k in SUMMARY_COLUMNS}})
    table = out_dir / "summary.csv"
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(table) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["lens", *SUMMARY_COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    return FolderSummary(len(lenses), sum(1 for r in rows if r["chi2_nu"] != ""), table, errors)


@dataclass
class DemoResult:
    """Summaries of the two demo reconstructions and the wall time."""

    slacs: dict
    simulated: dict
    seconds: float


def run_demo(model: RIM, out_dir: str | Path, seed: int = 7) -> DemoResult:
    """Reconstruct the real HST lens SLACS J2303+1422 (shipped, lens light subtracted) and a held-out
    simulated lens (test-split galaxies, high-SNR recipe, ``seed``) into ``out_dir/slacs2303`` and
    ``out_dir/simulated``."""
    t0 = time.time()
    out_dir = Path(out_dir)
    grid = model.grid.image_grid
    with resources.as_file(resources.files("rimlens") / "data" / "slacs") as d:
        obs = load_observation(d / "image.fits", d / "psf.fits", d / "noise_map.fits", pixel_scale_arcsec=0.05)
    obs.name = "SLACS J2303+1422 (HST F814W, lens light subtracted)"
    prep = prepare_observation(obs, grid)
    slacs = _write(
        model,
        prep,
        reconstruct_prepared(model, prep),
        out_dir / "slacs2303",
        {"image": "SLACS J2303+1422 (shipped)"},
        None,
        title=obs.name,
        obs=obs,
    )
    if model.preset is None:
        raise RimlensInputError("the demo needs a model loaded from a checkpoint (it carries the data configuration)")
    lens = LensGenerator(model.preset, split="test", bank_seed=seed, noise="high").draw(child_rng(seed, 99), 1)
    n = grid.n_pixels
    prep = PreparedObservation(
        lens.observation,
        lens.noise_sigma.reshape(1, 1, 1, 1).expand(1, 1, n, n).clone(),
        lens.psf,
        torch.ones(1, 1, n, n, dtype=torch.bool),
        1.0,
        (0.0, 0.0),
        grid,
    )
    snr = float(lens.snr[0])
    simulated = _write(
        model,
        prep,
        reconstruct_prepared(model, prep),
        out_dir / "simulated",
        {
            "image": f"simulated held-out lens (seed {seed}, {lens.kappa_family[0]} lens, "
            f"{lens.source_family[0]} source)",
            "snr": snr,
        },
        None,
        truth={"source": lens.source, "kappa": lens.kappa},
        title=f"simulated lens, SNR {snr:.0f}",
    )
    return DemoResult(slacs, simulated, time.time() - t0)
