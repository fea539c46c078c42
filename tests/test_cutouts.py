"""Observations as they come: cut-outs smaller or larger than the model field, off-centre lenses,
rotated WCS, and counts vs counts/s."""

import numpy as np
import pytest
import torch

from rimlens.errors import RimlensInputError
from rimlens.io.fits import pixel_scale_from_header, wcs_rotation_deg
from rimlens.io.observation import Observation, find_lens_center, prepare_observation
from rimlens.physics import PSF, PixelGrid, profiles

SCALE = 0.05  # arcsec / px, HST-like


def _lens(n: int, center: tuple[float, float], light: float = 0.0, seed: int = 0) -> Observation:
    """An SIE lens (theta_E 1.2") of a Sersic source, at ``center`` arcsec from the cut-out's centre,
    optionally with Sersic lens light of ``light`` x the arcs' peak, PSF FWHM 0.1", noise 1% of the arcs' peak."""
    grid = PixelGrid(n, SCALE)
    x, y = grid.coordinates(dtype=torch.float64)
    ax, ay = profiles.sie_deflection(x, y, 1.2, 0.75, 0.5, center_x=center[0], center_y=center[1])
    bx, by = x - ax, y - ay
    src = profiles.sersic(bx, by, 1.0, 0.15, 1.5, 0.8, 0.2, center_x=center[0] + 0.08, center_y=center[1] - 0.05)
    psf = PSF.gaussian(torch.tensor([0.1 / 2.3548]), SCALE, dtype=torch.float64)
    arcs = psf.convolve(src[None, None])[0, 0]
    image = arcs / arcs.max()
    if light:
        lens_light = profiles.sersic(x, y, 1.0, 0.6, 4.0, 0.8, 0.5, center_x=center[0], center_y=center[1])
        lens_light = psf.convolve(lens_light[None, None])[0, 0]
        image = image + light * lens_light / lens_light.max()
    rng = np.random.default_rng(seed)
    noise = np.full((n, n), 0.01)
    return Observation(image.numpy() + rng.normal(0, 0.01, (n, n)), noise, psf.kernel[0, 0].numpy(), SCALE)


@pytest.mark.parametrize(("light", "tolerance"), [(30.0, 7.68 / 64), (0.0, 0.4)])
def test_off_centre_lens_is_found(light, tolerance):
    """With lens light: within one model pixel (0.12"). Light subtracted: the arcs' circle centre is
    a first guess only (0.05"-0.4" off on 12 random SIE lenses; README)."""
    true = (0.7, -0.4)
    obs = _lens(200, true, light)
    (cx, cy), method = find_lens_center(obs)
    assert method == ("light" if light else "ring")
    assert np.hypot(cx - true[0], cy - true[1]) < tolerance, (cx, cy)
    prep = prepare_observation(obs, PixelGrid.from_fov(64, 7.68), "auto")
    assert prep.center_method == method and np.allclose(prep.center_arcsec, (cx, cy))


def test_small_cutout_is_padded_like_by_hand():
    """A 4.8" cut-out (96 px at 0.05") for a 7.68" model field: padded with excluded pixels by the
    tool, it gives what a cut-out padded by hand (sigma = 1e6 beyond it) gives."""
    grid = PixelGrid.from_fov(64, 7.68)
    small = _lens(96, (0.0, 0.0))
    with_tool = prepare_observation(small, grid)
    pad = (160 - 96) // 2
    by_hand = Observation(
        np.pad(small.image, pad), np.pad(small.noise_sigma, pad, constant_values=1e7), small.psf, SCALE
    )
    hand = prepare_observation(by_hand, grid)
    for a, b in ((with_tool.observation, hand.observation), (with_tool.noise_sigma, hand.noise_sigma)):
        assert torch.allclose(a, b, rtol=1e-6, atol=0)
    assert torch.equal(with_tool.mask, hand.mask)
    assert 0.55 < with_tool.padded_fraction < 0.65  # 1 - (4.8 / 7.68)^2 = 0.61 of the field lies outside
    assert hand.padded_fraction == 0.0 and not with_tool.cropped
    # same chi2 for the same model maps
    from rimlens.physics import LensSimulator
    from rimlens.physics.likelihood import reduced_chi_squared

    sim = LensSimulator(grid, PixelGrid.from_fov(64, 3.0))
    source, kappa = torch.rand(1, 1, 64, 64), torch.rand(1, 1, 64, 64) + 0.1
    chi = [
        float(
            reduced_chi_squared(
                sim.forward(source, kappa, PSF.from_kernel(p.psf)), p.observation, p.noise_sigma, p.mask
            )[0]
        )
        for p in (with_tool, hand)
    ]
    assert chi[0] == pytest.approx(chi[1], rel=1e-6)


