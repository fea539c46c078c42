"""FITS observations in, products out: errors, masks, flux-conserving resampling, CLI exit codes."""

import json

import numpy as np
import pytest
import torch
from astropy.io import fits

from rimlens.errors import RimlensInputError
from rimlens.io.fits import pixel_scale_from_header, read_image, write_image
from rimlens.io.observation import Observation, load_observation, prepare_observation
from rimlens.physics import PixelGrid
from rimlens.physics.likelihood import reduced_chi_squared


def _write(path, data, header=None):
    h = fits.Header()
    for k, v in (header or {}).items():
        h[k] = v
    fits.PrimaryHDU(np.asarray(data), header=h).writeto(path)
    return path


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.normal(0, 0.01, (100, 100))
    img[45:55, 40:60] += 1.0
    psf = np.exp(-0.5 * (np.arange(9) - 4) ** 2 / 1.5**2)
    psf = psf[:, None] * psf[None, :]
    return {
        "image": _write(tmp_path / "img.fits", img, {"CDELT1": -0.1 / 3600, "CDELT2": 0.1 / 3600}),
        "psf": _write(tmp_path / "psf.fits", psf),
        "noise": _write(tmp_path / "noise.fits", np.full((100, 100), 0.01)),
        "tmp": tmp_path,
    }


def test_fits_round_trip_keeps_data_and_grid(tmp_path):
    data = np.random.default_rng(1).normal(size=(16, 16)).astype(np.float32)
    write_image(tmp_path / "a.fits", data, {"PIXSCALE": 0.12, "CD1_1": -0.12 / 3600, "CD2_1": 0.0})
    back, header = read_image(tmp_path / "a.fits")
    assert np.array_equal(back, data) and pixel_scale_from_header(header) == pytest.approx(0.12)


def test_pixel_scale_from_header_variants():
    assert pixel_scale_from_header({"CDELT1": -1e-5}) == pytest.approx(0.036)
    assert pixel_scale_from_header({"CDELT1": 50.0, "CUNIT1": "mas"}) == pytest.approx(0.05)
    assert pixel_scale_from_header({"CDELT1": 0.001, "CUNIT1": "arcmin"}) == pytest.approx(0.06)
    assert pixel_scale_from_header({"CD1_1": 0.0, "CD2_1": 0.04, "CUNIT1": "arcsec"}) == pytest.approx(0.04)
    assert pixel_scale_from_header({"PIXSCALE": 0.05}) == 0.05
    assert pixel_scale_from_header({}) is None
    with pytest.raises(RimlensInputError, match="CUNIT1"):
        pixel_scale_from_header({"CDELT1": 1.0, "CUNIT1": "furlong"})
    with pytest.raises(RimlensInputError, match="not a number"):
        pixel_scale_from_header({"PIXSCALE": "small"})


def test_bad_inputs_give_clear_errors(files, tmp_path):
    with pytest.raises(RimlensInputError, match="not found"):
        load_observation(tmp_path / "missing.fits", files["psf"], sigma=0.01)
    cube = _write(tmp_path / "cube.fits", np.zeros((3, 10, 10)))
    with pytest.raises(RimlensInputError, match="2-D"):
        load_observation(cube, files["psf"], sigma=0.01)
    nan = np.zeros((20, 20))
    nan[3, 3] = np.nan
    with pytest.raises(RimlensInputError, match="NaN"):
        load_observation(_write(tmp_path / "nan.fits", nan), files["psf"], sigma=0.01, pixel_scale_arcsec=0.1)
    with pytest.raises(RimlensInputError, match="larger than the image"):
        load_observation(
            _write(tmp_path / "small.fits", np.ones((7, 7))), files["psf"], sigma=0.01, pixel_scale_arcsec=0.1
        )
    with pytest.raises(RimlensInputError, match="differs from image shape"):
        load_observation(files["image"], files["psf"], noise_path=_write(tmp_path / "n2.fits", np.ones((50, 50))))
    with pytest.raises(RimlensInputError, match="exactly one"):
        load_observation(files["image"], files["psf"])
    with pytest.raises(RimlensInputError, match="sigma must be"):
        load_observation(files["image"], files["psf"], sigma=-1.0)
    (tmp_path / "junk.fits").write_bytes(b"SIMPLE = junk" * 10)
    with pytest.raises(RimlensInputError, match="not a readable FITS"):
        load_observation(tmp_path / "junk.fits", files["psf"], sigma=0.01)
    with pytest.raises(RimlensInputError, match="odd"):
        load_observation(files["image"], _write(tmp_path / "even.fits", np.ones((4, 4))), sigma=0.01)


def test_cli_errors_exit_2_without_traceback(files, tmp_path, capsys):
    from rimlens.cli import main

    cube = _write(tmp_path / "cube.fits", np.zeros((3, 10, 10)))
    for args in (
        [
            "reconstruct",
            str(tmp_path / "missing.fits"),
            "--psf",
            str(files["psf"]),
            "--sigma",
            "0.01",
            "--out",
            str(tmp_path / "o"),
        ],
        ["reconstruct", str(cube), "--psf", str(files["psf"]), "--sigma", "0.01", "--out", str(tmp_path / "o")],
        ["reconstruct", str(files["image"]), "--psf", str(files["psf"]), "--sigma", "0", "--out", str(tmp_path / "o")],
    ):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and "Traceback" not in err and err.count("\n") == 1


