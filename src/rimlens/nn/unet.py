"""U-net whose skip connections and bottleneck each hold a convolutional-GRU memory
(docs/censai_as_run.md section 4): strided convolutions down, transposed convolutions up, tanh, an
11 x 11 input convolution and a 1 x 1 linear output convolution. Every size is configuration.
"""

from __future__ import annotations

import torch
from torch import nn

from rimlens.config import UNetConfig

__all__ = ["ConvGRU", "GRUUNet"]

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.3), "silu": nn.SiLU}


class ConvGRU(nn.Module):
    """Convolutional GRU, "concat" variant: ``z, r = sigmoid(W [x, h])``,
    ``h~ = tanh(W_h [x, r * h])``, ``h' = z * h + (1 - z) * h~``; returns ``h'``."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        p = kernel_size // 2
        self.gates = nn.Conv2d(2 * channels, 2 * channels, kernel_size, padding=p)
        self.candidate = nn.Conv2d(2 * channels, channels, kernel_size, padding=p)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        z, r = torch.sigmoid(self.gates(torch.cat([x, h], dim=1))).chunk(2, dim=1)
        h_tilde = torch.tanh(self.candidate(torch.cat([x, r * h], dim=1)))
        return z * h + (1 - z) * h_tilde


def _block(c_in: int, c_out: int, n: int, k: int, act) -> nn.Sequential:
    layers = []
    for i in range(n):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, k, padding=k // 2), act()]
    return nn.Sequential(*layers)


class GRUUNet(nn.Module):
    """The shared U-net of the RIM. ``forward(x, hidden) -> (update, hidden)``.

    ``x`` is ``B x in_channels x N x N``; ``hidden`` is a list of ``levels + 1`` memories (skip GRUs
    then bottleneck GRU), or None at the first step (zeros).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        act = ACTIVATIONS[c.activation]
        f = list(c.filters)
        self.input = nn.Sequential(
            nn.Conv2d(c.in_channels, f[0], c.input_kernel_size, padding=c.input_kernel_size // 2), act()
        )
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        self.skip_grus = nn.ModuleList()
        for i, fi in enumerate(f):
            self.encoders.append(_block(f[0] if i == 0 else f[i], fi, c.convs_per_level, c.kernel_size, act))
            nxt = f[i + 1] if i + 1 < len(f) else c.bottleneck_filters
            self.downs.append(
                nn.Sequential(nn.Conv2d(fi, nxt, c.kernel_size, stride=2, padding=c.kernel_size // 2), act())
            )
            self.skip_grus.append(ConvGRU(fi, c.gru_kernel_size))
        self.bottleneck_gru = ConvGRU(c.bottleneck_filters, c.gru_kernel_size)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for i, fi in enumerate(f):
            prev = f[i + 1] if i + 1 < len(f) else c.bottleneck_filters
            self.ups.append(
                nn.Sequential(
                    nn.ConvTranspose2d(prev, fi, c.kernel_size, stride=2, padding=c.kernel_size // 2, output_padding=1),
                    act(),
                )
            )
            self.decoders.append(_block(2 * fi, fi, c.convs_per_level, c.kernel_size, act))
        self.output = nn.Conv2d(f[0], c.out_channels, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot-normal convolutions, Glorot-uniform GRU convolutions, zero biases (as the paper)."""
        for name, m in self.named_modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                if ".gates" in name or ".candidate" in name or name.endswith(("gates", "candidate")):
                    nn.init.xavier_uniform_(m.weight)
                else:
                    nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def init_hidden(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, _, n, _ = x.shape
        hs = []
        for i, fi in enumerate(self.config.filters):
            s = -(-n // 2**i)
            hs.append(x.new_zeros(b, fi, s, s))
        s = -(-n // 2**self.config.levels)
        hs.append(x.new_zeros(b, self.config.bottleneck_filters, s, s))
        if x.is_contiguous(memory_format=torch.channels_last):
            hs = [h.contiguous(memory_format=torch.channels_last) for h in hs]
        return hs

    def forward(self, x: torch.Tensor, hidden: list[torch.Tensor] | None = None):
        if hidden is None:
            hidden = self.init_hidden(x)
        new_hidden = []
        h = self.input(x)
        skips = []
        for enc, down, gru, mem in zip(self.encoders, self.downs, self.skip_grus, hidden[:-1], strict=True):
            c = enc(h)
            s = gru(c, mem)
            new_hidden.append(s)
            skips.append(s)
            h = down(c)
        h = self.bottleneck_gru(h, hidden[-1])
        new_hidden.append(h)
        for up, dec, skip in zip(reversed(self.ups), reversed(self.decoders), reversed(skips), strict=True):
            h = up(h)
            h = dec(torch.cat([h, skip], dim=1))
        return self.output(h), new_hidden


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
