"""``rimlens evaluate``: the paper's section-5 evaluation on any test set, with a markdown report.

Three stages, each a function: :func:`compute_methods` reconstructs the test set with the RIM (and
optionally the MAP baseline and the fine-tuned RIM) resumably and sharded over ranks;
:func:`aggregate` turns the maps into figures of merit against the truth; :func:`write_report`
draws the figures and writes ``metrics.json`` and ``report.md``. :func:`evaluate_testset` chains them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rimlens.data.storage import read_lenses
from rimlens.distributed import rank_and_world
from rimlens.evaluate.metrics import coherence_spectrum, lens_losses
from rimlens.inference.finetune import FinetuneOptions, finetune, fit_simulator
from rimlens.inference.map_fit import MAPOptions, fit_map
from rimlens.inference.predict import check_grids, reconstruct
from rimlens.inference.sharding import run_chunks
from rimlens.io.atomic import atomic_path
from rimlens.io.checkpoint import load_model
from rimlens.io.figures import plt, save_figure
from rimlens.nn.rim import RIM
from rimlens.nn.vae import VAE
from rimlens.physics.convergence import log10_kappa

__all__ = ["MethodResult", "TestSet", "aggregate", "compute_methods", "evaluate_testset", "write_report"]

METHOD_LABELS = {"rim": "RIM", "finetuned": "fine-tuned RIM", "map": "MAP"}


def _fingerprint(module: torch.nn.Module) -> list:
    """A cheap identity of a network's weights (for the settings of a resumable run)."""
    return [
        int(sum(p.numel() for p in module.parameters())),
        float(sum(float(p.detach().double().sum()) for p in module.parameters())),
    ]


@dataclass
class TestSet:
    """A simulated test set (``B x 1 x N x N`` maps, ``(B,)`` noise and SNR) and where it came from."""

    path: Path
    observation: torch.Tensor
    psf: torch.Tensor
    noise_sigma: torch.Tensor
    source: torch.Tensor
    kappa: torch.Tensor
    snr: np.ndarray
    shear: torch.Tensor | None = None  # ``B x 2`` external shear (zeros for sets written without it)
    supersample: int = 1  # rays per pixel side the images were made with (chi2 uses the same)

    @classmethod
    def read(cls, path: str | Path) -> TestSet:
        d = read_lenses(path)
        return cls(
            Path(path),
            *(torch.as_tensor(d[k]) for k in ("observation", "psf", "noise_sigma", "source", "kappa")),
            np.asarray(d["snr"]),
            torch.as_tensor(d["shear"]),
            d["preset"].grid.supersample,
        )

    def __len__(self) -> int:
        return self.observation.shape[0]


@dataclass
class MethodResult:
    """The maps one method returned for the first ``len(chi2_nu)`` lenses, with compute time; the
    fine-tuning adds its step counts, the χ²_ν after its EWC stage and its options."""

    source: torch.Tensor
    kappa: torch.Tensor
    chi2_nu: torch.Tensor
    seconds_per_lens: float
    extra: dict = field(default_factory=dict)
    shear: torch.Tensor | None = None  # ``B x 2`` when the method estimates an external shear

    @property
    def lenses(self) -> int:
        return int(self.chi2_nu.shape[0])


