"""Batched reconstructions with a trained RIM."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from rimlens.config import Preset, preset_from_json
from rimlens.data.storage import open_lens_file
from rimlens.distributed import collective_failure
from rimlens.errors import RimlensInputError, check_noise_sigma
from rimlens.inference.finetune import fit_simulator
from rimlens.inference.sharding import run_chunks
from rimlens.io.atomic import atomic_path
from rimlens.io.checkpoint import load_model
from rimlens.nn.rim import RIM
from rimlens.physics import PSF
from rimlens.physics.likelihood import degrees_of_freedom, reduced_chi_squared

__all__ = ["BatchReconstruction", "check_grids", "predict_file", "reconstruct"]


@dataclass
class BatchReconstruction:
    """Reconstructions of a batch: maps ``B x 1 x N x N`` (``source`` >= 0), ``chi2_nu`` ``(B,)`` of
    the reported maps and ``chi2_nu_steps`` ``T-1 x B`` along the RIM's steps; ``shear`` ``B x 2`` the
    external shear (zeros for a model without the shear term)."""

    source: torch.Tensor
    kappa: torch.Tensor
    log10_kappa: torch.Tensor
    model_image: torch.Tensor
    chi2_nu: torch.Tensor
    chi2_nu_steps: torch.Tensor
    shear: torch.Tensor

    def arrays(self) -> dict[str, np.ndarray]:
        """The fields as float32 numpy arrays, by name."""
        return {
            f.name: getattr(self, f.name).detach().cpu().numpy().astype(np.float32) for f in dataclasses.fields(self)
        }


@torch.no_grad()
def reconstruct(
    model: RIM,
    observation: torch.Tensor,
    psf,
    noise_sigma,
    mask=None,
    batch_size: int = 32,
    supersample: int | None = None,
) -> BatchReconstruction:
    """Reconstruct a batch of lenses.

    Args:
        model: a :class:`rimlens.inference.RIM` (eval mode).
        observation: ``B x 1 x N x N``; psf: kernels ``B x 1 x K x K`` (or one for all);
        noise_sigma: ``(B,)`` or noise maps ``B x 1 x N x N``.
        supersample: rays per pixel side of the forward model of the reported model images and chi2
            (:func:`rimlens.inference.finetune.fit_simulator`): that of the data (a lens file's
            preset), so that the true maps would fit; ``None``: the model's own.

    Returns:
        the maps, their chi2_nu and the chi2_nu along the steps (:class:`BatchReconstruction`).
    """
    sim = fit_simulator(model, supersample)
    sim._check_image(observation, "observation")
    out: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("source", "kappa", "log10_kappa", "model_image", "chi2_nu", "chi2_nu_steps", "shear")
    }
    sigma_all = check_noise_sigma(noise_sigma, observation.shape[0], tuple(observation.shape[-2:]), like=observation)
    kernels = psf.kernel if isinstance(psf, PSF) else torch.as_tensor(psf)
    for i in range(0, observation.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        obs = observation[sl]
        sig = sigma_all[sl] if sigma_all.shape[0] > 1 else sigma_all
        k = kernels[sl] if kernels.ndim == 4 and kernels.shape[0] > 1 else kernels
        p = PSF.from_kernel(k)
        m = None if mask is None else (mask[sl] if mask.shape[0] > 1 else mask)
        r = model(obs, p, sig, mask=m)
        src, eta, shear = r.final_source, r.log10_kappa[-1], r.final_shear
        img = sim.forward(src, 10**eta, p, shear=shear, check=False)
        out["shear"].append(src.new_zeros(src.shape[0], 2) if shear is None else shear)
        out["source"].append(src)
        out["log10_kappa"].append(eta)
        out["kappa"].append(10**eta)
        out["model_image"].append(img)
        out["chi2_nu"].append(reduced_chi_squared(img, obs, sig, m))
        out["chi2_nu_steps"].append(r.chi2 / degrees_of_freedom(sig, obs.shape, m).clamp_min(1))
    return BatchReconstruction(**{k: torch.cat(v, dim=1 if k == "chi2_nu_steps" else 0) for k, v in out.items()})


def check_grids(attrs, preset: Preset, data_path) -> None:
    """Refuse a data file whose image or source grid differs from the model's."""
    for key, grid in (("image_grid", preset.grid.image_grid), ("source_grid", preset.grid.source_grid)):
        g = json.loads(attrs[key])
        if (
            g["n_pixels"] != grid.n_pixels
            or abs(g["pixel_scale_arcsec"] - grid.pixel_scale_arcsec) > 1e-9 * grid.pixel_scale_arcsec
        ):
            raise RimlensInputError(
                f'{data_path}: its {key.replace("_", " ")} ({g["n_pixels"]} px of {g["pixel_scale_arcsec"]:.5g}") '
                f"differs from the model's ({grid.n_pixels} px of {grid.pixel_scale_arcsec:.5g}\")"
            )


