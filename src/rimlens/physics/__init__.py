"""Lensing physics: grids, deflection, ray tracing, PSF, noise, likelihood and analytic profiles."""

from rimlens.physics.deflection import deflection, deflection_field
from rimlens.physics.grid import PixelGrid
from rimlens.physics.likelihood import chi_squared, peak_snr, reduced_chi_squared
from rimlens.physics.psf import PSF
from rimlens.physics.raytrace import lens_equation, sample_bilinear
from rimlens.physics.simulator import LensSimulator, SimulatedLens
from rimlens.physics import profiles

__all__ = [
    "PixelGrid", "deflection", "deflection_field", "PSF", "LensSimulator", "SimulatedLens",
    "chi_squared", "reduced_chi_squared", "peak_snr", "lens_equation", "sample_bilinear", "profiles",
]
