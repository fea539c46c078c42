"""Figures of merit: coherence spectra, the paper's loss statistics, chi^2 distributions."""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from rimlens.nn.rim import RIMOutput, rim_loss

__all__ = ["chi2_nu_distribution", "coherence_spectrum", "lens_losses"]


def coherence_spectrum(x: torch.Tensor, y: torch.Tensor, n_bins: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Phase-sensitive coherence ``|<X* Y>| / sqrt(<|X|^2> <|Y|^2>)`` in radial frequency annuli.

    ``x``, ``y``: ``B x 1 x N x N``. Averages over each annulus are taken *before* the modulus, so
    a reconstruction with the right power but the wrong phases scores low (the Censai script took
    the modulus per mode, which ignores phases; docs/censai_as_run.md section 8).

    Returns:
        ``(frequency in cycles / pixel (n_bins,), coherence B x n_bins)``.
    """
    n = x.shape[-1]
    X = torch.fft.fftshift(torch.fft.fft2(x.double()[:, 0]), dim=(-2, -1))
    Y = torch.fft.fftshift(torch.fft.fft2(y.double()[:, 0]), dim=(-2, -1))
    f = torch.fft.fftshift(torch.fft.fftfreq(n, dtype=torch.float64))
    fy, fx = torch.meshgrid(f, f, indexing="ij")
    r = torch.sqrt(fx**2 + fy**2)
    edges = torch.linspace(0, 0.5, n_bins + 1, dtype=torch.float64)
    out = np.zeros((x.shape[0], n_bins))
    for i in range(n_bins):
        sel = (r >= edges[i]) & (r < edges[i + 1])
        if not bool(sel.any()):
            out[:, i] = np.nan
            continue
        cross = (X.conj() * Y)[:, sel].sum(dim=1).abs()
        pxx = (X.abs() ** 2)[:, sel].sum(dim=1)
        pyy = (Y.abs() ** 2)[:, sel].sum(dim=1)
        out[:, i] = (cross / torch.sqrt(pxx * pyy + 1e-300)).numpy()
    return ((edges[1:] + edges[:-1]) / 2).numpy(), out


def lens_losses(
    source_hat: torch.Tensor, kappa_hat: torch.Tensor, source: torch.Tensor, kappa: torch.Tensor
) -> np.ndarray:
    """Per-lens loss of final estimates (paper Table 4): :func:`rimlens.nn.rim.rim_loss` of the maps
    ``B x 1 x N x N`` (source pixel MSE + sqrt(kappa)-weighted log10 kappa squared error), ``(B,)``."""
    return rim_loss(RIMOutput.single_step(source_hat, kappa_hat), source, kappa, reduction="none").double().numpy()


def chi2_nu_distribution(dof: int, x: np.ndarray) -> np.ndarray:
    """Density of chi^2_dof / dof at ``x`` (the distribution of chi2_nu for a perfect model)."""
    return stats.chi2.pdf(np.asarray(x) * dof, dof) * dof
