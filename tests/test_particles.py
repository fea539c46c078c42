"""Smooth-particle lensing: mass conservation, single particles, an SIS halo vs its closed form."""

import numpy as np
import pytest
import torch

from rimlens.data.particles import (
    critical_density_msun_per_arcsec2,
    kappa_from_particles,
    rasterize,
    read_tng_cutout,
    sample_sis,
    synthetic_galaxy,
)
from rimlens.errors import RimlensInputError
from rimlens.physics import PixelGrid


def test_mass_conserved_for_particles_inside():
    grid = PixelGrid(64, 0.1)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-2, 2, (2, 5000))
    m = rng.uniform(0.5, 2, 5000)
    w = rng.uniform(0.01, 0.3, 5000)  # from far below a pixel to 3 pixels
    sigma = rasterize(x, y, m, w, grid)
    assert sigma.sum() * grid.pixel_scale_arcsec**2 == pytest.approx(m.sum(), rel=1e-3)


def test_lone_particle_gives_its_gaussian():
    grid = PixelGrid(65, 0.05)
    width, x0, y0 = 0.25, 0.13, -0.07
    sigma = rasterize(np.array([x0]), np.array([y0]), np.array([3.0]), np.array([width]), grid)
    # (the 6-sigma tail beyond the field holds ~1e-9 of the mass, hence 1e-7 on the centroid)
    # independent reference: the Gaussian averaged over 16 x 16 sub-pixel points per pixel
    fine = PixelGrid(65 * 16, 0.05 / 16)
    x, y = fine.coordinates(torch.float64)
    gauss = 3.0 / (2 * np.pi * width**2) * torch.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * width**2))
    gauss = torch.nn.functional.avg_pool2d(gauss[None, None], 16)[0, 0].numpy()
    assert np.abs(sigma - gauss).max() < 1e-4 * gauss.max()
    x, y = (c.numpy() for c in grid.coordinates(torch.float64))
    area = grid.pixel_scale_arcsec**2
    assert (sigma * x).sum() * area / 3.0 == pytest.approx(x0, abs=1e-7)
    assert (sigma * y).sum() * area / 3.0 == pytest.approx(y0, abs=1e-7)
    # sub-pixel kernel: all mass still lands in the right pixel
    tiny = rasterize(np.array([0.0]), np.array([0.0]), np.array([1.0]), np.array([1e-4]), grid)
    assert tiny[32, 32] * area == pytest.approx(1.0, rel=1e-9)


def test_sis_particle_halo_matches_projected_profile():
    rng = np.random.default_rng(1)
    n, r_max, m_tot = 200_000, 40.0, 2e12
    pos = sample_sis(rng, n, r_max)
    mass = np.full(n, m_tot / n)
    grid = PixelGrid(64, 0.12)
    kappa = kappa_from_particles(pos, mass, grid, center_kpc=np.zeros(3))
    sigma_crit, kpc_per_arcsec = critical_density_msun_per_arcsec2(0.5, 1.5)
    x, y = grid.coordinates(torch.float64)
    r = np.sqrt(x.numpy() ** 2 + y.numpy() ** 2)
    for lo, hi in [(0.6, 1.0), (1.0, 1.6), (1.6, 2.4), (2.4, 3.4)]:
        sel = (r > lo) & (r < hi)
        rk = r[sel] * kpc_per_arcsec
        analytic = m_tot / (2 * np.pi * r_max * rk) * np.arctan(np.sqrt(r_max**2 - rk**2) / rk)  # M_sun / kpc^2
        analytic_kappa = analytic * kpc_per_arcsec**2 / sigma_crit
        n_in = (
            n
            * (np.pi * ((hi * kpc_per_arcsec) ** 2 - (lo * kpc_per_arcsec) ** 2))
            / (2 * np.pi * r_max * 2 * hi * kpc_per_arcsec)
            * 2
        )
        shot = 1 / np.sqrt(max(n_in, 1))
        rel = abs(kappa[sel].mean() / analytic_kappa.mean() - 1)
        assert rel < max(3 * shot, 0.02), (lo, hi, rel, shot)


def test_synthetic_galaxy_and_errors():
    rng = np.random.default_rng(2)
    pos, m = synthetic_galaxy(rng)
    assert pos.shape[1] == 3 and len(m) == len(pos) and np.all(m > 0)
    k = kappa_from_particles(pos, m, PixelGrid(32, 0.24))
    assert k.shape == (32, 32) and np.isfinite(k).all() and k.max() > 0
    with pytest.raises(RimlensInputError, match="P x 3"):
        kappa_from_particles(pos[:, :2], m, PixelGrid(32, 0.24))
    with pytest.raises(RimlensInputError, match="finite"):
        rasterize(np.array([np.nan]), np.array([0.0]), np.array([1.0]), np.array([0.1]), PixelGrid(8, 0.1))


def test_tng_cutout_reader(tmp_path):
    import h5py

    p = tmp_path / "cutout.hdf5"
    with h5py.File(p, "w") as f:
        f.create_group("Header").attrs.update(
            {"HubbleParam": 0.7, "Redshift": 0.0, "MassTable": np.array([0, 0.5, 0, 0, 0, 0])}
        )
        f.create_dataset("PartType0/Coordinates", data=np.ones((3, 3)) * 700.0)
        f.create_dataset("PartType0/Masses", data=np.ones(3) * 0.1)
        f.create_dataset("PartType1/Coordinates", data=np.zeros((2, 3)))
    pos, m = read_tng_cutout(p)
    assert pos.shape == (5, 3) and pos[0, 0] == pytest.approx(1000.0)
    assert m[0] == pytest.approx(0.1e10 / 0.7) and m[-1] == pytest.approx(0.5e10 / 0.7)
    (tmp_path / "junk.hdf5").write_bytes(b"not hdf5")
    with pytest.raises(RimlensInputError, match="cannot read"):
        read_tng_cutout(tmp_path / "junk.hdf5")
