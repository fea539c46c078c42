"""Sources, convergence maps, lens validation, HDF5 storage and resumable generation."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from rimlens.config import (
    DataConfig,
    GridConfig,
    ParametricSourceConfig,
    ValidationConfig,
    get_preset,
    preset_from_json,
)
from rimlens.data.kappa import einstein_radius, rescale_to_einstein_radius, tng_evaluation_maps
from rimlens.data.lenses import LensGenerator, validate_lenses
from rimlens.data.random import child_rng
from rimlens.data.sources import SourceBank, parametric_sources, read_real_galaxy_catalog, shipped_cosmos_stamps
from rimlens.data.storage import LensDataset, generate_dataset, read_lenses
from rimlens.data.stream import draw_step_batch, step_batches
from rimlens.errors import RimlensInputError
from rimlens.physics import PixelGrid, profiles
from rimlens.physics.resample import resample_density, resample_flux


@pytest.mark.parametrize("n", [32, 64, 128])
def test_einstein_radius_of_sis_within_5_percent(n):
    grid = PixelGrid.from_fov(n, 7.68)
    te = torch.linspace(0.5, 2.5, 9, dtype=torch.float64).reshape(-1, 1, 1, 1)
    kappa = profiles.pixelate(
        profiles.sis_kappa, grid, 8, torch.float64, theta_e_arcsec=te, center_x=0.03, center_y=-0.02
    )
    est = einstein_radius(kappa, grid.pixel_scale_arcsec)
    assert torch.all((est / te.flatten() - 1).abs() < 0.05)


def test_rescaling_hits_requested_radius():
    grid = PixelGrid.from_fov(64, 7.68)
    maps = tng_evaluation_maps(grid, torch.float64)
    target = torch.tensor([0.5, 1.2, 1.9, 2.5], dtype=torch.float64)
    scaled, factor = rescale_to_einstein_radius(maps, grid.pixel_scale_arcsec, target)
    assert torch.allclose(einstein_radius(scaled, grid.pixel_scale_arcsec), target, rtol=2e-3)
    assert torch.all(factor > 0)


def test_resampling_conserves_flux():
    rng = np.random.default_rng(0)
    img = torch.as_tensor(rng.uniform(size=(2, 1, 50, 50)))
    for n_out, s_out in [(32, 0.047), (100, 0.0151), (37, 0.05)]:  # down, up, non-integer, same field or smaller
        out = resample_flux(img, 0.03, n_out, s_out)
        inside = min(50 * 0.03, n_out * s_out)
        ref = resample_flux(img, 0.03, round(inside / 0.03), 0.03) if inside < 1.5 else img
        assert torch.allclose(out.sum(dim=(-2, -1)), ref.sum(dim=(-2, -1)), rtol=1e-6)
    d = resample_density(torch.ones(1, 1, 10, 10, dtype=torch.float64), 0.1, 7, 0.13)
    assert torch.allclose(d, torch.ones_like(d))


def test_cosmos_reader_and_split():
    stamps = shipped_cosmos_stamps()
    assert len(stamps) == 112 and len({s.ident for s in stamps}) == 112
    grid = PixelGrid.from_fov(32, 3.0)
    train, test = SourceBank(grid, "train"), SourceBank(grid, "test")
    assert len(train) > 20 and len(test) > 3
    assert not set(train.idents) & set(test.idents)
    s, ids = train.draw(np.random.default_rng(0), 16)
    assert s.shape == (16, 1, 32, 32) and torch.allclose(s.amax(dim=(-2, -1)), torch.ones(16, 1))
    assert float(s.min()) >= 0 and set(ids) <= set(train.idents)


def test_foreign_catalogue_rejected(tmp_path):
    from astropy.table import Table

    Table({"a": [1, 2]}).write(tmp_path / "cat.fits")
    with pytest.raises(RimlensInputError, match="not a RealGalaxy catalogue"):
        read_real_galaxy_catalog(tmp_path / "cat.fits")
    (tmp_path / "bad.fits").write_bytes(b"garbage" * 100)
    with pytest.raises(RimlensInputError, match="cannot read"):
        read_real_galaxy_catalog(tmp_path / "bad.fits")


def test_parametric_sources():
    s = parametric_sources(PixelGrid.from_fov(32, 3.0), np.random.default_rng(0), 8)
    assert s.shape == (8, 1, 32, 32) and torch.allclose(s.amax(dim=(-2, -1)), torch.ones(8, 1))


def _good_lens(grid: GridConfig):
    """An SIS with theta_E = 1.2" and a compact source behind it: a bright ring."""
    from rimlens.physics import PSF, LensSimulator

    img, src = grid.image_grid, grid.source_grid
    kappa = profiles.pixelate(profiles.sis_kappa, img, 4, theta_e_arcsec=1.2, center_x=0.01, center_y=0.02)
    sx, sy = src.coordinates()
    source = torch.exp(-0.5 * ((sx - 0.05) ** 2 + sy**2) / 0.1**2)[None, None]
    noiseless = LensSimulator(img, src).forward(source, kappa, PSF.gaussian(0.1, img.pixel_scale_arcsec))
    return noiseless, source, kappa


