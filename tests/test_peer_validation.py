"""Peer validation sets (rimlens.train.peer): the file format, the figures, and checkpoint selection on them."""

import csv
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rimlens.config import get_preset, with_train_settings
from rimlens.data.lenses import LensGenerator
from rimlens.data.random import child_rng
from rimlens.errors import RimlensInputError
from rimlens.physics import PixelGrid
from rimlens.train.engine import Trainer
from rimlens.train.peer import load_peer_validation, peer_figures


def _write_peer_file(path, n=4, preset="tiny", **override):
    """A peer-format file; the lenses come from rimlens's own generator here (the format is what is
    tested: the real sets are made by benchmarks/peer_validation.py from lenstronomy's lenses)."""
    p = get_preset(preset)
    lenses = LensGenerator(p, split="test", bank_seed=0).draw(child_rng(5, 5), n)
    npix = p.grid.image_pixels
    arrays = {
        "observation": lenses.observation.numpy(),
        "noise_sigma": lenses.noise_sigma.reshape(-1, 1, 1, 1).expand(-1, 1, npix, npix).numpy(),
        "mask": np.ones((n, 1, npix, npix), dtype=bool),
        "psf": lenses.psf.numpy(),
        "kappa": lenses.kappa.numpy(),
        "image_pixels": npix,
        "image_fov_arcsec": p.grid.image_fov_arcsec,
    }
    arrays.update(override)
    np.savez(path, **arrays)
    return path, lenses


class _Oracle(torch.nn.Module):
    """Returns a fixed convergence (the truth times ``factor``), whatever the data."""

    def __init__(self, kappa, factor):
        super().__init__()
        self.kappa, self.factor = kappa, factor
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, observation, psf, sigma, mask=None):
        b = observation.shape[0]
        out = self.kappa[self.calls : self.calls + b] * self.factor
        self.calls += b
        return SimpleNamespace(final_kappa=out)


def test_figures_are_zero_for_the_truth_and_measure_a_scaled_map(tmp_path):
    path, lenses = _write_peer_file(tmp_path / "peer.npz")
    grid = PixelGrid(32, 7.68 / 32)
    peer = load_peer_validation(path, grid)
    assert len(peer) == 4 and np.all(peer.theta_e > 0)
    exact = peer_figures(_Oracle(lenses.kappa, 1.0), peer, chunk=3)
    assert exact["peer_theta_err"] == pytest.approx(0, abs=1e-9)
    assert exact["peer_gamma_err"] == pytest.approx(0, abs=1e-9)
    assert exact["peer_kappa_err"] == pytest.approx(0, abs=1e-7)  # float32 maps
    # kappa x 1.1: every pixel 10% off, the slope unchanged, the Einstein radius larger
    scaled = peer_figures(_Oracle(lenses.kappa, 1.1), peer)
    assert scaled["peer_kappa_err"] == pytest.approx(0.1, rel=1e-5)
    assert scaled["peer_gamma_err"] == pytest.approx(0, abs=1e-6)
    assert scaled["peer_theta_err"] > 0.02
    assert scaled["peer_score"] == pytest.approx(sum(v for k, v in scaled.items() if k != "peer_score"))


def test_bad_peer_files_are_refused(tmp_path):
    grid = PixelGrid(32, 7.68 / 32)
    with pytest.raises(RimlensInputError, match="no such file"):
        load_peer_validation(tmp_path / "missing.npz", grid)
    path, _ = _write_peer_file(tmp_path / "peer.npz")
    with pytest.raises(RimlensInputError, match="32-pixel"):
        load_peer_validation(path, PixelGrid(64, 0.12))
    bad = np.ones((4, 1, 32, 32), dtype=np.float32)
    bad[1, 0, 3, 3] = np.nan
    path, _ = _write_peer_file(tmp_path / "nan.npz", observation=bad)
    with pytest.raises(RimlensInputError, match="observation contains NaN"):
        load_peer_validation(path, grid)
    np.savez(tmp_path / "partial.npz", observation=bad)
    with pytest.raises(RimlensInputError, match="not a peer validation set"):
        load_peer_validation(tmp_path / "partial.npz", grid)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(RimlensInputError, match="not a readable"):
        load_peer_validation(tmp_path / "junk.npz", grid)


def test_training_selects_checkpoints_on_the_peer_set(tmp_path):
    path, _ = _write_peer_file(tmp_path / "peer.npz")
    preset = with_train_settings(
        get_preset("tiny"),
        {"max_steps": 6, "val_every": 2, "val_size": 2, "checkpoint_every": 100, "peer_validation": str(path)},
    )
    t = Trainer(preset, tmp_path / "run", progress=False)
    assert t.selection_metric == "peer_score"
    t.train()
    with open(tmp_path / "run" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    scores = [float(r["peer_score"]) for r in rows]
    assert len(scores) == 3
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["best_val"] == pytest.approx(min(scores))  # selected on the peer score, not on val_loss
    assert best["step"] == int(rows[int(np.argmin(scores))]["step"])
    # a missing file is refused when the run starts, not at its first evaluation
    missing = dataclasses.replace(preset, train=dataclasses.replace(preset.train, peer_validation="nope.npz"))
    with pytest.raises(RimlensInputError, match="no such file"):
        Trainer(missing, tmp_path / "run2", progress=False)
