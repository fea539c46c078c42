"""Quality flags: chi2_nu over the arcs, the centre and padding used, and a one-line warning naming
the likely causes of a poor fit."""

import json

import numpy as np
import pytest

from rimlens.cli import main
from rimlens.inference.pipeline import reconstruct_prepared
from rimlens.inference.quality import POOR_CHI2_NU, assess
from rimlens.io.checkpoint import load_model
from rimlens.io.fits import write_image
from rimlens.io.observation import prepare_observation
from test_cutouts import _lens


def test_lens_light_left_in_the_data_is_named(tmp_path, capsys):
    obs = _lens(96, (0.3, -0.2), light=50.0)  # a 4.8" HST-like cut-out, lens light present, off-centre
    for name, data in (("image", obs.image), ("psf", obs.psf), ("noise", obs.noise_sigma)):
        write_image(tmp_path / f"{name}.fits", data, {"PIXSCALE": 0.05})
    files = [str(tmp_path / "image.fits"), "--psf", str(tmp_path / "psf.fits"), "--noise", str(tmp_path / "noise.fits")]
    code = main(["reconstruct", *files, "--lens-light", "none", "--out", str(tmp_path / "out")])
    assert code == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: poor fit")]
    assert len(warnings) == 1 and "lens light left in the data" in warnings[0]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["quality"]["poor"] and s["quality"]["chi2_nu"] > POOR_CHI2_NU
    assert s["quality"]["chi2_nu_arcs"] is not None and s["quality"]["arc_pixels"] > 0
    assert s["center_method"] == "light" and np.hypot(s["center_arcsec"][0] - 0.3, s["center_arcsec"][1] + 0.2) < 0.12
    assert 0.5 < s["padded_fraction"] < 0.7  # the 4.8" cut-out was padded to the 7.68" field
    for product in ("coolest.json", "lenstronomy_interpol.npz", "kappa.fits", "source.fits"):
        assert (tmp_path / "out" / product).exists(), product
    assert s["input"]["pixel_scale_from"] == "header" and s["warnings"] == [warnings[0][len("warning: ") :]]


def test_a_good_fit_is_not_flagged():
    model = load_model("default")
    obs = _lens(160, (0.0, 0.0), light=0.0)
    obs.noise_sigma = obs.noise_sigma * 10  # SNR ~10: the shipped 64-px model fits to the noise
    obs.image = obs.image + np.random.default_rng(1).normal(0, 0.09, obs.image.shape)
    prep = prepare_observation(obs, model.grid.image_grid, None)
    rec = reconstruct_prepared(model, prep)
    q = assess(model, prep, rec.model_image, rec.model_image, rec.chi2_nu, obs)
    assert not q.poor and q.warning() is None and not q.causes, q


def test_lens_light_is_modelled_by_default(tmp_path, capsys):
    """The same lens with the default --lens-light auto: the light is modelled (an MGE), the fit is
    far better, and lens_light.fits / lens_subtracted.fits are written."""
    obs = _lens(96, (0.3, -0.2), light=50.0)
    for name, data in (("image", obs.image), ("psf", obs.psf), ("noise", obs.noise_sigma)):
        write_image(tmp_path / f"{name}.fits", data, {"PIXSCALE": 0.05})
    files = [str(tmp_path / "image.fits"), "--psf", str(tmp_path / "psf.fits"), "--noise", str(tmp_path / "noise.fits")]
    assert main(["reconstruct", *files, "--lens-light", "none", "--out", str(tmp_path / "none")]) == 0
    assert main(["reconstruct", *files, "--out", str(tmp_path / "auto")]) == 0
    none = json.loads((tmp_path / "none" / "summary.json").read_text())
    auto = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert auto["lens_light"] != "none" and none["lens_light"] == "none"
    assert auto["chi2_nu"] < 0.05 * none["chi2_nu"], (auto["chi2_nu"], none["chi2_nu"])
    assert not any("lens light" in c for c in auto["quality"]["causes"])
    light = auto["lens_light"]
    assert np.hypot(light["center_arcsec"][0] - 0.3, light["center_arcsec"][1] + 0.2) < 0.05
    assert light["axis_ratio"] == pytest.approx(0.8, abs=0.05) and min(light["amplitudes"]) >= 0
    for product in ("lens_light.fits", "lens_subtracted.fits"):
        assert (tmp_path / "auto" / product).exists()


