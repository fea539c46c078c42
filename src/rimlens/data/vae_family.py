"""The "vae" data family: sources and convergence maps decoded from trained VAEs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rimlens.errors import RimlensInputError
from rimlens.io.checkpoint import load_vae

__all__ = ["VAESampler"]


class VAESampler:
    """Training-data family drawn from trained VAEs (paper: 80% VAE, 20% real).

    ``sources(rng, n)``: ``relu(decoder(z)) / max``; ``kappas(rng, n)``: ``10 ** decoder(z)``
    (the lens generator then rescales them to the Einstein-radius range); ``z ~ N(0, I)`` drawn
    from the numpy generator, so data sets stay reproducible.
    """

    def __init__(self, source_vae_path: str | Path | None = None, kappa_vae_path: str | Path | None = None):
        self.source_vae = load_vae(source_vae_path, kind="source") if source_vae_path else None
        self.kappa_vae = load_vae(kappa_vae_path, kind="kappa") if kappa_vae_path else None

    @torch.no_grad()
    def sources(self, rng: np.random.Generator, n: int) -> torch.Tensor:
        if self.source_vae is None:
            raise RimlensInputError("no source VAE configured (data.source_vae)")
        z = torch.as_tensor(rng.standard_normal((n, self.source_vae.config.latent)), dtype=torch.float32)
        s = self.source_vae.decode(z).clamp_min(0)
        return s / s.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-6)

    @torch.no_grad()
    def kappas(self, rng: np.random.Generator, n: int) -> torch.Tensor:
        if self.kappa_vae is None:
            raise RimlensInputError("no kappa VAE configured (data.kappa_vae)")
        z = torch.as_tensor(rng.standard_normal((n, self.kappa_vae.config.latent)), dtype=torch.float32)
        return 10 ** self.kappa_vae.decode(z)
