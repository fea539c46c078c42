"""Figures. Matplotlib with the Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rimlens.io.atomic import atomic_path  # noqa: E402


def _extent(n_pixels: int, pixel_scale: float):
    half = n_pixels * pixel_scale / 2
    return (-half, half, -half, half)


def lens_panels(rows: list[dict], path: str | Path, dpi: int = 110) -> Path:
    """Write a PNG grid: one row per lens, columns observation / source / log10 kappa.

    Each row dict has numpy arrays ``observation``, ``source``, ``kappa`` (2-D, row 0 at the bottom),
    grid scales ``image_scale`` and ``source_scale`` (arcsec / pixel) and an optional ``title`` string
    shown above the observation.
    """
    n = len(rows)
    fig, axes = plt.subplots(n, 3, figsize=(11, 3.4 * n), squeeze=False)
    for r, row in enumerate(rows):
        obs, src, kap = (np.asarray(row[k]) for k in ("observation", "source", "kappa"))
        ext_i = _extent(obs.shape[-1], row["image_scale"])
        ext_s = _extent(src.shape[-1], row["source_scale"])
        panels = [
            (obs, ext_i, "magma", row.get("title", "observation"), None),
            (src, ext_s, "magma", "source", None),
            (np.log10(np.clip(kap, 1e-3, None)), ext_i, "viridis", r"$\log_{10}\,\kappa$", None),
        ]
        for c, (img, ext, cmap, title, _) in enumerate(panels):
            ax = axes[r, c]
            im = ax.imshow(img, origin="lower", extent=ext, cmap=cmap)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel('x ["]')
            ax.set_ylabel('y ["]')
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path
