"""Simulated lenses: draw a source and a convergence map, a PSF and a noise level, ray-trace,
add noise, and keep only lenses that pass the validation checks (counting why others failed)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from rimlens.config import NOISE_RECIPES, DataConfig, GridConfig, Preset, ValidationConfig
from rimlens.data.kappa import (
    AnalyticKappaConfig,
    analytic_kappa,
    random_dihedral,
    rescale_to_einstein_radius,
    tng_evaluation_maps,
)
from rimlens.data.particles import kappa_from_particles, synthetic_galaxy
from rimlens.data.random import child_rng, truncated_normal
from rimlens.data.sources import SourceBank, parametric_sources
from rimlens.data.vae_family import VAESampler
from rimlens.errors import RimlensInputError
from rimlens.physics import PSF, LensSimulator, PixelGrid
from rimlens.physics.psf import FWHM_TO_SIGMA

__all__ = ["REJECTION_REASONS", "LensBatch", "LensGenerator", "psf_kernel_size", "validate_lenses"]

REJECTION_REASONS = ("magnification", "edge_flux", "faint_source", "low_kappa")


def psf_kernel_size(grid: PixelGrid, max_fwhm_arcsec: float) -> int:
    """Common odd kernel size for all PSFs of a data set: 4 sigma of the widest PSF each side."""
    return max(3, 2 * math.ceil(4 * max_fwhm_arcsec * FWHM_TO_SIGMA / grid.pixel_scale_arcsec) + 1)


def validate_lenses(
    noiseless: torch.Tensor, source: torch.Tensor, kappa: torch.Tensor, grid: GridConfig, config: ValidationConfig
) -> dict[str, torch.Tensor]:
    """The four checks of docs/censai_as_run.md section 2.4, per lens.

    Returns:
        ``{reason: (B,) bool tensor that is True where the lens FAILS that check}`` for the reasons
        in ``REJECTION_REASONS``.
    """
    img_g, src_g = grid.image_grid, grid.source_grid
    t = config.brightness_threshold
    img_area = (noiseless > t).flatten(1).sum(1).double() * img_g.pixel_scale_arcsec**2
    src_area = (source > t).flatten(1).sum(1).double() * src_g.pixel_scale_arcsec**2
    magnification = img_area / src_area.clamp_min(1e-12)
    n = img_g.n_pixels
    w = max(1, math.ceil(config.edge_width_arcsec / img_g.pixel_scale_arcsec - 1e-9))
    edge = torch.ones(n, n, dtype=torch.bool)
    edge[w : n - w, w : n - w] = False
    edge_max = (noiseless[:, 0] * edge).flatten(1).amax(1)
    bright_area = (source > 0.1).flatten(1).sum(1).double() * src_g.pixel_scale_arcsec**2
    return {
        "magnification": magnification < config.min_magnification,
        "edge_flux": edge_max > config.edge_tolerance,
        "faint_source": bright_area < config.min_bright_source_area_arcsec2,
        "low_kappa": kappa.flatten(1).amax(1) < config.min_max_kappa,
    }


@dataclass
class LensBatch:
    """A batch of simulated lenses (tensors ``B x 1 x N x N`` unless stated)."""

    observation: torch.Tensor
    source: torch.Tensor
    kappa: torch.Tensor
    psf: torch.Tensor  # B x 1 x K x K kernels
    psf_fwhm: torch.Tensor  # (B,) arcsec
    noise_sigma: torch.Tensor  # (B,)
    snr: torch.Tensor  # (B,) peak SNR
    theta_e: torch.Tensor  # (B,) arcsec (requested Einstein radius)
    source_family: np.ndarray  # (B,) str
    kappa_family: np.ndarray  # (B,) str
    shear: torch.Tensor  # B x 2 external shear (gamma1, gamma2); zeros without one

    FIELDS = ("observation", "source", "kappa", "psf", "psf_fwhm", "noise_sigma", "snr", "theta_e", "shear")

    def __len__(self) -> int:
        return self.observation.shape[0]

    def select(self, idx) -> LensBatch:
        return LensBatch(
            **{k: getattr(self, k)[idx] for k in self.FIELDS},
            source_family=self.source_family[np.asarray(idx)],
            kappa_family=self.kappa_family[np.asarray(idx)],
        )

    @staticmethod
    def concat(batches: list[LensBatch]) -> LensBatch:
        return LensBatch(
            **{k: torch.cat([getattr(b, k) for b in batches]) for k in LensBatch.FIELDS},
            source_family=np.concatenate([b.source_family for b in batches]),
            kappa_family=np.concatenate([b.kappa_family for b in batches]),
        )


class LensGenerator:
    """Draws validated lenses for a preset.

    Args:
        preset: grids and data configuration.
        split: ``"train"`` or ``"test"``: which COSMOS galaxies and which particle-galaxy stream.
        bank_seed: seed of the particle-galaxy bank (different for train and test by construction).
        noise: override of the preset's noise recipe (``train``, ``high``, ``medium``, ``low``).
    """

    def __init__(
        self, preset: Preset, split: str = "train", bank_seed: int = 0, noise: str | None = None, vae_sampler=None
    ):
        if split not in ("train", "test"):
            raise RimlensInputError(f"split must be 'train' or 'test', got {split!r}")
        self.preset, self.split = preset, split
        self.grid = preset.grid
        self.data: DataConfig = preset.data
        recipe = noise or self.data.noise
        if recipe not in NOISE_RECIPES:
            raise RimlensInputError(f"unknown noise recipe {recipe!r}; choose from {sorted(NOISE_RECIPES)}")
        self.noise = NOISE_RECIPES[recipe]
        self.image_grid, self.source_grid = self.grid.image_grid, self.grid.source_grid
        self.simulator = LensSimulator(self.image_grid, self.source_grid, supersample=self.grid.supersample)
        self.psf_size = psf_kernel_size(self.image_grid, self.data.psf_fwhm_arcsec.high)
        wants_vae = "vae" in self.data.source_mix or "vae" in self.data.kappa_mix
        if vae_sampler is None and wants_vae and (self.data.source_vae or self.data.kappa_vae):
            vae_sampler = VAESampler(self.data.source_vae or None, self.data.kappa_vae or None)
        self.vae_sampler = vae_sampler
        self.source_weights = self._weights(self.data.source_mix)
        self.kappa_weights = self._weights(self.data.kappa_mix)
        if split == "train" and self.kappa_weights.get("tng", 0) > 0:
            raise RimlensInputError(
                "the TNG100 maps are for evaluation only: the 'tng' family is refused for training data"
            )
        self._source_bank = None
        self._particle_bank = None
        self.bank_seed = bank_seed + (0 if split == "train" else 1_000_003)
        self.rejections: Counter = Counter()
        self.n_drawn = 0

    def _weights(self, mix: dict) -> dict:
        mix = {k: v for k, v in mix.items() if v > 0}
        if "vae" in mix and self.vae_sampler is None:
            raise RimlensInputError("the data mix asks for VAE samples but no VAE sampler was given")
        total = sum(mix.values())
        return {k: v / total for k, v in mix.items()}

    # ------------------------------------------------------------------ banks (built lazily)
    @property
    def source_bank(self) -> SourceBank:
        if self._source_bank is None:
            self._source_bank = SourceBank(self.source_grid, self.split, min_peak_snr=self.data.min_source_peak_snr)
        return self._source_bank

    @property
    def particle_bank(self) -> torch.Tensor:
        """Convergence maps of synthetic particle galaxies, un-rescaled (``K x 1 x N x N``)."""
        if self._particle_bank is None:
            rng = child_rng(self.bank_seed, 7)
            maps = []
            for _ in range(self.data.particle_bank_size):
                pos, m = synthetic_galaxy(rng)
                maps.append(torch.as_tensor(kappa_from_particles(pos, m, self.image_grid)))
            self._particle_bank = torch.stack(maps)[:, None].float()
        return self._particle_bank

    def prepare(self) -> LensGenerator:
        """Build now the banks the configured mix draws from (otherwise built on first use): call it
        before forking DataLoader workers so they share one bank instead of each building its own."""
        if self.source_weights.get("cosmos", 0) > 0:
            _ = self.source_bank
        if self.kappa_weights.get("particles", 0) > 0:
            _ = self.particle_bank
        return self

    # ------------------------------------------------------------------ draws
    def _families(self, rng, weights: dict, n: int) -> np.ndarray:
        names = sorted(weights)  # independent of the dict's order (configurations round-trip through JSON)
        return np.asarray(names)[rng.choice(len(names), size=n, p=[weights[k] for k in names])]

    def _sources(self, rng, families: np.ndarray) -> torch.Tensor:
        out = torch.zeros(len(families), 1, self.source_grid.n_pixels, self.source_grid.n_pixels)
        for fam in np.unique(families):
            idx = np.flatnonzero(families == fam)
            if fam == "cosmos":
                out[idx] = self.source_bank.draw(
                    rng, len(idx), zoom=self.data.cosmos_zoom, max_shift_arcsec=self.data.cosmos_max_shift_arcsec
                )[0]
            elif fam == "parametric":
                out[idx] = parametric_sources(self.source_grid, rng, len(idx), self.data.parametric_source)
            elif fam == "vae":
                out[idx] = self.vae_sampler.sources(rng, len(idx))
        return out

    def _kappas(self, rng, families: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(families)
        out = torch.zeros(n, 1, self.image_grid.n_pixels, self.image_grid.n_pixels)
        theta_e = torch.as_tensor(rng.uniform(*self.data.theta_e_range, n), dtype=torch.float32)
        for fam in np.unique(families):
            idx = np.flatnonzero(families == fam)
            if fam in ("sie", "sie_substructure", "epl"):
                cfg = AnalyticKappaConfig(theta_e_range=tuple(self.data.theta_e_range))
                if fam == "epl":  # power-law slopes around isothermal, with a few subhaloes and multipoles,
                    # as observed lenses have (issue 11)
                    cfg = AnalyticKappaConfig(
                        theta_e_range=tuple(self.data.theta_e_range),
                        slope_range=(1.6, 2.4),
                        subhalo_mean_count=1.0,
                        multipole_max_amplitude=0.03,
                    )
                if fam == "sie_substructure":
                    cfg = AnalyticKappaConfig(
                        theta_e_range=tuple(self.data.theta_e_range),
                        subhalo_mean_count=4.0,
                        multipole_max_amplitude=0.05,
                    )
                k, params = analytic_kappa(self.image_grid, rng, len(idx), cfg)
                out[idx] = k
                theta_e[idx] = torch.as_tensor(params["theta_e"], dtype=torch.float32)
            else:
                if fam == "particles":
                    bank = self.particle_bank
                    base = random_dihedral(bank[rng.integers(0, len(bank), len(idx))], rng)
                elif fam == "tng":  # evaluation only (refused for training in __init__)
                    maps = tng_evaluation_maps(self.image_grid)
                    base = random_dihedral(maps[rng.integers(0, len(maps), len(idx))], rng)
                else:  # vae
                    base = self.vae_sampler.kappas(rng, len(idx))
                out[idx], _ = rescale_to_einstein_radius(base, self.image_grid.pixel_scale_arcsec, theta_e[idx])
        # the SIE's requested theta_E is its parameter; the estimator's value is stored for all
        return out, theta_e

    def _candidates(self, rng, n: int) -> tuple[LensBatch, torch.Tensor]:
        """``n`` unvalidated lenses and their noiseless images."""
        src_fam = self._families(rng, self.source_weights, n)
        kap_fam = self._families(rng, self.kappa_weights, n)
        source = self._sources(rng, src_fam)
        kappa, theta_e = self._kappas(rng, kap_fam)
        f = self.data.psf_fwhm_arcsec
        fwhm = torch.as_tensor(truncated_normal(rng, f.mean, f.std, f.low, f.high, n), dtype=torch.float32)
        nz = self.noise
        sigma = torch.as_tensor(truncated_normal(rng, nz.mean, nz.std, nz.low, nz.high, n), dtype=torch.float32)
        psf = PSF.gaussian(fwhm, self.image_grid.pixel_scale_arcsec, size=self.psf_size)
        shear = self._shear(rng, n)
        noiseless = self.simulator.forward(source, kappa, psf, shear=shear, check=False)
        noise = torch.as_tensor(rng.standard_normal(noiseless.shape), dtype=torch.float32)
        observation = noiseless + sigma.reshape(-1, 1, 1, 1) * noise
        snr = noiseless.flatten(1).amax(1) / sigma
        batch = LensBatch(observation, source, kappa, psf.kernel, fwhm, sigma, snr, theta_e, src_fam, kap_fam, shear)
        return batch, noiseless

    def _shear(self, rng, n: int) -> torch.Tensor:
        """External shear ``n x 2``: magnitude U(0, shear_max), angle uniform (zeros when shear_max = 0,
        drawing nothing so that older configurations keep their random streams)."""
        if self.data.shear_max <= 0:
            return torch.zeros(n, 2)
        magnitude = rng.uniform(0, self.data.shear_max, n)
        angle = rng.uniform(0, np.pi, n)
        gamma = np.stack([magnitude * np.cos(2 * angle), magnitude * np.sin(2 * angle)], axis=1)
        return torch.as_tensor(gamma, dtype=torch.float32)

    def draw(self, rng: np.random.Generator, batch: int, max_tries: int = 100) -> LensBatch:
        """``batch`` validated lenses. Rejection counts accumulate in ``self.rejections``."""
        kept, n_kept = [], 0
        for _ in range(max_tries):
            need = batch - n_kept
            cand, noiseless = self._candidates(rng, max(4, math.ceil(need * 1.15)))
            fails = validate_lenses(noiseless, cand.source, cand.kappa, self.grid, self.data.validation)
            bad = torch.zeros(len(cand), dtype=torch.bool)
            for reason in REJECTION_REASONS:
                self.rejections[reason] += int(fails[reason].sum())
                bad |= fails[reason]
            self.n_drawn += len(cand)
            good = torch.nonzero(~bad).flatten()[:need]
            if len(good):
                kept.append(cand.select(good.numpy()))
                n_kept += len(good)
            if n_kept >= batch:
                return LensBatch.concat(kept)
        raise RimlensInputError(
            f"validation rejected almost every lens ({dict(self.rejections)}); check the configuration"
        )

    def stats(self) -> dict:
        """Counts of drawn candidates and of rejections per reason (a lens may fail several)."""
        return {"drawn": self.n_drawn, **{f"rejected_{k}": self.rejections[k] for k in REJECTION_REASONS}}
