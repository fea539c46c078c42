"""Classical baseline: maximum a posteriori fit of a pixelated source and a pixelated log10 kappa
through the same simulator, with explicit priors, as users of lenstronomy / PyAutoLens-style pixel
inversions would otherwise run.

Objective per lens (minimised with L-BFGS, strong-Wolfe line search, from several starts):

    chi2 / 2 + lambda_s * sum (D s)^2 + lambda_k * sum (D eta)^2,   s = softplus(u) >= 0,

with ``D`` the discrete Laplacian (``curvature``) or the finite-difference gradient (``gradient``).
Starts: eta = log10 of singular isothermal spheres with Einstein radii ``starts_theta_e``; s = 0.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import torch
import torch.nn.functional as F

from rimlens.data.storage import read_lenses
from rimlens.io.atomic import atomic_path
from rimlens.physics import PSF, LensSimulator, profiles
from rimlens.physics.likelihood import chi_squared, reduced_chi_squared

__all__ = ["MAPOptions", "MAPResult", "fit_map", "fit_map_file"]

_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


@dataclass(frozen=True)
class MAPOptions:
    """Prior weights, regulariser, starting Einstein radii (arcsec) and L-BFGS iterations per start."""

    source_weight: float = 3.0
    kappa_weight: float = 300.0
    regularization: str = "curvature"  # or "gradient"
    starts_theta_e: tuple = (0.8, 1.5, 2.2)
    max_iterations: int = 200


def _penalty(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "curvature":
        lap = F.conv2d(x, _LAPLACE.to(x)[None, None])  # valid region: no edge artefacts
        return (lap**2).sum(dim=(1, 2, 3))
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    return (dx**2).sum(dim=(1, 2, 3)) + (dy**2).sum(dim=(1, 2, 3))


@dataclass
class MAPResult:
    """MAP estimates of a batch: ``source``, ``kappa`` ``B x 1 x N x N``; ``chi2_nu``, ``objective``
    ``(B,)``; ``seconds``: total wall time."""

    source: torch.Tensor
    kappa: torch.Tensor
    chi2_nu: torch.Tensor
    objective: torch.Tensor
    seconds: float


def fit_map(
    simulator, observation: torch.Tensor, psf, noise_sigma, mask=None, options: MAPOptions = MAPOptions()
) -> MAPResult:
    """MAP estimates for a batch of lenses, each lens its own L-BFGS problem (from every start).

    One L-BFGS over the summed objectives of a batch would share one line search, and lenses with
    a large chi2 would stall the others (README, "RIM against the classical MAP baseline"), so
    lenses are fitted one at a time.

    Returns:
        the estimates, their chi2_nu and objectives (:class:`MAPResult`).
    """
    t0 = time.time()
    psf = psf if isinstance(psf, PSF) else PSF.from_kernel(psf)
    kernel = psf.kernel
    b = observation.shape[0]
    sigma = torch.as_tensor(noise_sigma, dtype=observation.dtype)
    sigma = sigma.reshape(-1, 1, 1, 1) if sigma.ndim <= 1 else sigma

    def pick(t, i):
        return t[i : i + 1] if t.shape[0] > 1 else t

    fits = [
        _fit_one(
            simulator,
            observation[i : i + 1],
            PSF.from_kernel(pick(kernel, i)),
            pick(sigma, i),
            None if mask is None else pick(mask, i),
            options,
        )
        for i in range(b)
    ]
    return MAPResult(
        **{k: torch.cat([f[k] for f in fits]) for k in ("source", "kappa", "chi2_nu", "objective")},
        seconds=time.time() - t0,
    )


def fit_map_file(
    data: str | Path, out: str | Path, count: int | None = None, options: MAPOptions = MAPOptions()
) -> MAPResult:
    """``rimlens fit-map``: MAP fits of the first ``count`` lenses (all if ``None``) of a lens file,
    in float64, written atomically to the HDF5 file ``out`` (``source``, ``kappa``, ``chi2_nu``,
    ``objective``; attributes: data, seconds, options)."""
    d = read_lenses(data, slice(0, count))
    grid = d["preset"].grid
    sim = LensSimulator(grid.image_grid, grid.source_grid, supersample=grid.supersample)
    r = fit_map(
        sim,
        torch.as_tensor(d["observation"]).double(),
        torch.as_tensor(d["psf"]).double(),
        torch.as_tensor(d["noise_sigma"]).double(),
        options=options,
    )
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        for k in ("source", "kappa", "chi2_nu", "objective"):
            f[k] = getattr(r, k).float().numpy()
        f.attrs.update(
            {
                "format": "rimlens-map-fits-1",
                "data": str(data),
                "seconds": r.seconds,
                "options": json.dumps(dataclasses.asdict(options)),
            }
        )
    return r


def _fit_one(simulator, observation, psf, sigma, mask, options: MAPOptions) -> dict:
    """Multi-start MAP of one lens (``1 x 1 x N x N``): the start with the lowest objective wins."""
    best = None
    for theta_e in options.starts_theta_e:
        fit = _fit_from(simulator, observation, psf, sigma, mask, options, theta_e)
        if best is None or bool(fit["objective"] < best["objective"]):
            best = fit
    assert best is not None  # MAPOptions has at least one start
    with torch.no_grad():
        model = simulator.forward(best["source"], best["kappa"], psf, check=False)
        best["chi2_nu"] = reduced_chi_squared(model, observation, sigma, mask)
    return best


def _fit_from(simulator, observation, psf, sigma, mask, options: MAPOptions, theta_e: float) -> dict:
    """L-BFGS from one start: an SIS of Einstein radius ``theta_e`` (arcsec) and a faint flat source."""
    m = simulator.source_grid.n_pixels
    eta = torch.log10(
        profiles.pixelate(
            profiles.sis_kappa,
            simulator.image_grid,
            2,
            observation.dtype,
            theta_e_arcsec=theta_e,
            center_x=1e-3,
            center_y=1e-3,
        )
    ).clone()
    u = torch.full((1, 1, m, m), -4.0, dtype=observation.dtype)
    eta.requires_grad_(True)
    u.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [u, eta],
        lr=1,
        max_iter=options.max_iterations,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
    )

    def objective():
        s = F.softplus(u)
        model = simulator.forward(s, 10**eta, psf, check=False)
        return (
            0.5 * chi_squared(model, observation, sigma, mask)
            + options.source_weight * _penalty(s, options.regularization)
            + options.kappa_weight * _penalty(eta, options.regularization)
        )

    def closure():
        opt.zero_grad()
        loss = objective().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return {"objective": objective(), "source": F.softplus(u).clone(), "kappa": (10**eta).clone()}
