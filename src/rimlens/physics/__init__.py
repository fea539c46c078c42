"""Lensing physics: grids, deflection, ray tracing, PSF, noise, likelihood and analytic profiles."""

from rimlens.physics import profiles
from rimlens.physics.deflection import deflection, deflection_field
from rimlens.physics.grid import PixelGrid
from rimlens.physics.likelihood import chi_squared, peak_snr, reduced_chi_squared
from rimlens.physics.psf import PSF
from rimlens.physics.raytrace import lens_equation, sample_bilinear
from rimlens.physics.simulator import LensSimulator, SimulatedLens

__all__ = [
    "PSF",
    "LensSimulator",
    "PixelGrid",
    "SimulatedLens",
    "chi_squared",
    "deflection",
    "deflection_field",
    "lens_equation",
    "peak_snr",
    "profiles",
    "reduced_chi_squared",
    "sample_bilinear",
]
