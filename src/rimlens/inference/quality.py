"""Honest quality flags for a reconstruction: chi2_nu over the whole field, over the arcs and in
annuli about the lens, and, when the fit is poor, the likely causes that can be tested cheaply with the
RIM itself.

A chi2_nu near 1 over the whole field can average a region the model misses with one where it fits the
noise (a pixelated source and kappa have thousands of free pixels, and a fit stopped at chi2_nu = 1
spends them where it can). The annuli show it: for pure noise each annulus's chi2_nu is 1 within
``sqrt(2 / pixels)`` (measured on data resampled onto the model grid: README, "Quality flags"), so one
``UNEVEN_SIGMAS`` of those below 1 is a fit into the noise, one as far above is structure missed.

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

__all__ = ["ANNULUS_WIDTH_ARCSEC", "POOR_CHI2_NU", "UNEVEN_SIGMAS", "Quality", "assess", "chi2_by_radius"]

POOR_CHI2_NU = 3.0
"""chi2_nu above which a fit is called poor and its likely causes are tested."""

BETTER_BY = 2.0  # a counterfactual must lower chi2_nu by this factor to be named as a cause

ANNULUS_WIDTH_ARCSEC = 0.5
"""Width of the annuli of :func:`chi2_by_radius` (arcsec)."""

UNEVEN_SIGMAS = 5.0
"""An annulus whose chi2_nu is this many ``sqrt(2 / pixels)`` below (above) 1 is fitted into the noise
(misses structure); annuli of fewer than ``MIN_ANNULUS_PIXELS`` used pixels are not judged."""

MIN_ANNULUS_PIXELS = 50


@dataclass
class Quality:
    """Figures of merit of a reconstruction and, for a poor fit, the likely causes found."""

    chi2_nu: float
    chi2_nu_arcs: float | None  # over the pixels where the lensed source is > 3 sigma
    arc_pixels: int
    central_residual_sigma: float  # mean (data - model) / sigma within 0.5" of the centre
    edge_flux_sigma: float  # largest lensed-source S/N within 2 model pixels of the field's edge
    causes: list[str] = field(default_factory=list)
    # chi2_nu in annuli about the lens centre: dicts of r_in, r_out (arcsec), pixels, chi2_nu, and
    # "judged": "noise fitted" / "missed" / "" (see UNEVEN_SIGMAS)
    chi2_nu_by_radius: list[dict] = field(default_factory=list)

    @property
    def poor(self) -> bool:
        return self.chi2_nu > POOR_CHI2_NU

    @property
    def noise_fitted(self) -> list[dict]:
        """The annuli where the model fits the noise (chi2_nu far below what noise allows)."""
        return [a for a in self.chi2_nu_by_radius if a["judged"] == "noise fitted"]

    @property
    def missed(self) -> list[dict]:
        """The annuli where the model misses structure (chi2_nu far above what noise allows)."""
        return [a for a in self.chi2_nu_by_radius if a["judged"] == "missed"]

    @property
    def uneven(self) -> bool:
        """The overall chi2_nu averages annuli fitted into the noise with annuli that miss structure."""
        return bool(self.noise_fitted) and bool(self.missed)

    def warning(self) -> str | None:
        """One line for the user when the fit is poor or its chi2_nu is an uneven average, else ``None``."""
        if not self.poor:
            if not self.uneven:
                return None

            def worst(annuli: list[dict], low: bool) -> str:
                a = sorted(annuli, key=lambda v: v["chi2_nu"], reverse=not low)[0]
                return f'{a["r_in"]:g}-{a["r_out"]:g}" chi2_nu {a["chi2_nu"]:.2f}'

            return (
                f"chi2_nu {self.chi2_nu:.2f} averages annuli fitted into the noise ({worst(self.noise_fitted, True)}) "
                f"with annuli the model misses ({worst(self.missed, False)}): see quality.chi2_nu_by_radius"
            )
        why = (
            "; ".join(self.causes)
            if self.causes
            else "none of the tested causes (lens light, pixel scale, PSF, field size)"
        )
        return f"poor fit (chi2_nu {self.chi2_nu:.2f} > {POOR_CHI2_NU:g}); likely causes: {why}"

    def as_dict(self) -> dict:
        """JSON-ready, for ``summary.json``."""
        return {**dataclasses.asdict(self), "poor": self.poor, "uneven": self.uneven}


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


def chi2_by_radius(
    normalised_residual: torch.Tensor, used: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
    width_arcsec: float = ANNULUS_WIDTH_ARCSEC,
) -> list[dict]:  # fmt: skip
    """chi2_nu in annuli of ``width_arcsec`` about ``(0, 0)``, judged against pure noise.

    Args:
        normalised_residual: ``N x N`` (data - model) / sigma.
        used: ``N x N`` bool, the pixels that count.
        x, y: ``N x N`` pixel-centre coordinates (arcsec) relative to the lens centre.
        width_arcsec: annulus width.

    Returns:
        One dict per annulus with used pixels, inner to outer: ``r_in``, ``r_out`` (arcsec), ``pixels``,
        ``chi2_nu``, and ``judged``: ``"noise fitted"`` when chi2_nu < 1 - UNEVEN_SIGMAS sqrt(2 / pixels),
        ``"missed"`` when > 1 + UNEVEN_SIGMAS sqrt(2 / pixels), else ``""`` (annuli of fewer than
        ``MIN_ANNULUS_PIXELS`` pixels: ``""``).
    """
    r = torch.hypot(x, y)
    out = []
    for k in range(int(float(r[used].max()) // width_arcsec) + 1 if bool(used.any()) else 0):
        ring = used & (r >= k * width_arcsec) & (r < (k + 1) * width_arcsec)
        n = int(ring.sum())
        if n == 0:
            continue
        chi2 = float((normalised_residual[ring].double() ** 2).mean())
        tol = UNEVEN_SIGMAS * (2.0 / n) ** 0.5
        judged = ""
        if n >= MIN_ANNULUS_PIXELS:
            judged = "noise fitted" if chi2 < 1 - tol else "missed" if chi2 > 1 + tol else ""
        out.append(
            {
                "r_in": round(k * width_arcsec, 3),
                "r_out": round((k + 1) * width_arcsec, 3),
                "pixels": n,
                "chi2_nu": round(chi2, 4),
                "judged": judged,
            }
        )
    return out


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
    q.chi2_nu_by_radius = chi2_by_radius(resid[0, 0], used[0, 0], x, y)
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