def compute_methods(
    model: RIM,
    data: TestSet,
    work: Path,
    *,
    batch_size: int = 32,
    n_map: int = 0,
    n_finetune: int = 0,
    vaes: tuple[VAE, VAE] | None = None,
    finetune_options: FinetuneOptions | None = None,
    progress: bool = True,
) -> dict[str, MethodResult] | None:
    """Reconstruct the test set with the RIM, the first ``n_map`` lenses with the MAP baseline and
    the first ``n_finetune`` with the fine-tuned RIM (``vaes = (source_vae, kappa_vae)``).

    Resumable and sharded (:func:`rimlens.inference.sharding.run_chunks`): per-chunk results are kept
    in ``work/`` so a killed evaluation resumes where it stopped. Returns the results on rank 0,
    ``None`` on other ranks. Times per lens are compute times summed over the chunks.
    """
    obs, psf, sigma, n = data.observation, data.psf, data.noise_sigma, len(data)
    model_file = model.checkpoint_path
    base = {
        "model": str(model_file.resolve()) if model_file else "",
        "model_weights": _fingerprint(model),
        "data": str(data.path.resolve()),
        "count": n,
        "chi2_supersample": data.supersample,
    }
    # every method's chi2 (and the MAP's and fine-tuning's fits) with the forward model the data were made with
    sim = fit_simulator(model, data.supersample)

    def rim_chunk(a: int, b: int) -> dict:
        t = time.perf_counter()
        r = reconstruct(model, obs[a:b], psf[a:b], sigma[a:b], batch_size=batch_size, supersample=data.supersample)
        return {
            "source": r.source.numpy(),
            "kappa": r.kappa.numpy(),
            "chi2_nu": r.chi2_nu.numpy(),
            "shear": r.shear.numpy(),
            "seconds": [time.perf_counter() - t],
        }

    chunks = {
        "rim": run_chunks(
            n, batch_size, work / "rim", {**base, "batch_size": batch_size}, rim_chunk, "evaluation", progress, "RIM"
        )
    }
    if n_map:
        m, map_options = min(n_map, n), MAPOptions()

        def map_chunk(a: int, b: int) -> dict:
            r = fit_map(sim, obs[a:b].double(), psf[a:b].double(), sigma[a:b].double(), options=map_options)
            return {
                "source": r.source.float().numpy(),
                "kappa": r.kappa.float().numpy(),
                "chi2_nu": r.chi2_nu.float().numpy(),
                "seconds": [r.seconds],
            }

        chunks["map"] = run_chunks(
            m,
            batch_size,
            work / "map",
            {**base, "lenses": m, "batch_size": batch_size, "options": dataclasses.asdict(map_options)},
            map_chunk,
            "evaluation",
            progress,
            "MAP",
        )
    options = finetune_options or FinetuneOptions()
    if n_finetune:
        if vaes is None:
            raise ValueError("fine-tuning in an evaluation needs vaes=(source_vae, kappa_vae)")
        m = min(n_finetune, n)

        def ft_chunk(a: int, b: int) -> dict:
            f = finetune(model, obs[a:b], psf[a:b], sigma[a:b], *vaes, options, simulator=sim)
            return {
                "source": f.source.numpy(),
                "kappa": f.kappa.numpy(),
                "shear": np.zeros((1, 2), np.float32) if f.shear is None else f.shear.reshape(1, 2).numpy(),
                "chi2_nu": [f.chi2_nu],
                "seconds": [f.seconds],
                "steps": [f.steps],
                "refine_steps": [f.refine_steps],
                "ewc_chi2_nu": [f.ewc_chi2_nu],
            }

        chunks["finetuned"] = run_chunks(
            m,
            1,
            work / "finetune",
            {**base, "lenses": m, "options": dataclasses.asdict(options), "vaes": [_fingerprint(v) for v in vaes]},
            ft_chunk,
            "evaluation",
            progress,
            "fine-tuning",
        )
    if rank_and_world()[0] != 0:
        return None
    results = {}
    for name, parts in chunks.items():
        assert parts is not None  # rank 0 holds every chunk
        r = {k: np.concatenate([np.atleast_1d(p[k]) for p in parts]) for k in parts[0]}
        extra = {}
        if name == "finetuned":
            extra = {
                "steps": r["steps"].tolist(),
                "refine_steps": r["refine_steps"].tolist(),
                "ewc_chi2_nu": r["ewc_chi2_nu"].tolist(),
                "options": dataclasses.asdict(options),
            }
        results[name] = MethodResult(
            torch.as_tensor(r["source"]),
            torch.as_tensor(r["kappa"]),
            torch.as_tensor(r["chi2_nu"]),
            float(r["seconds"].sum()) / len(r["chi2_nu"]),
            extra,
            torch.as_tensor(r["shear"]).reshape(-1, 2) if model.config.external_shear and "shear" in r else None,
        )
    return results


