"""Science products of a reconstruction: FITS maps with grid/unit/model headers, a one-page PNG and
a JSON summary, all written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from rimlens import __version__
from rimlens.io.atomic import atomic_path
from rimlens.io.figures import _extent, plt, save_figure
from rimlens.io.fits import write_image
from rimlens.physics import PixelGrid

__all__ = ["grid_header", "reconstruction_page", "write_products"]


def grid_header(grid: PixelGrid, bunit: str, extra: dict | None = None) -> dict:
    """FITS cards describing a rimlens grid (offsets from the optical axis in arcsec)."""
    c = (grid.n_pixels + 1) / 2
    h = {
        "BUNIT": (bunit, "map units"),
        "CTYPE1": ("OFFSET-X", "x offset from the lens axis"),
        "CTYPE2": ("OFFSET-Y", "y offset from the lens axis"),
        "CUNIT1": "arcsec",
        "CUNIT2": "arcsec",
        "CRPIX1": c,
        "CRPIX2": c,
        "CRVAL1": 0.0,
        "CRVAL2": 0.0,
        "CDELT1": grid.pixel_scale_arcsec,
        "CDELT2": grid.pixel_scale_arcsec,
        "PIXSCALE": (grid.pixel_scale_arcsec, "arcsec / pixel"),
        "FOV": (grid.fov_arcsec, "arcsec, edge to edge"),
        "CONVENT": ("row 0 at the bottom; x along columns", "rimlens grid convention"),
        "ORIGIN": f"rimlens {__version__}",
    }
    h.update(extra or {})
    return h


def write_products(
    out_dir: str | Path,
    *,
    observation: torch.Tensor,
    noise_sigma: torch.Tensor,
    mask: torch.Tensor,
    source: torch.Tensor,
    kappa: torch.Tensor,
    model_image: torch.Tensor,
    alpha: torch.Tensor,
    image_grid: PixelGrid,
    source_grid: PixelGrid,
    chi2_nu: float,
    summary: dict,
    truth: dict | None = None,
    title: str = "",
    extra_maps: dict[str, tuple[torch.Tensor, str]] | None = None,
    std_maps: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Write FITS maps, ``reconstruction.png`` and ``summary.json`` into ``out_dir``; returns the paths.

    ``extra_maps``: more image-grid maps to write, ``{file name: (1 x 1 x N x N map, unit)}``
    (e.g. ``lens_light.fits``). ``std_maps``: posterior standard deviations ``{"source": 1 x 1 x M x M,
    "kappa": 1 x 1 x N x N}``, written as ``source_std.fits`` / ``kappa_std.fits`` and shown in the PNG."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_card = {
        "MODEL": (str(summary.get("model", ""))[-68:], "RIM checkpoint"),
        "CHI2NU": (float(chi2_nu), "reduced chi^2"),
    }
    resid = ((observation - model_image) / noise_sigma).masked_fill(~mask, 0.0)
    maps = {
        "source.fits": (source, source_grid, "normalised surface brightness"),
        "kappa.fits": (kappa, image_grid, "convergence (dimensionless)"),
        "deflection_x.fits": (alpha[:, :1], image_grid, "arcsec"),
        "deflection_y.fits": (alpha[:, 1:2], image_grid, "arcsec"),
        "model_image.fits": (model_image, image_grid, "normalised flux per pixel"),
        "observation.fits": (observation, image_grid, "normalised flux per pixel"),
        "residuals.fits": (resid, image_grid, "(observation - model) / sigma"),
        **{name: (arr, image_grid, unit) for name, (arr, unit) in (extra_maps or {}).items()},
    }
    if std_maps is not None:
        maps["source_std.fits"] = (std_maps["source"], source_grid, "posterior std of the source")
        maps["kappa_std.fits"] = (std_maps["kappa"], image_grid, "posterior std of kappa")
    paths = {}
    for name, (arr, grid, unit) in maps.items():
        paths[name] = str(
            write_image(out / name, arr[0, 0].detach().cpu().numpy(), grid_header(grid, unit, model_card))
        )
    png = reconstruction_page(
        out / "reconstruction.png",
        observation,
        model_image,
        resid,
        source,
        kappa,
        image_grid,
        source_grid,
        chi2_nu,
        title,
        truth,
        std_maps,
    )
    paths["reconstruction.png"] = str(png)
    summary = {
        **summary,
        "chi2_nu": float(chi2_nu),
        "products": paths,
        "rimlens_version": __version__,
        "image_grid": image_grid.as_dict(),
        "source_grid": source_grid.as_dict(),
        "used_pixels": int(mask.sum()),
    }
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
    paths["summary.json"] = str(out / "summary.json")
    return paths


def reconstruction_page(
    path,
    observation,
    model_image,
    resid,
    source,
    kappa,
    image_grid,
    source_grid,
    chi2_nu,
    title="",
    truth=None,
    std_maps=None,
):
    """One page: observation, model, normalised residuals, source, log10 kappa (and the truth if known;
    and the posterior standard deviations of source and kappa, and kappa's relative one, if given)."""

    rows = 1 + bool(truth) + (std_maps is not None)
    fig, axes = plt.subplots(rows, 5, figsize=(19, 3.8 * rows), squeeze=False)
    ei, es = (
        _extent(image_grid.n_pixels, image_grid.pixel_scale_arcsec),
        _extent(source_grid.n_pixels, source_grid.pixel_scale_arcsec),
    )

    def show(ax, img, ext, cmap, t, **kw):
        im = ax.imshow(np.asarray(img), origin="lower", extent=ext, cmap=cmap, **kw)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel('x ["]')
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)

    obs = observation[0, 0].cpu().numpy()
    vmax = float(np.percentile(obs, 99.8))
    show(axes[0, 0], obs, ei, "magma", title or "observation", vmin=min(0, obs.min()), vmax=vmax)
    show(axes[0, 1], model_image[0, 0].cpu().numpy(), ei, "magma", "model image", vmin=min(0, obs.min()), vmax=vmax)
    show(
        axes[0, 2],
        resid[0, 0].cpu().numpy(),
        ei,
        "RdBu_r",
        rf"residuals / $\sigma$  ($\chi^2_\nu$ = {chi2_nu:.2f})",
        vmin=-4,
        vmax=4,
    )
    show(axes[0, 3], source[0, 0].cpu().numpy(), es, "magma", "source (reconstructed)")
    lk = np.log10(np.clip(kappa[0, 0].cpu().numpy(), 1e-3, None))
    show(axes[0, 4], lk, ei, "viridis", r"$\log_{10}\kappa$ (reconstructed)", vmin=lk.min(), vmax=lk.max())
    if truth:
        axes[1, 0].axis("off")
        axes[1, 1].axis("off")
        axes[1, 2].axis("off")
        show(axes[1, 3], truth["source"][0, 0].cpu().numpy(), es, "magma", "source (truth)")
        tk = np.log10(np.clip(truth["kappa"][0, 0].cpu().numpy(), 1e-3, None))
        show(axes[1, 4], tk, ei, "viridis", r"$\log_{10}\kappa$ (truth)", vmin=lk.min(), vmax=lk.max())
    if std_maps is not None:
        r = rows - 1
        for c in range(3):
            axes[r, c].axis("off")
        show(axes[r, 3], std_maps["source"][0, 0].cpu().numpy(), es, "magma", "source: posterior std")
        rel = (std_maps["kappa"] / kappa.clamp_min(1e-3))[0, 0].cpu().numpy()
        show(
            axes[r, 4],
            rel,
            ei,
            "viridis",
            r"$\sigma_\kappa / \kappa$ (posterior)",
            vmin=0,
            vmax=max(0.3, float(np.percentile(rel, 95))),
        )
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)
