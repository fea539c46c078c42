"""Does the model measure the log-slope on its own population? Per kappa family, on rimlens's own
held-out lenses (test split), the medians of the RIM's Einstein-radius, slope and kappa errors
(:func:`rimlens.train.peer.peer_figures`, known centre), beside the trivial "isothermal" guess.

    OMP_NUM_THREADS=2 python benchmarks/slope_by_family.py [--model M ...] [--preset cpu64] [--count 96]

If the slope error on the model's *own* power-law lenses is no better than guessing gamma = 2, the
model has not learnt slopes (a training matter); if it is much better there than on a peer
simulator's lenses, the gap is the population (a domain matter).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from common import write_peer_file
from rimlens.config import get_preset
from rimlens.data.lenses import LensGenerator
from rimlens.data.random import child_rng
from rimlens.io.checkpoint import load_model
from rimlens.train.peer import PeerValidationSet, load_peer_validation, peer_figures


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", default=["default"])
    ap.add_argument("--preset", default="cpu64", help="the population drawn (its test split)")
    ap.add_argument("--count", type=int, default=96)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args(argv)
    preset = get_preset(args.preset)
    lenses = LensGenerator(preset, split="test", bank_seed=0).draw(child_rng(args.seed, args.seed), args.count)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "own.npz"
        write_peer_file(lenses, preset, path)
        for name in args.model:
            model = load_model(name)
            every = load_peer_validation(path, model.grid.image_grid)
            print(f"model {name}: {len(lenses)} lenses of the {args.preset} population (test split, seed {args.seed})")
            print(
                "| family | lenses | theta_E error | slope error | slope error of gamma = 2 | kappa error 0.5-2 theta_E |"
            )
            print("|---|---|---|---|---|---|")
            for family in ["all", *sorted(set(lenses.kappa_family))]:
                idx = np.arange(len(lenses)) if family == "all" else np.where(lenses.kappa_family == family)[0]
                sub = PeerValidationSet(
                    every.observation[idx],
                    every.noise_sigma[idx],
                    every.mask[idx],
                    every.psf[idx],
                    every.kappa[idx],
                    every.grid,
                    every.theta_e[idx],
                    every.gamma[idx],
                )
                f = peer_figures(model, sub)
                guess = float(np.nanmedian(np.abs(sub.gamma - 2.0)))
                print(
                    f"| {family} | {len(idx)} | {f['peer_theta_err']:.2%} | {f['peer_gamma_err']:.3f} | {guess:.3f} "
                    f"| {f['peer_kappa_err']:.1%} |"
                )


if __name__ == "__main__":
    main()