def _quality(
    source: torch.Tensor,
    kappa: torch.Tensor,
    chi2_nu: torch.Tensor,
    data: TestSet,
    shear: torch.Tensor | None = None,
) -> dict:
    k = source.shape[0]
    loss = lens_losses(source, kappa, data.source[:k], data.kappa[:k])
    extra = {}
    if shear is not None and data.shear is not None:  # |gamma_hat - gamma|, beside guessing no shear
        extra = {
            "shear_error_median": float(np.median((shear[:k] - data.shear[:k]).norm(dim=-1).numpy())),
            "no_shear_baseline_error_median": float(np.median(data.shear[:k].norm(dim=-1).numpy())),
        }
    return {
        "lenses": k,
        "log10_loss_mean": float(np.log10(loss).mean()),
        "log10_loss_std": float(np.log10(loss).std()),
        "source_mse_median": float(((source - data.source[:k]) ** 2).mean(dim=(1, 2, 3)).median()),
        "log10_kappa_mse_median": float(
            ((log10_kappa(kappa) - log10_kappa(data.kappa[:k])) ** 2).mean(dim=(1, 2, 3)).median()
        ),
        "chi2_nu_median": float(chi2_nu.median()),
        **extra,
    }


def aggregate(results: dict[str, MethodResult], data: TestSet) -> dict:
    """Figures of merit of each method against the truth (paper Table 4: log10 of the per-lens loss,
    mean and std; median source and log10 kappa MSE and chi2_nu; seconds per lens), each non-RIM
    method beside the RIM on the same lenses, and the trivial mean-map baseline. JSON-ready."""
    rim = results["rim"]
    metrics: dict = {"n_lenses": len(data), "dof_per_lens": data.observation[0].numel(), "data": str(data.path)}
    for name, r in results.items():
        metrics[name] = {
            **_quality(r.source, r.kappa, r.chi2_nu, data, r.shear),
            "seconds_per_lens": r.seconds_per_lens,
        }
        if name != "rim":  # the RIM on exactly the same lenses, for a like-for-like comparison
            k = r.lenses
            rim_shear = None if rim.shear is None else rim.shear[:k]
            metrics[name]["rim_same_lenses"] = _quality(rim.source[:k], rim.kappa[:k], rim.chi2_nu[:k], data, rim_shear)
        if "steps" in r.extra:
            metrics[name].update(
                median_steps=float(np.median(r.extra["steps"])),
                median_refine_steps=float(np.median(r.extra["refine_steps"])),
                ewc_chi2_nu_median=float(np.median(r.extra["ewc_chi2_nu"])),
            )
        if "options" in r.extra:
            metrics[name]["options"] = r.extra["options"]
    src, kap = data.source, data.kappa
    mean_kappa = (10 ** log10_kappa(kap).mean(0, keepdim=True)).expand_as(kap)
    mean_loss = lens_losses(src.mean(0, keepdim=True).expand_as(src), mean_kappa, src, kap)
    metrics["mean_map_baseline"] = {
        "log10_loss_mean": float(np.log10(mean_loss).mean()),
        "log10_loss_std": float(np.log10(mean_loss).std()),
    }
    return metrics


def write_report(
    out: Path, results: dict[str, MethodResult], data: TestSet, metrics: dict, pixel_scales: tuple[float, float]
) -> None:
    """Figures (``chi2.png``, ``coherence.png``, ``gallery.png``), ``metrics.json`` and ``report.md`` in ``out``.
    ``pixel_scales``: (image, source) arcsec / pixel, for the coherence frequencies."""
    _figures(out, results, data, pixel_scales)
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    _report(out, metrics)


