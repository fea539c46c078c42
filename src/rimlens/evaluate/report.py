"""``rimlens evaluate``: the paper's section-5 evaluation on any test set, with a markdown report."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from rimlens.evaluate.figures import plt, save_figure
from rimlens.evaluate.metrics import chi2_nu_distribution, coherence_spectrum, rim_style_loss
from rimlens.io.atomic import atomic_path


def _fingerprint(module) -> list:
    """A cheap identity of a network's weights (for the settings of a resumable run)."""
    return [int(sum(p.numel() for p in module.parameters())), float(sum(float(p.double().sum()) for p in module.parameters()))]


def evaluate_testset(model_path, data_path, out_dir, batch_size: int = 32, n_map: int = 0, progress: bool = True,
                     n_finetune: int = 0, vaes=None, finetune_options=None) -> dict | None:
    """Reconstruct a test set with the RIM (and the MAP baseline on its first ``n_map`` lenses, the
    fine-tuned RIM on its first ``n_finetune`` with ``vaes = (source_vae, kappa_vae)``) and write
    figures, ``metrics.json`` and ``report.md`` into ``out_dir``.

    Resumable and sharded (:func:`rimlens.inference.sharding.run_chunks`): results are kept per chunk
    in ``out_dir/work/`` until the report is written, so a killed evaluation resumes where it
    stopped; under ``torchrun`` the ranks share the lenses and rank 0 writes the report (other
    ranks return ``None``). Times per lens are compute times summed over the chunks.
    """
    import dataclasses
    import shutil

    from rimlens.data.storage import read_lenses
    from rimlens.inference.finetune import FinetuneOptions, finetune
    from rimlens.inference.map_fit import MAPOptions, fit_map
    from rimlens.inference.predict import check_grids, reconstruct
    from rimlens.inference.sharding import rank_and_world, run_chunks
    from rimlens.train.checkpoint import load_model, resolve_model_path

    out = Path(out_dir)
    rank, _ = rank_and_world()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    model, preset, _ = load_model(model_path)
    d = read_lenses(data_path)
    check_grids(d["attrs"], preset, data_path)
    obs, psf, sigma = (torch.as_tensor(d[k]) for k in ("observation", "psf", "noise_sigma"))
    src, kap, snr = torch.as_tensor(d["source"]), torch.as_tensor(d["kappa"]), d["snr"]
    n = obs.shape[0]
    model_file = resolve_model_path(model_path)
    base = {"model": str(model_file.resolve()), "model_bytes": model_file.stat().st_size,
            "model_mtime_ns": model_file.stat().st_mtime_ns, "data": str(Path(data_path).resolve()), "count": n}
    work = out / "work"

    def rim_chunk(a, b):
        t = time.perf_counter()
        r = reconstruct(model, obs[a:b], psf[a:b], sigma[a:b], batch_size=batch_size)
        return {"source": r["source"].numpy(), "kappa": r["kappa"].numpy(), "chi2_nu": r["chi2_nu"].numpy(),
                "seconds": [time.perf_counter() - t]}

    chunks = {"rim": run_chunks(n, batch_size, work / "rim", {**base, "batch_size": batch_size}, rim_chunk,
                                "evaluation", progress, "RIM")}
    if n_map:
        m = min(n_map, n)
        map_options = MAPOptions()

        def map_chunk(a, b):
            r = fit_map(model.simulator, obs[a:b].double(), psf[a:b].double(), sigma[a:b].double(), options=map_options)
            return {"source": r["source"].float().numpy(), "kappa": r["kappa"].float().numpy(),
                    "chi2_nu": r["chi2_nu"].float().numpy(), "seconds": [r["seconds"]]}

        chunks["map"] = run_chunks(m, batch_size, work / "map", {**base, "lenses": m, "batch_size": batch_size,
                                   "options": dataclasses.asdict(map_options)}, map_chunk, "evaluation", progress, "MAP")
    if n_finetune:
        m = min(n_finetune, n)
        options = finetune_options or FinetuneOptions()

        def ft_chunk(a, b):
            f = finetune(model, obs[a:b], psf[a:b], sigma[a:b], *vaes, options)
            return {"source": f.source.numpy(), "kappa": f.kappa.numpy(), "chi2_nu": [f.chi2_nu], "seconds": [f.seconds],
                    "steps": [f.steps], "refine_steps": [f.refine_steps], "ewc_chi2_nu": [f.ewc_chi2_nu]}

        chunks["finetuned"] = run_chunks(m, 1, work / "finetune", {**base, "lenses": m, "options": dataclasses.asdict(options),
                                         "vaes": [_fingerprint(v) for v in vaes]}, ft_chunk, "evaluation", progress, "fine-tuning")
    if rank != 0:
        return None
    res = {}
    for name, parts in chunks.items():
        r = {k: np.concatenate([np.atleast_1d(p[k]) for p in parts]) for k in parts[0]}
        k = len(r["chi2_nu"])
        res[name] = {"source": torch.as_tensor(r["source"]), "kappa": torch.as_tensor(r["kappa"]),
                     "chi2_nu": torch.as_tensor(r["chi2_nu"]), "seconds_per_lens": float(r["seconds"].sum()) / k}
        if name == "finetuned":
            res[name].update(steps=r["steps"].tolist(), refine_steps=r["refine_steps"].tolist(),
                             ewc_chi2_nu=r["ewc_chi2_nu"].tolist(), options=dataclasses.asdict(options))
    rim = res["rim"]
    dof = obs[0].numel()
    metrics = {"n_lenses": n, "dof_per_lens": dof, "model": str(resolve_model_path(model_path)), "data": str(data_path)}

    def quality(source, kappa, chi2_nu, k):
        loss = rim_style_loss(source, kappa, src[:k], kap[:k])
        return loss, {
            "lenses": k, "log10_loss_mean": float(np.log10(loss).mean()), "log10_loss_std": float(np.log10(loss).std()),
            "source_mse_median": float(((source - src[:k]) ** 2).mean(dim=(1, 2, 3)).median()),
            "log10_kappa_mse_median": float(((torch.log10(kappa) - torch.log10(kap[:k])) ** 2).mean(dim=(1, 2, 3)).median()),
            "chi2_nu_median": float(chi2_nu.median())}

    for name, r in res.items():
        k = r["source"].shape[0]
        r["loss"], metrics[name] = quality(r["source"], r["kappa"], r["chi2_nu"], k)
        metrics[name]["seconds_per_lens"] = r["seconds_per_lens"]
        if name != "rim":  # the RIM on exactly the same lenses, for a like-for-like comparison
            metrics[name]["rim_same_lenses"] = quality(rim["source"][:k], rim["kappa"][:k], rim["chi2_nu"][:k], k)[1]
        if "steps" in r:
            metrics[name]["median_steps"] = float(np.median(r["steps"]))
            metrics[name]["median_refine_steps"] = float(np.median(r["refine_steps"]))
            metrics[name]["ewc_chi2_nu_median"] = float(np.median(r["ewc_chi2_nu"]))
        if "options" in r:
            metrics[name]["options"] = r["options"]
    # trivial baseline for scale: the mean maps of the test set
    mean_loss = rim_style_loss(src.mean(0, keepdim=True).expand_as(src), (10 ** torch.log10(kap).mean(0, keepdim=True)).expand_as(kap), src, kap)
    metrics["mean_map_baseline"] = {"log10_loss_mean": float(np.log10(mean_loss).mean()), "log10_loss_std": float(np.log10(mean_loss).std())}
    _figures(out, res, src, kap, obs, snr, dof, preset, metrics)
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    _report(out, metrics)
    shutil.rmtree(work, ignore_errors=True)  # the report is written: the per-chunk results are no longer needed
    return metrics


