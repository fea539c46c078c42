import subprocess
import sys

from rimlens.cli import main


def test_demo_reconstructs_real_and_simulated_lens_with_shipped_model(tmp_path):
    import json

    assert main(["demo", "--out", str(tmp_path)]) == 0
    for case in ("slacs2303", "simulated"):
        summary = json.loads((tmp_path / case / "summary.json").read_text())
        assert summary["chi2_nu"] > 0 and summary["model"].endswith("model.pt")
        for name in ("source.fits", "kappa.fits", "deflection_x.fits", "model_image.fits", "residuals.fits"):
            assert (tmp_path / case / name).exists()
        assert (tmp_path / case / "reconstruction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the real lens's Einstein radius against the published SIE value, 1.62" (Bolton et al. 2008)
    slacs = json.loads((tmp_path / "slacs2303" / "summary.json").read_text())["lens_mass"]
    assert abs(slacs["einstein_radius_arcsec"] / 1.62 - 1) < 0.03 and 1.7 < slacs["log_slope"] < 2.3, slacs
    sim = json.loads((tmp_path / "simulated" / "summary.json").read_text())
    # the shipped model must explain most of the lensed light and beat a flat kappa guess
    assert sim["chi2_nu"] < 10
    assert sim["log10_kappa_mse"] < 0.1 and sim["source_mse"] < 0.01


def test_usage_error_exit_code_2(capsys):
    assert main(["demo", "--seed", "notanint"]) == 2
    assert main(["no-such-command"]) == 2


def test_console_script_no_traceback():
    r = subprocess.run([sys.executable, "-m", "rimlens.cli", "demo", "--seed", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_atomic_write_keeps_old_file_on_failure_and_normal_permissions(tmp_path):
    import os

    import pytest

    from rimlens.io.atomic import atomic_path

    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and len(list(tmp_path.iterdir())) == 1
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    mask = os.umask(0)
    os.umask(mask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~mask)


def test_bad_settings_exit_2(tmp_path):
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--set", "val_every=0"]) == 2
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--set", "batch_size=abc"]) == 2
    assert (
        main(
            ["simulate", "--preset", "tiny", "--count", "2", "--kappa-mix", "sie=abc", "--out", str(tmp_path / "a.h5")]
        )
        == 2
    )
    assert (
        main(
            ["simulate", "--preset", "tiny", "--count", "2", "--kappa-mix", "sie=nan", "--out", str(tmp_path / "a.h5")]
        )
        == 2
    )


def test_reconstruct_an_hdf5_set_with_the_shipped_model(tmp_path):
    import h5py
    import numpy as np

    from rimlens.config import get_preset
    from rimlens.data.storage import generate_dataset

    data = generate_dataset(
        tmp_path / "set.h5", get_preset("cpu64"), 3, seed=9, split="test", block_size=3, progress=False
    )
    assert main(["reconstruct", str(data), "--out", str(tmp_path / "rec")]) == 0
    import torch

    from rimlens.physics import PSF, LensSimulator
    from rimlens.physics.likelihood import reduced_chi_squared

    grid = get_preset("cpu64").grid
    with h5py.File(tmp_path / "rec" / "reconstructions.h5", "r") as f, h5py.File(data, "r") as d:
        assert f["kappa"].shape == d["kappa"].shape and np.isfinite(f["chi2_nu"][:]).all()
        # the stored chi2_nu is the fit of the stored maps to the stored observations, recomputed here with
        # the forward model the set was made with (the cpu64 preset integrates over pixels, f = 4)
        sim = LensSimulator(grid.image_grid, grid.source_grid, supersample=grid.supersample)
        model = sim.forward(
            torch.as_tensor(f["source"][:]),
            torch.as_tensor(f["kappa"][:]),
            PSF.from_kernel(torch.as_tensor(d["psf"][:])),
        )
        chi2 = reduced_chi_squared(
            model, torch.as_tensor(d["observation"][:]), torch.as_tensor(d["noise_sigma"][:]).reshape(-1, 1, 1, 1)
        )
        assert np.allclose(chi2.numpy(), f["chi2_nu"][:], rtol=1e-3)
    assert main(["reconstruct", str(data), "--psf", str(data), "--out", str(tmp_path / "bad")]) == 2
