"""Validation on lenses a peer simulator made: checkpoint selection by the figures users judge.

A model's own validation loss rewards fitting its own generator; measured on lenstronomy-made lenses,
a model whose own loss kept falling got worse (slope error 0.065 -> 0.086; README, "The lens population
and the external shear"). A *peer validation set* is a file of such lenses already brought onto the
model grid, with their true convergence averaged over each pixel; the training loop then keeps the
weights that measure best on it.

File format (``.npz``, written by ``benchmarks/peer_validation.py``), ``n`` lenses:

* ``observation``: ``n x 1 x N x N``, the data as the RIM sees them (:func:`rimlens.inference.quality.rim_input`:
  excluded pixels zero, peak near 1), lens centred on the model grid;
* ``noise_sigma``: ``n x 1 x N x N`` in the same units (excluded pixels carry a huge sigma);
* ``mask``: ``n x 1 x N x N`` bool, True = used;
* ``psf``: ``n x 1 x K x K`` unit-sum kernels on the model pixel scale;
* ``kappa``: ``n x 1 x N x N`` true convergence, pixel means on the model grid, lens at the grid's centre;
* ``image_pixels``, ``image_fov_arcsec``: the model grid the file was made for.

Never train on a peer validation set: it selects checkpoints, and the figures of the README come from
a *different* peer set (another seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rimlens.errors import RimlensInputError
from rimlens.nn.rim import RIM
from rimlens.physics import PixelGrid
from rimlens.physics.lens_metrics import einstein_radius_of_map, kappa_error_in_annulus, log_slope

__all__ = ["PeerValidationSet", "load_peer_validation", "peer_figures"]

KEYS = ("observation", "noise_sigma", "mask", "psf", "kappa")


@dataclass
class PeerValidationSet:
    """Peer-simulated lenses on a model grid (see the module docstring), with the truth's Einstein
    radius ``theta_e`` (arcsec, circle-enclosed mean 1) and log-slope ``gamma`` measured on the
    pixel-mean truth maps exactly as the reconstructions' will be."""

    observation: torch.Tensor
    noise_sigma: torch.Tensor
    mask: torch.Tensor
    psf: torch.Tensor
    kappa: torch.Tensor
    grid: PixelGrid
    theta_e: np.ndarray
    gamma: np.ndarray

    def __len__(self) -> int:
        return self.observation.shape[0]


def load_peer_validation(path: str | Path, grid: PixelGrid) -> PeerValidationSet:
    """Read and check a peer validation file for a model whose image grid is ``grid``."""
    path = Path(path)
    if not path.is_file():
        raise RimlensInputError(f"peer validation set: no such file {path}")
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in KEYS}
            n_pix, fov = int(f["image_pixels"]), float(f["image_fov_arcsec"])
    except KeyError as exc:
        raise RimlensInputError(f"{path} is not a peer validation set: {exc.args[0]} missing") from None
    except (OSError, ValueError) as exc:
        raise RimlensInputError(f"{path} is not a readable .npz file (truncated or corrupt?): {exc}") from None
    if n_pix != grid.n_pixels or abs(fov - grid.fov_arcsec) > 1e-6:
        raise RimlensInputError(
            f'{path} was made for a {n_pix}-pixel {fov:g}" grid; the model has {grid.n_pixels} pixels over '
            f'{grid.fov_arcsec:g}"'
        )
    n = arrays["observation"].shape[0]
    for k, a in arrays.items():
        if a.shape[0] != n or a.ndim != 4 or (k != "psf" and a.shape[1:] != (1, n_pix, n_pix)):
            raise RimlensInputError(f"{path}: {k} has shape {a.shape}, expected ({n}, 1, {n_pix}, {n_pix})")
        if k != "mask" and not np.all(np.isfinite(a)):
            raise RimlensInputError(f"{path}: {k} contains NaN or infinite values")
    theta = np.array([einstein_radius_of_map(k[0], grid) for k in arrays["kappa"]])
    gamma = np.array([log_slope(k[0], grid, t) for k, t in zip(arrays["kappa"], theta, strict=True)])
    t = {k: torch.as_tensor(v) for k, v in arrays.items()}
    return PeerValidationSet(
        t["observation"].float(),
        t["noise_sigma"].float(),
        t["mask"].bool(),
        t["psf"].float(),
        t["kappa"].float(),
        grid,
        theta,
        gamma,
    )


@torch.no_grad()
def peer_figures(model: RIM, peer: PeerValidationSet, chunk: int = 16) -> dict:
    """Medians over the peer lenses of the RIM's final estimate (known centre: the grid's):

    * ``peer_theta_err``: ``|theta_hat - theta_true| / theta_true`` (circle-enclosed Einstein radii);
    * ``peer_gamma_err``: ``|gamma_hat - gamma_true|``, log-slopes in 0.5-2 ``theta_true``;
    * ``peer_kappa_err``: median relative kappa error in 0.5-2 ``theta_true``;
    * ``peer_score``: their sum (all dimensionless; lower is better), what checkpoints are selected on.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    kappas = []
    for i in range(0, len(peer), chunk):
        sl = slice(i, i + chunk)
        out = model(
            peer.observation[sl].to(device, dtype),
            peer.psf[sl].to(device, dtype),
            peer.noise_sigma[sl].to(device, dtype),
            mask=peer.mask[sl].to(device),
        )
        kappas.append(out.final_kappa.double().cpu().numpy())
    model.train(was_training)
    kappa_hat = np.concatenate(kappas)
    grid = peer.grid
    theta_err, gamma_err, kappa_err = [], [], []
    for k_hat, k_true, t, g in zip(kappa_hat, peer.kappa.double().numpy(), peer.theta_e, peer.gamma, strict=True):
        theta_err.append(abs(einstein_radius_of_map(k_hat[0], grid) - t) / t)
        gamma_err.append(abs(log_slope(k_hat[0], grid, t) - g))
        kappa_err.append(kappa_error_in_annulus(k_hat[0], k_true[0], grid, t, None))
    figures = {
        "peer_theta_err": float(np.nanmedian(theta_err)),
        "peer_gamma_err": float(np.nanmedian(gamma_err)),
        "peer_kappa_err": float(np.nanmedian(kappa_err)),
    }
    figures["peer_score"] = sum(figures.values())
    return figures