def _figures(out, res, src, kap, obs, snr, dof, preset, metrics):
    rim = res["rim"]
    chi = rim["chi2_nu"].numpy()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    hi = np.percentile(chi, 99)
    ax[0].hist(chi, bins=40, range=(0, max(hi, 1.5)), density=True, alpha=0.7, label="RIM")
    xs = np.linspace(max(0.01, 1 - 6 * np.sqrt(2 / dof)), 1 + 6 * np.sqrt(2 / dof), 200)
    ax[0].plot(xs, chi2_nu_distribution(dof, xs), "k-", label=rf"$\chi^2_{{{dof}}}/{dof}$")
    ax[0].set_xlabel(r"$\chi^2_\nu$")
    ax[0].legend()
    ax[1].scatter(snr, chi, s=6, label="RIM")
    if "finetuned" in res:
        ax[1].scatter(snr[: len(res["finetuned"]["chi2_nu"])], res["finetuned"]["chi2_nu"].numpy(), s=10, marker="+", label="fine-tuned")
    if "map" in res:
        ax[1].scatter(snr[: len(res["map"]["chi2_nu"])], res["map"]["chi2_nu"].numpy(), s=10, marker="x", label="MAP")
    ax[1].axhline(1, color="k", lw=0.8)
    ax[1].set_xscale("log")
    ax[1].set_yscale("log")
    ax[1].set_xlabel("peak SNR")
    ax[1].set_ylabel(r"$\chi^2_\nu$")
    ax[1].legend()
    fig.tight_layout()
    save_figure(fig, out / "chi2.png")
    ft_est = None
    if "finetuned" in res:
        ft = res["finetuned"]
        ft_est = {"source": ft["source"], r"$\log_{10}\kappa$": torch.log10(ft["kappa"])}
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for a, (name, truth, est) in zip(ax, [("source", src, rim["source"]), (r"$\log_{10}\kappa$", torch.log10(kap), torch.log10(rim["kappa"]))]):
        for label, estimate in [("RIM", est)] + ([("fine-tuned", ft_est[name])] if ft_est else []):
            k = estimate.shape[0]
            f, g = coherence_spectrum(estimate, truth[:k])
            f = f / preset.grid.image_grid.pixel_scale_arcsec if "kappa" in name else f / preset.grid.source_grid.pixel_scale_arcsec
            with warnings.catch_warnings():  # a frequency bin without power in any map has no coherence (NaN)
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, lo, hi = np.nanmean(g, 0), np.nanpercentile(g, 16, 0), np.nanpercentile(g, 84, 0)
            a.plot(f, mean, label=f"{label} (mean{'' if k == truth.shape[0] else f', {k} lenses'})")
            a.fill_between(f, lo, hi, alpha=0.3, label="68%")
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
        for c, (img, t) in enumerate([(obs[i, 0], f"obs, SNR {snr[i]:.0f}, $\\chi^2_\\nu$ {chi[i]:.2f}"), (rim["source"][i, 0], "source (RIM)"),
                                      (src[i, 0], "source (truth)"), (torch.log10(rim["kappa"][i, 0]) - torch.log10(kap[i, 0]), r"$\Delta\log_{10}\kappa$")]):
            im = ax[r, c].imshow(img.numpy(), origin="lower", cmap="RdBu_r" if c == 3 else "magma",
                                 **({"vmin": -0.5, "vmax": 0.5} if c == 3 else {}))
            ax[r, c].set_title(t, fontsize=8)
            ax[r, c].set_xticks([])
            ax[r, c].set_yticks([])
            fig.colorbar(im, ax=ax[r, c], fraction=0.046)
    fig.tight_layout()
    save_figure(fig, out / "gallery.png")


