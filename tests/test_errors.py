"""Every documented bad input raises RimlensInputError with a message naming the problem."""

import pytest
import torch

from rimlens.errors import RimlensInputError
from rimlens.physics import PSF, LensSimulator, PixelGrid, deflection


@pytest.fixture
def sim():
    return LensSimulator(PixelGrid(16, 0.1), PixelGrid(8, 0.1))


def _good():
    return torch.rand(2, 1, 8, 8), torch.rand(2, 1, 16, 16), PSF.gaussian(0.2, 0.1)


@pytest.mark.parametrize(
    "kappa,match",
    [
        (torch.rand(16, 16), "rank 4"),
        (torch.rand(1, 2, 16, 16), "one channel"),
        (torch.rand(1, 1, 16, 15), "square"),
        (torch.full((1, 1, 8, 8), float("nan")), "NaN"),
        (torch.full((1, 1, 8, 8), float("inf")), "NaN or infinite"),
        (torch.ones(1, 1, 8, 8, dtype=torch.int64), "floating-point"),
    ],
)
def test_deflection_bad_maps(kappa, match):
    with pytest.raises(RimlensInputError, match=match):
        deflection(kappa, 0.1)


@pytest.mark.parametrize("scale", [0.0, -0.1, float("nan"), "a"])
def test_deflection_bad_scale(scale):
    with pytest.raises(RimlensInputError, match="pixel_scale"):
        deflection(torch.rand(1, 1, 8, 8), scale)


@pytest.mark.parametrize(
    "sigma,match",
    [
        (0.0, "> 0"),
        (-1.0, "> 0"),
        (float("nan"), "NaN"),
        (torch.tensor([0.1, 0.1, 0.1]), "3 values"),
        (torch.tensor([0.1, -0.1]), "> 0"),
        (torch.ones(2, 1, 4, 4), "noise_sigma map"),
    ],
)
def test_bad_noise_sigma(sim, sigma, match):
    source, kappa, psf = _good()
    with pytest.raises(RimlensInputError, match=match):
        sim.simulate(source, kappa, psf, sigma)


def test_bad_psf():
    with pytest.raises(RimlensInputError, match="odd"):
        PSF.from_kernel(torch.ones(4, 4))
    with pytest.raises(RimlensInputError, match="sums to zero"):
        k = torch.zeros(3, 3)
        k[0, 0], k[2, 2] = 1.0, -1.0
        PSF.from_kernel(k)
    with pytest.raises(RimlensInputError, match="NaN"):
        PSF.from_kernel(torch.full((3, 3), float("nan")))
    with pytest.raises(RimlensInputError, match="square"):
        PSF.from_kernel(torch.ones(3, 5))
    with pytest.raises(RimlensInputError, match="FWHM"):
        PSF.gaussian(-0.1, 0.1)
    with pytest.raises(RimlensInputError, match="larger than the image"):
        PSF.from_kernel(torch.ones(21, 21)).convolve(torch.rand(1, 1, 16, 16))


def test_mismatched_batches_and_grids(sim):
    source, kappa, psf = _good()
    with pytest.raises(RimlensInputError, match="mismatched batch sizes"):
        sim.forward(source, torch.rand(3, 1, 16, 16), psf)
    with pytest.raises(RimlensInputError, match="mismatched batch sizes"):
        sim.forward(source, kappa, PSF.gaussian(torch.tensor([0.1, 0.2, 0.3]), 0.1))
    with pytest.raises(RimlensInputError, match="source grid has 8"):
        sim.forward(torch.rand(2, 1, 9, 9), kappa, psf)
    with pytest.raises(RimlensInputError, match="image grid has 16"):
        sim.forward(source, torch.rand(2, 1, 12, 12), psf)
    with pytest.raises(RimlensInputError, match="observation"):
        sim.likelihood_gradient(torch.rand(2, 1, 16, 16).fill_(float("nan")), source, kappa, psf, 0.1)
