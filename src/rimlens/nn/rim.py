"""The Recurrent Inference Machine (docs/censai_as_run.md section 3).

At step 0 the U-net sees ``[y, 0, 0, 0, 0]`` and returns the initial estimate (learned from the
observation). At each later step it sees ``[y, s_t, eta_t, g~_s, g~_eta]`` where ``eta = log10 kappa``
and ``g~`` are the gradients of ``chi^2 / 2`` (the negative log-likelihood of the simulator) with
respect to the source and ``eta``, normalised RMSProp-style per pixel
(``v = 0.9 v + 0.1 g^2``, ``g~ = g / (sqrt(v / (1 - 0.9^(t+1))) + 1e-8)``), and returns additive
updates. During training the gradient computation is excluded from back-propagation through time
(the gradients are constant inputs), as in the paper.

With ``RIMConfig.external_shear`` the RIM also estimates a constant external shear
``gamma = (gamma1, gamma2)`` (the tidal field of mass outside the field, which the convergence map
cannot make): the U-net additionally sees ``gamma`` and its RMSProp-normalised likelihood gradient,
each broadcast to constant channels, and the image mean of two more output channels is ``gamma``'s
update. The loss adds ``SHEAR_LOSS_WEIGHT * |gamma_t - gamma|^2``. A model without the term loads
into one with it (:func:`expand_state_dict`: the new input and output weights start at zero, so the
expanded model starts as the old one with ``gamma = 0``).

The source link is the identity in every step (the paper used identity in training but ReLU at
test time, an inconsistency we do not reproduce); the *reported* source is ``max(s, 0)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rimlens.config import GridConfig, Preset, RIMConfig
from rimlens.errors import RimlensInputError
from rimlens.nn.unet import GRUUNet
from rimlens.physics import PSF, LensSimulator
from rimlens.physics.convergence import KAPPA_FLOOR, log10_kappa

__all__ = ["RIM", "SHEAR_LOSS_WEIGHT", "RIMOutput", "expand_state_dict", "rim_loss"]

SHEAR_LOSS_WEIGHT = 10.0
"""Weight of the shear term of :func:`rim_loss`: a shear error of 0.02 per component then costs
about as much as the typical log10-kappa term of a trained model (~0.01)."""


@dataclass
class RIMOutput:
    """All estimates of a RIM call: ``source`` and ``log10_kappa`` are ``T x B x 1 x N x N``."""

    source: torch.Tensor
    log10_kappa: torch.Tensor
    chi2: torch.Tensor  # T-1 x B: chi^2 at the estimates whose gradients were computed
    shear: torch.Tensor | None = None  # T x B x 2 (gamma1, gamma2) when the RIM estimates an external shear

    @property
    def final_shear(self) -> torch.Tensor | None:
        """External shear ``B x 2`` of the last step (``None`` for a RIM without the shear term)."""
        return None if self.shear is None else self.shear[-1]

    @property
    def final_source(self) -> torch.Tensor:
        """Reported source of the last step (non-negative), ``B x 1 x N x N``."""
        return self.source[-1].clamp_min(0)

    @property
    def final_kappa(self) -> torch.Tensor:
        """Convergence of the last step, ``B x 1 x N x N``."""
        return 10 ** self.log10_kappa[-1]

    @classmethod
    def single_step(cls, source: torch.Tensor, kappa: torch.Tensor, shear: torch.Tensor | None = None) -> RIMOutput:
        """Final maps ``B x 1 x N x N`` (source, convergence) and optionally a shear ``B x 2`` seen as a
        one-step output (for the loss)."""
        return cls(
            source[None],
            log10_kappa(kappa)[None],
            source.new_zeros(0, source.shape[0]),
            None if shear is None else shear[None],
        )


class RIM(nn.Module):
    """RIM over a lensing simulator. ``forward(observation, psf, noise_sigma)`` -> :class:`RIMOutput`.

    Args:
        config: model configuration.
        grid: image / source grids (they must have the same number of pixels: the U-net stacks
            observation, source and convergence as channels).

    Attributes:
        preset: the whole configuration the model was built from (set by :meth:`from_preset`; a
            loaded checkpoint carries it), else ``None``.
        checkpoint_path: the file it was loaded from, if any.
    """

    def __init__(self, config: RIMConfig, grid: GridConfig):
        super().__init__()
        self.preset: Preset | None = None
        self.checkpoint_path: Path | None = None
        if grid.image_pixels != grid.source_pixels:
            raise RimlensInputError("the RIM needs image_pixels == source_pixels (they are stacked as channels)")
        levels = config.unet.levels
        if grid.image_pixels % (2**levels):
            raise RimlensInputError(f"{grid.image_pixels} px is not divisible by 2^{levels} (U-net levels)")
        self.config, self.grid = config, grid
        self.simulator = LensSimulator(grid.image_grid, grid.source_grid, supersample=grid.supersample)
        self.shear = config.external_shear
        unet = dataclasses.replace(config.unet, in_channels=9, out_channels=4) if self.shear else config.unet
        self.unet = GRUUNet(unet)
        self.amp = False  # bfloat16 autocast of the U-net (the simulator stays float32)

    @classmethod
    def from_preset(cls, preset: Preset) -> RIM:
        """A freshly initialised RIM for ``preset`` (its ``model`` and ``grid``), remembering the preset."""
        model = cls(preset.model, preset.grid)
        model.preset = preset
        return model

    def _unet(self, x, hidden=None):
        if self.amp:  # bfloat16 autocast on CUDA or CPU; states and outputs are returned in float32
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                delta, hidden = self.unet(x, hidden)
            return delta.float(), [h.float() for h in hidden]
        return self.unet(x, hidden)

    def _normalise(self, g, v, t):
        d = self.config.rmsprop_decay
        v = d * v + (1 - d) * g**2
        v_hat = v / (1 - d ** (t + 1))
        return g / (torch.sqrt(v_hat) + self.config.epsilon), v

    def forward(
        self,
        observation: torch.Tensor,
        psf,
        noise_sigma,
        *,
        steps: int | None = None,
        differentiable_likelihood: bool = False,
        mask: torch.Tensor | None = None,
        functional: bool = False,
    ) -> RIMOutput:
        """Run the RIM.

        Args:
            observation: ``B x 1 x N x N``.
            psf: a :class:`rimlens.physics.PSF` or kernels ``B x 1 x K x K``.
            noise_sigma: float, ``(B,)`` or a noise map.
            steps: number of steps T (default: the configuration's).
            differentiable_likelihood: keep the likelihood gradients in the graph (second order),
                for fine-tuning; off in training, as the paper.
            mask: optional pixel mask for the likelihood (True = used).
            functional: likelihood gradients with ``torch.func`` (for ``vmap`` over examples, e.g.
                per-sample gradients of the weights); ``psf`` must then be a PSF object.
        """
        steps = steps or self.config.steps
        psf = psf if isinstance(psf, PSF) else PSF.from_kernel(psf)
        sim = self.simulator
        b = observation.shape[0]
        zeros = torch.zeros_like(observation)
        x = torch.cat([observation] + [zeros] * (8 if self.shear else 4), dim=1)
        channels_last = (
            not functional
            and x.device.type == "cpu"
            and next(self.unet.parameters()).is_contiguous(memory_format=torch.channels_last)
        )
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        delta, hidden = self._unet(x)
        s, eta = delta[:, :1], delta[:, 1:2]
        gamma = delta[:, 2:4].mean(dim=(-2, -1)) if self.shear else None
        sources, etas, chi2s, gammas = [s], [eta], [], [gamma]
        v_s = v_eta = v_gamma = None
        for t in range(steps - 1):
            if gamma is not None:
                g_s, g_eta, g_gamma, chi2 = sim.likelihood_gradient_with_shear(
                    observation,
                    s if differentiable_likelihood else s.detach(),
                    eta if differentiable_likelihood else eta.detach(),
                    gamma if differentiable_likelihood else gamma.detach(),
                    psf,
                    noise_sigma,
                    mask,
                    create_graph=differentiable_likelihood,
                    check=False,
                    functional=functional and not differentiable_likelihood,
                )
                if v_gamma is None:
                    v_gamma = torch.zeros_like(g_gamma)
                g_gamma, v_gamma = self._normalise(g_gamma, v_gamma, t)
            elif differentiable_likelihood:
                g_s, g_eta, chi2 = sim.likelihood_gradient(
                    observation, s, eta, psf, noise_sigma, mask, create_graph=True, check=False
                )
            else:
                g_s, g_eta, chi2 = sim.likelihood_gradient(
                    observation, s.detach(), eta.detach(), psf, noise_sigma, mask, check=False, functional=functional
                )
            if v_s is None:
                v_s, v_eta = torch.zeros_like(g_s), torch.zeros_like(g_eta)
            g_s, v_s = self._normalise(g_s, v_s, t)
            g_eta, v_eta = self._normalise(g_eta, v_eta, t)
            maps = [observation, s, eta, g_s, g_eta]
            if gamma is not None:
                constant = torch.cat([gamma, g_gamma], dim=1)[:, :, None, None].expand(-1, -1, *observation.shape[-2:])
                maps.append(constant.to(observation.dtype))
            x = torch.cat(maps, dim=1)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            delta, hidden = self._unet(x, hidden)
            s, eta = s + delta[:, :1], eta + delta[:, 1:2]
            if gamma is not None:
                gamma = gamma + delta[:, 2:4].mean(dim=(-2, -1))
            sources.append(s)
            etas.append(eta)
            gammas.append(gamma)
            chi2s.append(chi2)
        chi2 = torch.stack(chi2s) if chi2s else observation.new_zeros(0, b)
        shear = torch.stack([g for g in gammas if g is not None]) if self.shear else None
        return RIMOutput(torch.stack(sources), torch.stack(etas), chi2, shear)


def rim_loss(
    output: RIMOutput,
    source: torch.Tensor,
    kappa: torch.Tensor,
    reduction: str = "mean",
    shear: torch.Tensor | None = None,
    kappa_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The RIM's loss (paper eq. 7 / docs/censai_as_run.md section 3), the one loss of rimlens: training,
    validation, the evaluation's figures of merit and the fine-tuning's Fisher information use it.

    ``loss_b = mean_t [ mean_p (s_t - s)^2 + sum_p w_p (eta_t - log10 kappa)^2 ]`` with
    ``w_p = sqrt(kappa_p) / sum_q sqrt(kappa_q)`` and kappa floored at ``KAPPA_FLOOR``.

    When the output carries a shear (``T x B x 2``), ``SHEAR_LOSS_WEIGHT * mean_t |gamma_t - gamma|^2``
    is added (true shear ``shear``, ``B x 2``; zero when not given).

    Args:
        output: estimates ``T x B x 1 x N x N`` (:meth:`RIMOutput.single_step` for final maps).
        source, kappa: truth ``B x 1 x N x N``.
        reduction: ``"mean"`` (batch mean, a scalar) or ``"none"`` (one value per lens, ``(B,)``).
        shear: true external shear ``B x 2`` (used only when the output has a shear).
        kappa_weight: optional extra per-pixel weights of the kappa term, ``B x 1 x N x N`` (e.g. to
            weigh the annulus that sets the slope, :attr:`rimlens.config.TrainConfig.annulus_weight`):
            ``w_p`` becomes ``sqrt(kappa_p) k_p / sum_q sqrt(kappa_q) k_q``; ``None`` is the paper's loss.
    """
    if reduction not in ("mean", "none"):
        raise RimlensInputError(f"rim_loss reduction must be 'mean' or 'none', got {reduction!r}")
    w = torch.sqrt(kappa.clamp_min(KAPPA_FLOOR))
    if kappa_weight is not None:
        w = w * kappa_weight
    w = w / w.sum(dim=(-3, -2, -1), keepdim=True)
    src_term = ((output.source - source) ** 2).mean(dim=(-3, -2, -1))  # T x B
    kap_term = (w * (output.log10_kappa - log10_kappa(kappa)) ** 2).sum(dim=(-3, -2, -1))
    per_lens = (src_term + kap_term).mean(dim=0)
    if output.shear is not None:
        truth = output.shear.new_zeros(output.shear.shape[1:]) if shear is None else shear.to(output.shear)
        per_lens = per_lens + SHEAR_LOSS_WEIGHT * ((output.shear - truth) ** 2).sum(dim=-1).mean(dim=0)
    return per_lens.mean() if reduction == "mean" else per_lens


def expand_state_dict(state: dict[str, torch.Tensor], model: RIM) -> dict[str, torch.Tensor]:
    """Weights of a RIM without the shear term made to fit ``model`` (which has it).

    The U-net's input convolution gains 4 input channels and its output convolution 2 output
    channels, all with zero weights (and bias), so the expanded model reproduces the old model's
    maps with ``gamma = 0`` at every step until training moves them. Other tensors must match.
    """
    target = model.state_dict()
    out = {}
    for name, value in state.items():
        if name not in target:
            raise RimlensInputError(f"weights {name!r} do not belong to this model")
        want = target[name]
        if value.shape == want.shape:
            out[name] = value
            continue
        grown = torch.zeros_like(want)
        index = tuple(slice(0, n) for n in value.shape)
        if value.ndim != want.ndim or any(n > m for n, m in zip(value.shape, want.shape, strict=True)):
            raise RimlensInputError(f"weights {name!r} have shape {tuple(value.shape)}, the model {tuple(want.shape)}")
        grown[index] = value
        out[name] = grown
    return out