def evaluate_testset(
    model_path: str | Path,
    data_path: str | Path,
    out_dir: str | Path,
    batch_size: int = 32,
    n_map: int = 0,
    progress: bool = True,
    n_finetune: int = 0,
    vaes: tuple[VAE, VAE] | None = None,
    finetune_options: FinetuneOptions | None = None,
) -> dict | None:
    """``rimlens evaluate``: :func:`compute_methods`, :func:`aggregate` and :func:`write_report` into
    ``out_dir``; per-chunk results stay in ``out_dir/work/`` until the report is written. Under
    ``torchrun`` the ranks share the lenses and rank 0 writes the report (other ranks return ``None``)."""
    out = Path(out_dir)
    if rank_and_world()[0] == 0:
        out.mkdir(parents=True, exist_ok=True)
    model = load_model(model_path)
    assert model.preset is not None  # set by load_model
    data = TestSet.read(data_path)
    check_grids(read_lenses(data_path, slice(0, 1))["attrs"], model.preset, data_path)
    results = compute_methods(
        model,
        data,
        out / "work",
        batch_size=batch_size,
        n_map=n_map,
        n_finetune=n_finetune,
        vaes=vaes,
        finetune_options=finetune_options,
        progress=progress,
    )
    if results is None:
        return None
    metrics = {"model": str(model.checkpoint_path), **aggregate(results, data)}
    grid = model.preset.grid
    write_report(out, results, data, metrics, (grid.image_grid.pixel_scale_arcsec, grid.source_grid.pixel_scale_arcsec))
    shutil.rmtree(out / "work", ignore_errors=True)  # the report is written: the per-chunk results are no longer needed
    return metrics


def _figures(out: Path, res: dict[str, MethodResult], data: TestSet, pixel_scales: tuple[float, float]) -> None:
    rim = res["rim"]
    src, kap, obs, snr = data.source, data.kappa, data.observation, data.snr
    dof = obs[0].numel()
    chi = rim.chi2_nu.numpy()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    # log-spaced bins: chi2_nu spans decades (a good fit at 1, poor fits at tens to hundreds), and a
    # linear axis would put almost every lens in its first bin
    lo, hi = max(min(chi.min(), 0.8), 1e-2), max(chi.max(), 1.5)
    bins = np.geomspace(lo, hi * 1.01, 40)
    ax[0].hist(chi, bins=bins, alpha=0.7, label="RIM")
    for name, marker in (("finetuned", "fine-tuned"), ("map", "MAP")):
        if name in res:
            ax[0].hist(res[name].chi2_nu.numpy(), bins=bins, histtype="step", lw=1.5, label=marker)
    ax[0].axvline(1, color="k", lw=0.8)
    ax[0].axvspan(
        1 - 3 * np.sqrt(2 / dof),
        1 + 3 * np.sqrt(2 / dof),
        color="k",
        alpha=0.15,
        label=rf"$\chi^2_{{{dof}}}/{dof}$ (3$\sigma$)",
    )
    ax[0].set_xscale("log")
    ax[0].set_xlabel(r"$\chi^2_\nu$")
    ax[0].set_ylabel("lenses")
    ax[0].legend()
    ax[1].scatter(snr, chi, s=6, label="RIM")
    if "finetuned" in res:
        ax[1].scatter(
            snr[: res["finetuned"].lenses], res["finetuned"].chi2_nu.numpy(), s=10, marker="+", label="fine-tuned"
        )
    if "map" in res:
        ax[1].scatter(snr[: res["map"].lenses], res["map"].chi2_nu.numpy(), s=10, marker="x", label="MAP")
    ax[1].axhline(1, color="k", lw=0.8)
    ax[1].set_xscale("log")
    ax[1].set_yscale("log")
    ax[1].set_xlabel("peak SNR")
    ax[1].set_ylabel(r"$\chi^2_\nu$")
    ax[1].legend()
    fig.tight_layout()
    save_figure(fig, out / "chi2.png")
    log_k = r"$\log_{10}\kappa$"
    estimates = {"RIM": {"source": rim.source, log_k: log10_kappa(rim.kappa)}}
    if "finetuned" in res:
        estimates["fine-tuned"] = {"source": res["finetuned"].source, log_k: log10_kappa(res["finetuned"].kappa)}
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for a, (name, truth, scale) in zip(
        ax, [("source", src, pixel_scales[1]), (log_k, log10_kappa(kap), pixel_scales[0])], strict=True
    ):
        for label, est in estimates.items():
            k = est[name].shape[0]
            f, g = coherence_spectrum(est[name], truth[:k])
            with warnings.catch_warnings():  # a frequency bin without power in any map has no coherence (NaN)
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, lo_band, hi_band = np.nanmean(g, 0), np.nanpercentile(g, 16, 0), np.nanpercentile(g, 84, 0)
            a.plot(f / scale, mean, label=f"{label} (mean{'' if k == truth.shape[0] else f', {k} lenses'})")
            a.fill_between(f / scale, lo_band, hi_band, alpha=0.3, label="68%")
        a.set_xlabel(r"frequency [arcsec$^{-1}$]")
        a.set_ylabel("coherence")
        a.set_title(name)
        a.set_ylim(0, 1.02)
        a.legend()
    fig.tight_layout()
    save_figure(fig, out / "coherence.png")
    order = np.argsort(chi)
    picks = order[np.linspace(0, len(order) - 1, min(5, len(order))).astype(int)]
    fig, ax = plt.subplots(len(picks), 4, figsize=(13, 3 * len(picks)), squeeze=False)
    for r, i in enumerate(picks):
        panels = [
            (obs[i, 0], f"obs, SNR {snr[i]:.0f}, $\\chi^2_\\nu$ {chi[i]:.2f}"),
            (rim.source[i, 0], "source (RIM)"),
            (src[i, 0], "source (truth)"),
            (log10_kappa(rim.kappa[i, 0]) - log10_kappa(kap[i, 0]), r"$\Delta\log_{10}\kappa$"),
        ]
        for c, (img, title) in enumerate(panels):
            im = ax[r, c].imshow(
                img.numpy(),
                origin="lower",
                cmap="RdBu_r" if c == 3 else "magma",
                **({"vmin": -0.5, "vmax": 0.5} if c == 3 else {}),
            )
            ax[r, c].set_title(title, fontsize=8)
            ax[r, c].set_xticks([])
            ax[r, c].set_yticks([])
            fig.colorbar(im, ax=ax[r, c], fraction=0.046)
    fig.tight_layout()
    save_figure(fig, out / "gallery.png")