def test_a_shear_model_reports_its_shear_everywhere(tmp_path):
    """With a RIM that estimates an external shear, the model image, the deflection, summary.json's
    figures and both exports carry it (an untrained tiny model: the plumbing, not the accuracy)."""
    import dataclasses

    import torch

    from rimlens.config import get_preset
    from rimlens.inference.finetune import fit_simulator
    from rimlens.inference.pipeline import FIT_SUPERSAMPLE, export
    from rimlens.io.export import read_lenstronomy
    from rimlens.nn.rim import RIM
    from rimlens.physics import PSF
    from rimlens.physics.profiles import shear_deflection

    base = get_preset("tiny")
    preset = dataclasses.replace(base, model=dataclasses.replace(base.model, external_shear=True))
    torch.manual_seed(0)
    model = RIM.from_preset(preset).eval()
    with torch.no_grad():  # a visible shear output: bias of the shear channels of the output layer
        model.unet.output.bias[2:] = torch.tensor([0.01, -0.005])
    obs = _lens(96, (0.0, 0.0))
    prep = prepare_observation(obs, model.grid.image_grid, None)
    rec = reconstruct_prepared(model, prep, lens_light="none")
    assert rec.shear is not None and rec.shear.shape == (1, 2) and rec.shear.abs().min() > 1e-3
    # the model image is the fit's forward model: integrated over pixels (FIT_SUPERSAMPLE), whatever the RIM's
    assert rec.fit_supersample == FIT_SUPERSAMPLE and rec.summary()["fit_supersample"] == FIT_SUPERSAMPLE
    sim = fit_simulator(model, FIT_SUPERSAMPLE)
    assert sim.supersample == FIT_SUPERSAMPLE
    expected = sim.forward(rec.source, rec.kappa, PSF.from_kernel(prep.psf), shear=rec.shear, check=False)
    torch.testing.assert_close(rec.model_image, expected)
    x, y = sim.image_grid.coordinates(rec.alpha.dtype)
    ax, ay = shear_deflection(x, y, float(rec.shear[0, 0]), float(rec.shear[0, 1]))
    torch.testing.assert_close(rec.alpha - sim.deflection(rec.kappa), torch.stack([ax, ay])[None])
    s = rec.summary()["external_shear"]
    assert s["gamma1"] == pytest.approx(float(rec.shear[0, 0])) and s["magnitude"] > 0
    export(tmp_path, model, prep, rec)
    models, kwargs = read_lenstronomy(tmp_path / "lenstronomy_interpol.npz")
    assert models == ["INTERPOL", "SHEAR"] and kwargs[1]["gamma2"] == pytest.approx(float(rec.shear[0, 1]))
    coolest = json.loads((tmp_path / "coolest.json").read_text())
    assert "ExternalShear" in json.dumps(coolest)


def test_pure_noise_resampled_onto_the_model_grid_judges_no_annulus():
    """The annuli's yardstick: noise drawn on a 0.05" cut-out and resampled onto the 0.12" model grid (its
    neighbouring pixels share detector pixels) gives chi2_nu within UNEVEN_SIGMAS sqrt(2 / pixels) of 1 in
    every annulus; the same residuals scaled by 0.6 (a fit into the noise) or by 1.6 (structure missed)
    inside 1-2" are judged so, and together they make the overall chi2_nu an uneven average."""
    import torch

    from rimlens.inference.quality import Quality, chi2_by_radius
    from rimlens.io.observation import Observation

    grid = load_model("default").grid.image_grid
    rng = np.random.default_rng(7)
    h = 160
    yy, xx = np.indices((h, h))
    blob = 100 * np.exp(-((xx - (h - 1) / 2) ** 2 + (yy - (h - 1) / 2) ** 2) / 50.0)
    sigma = np.full((h, h), 0.3) + 0.01 * blob  # a light-like Poisson term
    psf = np.zeros((5, 5))
    psf[2, 2] = 1.0
    clean = prepare_observation(Observation(blob, sigma, psf, 0.05), grid, (0.0, 0.0))
    noisy = prepare_observation(Observation(blob + rng.normal(size=(h, h)) * sigma, sigma, psf, 0.05), grid, (0.0, 0.0))
    resid = ((noisy.observation - clean.observation) / clean.noise_sigma)[0, 0].double()
    used = clean.mask[0, 0]
    x, y = grid.coordinates(torch.float64)
    annuli = chi2_by_radius(resid, used, x, y)
    assert len(annuli) >= 7 and sum(a["pixels"] for a in annuli) == int(used.sum())
    assert all(a["judged"] == "" for a in annuli), annuli
    r = torch.hypot(x, y)
    fitted = torch.where((r >= 1.0) & (r < 2.0), 0.6 * resid, resid)
    assert [a["judged"] for a in chi2_by_radius(fitted, used, x, y)][2:4] == ["noise fitted"] * 2
    q = Quality(1.0, None, 0, 0.0, 0.0, chi2_nu_by_radius=chi2_by_radius(fitted, used, x, y))
    assert not q.uneven and q.warning() is None  # fitted into the noise, but nothing missed
    both = torch.where(r < 0.5, 1.6 * resid, fitted)
    q = Quality(1.0, None, 0, 0.0, 0.0, chi2_nu_by_radius=chi2_by_radius(both, used, x, y))
    assert q.uneven and q.missed[0]["r_in"] == 0.0
    warning = q.warning()
    assert warning is not None and "fitted into the noise (1" in warning and 'misses (0-0.5" chi2_nu' in warning
