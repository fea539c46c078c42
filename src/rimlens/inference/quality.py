"""Honest quality flags for a reconstruction: chi2_nu over the whole field and over the arcs, and,
when the fit is poor, the likely causes that can be tested cheaply with the RIM itself.

Each cause is tested by a counterfactual: reconstruct again with the suspected ingredient changed
(the pixel scale scaled by 0.8 or 1.25, the PSF broadened or narrowed) and see whether chi2_nu
falls by a factor of two or more; a positive central residual means lens light left in the data;
significant flux at the field's edge means the model field is too small for the lens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from rimlens.io.observation import Observation, PreparedObservation, prepare_observation
from rimlens.nn.rim import RIM
from rimlens.physics import PSF
from rimlens.physics.likelihood import reduced_chi_squared, used_pixels

__all__ = ["POOR_CHI2_NU", "Quality", "assess"]

POOR_CHI2_NU = 3.0
"""chi2_nu above which a fit is called poor and its likely causes are tested."""

BETTER_BY = 2.0  # a counterfactual must lower chi2_nu by this factor to be named as a cause


@dataclass
class Quality:
    """Figures of merit of a reconstruction and, for a poor fit, the likely causes found."""

    chi2_nu: float
    chi2_nu_arcs: float | None  # over the pixels where the lensed source is > 3 sigma
    arc_pixels: int
    central_residual_sigma: float  # mean (data - model) / sigma within 0.5" of the centre
    edge_flux_sigma: float  # largest lensed-source S/N within 2 model pixels of the field's edge
    causes: list[str] = field(default_factory=list)

    @property
    def poor(self) -> bool:
        return self.chi2_nu > POOR_CHI2_NU

    def warning(self) -> str | None:
        """One line for the user when the fit is poor, else ``None``."""
        if not self.poor:
            return None
        why = (
            "; ".join(self.causes)
            if self.causes
            else "none of the tested causes (lens light, pixel scale, PSF, field size)"
        )
        return f"poor fit (chi2_nu {self.chi2_nu:.2f} > {POOR_CHI2_NU:g}); likely causes: {why}"

    def as_dict(self) -> dict:
        """JSON-ready, for ``summary.json``."""
        return {**dataclasses.asdict(self), "poor": self.poor}


def _rim_chi2(
    model: RIM, prep: PreparedObservation, psf_kernel: torch.Tensor | None = None, light: torch.Tensor | None = None
) -> float:
    """chi2_nu of a plain RIM reconstruction of ``prep`` (minus ``light``, the lens-light model, if given),
    with the data as the RIM was trained on them: excluded pixels zero, smoothed peak 1."""
    psf = PSF.from_kernel(prep.psf if psf_kernel is None else psf_kernel)
    data, sigma, _ = rim_input(prep.observation if light is None else prep.observation - light, prep)
    with torch.no_grad():
        out = model(data, psf, sigma, mask=prep.mask)
        image = model.simulator.forward(out.final_source, out.final_kappa, psf, shear=out.final_shear, check=False)
        return float(reduced_chi_squared(image, data, sigma, prep.mask)[0])


def rim_input(data: torch.Tensor, prep: PreparedObservation) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Data as the RIM was trained on them: excluded pixels zero (not minus the lens light) and the
    smoothed peak rescaled to 1 (after a lens-light subtraction the arcs are much fainter than the
    prepared observation's peak). Returns ``(data, noise_sigma, gain)``; sources come back divided by ``gain``."""
    data = data.masked_fill(~prep.mask, 0.0)
    smooth = torch.nn.functional.avg_pool2d(data, 3, stride=1, padding=1, count_include_pad=False)
    peak = float(smooth.masked_fill(~prep.mask, -float("inf")).max())
    gain = 1.0 / peak if peak > 0 else 1.0
    return data * gain, prep.noise_sigma * gain, gain


def _gaussian_kernel(sigma_px: float, size: int) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (r / sigma_px) ** 2)
    k = g[:, None] * g[None, :]
    return (k / k.sum())[None, None]