def _report(out: Path, m: dict) -> None:
    lines = [
        "# rimlens evaluation\n",
        f"Model: `{m['model']}`  \nTest set: `{m['data']}` ({m['n_lenses']} lenses)\n",
        "| method | lenses | log10 loss (mean ± std) | median source MSE | median log10 κ MSE | median χ²_ν | seconds / lens |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("rim", "finetuned", "map"):
        if name in m:
            r = m[name]
            label = METHOD_LABELS[name]
            if name == "finetuned" and r.get("options", {}).get("refine_steps"):
                label += " + pixel refinement"
            lines.append(
                f"| {label} | {r['lenses']} | {r['log10_loss_mean']:.2f} ± {r['log10_loss_std']:.2f} | {r['source_mse_median']:.4f} "
                f"| {r['log10_kappa_mse_median']:.4f} | {r['chi2_nu_median']:.2f} | {r['seconds_per_lens']:.3f} |"
            )
            if "rim_same_lenses" in r:
                q = r["rim_same_lenses"]
                lines.append(
                    f"| (RIM on the same {q['lenses']}) | {q['lenses']} | {q['log10_loss_mean']:.2f} ± {q['log10_loss_std']:.2f} "
                    f"| {q['source_mse_median']:.4f} | {q['log10_kappa_mse_median']:.4f} | {q['chi2_nu_median']:.2f} | |"
                )
    b = m["mean_map_baseline"]
    lines.append(
        f"| mean maps (trivial) | {m['n_lenses']} | {b['log10_loss_mean']:.2f} ± {b['log10_loss_std']:.2f} | | | | |"
    )
    for name in ("rim", "finetuned"):
        if name in m and "shear_error_median" in m[name]:
            r = m[name]
            lines.append(
                f"\n{METHOD_LABELS[name]}: median external-shear error |γ̂ − γ| {r['shear_error_median']:.4f} "
                f"(guessing no shear: {r['no_shear_baseline_error_median']:.4f})."
            )
    lines += ["", "![chi2](chi2.png)", "", "![coherence](coherence.png)", "", "![gallery](gallery.png)", ""]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines))
