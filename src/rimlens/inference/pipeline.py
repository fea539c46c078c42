"""From a prepared observation to a reconstruction (RIM, optionally fine-tuned) and its products."""

from __future__ import annotations

import time

import torch

from rimlens.io.observation import PreparedObservation
from rimlens.physics import PSF
from rimlens.physics.likelihood import reduced_chi_squared


def reconstruct_prepared(model, prep: PreparedObservation, finetune_with=None, finetune_options=None) -> dict:
    """Reconstruct one prepared observation.

    Args:
        model: trained RIM (its grid must be ``prep.grid``).
        finetune_with: optional ``(source_vae, kappa_vae)`` to fine-tune after the baseline.
        finetune_options: :class:`rimlens.inference.finetune.FinetuneOptions` (default: the paper's).

    Returns:
        dict with ``source``, ``kappa``, ``model_image``, ``alpha`` (tensors), ``chi2_nu``,
        ``baseline_chi2_nu``, ``seconds`` and, if fine-tuned, ``finetune_steps``, ``chi2_history``,
        ``ewc_chi2_nu`` (after the weight fine-tuning) and ``refine_steps`` (pixel refinement).
    """
    t0 = time.time()
    sim = model.simulator
    psf = PSF.from_kernel(prep.psf)
    with torch.no_grad():
        out = model(prep.observation, psf, prep.noise_sigma, mask=prep.mask)
        source, kappa = out.final_source, out.final_kappa
        image = sim.forward(source, kappa, psf, check=False)
        chi2 = float(reduced_chi_squared(image, prep.observation, prep.noise_sigma, prep.mask)[0])
    result = {"baseline_chi2_nu": chi2, "chi2_nu": chi2}
    if finetune_with is not None:
        from rimlens.inference.finetune import finetune

        ft = finetune(model, prep.observation, psf, prep.noise_sigma, *finetune_with, finetune_options, mask=prep.mask)
        source, kappa = ft.source, ft.kappa
        with torch.no_grad():
            image = sim.forward(source, kappa, psf, check=False)
        result.update(chi2_nu=ft.chi2_nu, finetune_steps=ft.steps, chi2_history=ft.chi2_history, ewc_chi2_nu=ft.ewc_chi2_nu,
                      refine_steps=ft.refine_steps)
    with torch.no_grad():
        alpha = sim.deflection(kappa, check=False)
    result.update(source=source, kappa=kappa, model_image=image, alpha=alpha, seconds=time.time() - t0)
    return result