def assess(
    model: RIM,
    prep: PreparedObservation,
    model_image: torch.Tensor,
    lensed_source: torch.Tensor,
    chi2_nu: float,
    obs: Observation | None = None,
    lens_light: torch.Tensor | None = None,
) -> Quality:
    """Quality of a reconstruction of ``prep`` whose model image is ``model_image`` (``1 x 1 x N x N``,
    lens light included when modelled) and lensed source ``lensed_source`` (PSF-convolved).

    When ``chi2_nu > POOR_CHI2_NU`` the likely causes are tested: lens light left in the data
    (central residual > 3 sigma while no lens light was modelled), the pixel scale (needs the raw
    ``obs``; re-prepared at 0.8x and 1.25x), the PSF (1.5x broader, or narrower), the field size
    (lensed flux > 5 sigma at the edge of the model field).
    """
    sigma, data, mask = prep.noise_sigma, prep.observation, prep.mask
    used = used_pixels(sigma, data.shape, mask) > 0
    resid = torch.where(used, (data - model_image) / sigma, torch.zeros_like(data))
    arcs = used & (lensed_source > 3 * sigma)
    n_arcs = int(arcs.sum())
    chi2_arcs = float((resid[arcs] ** 2).mean()) if n_arcs else None
    grid = prep.grid
    x, y = grid.coordinates(dtype=data.dtype)
    central = used[0, 0] & (x**2 + y**2 <= 0.5**2)
    central_resid = float(resid[0, 0][central].mean()) if bool(central.any()) else 0.0
    n = grid.n_pixels
    edge = torch.zeros(n, n, dtype=torch.bool)
    edge[:2], edge[-2:], edge[:, :2], edge[:, -2:] = True, True, True, True
    snr = torch.where(used[0, 0] & edge, lensed_source[0, 0] / sigma[0, 0], torch.zeros_like(sigma[0, 0]))
    edge_snr = float(snr.max())
    q = Quality(chi2_nu, chi2_arcs, n_arcs, central_resid, edge_snr)
    if not q.poor:
        return q
    if lens_light is None and central_resid > 3:
        q.causes.append(
            f"lens light left in the data (central residual {central_resid:+.1f} sigma; use --lens-light auto)"
        )
    if edge_snr > 5:
        q.causes.append(f"field too small (lensed flux at {edge_snr:.0f} sigma on the model field's edge)")
    base = _rim_chi2(model, prep, light=lens_light)
    if obs is not None and lens_light is None:  # the light model is tied to this grid: no re-preparation then
        for factor in (0.8, 1.25):
            other = dataclasses.replace(obs, pixel_scale_arcsec=obs.pixel_scale_arcsec * factor)
            center = (prep.center_arcsec[0] * factor, prep.center_arcsec[1] * factor)  # the lens stays put in pixels
            trial = _rim_chi2(model, prepare_observation(other, grid, center))
            if trial * BETTER_BY < base:
                q.causes.append(
                    f'pixel scale ({obs.pixel_scale_arcsec:.4g}"/px used; {obs.pixel_scale_arcsec * factor:.4g} fits '
                    f"{base / trial:.1f}x better)"
                )
    k = prep.psf.shape[-1]
    size = max(k + 4, 9) | 1
    broad = torch.nn.functional.conv2d(
        torch.nn.functional.pad(prep.psf.double(), ((size - k) // 2,) * 4), _gaussian_kernel(1.0, 5), padding=2
    ).float()
    narrow = torch.zeros(1, 1, 3, 3)
    narrow[..., 1, 1] = 1.0
    for name, kernel in (("a broader PSF", broad / broad.sum()), ("a narrower PSF", narrow)):
        trial = _rim_chi2(model, prep, kernel, lens_light)
        if trial * BETTER_BY < base:
            q.causes.append(f"PSF ({name} fits {base / trial:.1f}x better)")
    if not q.causes and chi2_arcs is not None and chi2_arcs > 3 * chi2_nu:
        q.causes.append("the arcs themselves (source or mass model too simple for this lens; try --finetune)")
    return q