def test_resampling_conserves_flux_and_noise_is_propagated(files):
    obs = load_observation(files["image"], files["psf"], noise_path=files["noise"])
    assert obs.pixel_scale_arcsec == pytest.approx(0.1)
    grid = PixelGrid(32, 0.24)  # 7.68" inside the 10" image
    prep = prepare_observation(obs, grid)
    total_in = prep.observation.sum() / prep.flux_scale
    # exact: the model field covers input pixels 11.6 .. 88.4; the sum is conserved to 1e-6
    w = np.ones(100)
    w[:11], w[89:] = 0, 0
    w[11], w[88] = 0.4, 0.4
    expected = (w[:, None] * w[None, :] * obs.image).sum()
    assert float(total_in) == pytest.approx(expected, rel=1e-6)
    # the propagated sigma matches the scatter of resampled noise realisations (Monte Carlo)
    from rimlens.physics.resample import resample_flux

    noise = torch.as_tensor(np.random.default_rng(3).normal(0, 0.01, (4000, 1, 100, 100)))
    empirical = resample_flux(noise, 0.1, 32, 0.24).std(dim=0)[0]
    predicted = prep.noise_sigma[0, 0] / prep.flux_scale
    assert torch.allclose(predicted.double(), empirical, rtol=0.06)
    assert prep.psf.shape[-1] % 2 == 1 and float(prep.psf.sum()) == pytest.approx(1.0, abs=1e-6)


def test_masked_pixels_do_not_change_chi2(files, tmp_path):
    obs = load_observation(files["image"], files["psf"], noise_path=files["noise"])
    grid = PixelGrid(32, 0.24)
    mask = np.ones((100, 100), bool)
    mask[:30, :] = False
    a = prepare_observation(Observation(obs.image, obs.noise_sigma, obs.psf, 0.1, mask), grid)
    garbage = obs.image.copy()
    garbage[:30, :] = 1e4
    b = prepare_observation(Observation(garbage, obs.noise_sigma, obs.psf, 0.1, mask), grid)
    assert torch.equal(a.mask, b.mask) and not bool(a.mask.all())
    model = torch.zeros_like(a.observation)
    ca = reduced_chi_squared(model, a.observation, a.noise_sigma, a.mask)
    cb = reduced_chi_squared(model, b.observation * a.flux_scale / b.flux_scale, a.noise_sigma, b.mask)
    assert torch.allclose(ca, cb)
    noisy = obs.noise_sigma.copy()
    noisy[:30, :] = 1e8  # the noise-map convention for bad pixels
    c = prepare_observation(Observation(garbage, noisy, obs.psf, 0.1), grid)
    assert torch.equal(c.mask, a.mask)


def test_folder_mode_rejects_per_file_options(files, tmp_path):
    from rimlens.cli import main

    (tmp_path / "lenses").mkdir()
    assert (
        main(["reconstruct", str(tmp_path / "lenses"), "--psf", str(files["psf"]), "--out", str(tmp_path / "o")]) == 2
    )


@pytest.mark.slow
def test_folder_of_lenses_sharded_and_resumable(tmp_path):
    import os
    import subprocess
    import sys

    from rimlens.config import get_preset, with_train_settings
    from rimlens.train import Trainer

    p = get_preset("tiny")
    Trainer(with_train_settings(p, {"max_steps": 1, "val_size": 4}), tmp_path / "run", progress=False).train()
    rng = np.random.default_rng(0)
    psf = np.exp(-0.5 * (np.arange(7) - 3) ** 2)
    for i in range(3):
        d = tmp_path / "lenses" / f"lens{i}"
        d.mkdir(parents=True)
        img = rng.normal(0, 0.01, (90, 90))
        img[40:50, 30:60] += 1
        _write(d / "image.fits", img)
        _write(d / "psf.fits", psf[:, None] * psf[None])
        _write(d / "noise_map.fits", np.full((90, 90), 0.01))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29529",
        "-m",
        "rimlens.cli",
        "reconstruct",
        str(tmp_path / "lenses"),
        "--pixel-scale",
        "0.1",
        "--model",
        str(tmp_path / "run"),
        "--out",
        str(tmp_path / "out"),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert len(table) == 4 and all(row.split(",")[1] for row in table[1:])
    first = json.loads((tmp_path / "out" / "lens0" / "summary.json").read_text())
    # single process equals the sharded run; a finished lens is not redone
    from rimlens.cli import main

    stamp = (tmp_path / "out" / "lens1" / "summary.json").stat().st_mtime_ns
    (tmp_path / "out" / "lens0" / "summary.json").unlink()
    assert (
        main(
            [
                "reconstruct",
                str(tmp_path / "lenses"),
                "--pixel-scale",
                "0.1",
                "--model",
                str(tmp_path / "run"),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    again = json.loads((tmp_path / "out" / "lens0" / "summary.json").read_text())
    assert again["chi2_nu"] == pytest.approx(first["chi2_nu"], rel=1e-5)
    assert (tmp_path / "out" / "lens1" / "summary.json").stat().st_mtime_ns == stamp