def _half_light_and_offset(sources: torch.Tensor, grid: PixelGrid) -> tuple[np.ndarray, np.ndarray]:
    """Per source: the radius about its centroid holding half its flux, and the centroid's distance
    from the axis (arcsec)."""
    x, y = (t.numpy() for t in grid.coordinates(torch.float64))
    half, offset = [], []
    for s in sources[:, 0].double().numpy():
        w = s / s.sum()
        cx, cy = (w * x).sum(), (w * y).sum()
        r = np.hypot(x - cx, y - cy).ravel()
        order = np.argsort(r)
        half.append(r[order][np.searchsorted(np.cumsum(w.ravel()[order]), 0.5)])
        offset.append(np.hypot(cx, cy))
    return np.array(half), np.array(offset)


def test_source_population_is_a_data_setting():
    """The parametric sources' sizes and offsets and the COSMOS galaxies' zoom and shift follow DataConfig,
    round-trip through a preset's JSON, and bad ranges are refused."""
    base = get_preset("tiny")
    grid = base.grid.source_grid

    rng_sources = {}
    for name, config in {
        "small": ParametricSourceConfig(r_eff_arcsec=(0.06, 0.08), max_offset_arcsec=0.0, clumps=(0, 0)),
        "large": ParametricSourceConfig(r_eff_arcsec=(0.35, 0.4), max_offset_arcsec=0.6, clumps=(0, 0)),
    }.items():
        preset = dataclasses.replace(
            base, data=dataclasses.replace(base.data, source_mix={"parametric": 1.0}, parametric_source=config)
        )
        assert preset_from_json(preset.to_json()) == preset  # saved with every model
        gen = LensGenerator(preset, split="train", bank_seed=0)
        rng_sources[name] = gen._sources(child_rng(2, 2), np.array(["parametric"] * 24))
    half_small, off_small = _half_light_and_offset(rng_sources["small"], grid)
    half_large, off_large = _half_light_and_offset(rng_sources["large"], grid)
    assert np.median(half_small) < 0.15 < 0.25 < np.median(half_large)
    assert np.max(off_small) < 0.05 < np.median(off_large)

    cosmos = {}
    for zoom in (0.6, 1.5):
        preset = dataclasses.replace(
            base, data=dataclasses.replace(base.data, cosmos_zoom=(zoom, zoom), cosmos_max_shift_arcsec=0.0)
        )
        cosmos[zoom] = LensGenerator(preset, split="train", bank_seed=0)._sources(
            child_rng(3, 3), np.array(["cosmos"] * 24)
        )
    ratio = np.median(_half_light_and_offset(cosmos[1.5], grid)[0] / _half_light_and_offset(cosmos[0.6], grid)[0])
    assert 2.0 < ratio < 3.0  # 1.5 / 0.6 = 2.5, blurred by the grid's pixels and the clipping at the edge

    for bad in (
        lambda: DataConfig(cosmos_zoom=(0.0, 1.0)),
        lambda: DataConfig(cosmos_max_shift_arcsec=-0.1),
        lambda: ParametricSourceConfig(r_eff_arcsec=(0.5, 0.1)),
        lambda: ParametricSourceConfig(axis_ratio=(0.5, 1.5)),
        lambda: ParametricSourceConfig(clumps=(3, 1)),
    ):
        with pytest.raises(RimlensInputError):
            bad()


