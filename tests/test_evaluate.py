"""Figures of merit, the MAP baseline and the evaluate report."""

import json

import numpy as np
import torch

from rimlens.config import get_preset, with_train_settings
from rimlens.data.lenses import LensGenerator
from rimlens.evaluate.metrics import chi2_nu_distribution, coherence_spectrum, lens_losses
from rimlens.inference.map_fit import MAPOptions, fit_map
from rimlens.physics import LensSimulator


def test_coherence_identity_noise_and_phase():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 32, 32, generator=g, dtype=torch.float64)
    _f, same = coherence_spectrum(x, x)
    assert np.allclose(same[:, ~np.isnan(same[0])], 1.0)
    _, indep = coherence_spectrum(x, torch.randn(4, 1, 32, 32, generator=g, dtype=torch.float64))
    assert np.nanmean(indep) < 0.35
    # same power, scrambled phases: the phase-sensitive coherence is low
    X = torch.fft.fft2(x[:, 0])
    scrambled = torch.fft.ifft2(
        X.abs() * torch.exp(1j * torch.rand(X.shape, generator=g, dtype=torch.float64) * 6.283)
    ).real[:, None]
    _, sc = coherence_spectrum(x, scrambled)
    assert np.nanmean(sc[:, 3:]) < 0.5


def test_chi2_distribution_is_normalised():
    xs = np.linspace(0.8, 1.2, 4001)
    assert abs(np.trapezoid(chi2_nu_distribution(1024, xs), xs) - 1) < 1e-3


def test_loss_is_zero_for_truth():
    s = torch.rand(2, 1, 8, 8)
    k = torch.rand(2, 1, 8, 8) + 0.1
    assert np.allclose(lens_losses(s, k, s, k), 0)


def test_map_fit_lowers_chi2_from_start():
    p = get_preset("tiny")
    b = LensGenerator(p, split="test").draw(np.random.default_rng(2), 2)
    sim = LensSimulator(p.grid.image_grid, p.grid.source_grid)
    from rimlens.physics import PSF, profiles
    from rimlens.physics.likelihood import reduced_chi_squared

    long = fit_map(
        sim, b.observation.double(), b.psf.double(), b.noise_sigma.double(), options=MAPOptions(max_iterations=150)
    )
    # chi2 of the starting point (SIS theta_E = 1.5", faint flat source) and of the truth
    start_k = profiles.pixelate(
        profiles.sis_kappa, p.grid.image_grid, 2, torch.float64, theta_e_arcsec=1.5, center_x=1e-3, center_y=1e-3
    ).expand(2, 1, -1, -1)
    start_s = torch.nn.functional.softplus(torch.full((2, 1, 32, 32), -4.0, dtype=torch.float64))
    psf = PSF.from_kernel(b.psf.double())
    sig = b.noise_sigma.double().reshape(-1, 1, 1, 1)
    start = reduced_chi_squared(sim.forward(start_s, start_k, psf), b.observation.double(), sig)
    assert torch.all(long.chi2_nu < 0.2 * start)
    # (its log10 kappa error need not fall: a pixelated kappa with only a smoothness prior is
    # ill-constrained -- on this pair it ends further from the truth than the SIS start)
    assert torch.all(long.source >= 0) and torch.all(long.kappa > 0)


def test_evaluate_report(tmp_path):
    from rimlens.cli import main
    from rimlens.data.storage import generate_dataset
    from rimlens.train import Trainer

    preset = get_preset("tiny")
    Trainer(with_train_settings(preset, {"max_steps": 2, "val_size": 4}), tmp_path / "run", progress=False).train()
    data = generate_dataset(
        tmp_path / "t.h5", preset, 8, seed=1, split="test", noise="high", block_size=8, progress=False
    )
    assert main(["evaluate", str(tmp_path / "run"), str(data), "--out", str(tmp_path / "ev"), "--map", "2"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["rim"]["lenses"] == 8 and m["map"]["lenses"] == 2
    for f in ("report.md", "chi2.png", "coherence.png", "gallery.png"):
        assert (tmp_path / "ev" / f).exists()


def test_evaluate_reports_the_external_shear(tmp_path):
    """A model with the shear term on a set with external shear: the report gives its median shear
    error beside guessing no shear (the median |gamma| of the set)."""
    import dataclasses

    from rimlens.cli import main
    from rimlens.data.storage import generate_dataset, read_lenses
    from rimlens.train import Trainer

    base = get_preset("tiny")
    preset = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, external_shear=True),
        data=dataclasses.replace(base.data, shear_max=0.1),
    )
    Trainer(with_train_settings(preset, {"max_steps": 2, "val_size": 4}), tmp_path / "run", progress=False).train()
    data = generate_dataset(
        tmp_path / "t.h5", preset, 8, seed=1, split="test", noise="high", block_size=8, progress=False
    )
    assert main(["evaluate", str(tmp_path / "run"), str(data), "--out", str(tmp_path / "ev")]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    truth = np.linalg.norm(read_lenses(data)["shear"], axis=-1)
    assert truth.max() > 0.01
    assert np.isclose(m["rim"]["no_shear_baseline_error_median"], np.median(truth), rtol=1e-5)
    assert np.isfinite(m["rim"]["shear_error_median"])
    assert "external-shear error" in (tmp_path / "ev" / "report.md").read_text()
