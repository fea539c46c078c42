"""Figures. Matplotlib with the Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from rimlens.io.atomic import atomic_path

__all__ = ["lens_panels", "save_figure", "training_curve"]


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write a figure as PNG atomically and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path


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
    return save_figure(fig, path, dpi)


def training_curve(history: list[dict], path: str | Path) -> Path:
    """Training and validation loss (log scale) against step, with the validation errors of the
    final estimates and the mean-map baselines; with a peer validation set (``peer_*`` metrics) a third
    panel shows its medians."""
    steps = [h["step"] for h in history]
    peer = [k for k in ("peer_theta_err", "peer_gamma_err", "peer_kappa_err", "peer_score") if k in history[-1]]
    fig, axes = plt.subplots(1, 3 if peer else 2, figsize=(16 if peer else 11, 4))
    ax = axes[0]
    ax.plot(steps, [h["train_loss"] for h in history], label="train loss (running mean)")
    ax.plot(steps, [h["val_loss"] for h in history], label="validation loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend()
    ax = axes[1]
    for key, base, label in [
        ("val_source_mse", "baseline_source_mse", "source MSE"),
        ("val_log10_kappa_mse", "baseline_log10_kappa_mse", r"$\log_{10}\kappa$ MSE"),
    ]:
        (line,) = ax.plot(steps, [h[key] for h in history], label=f"{label} (final step)")
        ax.axhline(history[-1][base], color=line.get_color(), ls="--", label=f"{label}, mean-map baseline")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    if peer:
        ax = axes[2]
        labels = {
            "peer_theta_err": r"$\theta_E$ rel. error",
            "peer_gamma_err": r"slope $|\Delta\gamma|$",
            "peer_kappa_err": r"$\kappa$ rel. error, 0.5-2 $\theta_E$",
            "peer_score": "sum (selection)",
        }
        for key in peer:
            ax.plot(steps, [h.get(key, float("nan")) for h in history], label=labels[key])
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title("peer-simulated validation lenses (medians)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
