"""Science products of a reconstruction: FITS maps with grid/unit/model headers, a one-page PNG and
a JSON summary, all written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import torch

from rimlens import __version__
from rimlens.io.atomic import atomic_path
from rimlens.io.figures import _extent, plt, save_figure
from rimlens.io.fits import write_image
from rimlens.physics import PixelGrid

__all__ = ["grid_header", "reconstruction_page", "write_power_law_products", "write_products"]


def grid_header(
    grid: PixelGrid, bunit: str, extra: dict | None = None, center_arcsec: tuple[float, float] = (0.0, 0.0)
) -> dict:
    """FITS cards describing a rimlens grid (offsets from the optical axis in arcsec; the grid's centre at
    ``center_arcsec`` from it)."""
    c = (grid.n_pixels + 1) / 2
    h = {
        "BUNIT": (bunit, "map units"),
        "CTYPE1": ("OFFSET-X", "x offset from the lens axis"),
        "CTYPE2": ("OFFSET-Y", "y offset from the lens axis"),
        "CUNIT1": "arcsec",
        "CUNIT2": "arcsec",
        "CRPIX1": c,
        "CRPIX2": c,
        "CRVAL1": float(center_arcsec[0]),
        "CRVAL2": float(center_arcsec[1]),
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


def write_power_law_products(
    out_dir: str | Path,
    *,
    data: np.ndarray,
    model: np.ndarray,
    residuals: np.ndarray,
    crop_grid: PixelGrid,
    light: np.ndarray | None = None,
    crop_center_arcsec: tuple[float, float],
    source: np.ndarray,
    source_grid: PixelGrid,
    source_center_arcsec: tuple[float, float],
    chi2_nu: float,
    samples: dict | None = None,
    image_grid: PixelGrid | None = None,
    title: str = "",
) -> dict[str, str]:
    """The power-law measurement's products, atomically: ``power_law.png`` (its crop's data, model and
    residuals, the source, and with ``samples`` the posterior mean of kappa and its relative std),
    ``power_law_source.fits``; with ``samples``, also ``power_law_source_std.fits``, ``power_law_kappa.fits``,
    ``power_law_kappa_std.fits`` (on ``image_grid``, as ``kappa.fits``) and ``power_law_samples.h5``.

    Positions are offsets (arcsec) from the reconstruction's axis (the centre of ``kappa.fits``):
    ``crop_center_arcsec`` and ``source_center_arcsec`` are the crop's and the source box's centres there.
    ``data``, ``model``, ``residuals``: ``H x W`` (the light subtracted from data and model when it is given as
    ``light``); ``source``: ``M x M`` (the posterior mean with samples).
    ``samples``: ``{"parameters": S x P, "names": [P], "kappa": S x N x N, "source": S x M x M, "chi2_nu": S,
    "covariance": P x P, "covariance_statistical": P x P}``. Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    card = {"MODEL": ("EPL + shear (power law)", "rimlens.inference.power_law")}
    maps = {"power_law_source.fits": (source, source_grid, source_center_arcsec, "data units per pixel")}
    if samples is not None:
        assert image_grid is not None
        kappa, src = np.asarray(samples["kappa"]), np.asarray(samples["source"])
        maps["power_law_source_std.fits"] = (src.std(0, ddof=1), source_grid, source_center_arcsec, "posterior std")
        maps["power_law_kappa.fits"] = (kappa.mean(0), image_grid, (0.0, 0.0), "posterior mean convergence")
        maps["power_law_kappa_std.fits"] = (kappa.std(0, ddof=1), image_grid, (0.0, 0.0), "posterior std of kappa")
    paths = {
        name: str(write_image(out / name, np.asarray(arr, dtype=np.float64), grid_header(grid, unit, card, center)))
        for name, (arr, grid, center, unit) in maps.items()
    }
    if samples is not None:
        path = out / "power_law_samples.h5"
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
            h5.create_dataset("parameters", data=np.asarray(samples["parameters"], dtype=np.float64))
            h5["parameters"].attrs["names"] = json.dumps(list(samples["names"]))
            for key in ("covariance", "covariance_statistical"):
                h5.create_dataset(key, data=np.asarray(samples[key], dtype=np.float64))
            h5.create_dataset("kappa", data=np.asarray(samples["kappa"], dtype=np.float32), compression="gzip")
            h5.create_dataset("source", data=np.asarray(samples["source"], dtype=np.float32), compression="gzip")
            h5.create_dataset("chi2_nu", data=np.asarray(samples["chi2_nu"], dtype=np.float64))
            h5.attrs["image_grid"] = json.dumps(image_grid.as_dict() if image_grid else {})
            h5.attrs["source_grid"] = json.dumps(source_grid.as_dict())
            h5.attrs["source_center_arcsec"] = json.dumps([float(c) for c in source_center_arcsec])
            h5.attrs["conventions"] = (
                "row 0 at the bottom (FITS order), x along columns; arcsec from the reconstruction's axis; "
                "parameters in lenstronomy EPL + SHEAR (+ pseudo-Jaffe subhaloes) conventions, cut-out frame"
            )
        paths["power_law_samples.h5"] = str(path)
    rows = 1 + (samples is not None)
    fig, axes = plt.subplots(rows, 4, figsize=(16, 3.8 * rows), squeeze=False)

    def show(ax, img, grid, center, cmap, t, **kw):
        x0, x1, y0, y1 = _extent(grid.n_pixels, grid.pixel_scale_arcsec)
        ext = (x0 + center[0], x1 + center[0], y0 + center[1], y1 + center[1])
        im = ax.imshow(np.asarray(img), origin="lower", extent=ext, cmap=cmap, **kw)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel('x ["]')
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)

    if light is not None:
        data, model = data - light, model - light
    vmax = float(np.percentile(data, 99.8))
    vmin = min(0.0, float(data.min()))
    show(
        axes[0, 0],
        data,
        crop_grid,
        crop_center_arcsec,
        "magma",
        (title or "data") + (" - lens light" if light is not None else ""),
        vmin=vmin,
        vmax=vmax,
    )
    show(
        axes[0, 1],
        model,
        crop_grid,
        crop_center_arcsec,
        "magma",
        "power-law model" + (" (arcs)" if light is not None else ""),
        vmin=vmin,
        vmax=vmax,
    )
    show(
        axes[0, 2], residuals, crop_grid, crop_center_arcsec, "RdBu_r",
        rf"residuals / $\sigma$  ($\chi^2_\nu$ = {chi2_nu:.2f})", vmin=-4, vmax=4,
    )  # fmt: skip
    show(axes[0, 3], source, source_grid, source_center_arcsec, "magma", "source (pixelated, regularised)")
    if samples is not None:
        assert image_grid is not None
        kappa = np.asarray(samples["kappa"])
        mean, std = kappa.mean(0), kappa.std(0, ddof=1)
        lk = np.log10(np.clip(mean, 1e-3, None))
        show(axes[1, 0], lk, image_grid, (0.0, 0.0), "viridis", r"$\log_{10}\kappa$ (posterior mean)")
        rel = std / np.clip(mean, 1e-3, None)
        show(axes[1, 1], rel, image_grid, (0.0, 0.0), "viridis", r"$\sigma_\kappa / \kappa$ (posterior)", vmin=0,
             vmax=max(0.1, float(np.percentile(rel, 95))))  # fmt: skip
        src_std = np.asarray(samples["source"]).std(0, ddof=1)
        show(axes[1, 2], src_std, source_grid, source_center_arcsec, "magma", "source: posterior std")
        axes[1, 3].hist(np.asarray(samples["parameters"])[:, 1], bins=max(5, len(kappa) // 4), color="0.4")
        axes[1, 3].set(title="log-slope samples", xlabel=r"$\gamma$")
    fig.tight_layout()
    paths["power_law.png"] = str(save_figure(fig, out / "power_law.png", dpi=90))
    return paths