def test_each_validation_check_rejects_a_crafted_bad_lens():
    grid, cfg = get_preset("cpu64").grid, ValidationConfig()
    noiseless, source, kappa = _good_lens(grid)
    ok = validate_lenses(noiseless, source, kappa, grid, cfg)
    assert not any(bool(v.any()) for v in ok.values()), ok
    # magnification: an unlensed-looking image (the source itself, tiny) -> few bright image pixels
    tiny_img = torch.zeros_like(noiseless)
    tiny_img[..., 32, 32] = 1.0
    assert validate_lenses(tiny_img, source, kappa, grid, cfg)["magnification"].all()
    # edge: light at the border
    edgy = noiseless.clone()
    edgy[..., 0, 10] = 0.5
    assert validate_lenses(edgy, source, kappa, grid, cfg)["edge_flux"].all()
    # faint source: nothing above 0.1
    faint = source * 0.05
    assert validate_lenses(noiseless, faint, kappa, grid, cfg)["faint_source"].all()
    # kappa never reaching 1
    assert validate_lenses(noiseless, source, kappa.clamp(max=0.9), grid, cfg)["low_kappa"].all()


def test_generator_counts_rejections_and_draws_validated_lenses():
    gen = LensGenerator(get_preset("tiny"))
    batch = gen.draw(np.random.default_rng(0), 24)
    assert len(batch) == 24 and gen.stats()["drawn"] >= 24
    assert batch.observation.shape == (24, 1, 32, 32) and batch.psf.shape[-1] % 2 == 1
    assert torch.allclose(batch.psf.sum(dim=(-2, -1)), torch.ones(24, 1), atol=1e-5)
    assert torch.all((batch.noise_sigma >= 0.001) & (batch.noise_sigma <= 0.1))
    assert torch.all((batch.psf_fwhm >= 0.06) & (batch.psf_fwhm <= 0.30))
    assert torch.all(batch.kappa.flatten(1).amax(1) >= 1)