def test_large_cutout_is_cropped_and_any_pixel_scale_works():
    grid = PixelGrid.from_fov(64, 7.68)
    big = _lens(240, (0.0, 0.0))  # 12"
    prep = prepare_observation(big, grid)
    assert prep.cropped and prep.padded_fraction == 0.0
    for scale in (0.02, 0.3):  # JWST-like to ground-based
        obs = Observation(big.image, big.noise_sigma, big.psf, scale)
        p = prepare_observation(obs, grid)
        assert torch.isfinite(p.observation).all() and p.mask.any()


def test_counts_and_counts_per_second_give_the_same_prepared_data():
    grid = PixelGrid.from_fov(64, 7.68)
    obs = _lens(160, (0.0, 0.0))
    exposure = 2188.0  # seconds: the same data in counts
    counts = Observation(obs.image * exposure, obs.noise_sigma * exposure, obs.psf, SCALE)
    a, b = prepare_observation(obs, grid), prepare_observation(counts, grid)
    assert torch.allclose(a.observation, b.observation, rtol=1e-5) and torch.allclose(
        a.noise_sigma, b.noise_sigma, rtol=1e-5
    )


def test_rotated_wcs_is_read_and_skewed_pixels_refused():
    s = SCALE / 3600
    t = np.radians(30)
    rotated = {"CD1_1": -s * np.cos(t), "CD1_2": s * np.sin(t), "CD2_1": s * np.sin(t), "CD2_2": s * np.cos(t)}
    assert pixel_scale_from_header(rotated) == pytest.approx(SCALE)
    assert wcs_rotation_deg(rotated) == pytest.approx(-30.0)
    assert wcs_rotation_deg({"CD1_1": -s, "CD2_2": s}) == pytest.approx(0.0)
    with pytest.raises(RimlensInputError, match="non-square"):
        pixel_scale_from_header({"CD1_1": -s, "CD2_2": 1.5 * s})
    with pytest.raises(RimlensInputError, match="skewed"):
        pixel_scale_from_header({"CD1_1": -s, "CD1_2": s * np.sin(0.3), "CD2_1": 0.0, "CD2_2": s * np.cos(0.3)})


def test_bad_or_faint_centres():
    grid = PixelGrid.from_fov(64, 7.68)
    obs = _lens(96, (0.0, 0.0))
    for center in ((float("inf"), 0.0), (float("nan"), 0.0)):
        with pytest.raises(RimlensInputError, match="finite"):
            prepare_observation(obs, grid, center)
    with pytest.raises(RimlensInputError, match="not pixels"):
        prepare_observation(obs, grid, (48.0, 48.0))  # pixel coordinates given by mistake
    faint = Observation(np.random.default_rng(0).normal(0, 0.01, (96, 96)) + 0.02, obs.noise_sigma, obs.psf, SCALE)
    p = prepare_observation(faint, grid, "auto")  # nothing to find: the cut-out's centre, not an error
    assert p.center_method == "cutout" and p.center_arcsec == (0.0, 0.0)