def predict_file(model_path, data_path, out_path, batch_size: int = 32, progress: bool = True) -> Path:
    """Reconstruct every lens of a rimlens lens file into one HDF5 file.

    Work is split in chunks of ``batch_size`` lenses, each written atomically to ``OUT.parts/`` as
    soon as it is done, so a killed run resumes without redoing finished chunks. Under
    ``torchrun`` (torch.distributed initialised) rank ``r`` of ``W`` takes chunks ``c = r mod W``;
    rank 0 gathers the chunks into ``OUT`` (atomically) once every rank is done
    (:func:`rimlens.inference.sharding.run_chunks`).
    """
    model = load_model(model_path)
    preset, model_file = model.preset, model.checkpoint_path
    assert preset is not None and model_file is not None  # set by load_model
    out_path = Path(out_path)
    parts = out_path.with_name(out_path.name + ".parts")
    with open_lens_file(data_path) as h5:
        n = int(h5.attrs["count"])
        check_grids(h5.attrs, preset, data_path)
        settings = {
            "model": str(model_file.resolve()),
            "model_bytes": model_file.stat().st_size,
            "model_mtime_ns": model_file.stat().st_mtime_ns,
            "data": str(Path(data_path).resolve()),
            "count": n,
            "seed": int(h5.attrs["seed"]),
            "batch_size": batch_size,
        }
        # chi2 with the forward model the data were made with (pixel integration), not the model's own
        data_supersample = preset_from_json(h5.attrs["preset"]).grid.supersample
        settings["chi2_supersample"] = data_supersample

        def compute(start, stop):
            sl = slice(start, stop)
            r = reconstruct(
                model,
                torch.as_tensor(h5["observation"][sl]),
                torch.as_tensor(h5["psf"][sl]),
                torch.as_tensor(h5["noise_sigma"][sl]),
                batch_size=batch_size,
                supersample=data_supersample,
            )
            return r.arrays()

        results = run_chunks(n, batch_size, parts, settings, compute, "reconstruction run", progress, "reconstructing")
    with collective_failure("prediction"):  # a failure while rank 0 writes must not leave the others waiting
        if results is not None:  # rank 0
            _write_reconstructions(out_path, results, model_file, data_path, preset, n)
            shutil.rmtree(parts)
    return out_path


def _write_reconstructions(
    out_path: Path, results: list[dict], model_file: Path, data_path, preset: Preset, n: int
) -> None:
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as f:
        for k in results[0]:
            a = np.concatenate([r[k] for r in results], axis=1 if k == "chi2_nu_steps" else 0)
            f.create_dataset(k, data=a, compression="gzip" if a.ndim > 2 else None)
        f.attrs.update(
            {
                "format": "rimlens-reconstructions-1",
                "model": str(model_file),
                "data": str(data_path),
                "preset": preset.to_json(),
                "count": n,
                "image_grid": json.dumps(preset.grid.image_grid.as_dict()),
                "source_grid": json.dumps(preset.grid.source_grid.as_dict()),
            }
        )
