"""The lensing simulator: one object that owns the forward model, the noise and the likelihood.

    observation = PSF * [source(theta - alpha(kappa) - alpha_shear)] + noise,   noise ~ N(0, sigma^2) per pixel.

``alpha_shear`` is an optional constant external shear ``(gamma1, gamma2)`` per lens (lenstronomy's
``SHEAR`` about the grid centre, :func:`rimlens.physics.profiles.shear_deflection`): the tidal field of
mass outside the field, which a convergence map of the field cannot make.

The convergence lives on the image grid; the source on its own grid (see :mod:`rimlens.physics.grid`).
With ``supersample = f > 1`` the image is pixel-integrated: rays are traced through the ``f x f``
sub-pixel centres of every image pixel and their source values averaged per pixel, before the PSF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

import torch

from rimlens.errors import RimlensInputError, check_batch, check_map, check_noise_sigma
from rimlens.physics.deflection import deflection_field, deflection_supersampled
from rimlens.physics.grid import PixelGrid
from rimlens.physics.likelihood import chi_squared, degrees_of_freedom, peak_snr
from rimlens.physics.profiles import shear_deflection
from rimlens.physics.psf import PSF
from rimlens.physics.raytrace import pixel_average, sample_lensed, supersampled_grid

__all__ = ["LensSimulator", "SimulatedLens", "check_shear"]

PSFLike: TypeAlias = PSF | torch.Tensor
"""A :class:`PSF`, or a kernel tensor accepted by :meth:`PSF.from_kernel`."""
NoiseSigma: TypeAlias = float | torch.Tensor
"""Noise standard deviation: a float, a ``(B,)`` tensor or a ``B x 1 x N x N`` noise map (image units)."""


@dataclass
class SimulatedLens:
    """Result of :meth:`LensSimulator.simulate` (all ``B x 1 x N x N`` except ``noise_sigma``/``snr``)."""

    noiseless: torch.Tensor
    observation: torch.Tensor
    noise_sigma: torch.Tensor  # (B,) or noise map
    snr: torch.Tensor  # (B,) peak SNR of the noiseless image


def check_shear(shear: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """Validate an external shear: a finite ``B x 2`` (or ``2``) tensor of ``(gamma1, gamma2)``.

    Returns it as ``B x 2`` (a ``2`` tensor is broadcast over ``batch`` lenses when given).
    """
    if not isinstance(shear, torch.Tensor):
        raise RimlensInputError(f"shear must be a tensor of (gamma1, gamma2), got {type(shear).__name__}")
    if shear.ndim == 1:
        shear = shear[None]
    if shear.ndim != 2 or shear.shape[1] != 2:
        raise RimlensInputError(f"shear must have shape B x 2 (gamma1, gamma2), got {tuple(shear.shape)}")
    if batch is not None and shear.shape[0] not in (1, batch):
        raise RimlensInputError(f"shear has {shear.shape[0]} rows for a batch of {batch}")
    if not torch.isfinite(shear).all():
        raise RimlensInputError("shear contains NaN or infinite values")
    return shear


def _as_psf(psf: PSFLike | None) -> PSF:
    if isinstance(psf, PSF):
        return psf
    if psf is None:
        raise RimlensInputError("a PSF is required (a rimlens.physics.PSF or a kernel tensor)")
    return PSF.from_kernel(psf)


class LensSimulator:
    """Differentiable ray-tracing simulator for a pixelated source and a pixelated convergence.

    Args:
        image_grid: grid of the image and of the convergence map (``N`` pixels of ``s`` arcsec).
        source_grid: grid of the source plane.
        supersample: sub-pixels per side ``f`` (integer >= 1). With ``f > 1`` rays are traced through
            the ``f x f`` sub-pixel centres of every image pixel (offsets ``((k + 1/2) / f - 1/2) s``
            from its centre, i.e. the pixel centres of :attr:`ray_grid` = ``PixelGrid(f N, s / f)``),
            the source is sampled bilinearly at each and the samples are averaged per pixel (the
            pixel-integrated surface brightness) before the PSF. The deflection of a convergence map
            at the sub-pixel centres is the exact sum over its pixels taken as uniform squares
            (:func:`~rimlens.physics.deflection.deflection_supersampled`; point masses would leave
            each ray a fraction of a pixel from its own pixel's mass, an error ~0.5 kappa s). An
            analytic deflection ``alpha`` must be given on :attr:`ray_grid` (``B x 2 x fN x fN``).
            ``f = 1`` samples the pixel centres (bit-for-bit the unsupersampled simulator). Cost:
            about ``f**2`` times the ray tracing and deflection work of ``f = 1``.

    All methods accept float32 or float64 tensors on any device and are batched; the PSF may be
    one kernel for the whole batch or one per example; ``noise_sigma`` may be a float, a ``(B,)``
    tensor or a ``B x 1 x N x N`` noise map.
    """

    def __init__(self, image_grid: PixelGrid, source_grid: PixelGrid, supersample: int = 1) -> None:
        if not isinstance(supersample, int) or isinstance(supersample, bool) or supersample < 1:
            raise RimlensInputError(f"supersample must be an integer >= 1, got {supersample!r}")
        self.image_grid = image_grid
        self.source_grid = source_grid
        self.supersample = supersample
        self.ray_grid = supersampled_grid(image_grid, supersample)
        self._coords: dict[tuple[torch.dtype, str], torch.Tensor] = {}

    def __repr__(self) -> str:
        extra = f", supersample={self.supersample}" if self.supersample != 1 else ""
        return f"LensSimulator(image_grid={self.image_grid}, source_grid={self.source_grid}{extra})"

    def _xy(self, like: torch.Tensor) -> torch.Tensor:
        """Ray-grid coordinates ``fN x fN x 2`` (x, y; arcsec) in the dtype / device of ``like``, cached."""
        key = (like.dtype, str(like.device))
        if key not in self._coords:
            self._coords[key] = torch.stack(self.ray_grid.coordinates(like.dtype, like.device), dim=-1)
        return self._coords[key]

    # ------------------------------------------------------------------ checks
    def _check_kappa(self, kappa: torch.Tensor, name: str = "kappa") -> None:
        check_map(kappa, name)
        if kappa.shape[-1] != self.image_grid.n_pixels:
            raise RimlensInputError(
                f"{name} has {kappa.shape[-1]} pixels per side, the image grid has {self.image_grid.n_pixels}"
            )

    def _check_source(self, source: torch.Tensor) -> None:
        check_map(source, "source")
        if source.shape[-1] != self.source_grid.n_pixels:
            raise RimlensInputError(
                f"source has {source.shape[-1]} pixels per side, the source grid has {self.source_grid.n_pixels}"
            )

    def _check_image(self, image: torch.Tensor, name: str) -> None:
        check_map(image, name)
        if image.shape[-1] != self.image_grid.n_pixels:
            raise RimlensInputError(
                f"{name} has {image.shape[-1]} pixels per side, the image grid has {self.image_grid.n_pixels}"
            )

    def _check_alpha(self, alpha: torch.Tensor) -> None:
        n = self.ray_grid.n_pixels
        if not isinstance(alpha, torch.Tensor) or alpha.ndim != 4 or tuple(alpha.shape[1:]) != (2, n, n):
            shape = tuple(alpha.shape) if isinstance(alpha, torch.Tensor) else type(alpha).__name__
            where = (
                f" (the ray grid of supersample={self.supersample}: {self.ray_grid})" if self.supersample > 1 else ""
            )
            raise RimlensInputError(f"alpha must have shape B x 2 x {n} x {n}{where}, got {shape}")

    # ------------------------------------------------------------------ forward model
    def deflection(self, kappa: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Deflection ``B x 2 x N x N`` (arcsec) of a convergence map at the image-grid pixel centres.

        ``kappa`` is ``B x 1 x N x N`` (dimensionless). This is the deflection at the pixel centres
        whatever ``supersample`` is; the rays use :meth:`ray_deflection`.
        """
        if check:
            self._check_kappa(kappa)
        return deflection_field(kappa, self.image_grid.pixel_scale_arcsec, check=False)

    def ray_deflection(self, kappa: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Deflection ``B x 2 x fN x fN`` (arcsec) of a convergence map at the rays (:attr:`ray_grid`).

        ``kappa`` is ``B x 1 x N x N`` (dimensionless). For ``supersample = 1`` this is
        :meth:`deflection`; otherwise the exact deflection of the pixelated map (uniform square pixels)
        at the ``f x f`` sub-pixel centres of every pixel, laid out on :attr:`ray_grid`.
        """
        if self.supersample == 1:
            return self.deflection(kappa, check=check)
        if check:
            self._check_kappa(kappa)
        return deflection_supersampled(kappa, self.image_grid.pixel_scale_arcsec, self.supersample, check=False)

    def lens(
        self,
        source: torch.Tensor,
        kappa: torch.Tensor | None = None,
        *,
        alpha: torch.Tensor | None = None,
        shear: torch.Tensor | None = None,
        check: bool = True,
    ) -> torch.Tensor:
        """Lensed, unblurred image ``B x 1 x N x N`` of ``source`` by ``kappa`` (or by a given deflection ``alpha``).

        With ``supersample = f > 1`` each pixel is the mean of the ``f x f`` sub-pixel samples.

        Args:
            source: ``B x 1 x M x M`` source surface brightness (any units; the output has the same).
            kappa: ``B x 1 x N x N`` convergence (dimensionless).
            alpha: deflection in arcsec at the rays, instead of ``kappa``: ``B x 2 x fN x fN`` on
                :attr:`ray_grid` (``B x 2 x N x N`` at the pixel centres when ``f = 1``); e.g. an
                analytic profile evaluated at ``ray_grid.coordinates()``.
            shear: optional external shear ``B x 2`` (``gamma1, gamma2``; dimensionless) added to
                the deflection (about the grid centre).
        """
        if (kappa is None) == (alpha is None):
            raise RimlensInputError("give exactly one of kappa or alpha")
        if check:
            self._check_source(source)
            if kappa is not None:
                self._check_kappa(kappa)
                check_batch({"source": source.shape[0], "kappa": kappa.shape[0]})
        if kappa is not None:
            alpha = self.ray_deflection(kappa, check=False)
        assert alpha is not None  # exactly one of kappa / alpha was given (checked above)
        self._check_alpha(alpha)  # shapes only: cheap, and the one place a coarse alpha would slip in
        xy = self._xy(alpha)
        if shear is not None:
            if check:
                shear = check_shear(shear, source.shape[0])
            g1, g2 = shear[:, 0, None, None], shear[:, 1, None, None]
            ax, ay = shear_deflection(xy[..., 0], xy[..., 1], g1, g2)
            alpha = alpha + torch.stack([ax, ay], dim=1)
        image = sample_lensed(source, self.source_grid, xy, alpha)
        return pixel_average(image, self.supersample)

    def forward(
        self,
        source: torch.Tensor,
        kappa: torch.Tensor,
        psf: PSFLike,
        *,
        shear: torch.Tensor | None = None,
        check: bool = True,
    ) -> torch.Tensor:
        """Noiseless model image ``PSF * lens(source, kappa, shear)``, shape ``B x 1 x N x N``.

        ``source`` is ``B x 1 x M x M`` (the image has its units), ``kappa`` ``B x 1 x N x N``
        (dimensionless); ``psf`` a :class:`PSF` or a kernel; ``shear`` an optional external shear
        ``B x 2``.
        """
        psf = _as_psf(psf)
        if check:
            self._check_source(source)
            self._check_kappa(kappa)
            check_batch({"source": source.shape[0], "kappa": kappa.shape[0], "psf": psf.batch_size})
        if shear is not None and check:
            shear = check_shear(shear, source.shape[0])
        return psf.convolve(self.lens(source, kappa, shear=shear, check=False))

    __call__ = forward

    def add_noise(
        self, image: torch.Tensor, noise_sigma: NoiseSigma, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``image + sigma * N(0, 1)``; Gaussian noise added after the PSF.

        ``image`` is ``B x 1 x N x N``; ``noise_sigma`` (image units) a float, a ``(B,)`` tensor or a
        ``B x 1 x N x N`` map. Returns a ``B x 1 x N x N`` tensor.
        """
        sigma = check_noise_sigma(noise_sigma, image.shape[0], image.shape[-2:], like=image)
        noise = torch.randn(image.shape, generator=generator, dtype=image.dtype, device=image.device)
        return image + sigma * noise

    def simulate(
        self,
        source: torch.Tensor,
        kappa: torch.Tensor,
        psf: PSFLike,
        noise_sigma: NoiseSigma,
        generator: torch.Generator | None = None,
        *,
        shear: torch.Tensor | None = None,
    ) -> SimulatedLens:
        """Noiseless and noisy images of a batch of lenses, with their peak SNR.

        Inputs as in :meth:`forward` and :meth:`add_noise`; the images are ``B x 1 x N x N``, the
        returned ``noise_sigma`` is ``(B,)`` (or the ``B x 1 x N x N`` map) and ``snr`` is ``(B,)``.
        """
        noiseless = self.forward(source, kappa, psf, shear=shear)
        sigma = check_noise_sigma(noise_sigma, noiseless.shape[0], noiseless.shape[-2:], like=noiseless)
        observation = self.add_noise(noiseless, sigma, generator)
        sigma_out = (
            sigma.reshape(-1).expand(noiseless.shape[0]).clone() if sigma.numel() <= noiseless.shape[0] else sigma
        )
        return SimulatedLens(noiseless, observation, sigma_out, peak_snr(noiseless, sigma))

    # ------------------------------------------------------------------ likelihood
    def chi_squared(
        self,
        observation: torch.Tensor,
        source: torch.Tensor,
        kappa: torch.Tensor,
        psf: PSFLike,
        noise_sigma: NoiseSigma,
        mask: torch.Tensor | None = None,
        *,
        shear: torch.Tensor | None = None,
        check: bool = True,
    ) -> torch.Tensor:
        """Chi-square per example ``(B,)`` of the model ``forward(source, kappa, psf, shear=shear)``.

        ``observation`` is ``B x 1 x N x N``; ``mask`` (optional, broadcastable to it) is True where
        a pixel is used; the other inputs as in :meth:`simulate`.
        """
        if check:
            self._check_image(observation, "observation")
        model = self.forward(source, kappa, psf, shear=shear, check=check)
        sigma = check_noise_sigma(noise_sigma, observation.shape[0], observation.shape[-2:], like=observation)
        return chi_squared(model, observation, sigma, mask)

    def reduced_chi_squared(
        self,
        observation: torch.Tensor,
        source: torch.Tensor,
        kappa: torch.Tensor,
        psf: PSFLike,
        noise_sigma: NoiseSigma,
        mask: torch.Tensor | None = None,
        *,
        shear: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reduced chi-square per example ``(B,)``: chi2 / number of used pixels.

        Inputs as in :meth:`chi_squared`.
        """
        self._check_image(observation, "observation")
        sigma = check_noise_sigma(noise_sigma, observation.shape[0], observation.shape[-2:], like=observation)
        return self.chi_squared(observation, source, kappa, psf, sigma, mask, shear=shear) / degrees_of_freedom(
            sigma, observation.shape, mask
        ).clamp_min(1)

    def likelihood_gradient(
        self,
        observation: torch.Tensor,
        source: torch.Tensor,
        log10_kappa: torch.Tensor,
        psf: PSFLike,
        noise_sigma: NoiseSigma,
        mask: torch.Tensor | None = None,
        *,
        shear: torch.Tensor | None = None,
        create_graph: bool = False,
        check: bool = True,
        functional: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradient of the negative log-likelihood ``chi2 / 2`` w.r.t. the source and ``log10 kappa``.

        This is what the RIM is fed at every step (with kappa = 10 ** log10_kappa).

        Args:
            observation: ``B x 1 x N x N``.
            source: ``B x 1 x M x M``.
            log10_kappa: ``B x 1 x N x N`` (log10 of the dimensionless convergence).
            psf, noise_sigma, mask: as in :meth:`chi_squared`.
            shear: optional external shear ``B x 2``, held fixed (see
                :meth:`likelihood_gradient_with_shear` for its gradient).
            create_graph: keep the graph for second-order derivatives (fine-tuning).
            functional: compute with ``torch.func.grad`` (composable with ``vmap``, for per-sample
                gradients); the inputs are treated as constants (no second-order path).

        Returns:
            ``(grad_source, grad_log10_kappa, chi2)`` with shapes of the inputs and ``(B,)``.
            Each example's gradient depends only on that example.
        """
        g_s, g_eta, _, chi2 = self._gradients(
            observation, source, log10_kappa, shear, False, psf, noise_sigma, mask, create_graph, check, functional
        )
        return g_s, g_eta, chi2

    def likelihood_gradient_with_shear(
        self,
        observation: torch.Tensor,
        source: torch.Tensor,
        log10_kappa: torch.Tensor,
        shear: torch.Tensor,
        psf: PSFLike,
        noise_sigma: NoiseSigma,
        mask: torch.Tensor | None = None,
        *,
        create_graph: bool = False,
        check: bool = True,
        functional: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`likelihood_gradient` with the external shear ``B x 2`` free as well.

        Returns:
            ``(grad_source, grad_log10_kappa, grad_shear, chi2)``; ``grad_shear`` is ``B x 2``.
        """
        g_s, g_eta, g_shear, chi2 = self._gradients(
            observation, source, log10_kappa, shear, True, psf, noise_sigma, mask, create_graph, check, functional
        )
        assert g_shear is not None
        return g_s, g_eta, g_shear, chi2

    def _gradients(
        self,
        observation: torch.Tensor,
        source: torch.Tensor,
        log10_kappa: torch.Tensor,
        shear: torch.Tensor | None,
        free_shear: bool,
        psf: PSFLike,
        noise_sigma: NoiseSigma,
        mask: torch.Tensor | None,
        create_graph: bool,
        check: bool,
        functional: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        if check:
            self._check_image(observation, "observation")
            self._check_source(source)
            self._check_kappa(log10_kappa, "log10_kappa")
            check_batch(
                {"observation": observation.shape[0], "source": source.shape[0], "log10_kappa": log10_kappa.shape[0]}
            )
            if shear is not None:
                shear = check_shear(shear, observation.shape[0])
        if free_shear and shear is None:
            raise RimlensInputError("a shear is needed to differentiate with respect to it")
        sigma = check_noise_sigma(noise_sigma, observation.shape[0], observation.shape[-2:], like=observation)
        if functional:

            def half_chi2(
                s: torch.Tensor, eta: torch.Tensor, g: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
                model = self.forward(s, torch.pow(10.0, eta), psf, shear=g, check=False)
                chi2 = chi_squared(model, observation, sigma, mask)
                return 0.5 * chi2.sum(), chi2

            fixed = None if shear is None else shear.detach()
            if free_shear:
                assert fixed is not None
                (g_s, g_eta, g_shear), chi2 = torch.func.grad(half_chi2, argnums=(0, 1, 2), has_aux=True)(
                    source.detach(), log10_kappa.detach(), fixed
                )
                return g_s, g_eta, g_shear, chi2
            (g_s, g_eta), chi2 = torch.func.grad(half_chi2, argnums=(0, 1), has_aux=True)(
                source.detach(), log10_kappa.detach(), fixed
            )
            return g_s, g_eta, None, chi2

        def leaf(t: torch.Tensor) -> torch.Tensor:
            return t if (create_graph and t.requires_grad) else t.detach().requires_grad_(True)

        with torch.enable_grad():
            s, eta = leaf(source), leaf(log10_kappa)
            g = None if shear is None else (leaf(shear) if free_shear else shear)
            model = self.forward(s, torch.pow(10.0, eta), psf, shear=g, check=False)
            chi2 = chi_squared(model, observation, sigma, mask)
            wrt = [s, eta] if g is None or not free_shear else [s, eta, g]
            grads = torch.autograd.grad(0.5 * chi2.sum(), wrt, create_graph=create_graph)
        g_shear = grads[2] if free_shear else None
        return grads[0], grads[1], g_shear, chi2.detach() if not create_graph else chi2
