"""Write a peer validation set (:mod:`rimlens.train.peer`) from lenstronomy-made lenses, for
checkpoint selection in training (``--set peer_validation=FILE``).

    python benchmarks/lenstronomy_lenses.py --count 64 --seed 77 --cutout mixed --shear-max 0.1 --out LV
    python benchmarks/peer_validation.py LV --preset cpu64 --out peer_val_cpu64.npz
    rimlens train --preset cpu64 --out RUN --set peer_validation=peer_val_cpu64.npz ...

Each lens is brought onto the preset's model grid exactly as ``rimlens reconstruct`` does
(:func:`rimlens.io.observation.prepare_observation` centred on the *true* lens centre, then
:func:`rimlens.inference.quality.rim_input`), and its true convergence is recomputed as exact pixel
means on that grid (:func:`lenstronomy_lenses.truth_kappa`). Use a seed that the README's evaluation
sets do not use (they use 41 and 31): a set that selects checkpoints cannot also judge them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from lenstronomy_lenses import PIXEL_SCALE, load_truth, truth_kappa
from rimlens.config import get_preset
from rimlens.inference.quality import rim_input
from rimlens.io.atomic import atomic_path
from rimlens.io.observation import load_observation, prepare_observation
from rimlens.physics import PixelGrid


def prepare_lens(folder: Path, grid: PixelGrid) -> dict:
    """The arrays of one lens folder on ``grid`` (see :mod:`rimlens.train.peer`)."""
    arrays, params = load_truth(folder)
    if float(np.max(arrays["lens_light_image"])) > 0:
        raise SystemExit(f"{folder}: has lens light; a peer validation set holds lens-subtracted data only")
    obs = load_observation(
        folder / "image.fits", folder / "psf.fits", folder / "noise_map.fits", pixel_scale_arcsec=PIXEL_SCALE
    )
    center = tuple(float(c) for c in params["center"])
    prep = prepare_observation(obs, grid, center)
    data, sigma, _ = rim_input(prep.observation, prep)
    return {
        "observation": data[0].float().numpy(),
        "noise_sigma": sigma[0].float().numpy(),
        "mask": prep.mask[0].numpy(),
        "psf": prep.psf[0].float().numpy(),
        "kappa": truth_kappa(params, grid, center)[None].astype(np.float32),
    }


def _pad_psf(kernel: np.ndarray, size: int) -> np.ndarray:
    p = (size - kernel.shape[-1]) // 2
    return np.pad(kernel, ((0, 0), (p, p), (p, p)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lenses", type=Path, help="folder written by lenstronomy_lenses.py")
    ap.add_argument("--preset", default="cpu64")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    g = get_preset(args.preset).grid
    grid = PixelGrid(g.image_pixels, g.image_fov_arcsec / g.image_pixels)
    folders = sorted(p for p in args.lenses.iterdir() if (p / "truth.npz").exists())
    if not folders:
        raise SystemExit(f"no lens folders (with truth.npz) in {args.lenses}")
    lenses = [prepare_lens(f, grid) for f in folders]
    size = max(lens["psf"].shape[-1] for lens in lenses)
    out = {k: np.stack([lens[k] for lens in lenses]) for k in ("observation", "noise_sigma", "mask", "kappa")}
    out["psf"] = np.stack([_pad_psf(lens["psf"], size) for lens in lenses])
    with atomic_path(args.out) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **out, image_pixels=g.image_pixels, image_fov_arcsec=g.image_fov_arcsec)
    print(f"{args.out}: {len(lenses)} lenses on the {args.preset} grid", file=sys.stderr)


if __name__ == "__main__":
    main()
