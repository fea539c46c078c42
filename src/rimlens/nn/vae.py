"""Variational auto-encoders for sources and log10 convergence maps (docs/censai_as_run.md section 6).

Encoder: 7x7 conv (ReLU), then ``levels`` x [``convs`` 3x3 convs + stride-2 3x3 conv] with
LeakyReLU(0.3), flatten, two dense heads (mean, log-variance). Decoder: dense -> feature map,
``levels`` x [stride-2 transposed conv + ``convs`` 3x3 convs], 3x3 output conv with a sigmoid
(sources in [0, 1]) or linear (log10 kappa) output. Loss per image:
``sum_p (x - x_hat)^2 + beta(t) KL + gamma(t) mean (Dense_dec(z) - encoder features)^2``
(the bottleneck identity penalty fading out).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from rimlens.config import KAPPA_VAE, SOURCE_VAE, Preset, VAEConfig
from rimlens.errors import RimlensInputError

__all__ = ["VAE", "default_vae_config"]


class VAE(nn.Module):
    """Convolutional VAE on ``B x 1 x N x N`` maps."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        c = self.config = config
        self.kind: str | None = None  # 'source' or 'kappa' once loaded from a checkpoint
        if c.image_pixels % (2**c.levels):
            raise RimlensInputError(f"{c.image_pixels} px is not divisible by 2^{c.levels} (VAE levels)")

        def act():
            return nn.LeakyReLU(0.3)

        width = [c.filters * c.filter_scaling**i for i in range(c.levels + 1)]
        enc = [nn.Conv2d(1, width[0], 7, padding=3), nn.ReLU()]
        for i in range(c.levels):
            for _ in range(c.convs_per_level):
                enc += [nn.Conv2d(width[i], width[i], 3, padding=1), act()]
            enc += [nn.Conv2d(width[i], width[i + 1], 3, stride=2, padding=1), act()]
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        self.bottom = (width[-1], c.image_pixels // 2**c.levels)
        flat = width[-1] * self.bottom[1] ** 2
        self.mean = nn.Linear(flat, c.latent)
        self.logvar = nn.Linear(flat, c.latent)
        self.expand = nn.Linear(c.latent, flat)
        dec = []
        for i in reversed(range(c.levels)):
            dec += [nn.ConvTranspose2d(width[i + 1], width[i], 3, stride=2, padding=1, output_padding=1), act()]
            for _ in range(c.convs_per_level):
                dec += [nn.Conv2d(width[i], width[i], 3, padding=1), act()]
        dec += [nn.Conv2d(width[0], 1, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean, logvar, flattened features)`` of ``B x 1 x N x N`` maps."""
        h = self.encoder(x)
        return self.mean(h), self.logvar(h), h

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.expand(z).reshape(-1, self.bottom[0], self.bottom[1], self.bottom[1])
        out = self.decoder(h)
        return torch.sigmoid(out) if self.config.output == "sigmoid" else out

    def forward(self, x: torch.Tensor):
        mean, logvar, feats = self.encode(x)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        return self.decode(z), mean, logvar, feats, z

    def loss(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """Batch-mean loss and its terms at training step ``step``."""
        x_hat, mean, logvar, feats, z = self(x)
        rec = ((x_hat - x) ** 2).sum(dim=(1, 2, 3))
        kl = -0.5 * (1 + logvar - mean**2 - logvar.exp()).sum(dim=1)
        ident = ((self.expand(z) - feats) ** 2).mean(dim=1)
        c = self.config
        total = (rec + c.beta(step) * kl + c.gamma(step) * ident).mean()
        return total, {
            "reconstruction": float(rec.detach().mean()),
            "kl": float(kl.detach().mean()),
            "identity": float(ident.detach().mean()),
        }

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, center: torch.Tensor | None = None, scale: float = 1.0
    ) -> torch.Tensor:
        """Decode ``n`` latent draws ``z ~ N(center, scale^2 I)`` (center 0 by default)."""
        dev = next(self.parameters()).device
        z = torch.randn(n, self.config.latent, generator=generator, device=dev) * scale
        if center is not None:
            z = z + center
        out = self.decode(z)
        if self.config.sample_range is not None:
            out = out.clamp(*self.config.sample_range)
        return out


def default_vae_config(kind: str, preset: Preset) -> VAEConfig:
    """The VAE configuration of ``kind`` ('source' or 'kappa') for the preset's grids."""
    if kind not in ("source", "kappa"):
        raise RimlensInputError(f"VAE kind must be 'source' or 'kappa', got {kind!r}")
    base = SOURCE_VAE if kind == "source" else KAPPA_VAE
    n = preset.grid.source_pixels if kind == "source" else preset.grid.image_pixels
    cfg = VAEConfig(image_pixels=n, **base)
    # The reconstruction term sums over pixels, so on an N-pixel grid it is (N/128)^2 of the paper's;
    # scale beta alike to keep the paper's balance (at 32 px the unscaled KL weight collapses the
    # posterior and the VAE returns the mean map).
    f = (n / 128) ** 2
    return dataclasses.replace(cfg, beta_start=cfg.beta_start * f, beta_end=cfg.beta_end * f)