def _report(out, m):
    lines = [f"# rimlens evaluation\n", f"Model: `{m['model']}`  \nTest set: `{m['data']}` ({m['n_lenses']} lenses)\n",
             "| method | lenses | log10 loss (mean ± std) | median source MSE | median log10 κ MSE | median χ²_ν | seconds / lens |",
             "|---|---|---|---|---|---|---|"]
    for name in ("rim", "finetuned", "map"):
        if name in m:
            r = m[name]
            label = {"rim": "RIM", "finetuned": "fine-tuned RIM", "map": "MAP"}[name]
            if name == "finetuned" and r.get("options", {}).get("refine_steps"):
                label += " + pixel refinement"
            lines.append(f"| {label} | {r['lenses']} | {r['log10_loss_mean']:.2f} ± {r['log10_loss_std']:.2f} | {r['source_mse_median']:.4f} "
                         f"| {r['log10_kappa_mse_median']:.4f} | {r['chi2_nu_median']:.2f} | {r['seconds_per_lens']:.3f} |")
            if "rim_same_lenses" in r:
                q = r["rim_same_lenses"]
                lines.append(f"| (RIM on the same {q['lenses']}) | {q['lenses']} | {q['log10_loss_mean']:.2f} ± {q['log10_loss_std']:.2f} "
                             f"| {q['source_mse_median']:.4f} | {q['log10_kappa_mse_median']:.4f} | {q['chi2_nu_median']:.2f} | |")
    b = m["mean_map_baseline"]
    lines.append(f"| mean maps (trivial) | {m['n_lenses']} | {b['log10_loss_mean']:.2f} ± {b['log10_loss_std']:.2f} | | | | |")
    lines += ["", "![chi2](chi2.png)", "", "![coherence](coherence.png)", "", "![gallery](gallery.png)", ""]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines))