def test_hdf5_round_trip_and_determinism(tmp_path):
    preset = get_preset("tiny")
    a = generate_dataset(tmp_path / "a.h5", preset, 40, seed=5, block_size=16, progress=False)
    b = generate_dataset(tmp_path / "b.h5", preset, 40, seed=5, block_size=16, progress=False)
    da, db = read_lenses(a), read_lenses(b)
    for k in ("observation", "source", "kappa", "psf", "noise_sigma", "theta_e"):
        assert np.array_equal(da[k], db[k]), k
    # round trip: the file holds exactly what the generator draws for each block
    gen = LensGenerator(preset, bank_seed=5)
    block1 = gen.draw(child_rng(5, 1), 16)
    assert np.array_equal(da["observation"][16:32], block1.observation.numpy())
    assert np.array_equal(da["kappa"][16:32], block1.kappa.numpy())
    assert da["preset"] == preset and da["attrs"]["seed"] == 5
    ds = LensDataset(a)
    assert len(ds) == 40 and torch.equal(ds[17]["source"], torch.as_tensor(da["source"][17]))
    c = generate_dataset(tmp_path / "c.h5", preset, 40, seed=6, block_size=16, progress=False)
    assert not np.array_equal(read_lenses(c)["observation"], da["observation"])


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    good = generate_dataset(tmp_path / "g.h5", get_preset("tiny"), 8, seed=1, block_size=8, progress=False)
    data = good.read_bytes()
    (tmp_path / "trunc.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(RimlensInputError, match="truncated or corrupt"):
        LensDataset(tmp_path / "trunc.h5")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(RimlensInputError, match="not a rimlens lens file"):
        LensDataset(tmp_path / "foreign.h5")
    with pytest.raises(RimlensInputError, match="no such file"):
        LensDataset(tmp_path / "missing.h5")


@pytest.mark.slow
def test_killed_simulate_resumes_to_identical_file(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # 30 blocks: enough that the kill lands long before the end
    args = [
        sys.executable,
        "-m",
        "rimlens.cli",
        "simulate",
        "--preset",
        "tiny",
        "--count",
        "480",
        "--seed",
        "3",
        "--block-size",
        "16",
    ]
    ref = tmp_path / "ref.h5"
    subprocess.run([*args, "--out", str(ref)], check=True, env=env, capture_output=True)
    out = tmp_path / "killed.h5"
    proc = subprocess.Popen([*args, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "killed.h5.parts"
    deadline = time.time() + 120
    while time.time() < deadline and not (parts / "block_000001.h5").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and (parts / "block_000000.h5").exists()
    done_before = sorted(p.name for p in parts.glob("block_*.h5"))
    r = subprocess.run([*args, "--out", str(out)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not parts.exists()
    a, b = read_lenses(ref), read_lenses(out)
    for k in ("observation", "source", "kappa", "psf", "noise_sigma", "snr", "theta_e", "kappa_family"):
        assert np.array_equal(a[k], b[k]), k
    assert len(done_before) < 30


def test_training_stream_depends_on_the_step_alone():
    """The one on-the-fly stream: a step's batch is a pure function of (seed, shard, step), one
    process with shards 0, 1 draws what two ranks draw, and DataLoader workers draw the same batches."""
    preset = get_preset("tiny")
    gen = LensGenerator(preset, split="train", bank_seed=1)
    a, again = draw_step_batch(gen, 1, [0], 4, 5), draw_step_batch(LensGenerator(preset, bank_seed=1), 1, [0], 4, 5)
    assert torch.equal(a.observation, again.observation)
    assert not torch.equal(a.observation, draw_step_batch(gen, 1, [0], 4, 6).observation)
    both = draw_step_batch(gen, 1, [0, 1], 4, 5)
    rank1 = draw_step_batch(gen, 1, [1], 4, 5)
    assert torch.equal(both.observation, torch.cat([a.observation, rank1.observation]))
    batches = step_batches(gen, 1, [0], 4, 5, 8, workers=2)
    drawn = list(batches)
    batches.close()
    assert len(drawn) == 3 and torch.equal(drawn[0].observation, a.observation)


def test_cli_simulate_and_show(tmp_path):
    from rimlens.cli import main

    out = tmp_path / "s.h5"
    assert main(["simulate", "--preset", "tiny", "--count", "4", "--seed", "0", "--out", str(out)]) == 0
    assert main(["simulate", "--preset", "tiny", "--count", "4", "--seed", "0", "--out", str(out)]) == 2  # exists
    assert main(["show", str(out), "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["show", str(tmp_path / "nope.h5")]) == 2
    assert main(["simulate", "--preset", "nope", "--count", "4", "--out", str(tmp_path / "x.h5")]) == 2


def test_tng_maps_only_for_evaluation(tmp_path):
    import dataclasses

    p = get_preset("tiny")
    tng = dataclasses.replace(p, data=dataclasses.replace(p.data, kappa_mix={"tng": 1.0}))
    with pytest.raises(RimlensInputError, match="evaluation only"):
        LensGenerator(tng, split="train")
    batch = LensGenerator(tng, split="test").draw(np.random.default_rng(0), 4)
    assert set(batch.kappa_family) == {"tng"}
    from rimlens.cli import main

    assert (
        main(["simulate", "--preset", "tiny", "--count", "2", "--kappa-mix", "tng=1", "--out", str(tmp_path / "t.h5")])
        == 2
    )
    assert (
        main(
            [
                "simulate",
                "--preset",
                "tiny",
                "--count",
                "2",
                "--kappa-mix",
                "tng=1",
                "--split",
                "test",
                "--out",
                str(tmp_path / "t.h5"),
            ]
        )
        == 0
    )


def test_epl_family_draws_power_law_slopes():
    """The ``epl`` convergence family (issue 11's population): slopes U(1.6, 2.4), recovered from
    the maps by the evaluation's own slope estimator; SIE draws are unchanged by its addition."""
    from rimlens.data.kappa import AnalyticKappaConfig, analytic_kappa
    from rimlens.physics.lens_metrics import einstein_radius_of_map, log_slope

    grid = PixelGrid.from_fov(64, 7.68)
    cfg = AnalyticKappaConfig(
        theta_e_range=(1.2, 1.6),
        ellipticity_range=(0.0, 0.1),
        max_offset_arcsec=0.0,
        slope_range=(1.6, 2.4),
        supersample=4,
    )
    kappa, params = analytic_kappa(grid, np.random.default_rng(3), 6, cfg, torch.float64)
    assert params["slope"].min() >= 1.6 and params["slope"].max() <= 2.4 and np.ptp(params["slope"]) > 0.2
    for i in range(6):
        te = einstein_radius_of_map(kappa[i, 0], grid)
        assert abs(log_slope(kappa[i, 0], grid, te) - params["slope"][i]) < 0.05
    sie_a, _ = analytic_kappa(grid, np.random.default_rng(3), 2, AnalyticKappaConfig())
    sie_b, _ = analytic_kappa(grid, np.random.default_rng(3), 2, AnalyticKappaConfig(slope_range=(2.0, 2.0)))
    assert torch.equal(sie_a, sie_b)
    preset = get_preset("tiny")
    preset = dataclasses.replace(preset, data=dataclasses.replace(preset.data, kappa_mix={"epl": 1.0}))
    lenses = LensGenerator(preset).draw(np.random.default_rng(0), 4)
    assert set(lenses.kappa_family) == {"epl"}


def test_external_shear_in_lens_files(tmp_path):
    """Lenses drawn with shear_max carry their shear (|gamma| <= shear_max, images made with it), the
    lens file keeps it, and a file written before the shear existed reads as zero shear."""
    base = get_preset("tiny")
    preset = dataclasses.replace(base, data=dataclasses.replace(base.data, shear_max=0.1))
    gen = LensGenerator(preset)
    batch = gen.draw(np.random.default_rng(3), 6)
    norm = batch.shear.norm(dim=1)
    assert (norm <= 0.1 + 1e-7).all() and norm.max() > 0.02
    # the image is the simulator's with that shear (noise aside: same draw, same noise)
    again = LensGenerator(preset).draw(np.random.default_rng(3), 6)
    torch.testing.assert_close(again.observation, batch.observation)
    # no shear: zeros and the random stream of older configurations is unchanged
    assert not LensGenerator(base).draw(np.random.default_rng(3), 2).shear.any()
    path = generate_dataset(tmp_path / "s.h5", preset, 8, seed=1, block_size=8, progress=False)
    d = read_lenses(path)
    assert d["shear"].shape == (8, 2) and np.abs(d["shear"]).max() > 0.01
    with h5py.File(path, "a") as h5:  # as written before the shear existed
        del h5["shear"]
    old = read_lenses(path)
    assert old["shear"].shape == (8, 2) and not old["shear"].any()
    assert LensDataset(path)[0]["shear"].shape == (2,)
    with pytest.raises(RimlensInputError, match="shear_max"):
        dataclasses.replace(base.data, shear_max=0.7)


def test_kernel_sampled_at_centres_has_no_second_pixel_box():
    # A Gaussian PSF given on 0.05" pixels (values at pixel centres), brought to 0.12" model pixels.
    # Closed form of the sampled kernel: bilinear interpolation adds a tent of one input pixel
    # (variance s_in^2 / 6), so the result is ~ a Gaussian of variance sigma^2 + s_in^2 / 6 at the model
    # pixel centres (measured: 0.3% of the peak). The area-averaged kernel (for point-sampled models)
    # also carries the 0.12" model pixel (variance + s_out^2 / 12) and misses that closed form by 26%.
    from rimlens.physics.resample import resample_density, sample_kernel_at_centres

    s_in, s_out, fwhm, k_in, k_out = 0.05, 0.12, 0.1, 41, 11
    sigma = fwhm / 2.3548
    r_in = (torch.arange(k_in, dtype=torch.float64) - (k_in - 1) / 2) * s_in
    psf_in = torch.exp(-0.5 * (r_in[:, None] ** 2 + r_in[None, :] ** 2) / sigma**2)[None, None]
    sampled = sample_kernel_at_centres(psf_in, s_in, k_out, s_out)
    area = resample_density(psf_in, s_in, k_out, s_out)
    area = area / area.sum()
    r_out = (torch.arange(k_out, dtype=torch.float64) - (k_out - 1) / 2) * s_out
    var = sigma**2 + s_in**2 / 6
    expected = torch.exp(-0.5 * (r_out[:, None] ** 2 + r_out[None, :] ** 2) / var)[None, None]
    expected = expected / expected.sum()
    peak = float(expected.max())
    assert float((sampled - expected).abs().max()) < 0.02 * peak
    assert float((area - expected).abs().max()) > 0.1 * peak
    assert float(sampled.sum()) == pytest.approx(1.0, abs=1e-12)
    # same pixel scale: the kernel itself (normalised), whatever its size
    same = sample_kernel_at_centres(psf_in, s_in, k_in, s_in)
    assert torch.allclose(same, psf_in / psf_in.sum(), rtol=0, atol=1e-15)
