"""The ``rimlens`` command line.

Every user error (bad input, unreadable files) ends with a one-line message on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import click

from rimlens.errors import RimlensInputError


def _parse_settings(items) -> dict:
    """``--set KEY=VALUE`` options as a dict (values parsed as JSON when possible)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise RimlensInputError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rimlens")
def cli():
    """rimlens: reconstruct strong gravitational lenses (convergence and source) with a RIM."""


def _finetune_options(mode: str, steps: int | None, refine: bool | None):
    """Fine-tuning options from the CLI: 'fast' (measured: noise level in under a minute on 2 CPU
    cores) or 'paper' (the paper's settings), an optional step limit, and the pixel refinement
    (``None``: on for 'fast', off for 'paper')."""
    from rimlens.inference.finetune import FinetuneOptions

    opts = {"fast": FinetuneOptions.fast, "paper": FinetuneOptions.paper, "refine": FinetuneOptions.refine_only}[mode]()
    if steps is not None:
        opts = dataclasses.replace(opts, max_steps=steps)
    if refine is None:
        return opts
    if not refine:
        opts = dataclasses.replace(opts, refine_steps=0)
    elif opts.refine_steps == 0:
        opts = dataclasses.replace(opts, refine_steps=FinetuneOptions.fast().refine_steps)
    return opts


_FINETUNE_OPTIONS = [
    click.option("--finetune-mode", type=click.Choice(["fast", "paper", "refine"]), default="fast", show_default=True,
                 help="fast: EWC with 50 Fisher samples, RMSprop lr 1e-5, <= 200 steps, then pixel refinement; "
                      "paper: 100 samples, lr 1e-6, <= 2000 steps; refine: pixel refinement of the RIM estimate only."),
    click.option("--finetune-steps", type=click.IntRange(min=0), default=None, help="Override the fine-tuning step limit."),
    click.option("--refine/--no-refine", default=None,
                 help="After fine-tuning, refine the maps in pixel space until chi2_nu < 1 (not in the paper; "
                      "default: on with --finetune-mode fast, off with paper)."),
]


def _with_finetune_options(fn):
    for option in reversed(_FINETUNE_OPTIONS):
        fn = option(fn)
    return fn


def _load_vaes(source_vae, kappa_vae, model=None):
    """The two VAEs of the fine-tuning prior (shipped ones by default), checked against ``model``'s grids."""
    from rimlens.inference.finetune import check_vae_grids
    from rimlens.train.vae import load_vae

    vaes = load_vae(source_vae, kind="source")[0], load_vae(kappa_vae, kind="kappa")[0]
    if model is not None:
        check_vae_grids(model, *vaes)
    return vaes


def _reconstruct_one(model, preset, prep, out_dir, finetune, ft_setup, summary, truth=None, title=""):
    from rimlens.evaluate.products import write_products
    from rimlens.inference.pipeline import reconstruct_prepared

    r = reconstruct_prepared(model, prep, ft_setup[0] if finetune else None, ft_setup[1] if finetune else None)
    summary = {**summary, "chi2_nu": r["chi2_nu"], "baseline_chi2_nu": r["baseline_chi2_nu"], "seconds": round(r["seconds"], 3),
               "flux_scale": prep.flux_scale, "center_arcsec": list(prep.center_arcsec)}
    if finetune:
        summary.update(finetune_steps=r["finetune_steps"], chi2_history=r["chi2_history"], ewc_chi2_nu=r["ewc_chi2_nu"],
                       refine_steps=r["refine_steps"], finetune_options=dataclasses.asdict(ft_setup[1]))
    if truth is not None:
        import torch

        summary["source_mse"] = float(((r["source"] - truth["source"]) ** 2).mean())
        summary["log10_kappa_mse"] = float(((torch.log10(r["kappa"]) - torch.log10(truth["kappa"])) ** 2).mean())
    write_products(out_dir, observation=prep.observation, noise_sigma=prep.noise_sigma, mask=prep.mask,
                   source=r["source"], kappa=r["kappa"], model_image=r["model_image"], alpha=r["alpha"],
                   image_grid=preset.grid.image_grid, source_grid=preset.grid.source_grid, chi2_nu=r["chi2_nu"],
                   summary=summary, truth=truth, title=title)
    return r, summary


@cli.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--psf", "psf_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="PSF FITS (odd size).")
@click.option("--noise", "noise_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="1-sigma noise map FITS.")
@click.option("--sigma", type=float, default=None, help="One noise sigma for all pixels (instead of --noise).")
@click.option("--pixel-scale", type=float, default=None, help="arcsec / pixel (default: from the header).")
@click.option("--mask", "mask_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="FITS mask: non-zero = use the pixel.")
@click.option("--center", type=float, nargs=2, default=None, metavar="X Y",
              help="Lens centre in arcsec from the image centre (default: the image centre).")
@click.option("--model", default="default", show_default=True, help="Checkpoint, run folder or 'default'.")
@click.option("--finetune", is_flag=True, help="Fine-tune the RIM on this observation (EWC prior, needs the VAEs).")
@click.option("--source-vae", default=None, help="Source VAE checkpoint (default: the shipped one).")
@click.option("--kappa-vae", default=None, help="log10-kappa VAE checkpoint (default: the shipped one).")
@_with_finetune_options
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
def reconstruct(image, psf_path, noise_path, sigma, pixel_scale, mask_path, center, model, finetune, source_vae,
                kappa_vae, finetune_mode, finetune_steps, refine, out_dir):
    """Reconstruct the convergence and the source of a lens image (FITS) and write FITS/PNG/JSON products.

    IMAGE may also be a folder of lenses, one sub-folder each holding image.fits, psf.fits and
    noise_map.fits (or use --sigma): they are reconstructed into OUT/<name>/, resumably (finished
    lenses are skipped), sharded over processes under torchrun, with a table OUT/summary.csv.
    An HDF5 lens set (from `rimlens simulate`) is reconstructed into OUT/reconstructions.h5, as `predict`.
    """
    from rimlens.io.observation import load_observation, prepare_observation
    from rimlens.train.checkpoint import load_model, resolve_model_path

    rim, preset, _ = load_model(model)
    ft_setup = (_load_vaes(source_vae, kappa_vae, rim), _finetune_options(finetune_mode, finetune_steps, refine)) if finetune else None
    if image.is_dir():
        given = [n for n, v in (("--psf", psf_path), ("--noise", noise_path), ("--mask", mask_path), ("--center", center)) if v]
        if given:
            raise RimlensInputError(f"{', '.join(given)} cannot be used with a folder of lenses (each sub-folder holds its own files)")
        _reconstruct_folder(image, out_dir, rim, preset, model, sigma, pixel_scale, finetune, ft_setup)
        return
    if image.suffix.lower() in (".h5", ".hdf5"):  # a simulated set: batched, resumable, sharded (as `predict`)
        given = [n for n, v in (("--psf", psf_path), ("--noise", noise_path), ("--mask", mask_path), ("--center", center),
                                ("--sigma", sigma), ("--pixel-scale", pixel_scale), ("--finetune", finetune)) if v]
        if given:
            raise RimlensInputError(f"{', '.join(given)} cannot be used with an HDF5 lens set (it holds its own PSFs and noise; "
                                    "fine-tune a set with `rimlens evaluate --finetune N`)")
        _predict_distributed(model, image, out_dir / "reconstructions.h5", 32)
        return
    if psf_path is None:
        raise RimlensInputError("--psf is required")
    obs = load_observation(image, psf_path, noise_path, sigma, pixel_scale, mask_path)
    prep = prepare_observation(obs, preset.grid.image_grid, tuple(center) if center else None)
    _, summary = _reconstruct_one(rim, preset, prep, out_dir, finetune, ft_setup,
                                  {"image": str(image), "model": str(resolve_model_path(model)), "preset": preset.name},
                                  title=obs.name)
    click.echo(f"chi2_nu {summary['chi2_nu']:.3f} (baseline {summary['baseline_chi2_nu']:.3f}); products in {out_dir}")


def _reconstruct_folder(folder, out_dir, rim, preset, model, sigma, pixel_scale, finetune, ft_setup):
    import csv

    from rimlens.inference.sharding import barrier, process_group
    from rimlens.io.atomic import atomic_path
    from rimlens.io.observation import load_observation, prepare_observation
    from rimlens.train.checkpoint import resolve_model_path

    lenses = sorted(d for d in folder.iterdir() if (d / "image.fits").exists())
    if not lenses:
        raise RimlensInputError(f"{folder} holds no lens sub-folders with an image.fits")
    with process_group() as (rank, world):
        for i, lens in enumerate(lenses):
            target = out_dir / lens.name
            if i % world != rank or (target / "summary.json").exists():
                continue
            noise = lens / "noise_map.fits" if sigma is None else None
            try:
                obs = load_observation(lens / "image.fits", lens / "psf.fits", noise, sigma, pixel_scale)
                prep = prepare_observation(obs, preset.grid.image_grid)
                _reconstruct_one(rim, preset, prep, target, finetune, ft_setup,
                                 {"image": str(lens), "model": str(resolve_model_path(model)), "preset": preset.name}, title=lens.name)
            except RimlensInputError as exc:  # one bad lens must not stop a survey-sized run
                click.echo(f"error: {lens.name}: {exc}", err=True)
        barrier()
        if rank == 0:
            rows = []
            for lens in lenses:
                f = out_dir / lens.name / "summary.json"
                if f.exists():
                    sm = json.loads(f.read_text())
                    rows.append({"lens": lens.name, "chi2_nu": sm["chi2_nu"], "baseline_chi2_nu": sm["baseline_chi2_nu"],
                                 "seconds": sm["seconds"], "used_pixels": sm["used_pixels"]})
                else:
                    rows.append({"lens": lens.name, "chi2_nu": "", "baseline_chi2_nu": "", "seconds": "", "used_pixels": ""})
            with atomic_path(out_dir / "summary.csv") as tmp:
                with open(tmp, "w", newline="") as fh:
                    w = csv.DictWriter(fh, fieldnames=list(rows[0]))
                    w.writeheader()
                    w.writerows(rows)
            done = sum(1 for r in rows if r["chi2_nu"] != "")
            click.echo(f"reconstructed {done}/{len(lenses)} lenses; table in {out_dir / 'summary.csv'}")


@cli.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_output"),
              show_default=True, help="Folder for the products.")
@click.option("--model", default="default", show_default=True, help="Checkpoint, run folder or 'default'.")
@click.option("--seed", type=int, default=7, show_default=True, help="Seed of the simulated held-out lens.")
def demo(out_dir: Path, model: str, seed: int):
    """Reconstruct the real HST lens SLACS J2303+1422 and a held-out simulated lens with the shipped model."""
    import time
    from importlib import resources

    import torch

    from rimlens.data.lenses import LensGenerator
    from rimlens.data.random import child_rng
    from rimlens.io.observation import PreparedObservation, load_observation, prepare_observation
    from rimlens.train.checkpoint import load_model, resolve_model_path

    t0 = time.time()
    rim, preset, _ = load_model(model)
    model_path = str(resolve_model_path(model))
    root = resources.files("rimlens") / "data" / "slacs"
    with resources.as_file(root) as d:
        obs = load_observation(d / "image.fits", d / "psf.fits", d / "noise_map.fits", pixel_scale_arcsec=0.05)
    obs.name = "SLACS J2303+1422 (HST F814W, lens light subtracted)"
    prep = prepare_observation(obs, preset.grid.image_grid)
    _, s1 = _reconstruct_one(rim, preset, prep, out_dir / "slacs2303", False, None,
                             {"image": "SLACS J2303+1422 (shipped)", "model": model_path, "preset": preset.name}, title=obs.name)
    click.echo(f"SLACS J2303+1422: chi2_nu {s1['chi2_nu']:.2f}, products in {out_dir / 'slacs2303'}")
    lens = LensGenerator(preset, split="test", bank_seed=seed, noise="high").draw(child_rng(seed, 99), 1)
    grid = preset.grid.image_grid
    prep = PreparedObservation(lens.observation, lens.noise_sigma.reshape(1, 1, 1, 1).expand(1, 1, grid.n_pixels, grid.n_pixels).clone(),
                               lens.psf, torch.ones(1, 1, grid.n_pixels, grid.n_pixels, dtype=torch.bool), 1.0, (0.0, 0.0), grid)
    _, s2 = _reconstruct_one(rim, preset, prep, out_dir / "simulated", False, None,
                             {"image": f"simulated held-out lens (seed {seed}, {lens.kappa_family[0]} lens, {lens.source_family[0]} source)",
                              "model": model_path, "preset": preset.name, "snr": float(lens.snr[0])},
                             truth={"source": lens.source, "kappa": lens.kappa}, title=f"simulated lens, SNR {float(lens.snr[0]):.0f}")
    click.echo(f"simulated lens: chi2_nu {s2['chi2_nu']:.2f}, source MSE {s2['source_mse']:.4f}, "
               f"log10 kappa MSE {s2['log10_kappa_mse']:.4f}; products in {out_dir / 'simulated'}")
    click.echo(f"done in {time.time() - t0:.1f} s")


@cli.command()
@click.option("--preset", default="cpu64", show_default=True, help="Named configuration (tiny, cpu64, paper128).")
@click.option("--count", type=click.IntRange(min=1), required=True, help="Number of validated lenses.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same data, bit for bit.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output HDF5 file.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True,
              help="Which galaxies (COSMOS split by galaxy) and particle-galaxy stream.")
@click.option("--noise", type=click.Choice(["train", "high", "medium", "low"]), default=None,
              help="Noise recipe (high/medium/low = the paper's test sets); default: the preset's.")
@click.option("--block-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--kappa-mix", multiple=True, metavar="FAMILY=WEIGHT",
              help="Convergence families (sie, sie_substructure, particles, vae; tng for test sets only).")
@click.option("--source-mix", multiple=True, metavar="FAMILY=WEIGHT", help="Source families (cosmos, parametric, vae).")
@click.option("--overwrite", is_flag=True, help="Replace an existing finished file.")
def simulate(preset, count, seed, out_path, split, noise, block_size, kappa_mix, source_mix, overwrite):
    """Simulate validated lenses into an HDF5 file (an interrupted run resumes when re-run)."""
    import dataclasses

    from rimlens.config import get_preset
    from rimlens.data.storage import generate_dataset, read_lenses

    if out_path.exists() and not overwrite:
        raise RimlensInputError(f"{out_path} exists; pass --overwrite to replace it")
    cfg = get_preset(preset)
    mixes = {}
    for name, items in (("kappa_mix", kappa_mix), ("source_mix", source_mix)):
        if items:
            weights = _parse_settings(items)
            bad = {k: v for k, v in weights.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf")}
            if bad:
                raise RimlensInputError(f"--{name.replace('_', '-')} weights must be finite numbers >= 0, got {bad}")
            mixes[name] = {k: float(v) for k, v in weights.items()}
    if mixes:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **mixes))
    generate_dataset(out_path, cfg, count, seed, split=split, noise=noise, block_size=block_size, progress=True)
    attrs = read_lenses(out_path, slice(0, 1))["attrs"]
    drawn = int(attrs["stats_drawn"])
    reasons = ", ".join(f"{k[len('stats_rejected_'):]} {int(v)}" for k, v in attrs.items() if k.startswith("stats_rejected_"))
    click.echo(f"wrote {count} lenses to {out_path} ({drawn} drawn; rejected: {reasons})")


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG to write (default: PATH with .png).")
@click.option("--count", type=click.IntRange(1, 32), default=4, show_default=True, help="Lenses to show.")
@click.option("--start", type=click.IntRange(min=0), default=0, show_default=True, help="First lens index.")
def show(path, out_png, count, start):
    """Picture of lenses in a file: observation, source, log10 kappa, with SNR and Einstein radius."""
    from rimlens.data.storage import read_lenses
    from rimlens.evaluate.figures import lens_panels

    d = read_lenses(path, slice(start, start + count))
    grid = d["preset"].grid
    rows = [{"observation": d["observation"][i, 0], "source": d["source"][i, 0], "kappa": d["kappa"][i, 0],
             "image_scale": grid.image_grid.pixel_scale_arcsec, "source_scale": grid.source_grid.pixel_scale_arcsec,
             "title": f"#{start + i}  SNR {d['snr'][i]:.0f}  $\\theta_E$ {d['theta_e'][i]:.2f}\"  "
                      f"({d['kappa_family'][i].decode()}, {d['source_family'][i].decode()})"}
            for i in range(len(d["snr"]))]
    if not rows:
        raise RimlensInputError(f"{path} has no lens at index {start}")
    out_png = out_png or path.with_suffix(".png")
    lens_panels(rows, out_png)
    click.echo(f"wrote {out_png}")


@cli.command()
@click.option("--preset", default="cpu64", show_default=True, help="Named configuration (tiny, cpu64, paper128).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Override the preset's step limit.")
@click.option("--max-minutes", type=float, default=None, help="Stop (with a checkpoint) after this wall time.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Global batch size.")
@click.option("--lr", type=float, default=None, help="Initial learning rate.")
@click.option("--seed", type=int, default=None)
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override any training setting (rimlens.train.TrainConfig), e.g. --set val_every=500.")
@click.option("--init-from", default=None, help="Start from these weights (e.g. 'default' to keep training the shipped model).")
def train(preset, out_dir, resume, max_steps, max_minutes, batch_size, lr, seed, device, settings, init_from):
    """Train a RIM (single process, or multi-GPU / multi-node under torchrun)."""
    import torch

    from rimlens.config import get_preset
    from rimlens.inference.sharding import process_group
    from rimlens.train import Trainer
    from rimlens.train.engine import TrainConfig

    cfg = get_preset(preset)
    overrides = {k: v for k, v in {"max_steps": max_steps, "max_minutes": max_minutes, "batch_size": batch_size,
                                   "learning_rate": lr, "seed": seed}.items() if v is not None}
    overrides.update(_parse_settings(settings))
    if overrides:
        cfg = dataclasses.replace(cfg, train={**cfg.train, **overrides})
    with process_group("nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"):
        trainer = Trainer(cfg, out_dir, resume=resume, device=device, init_from=init_from)
        if resume and overrides:  # the checkpoint's configuration wins, except for what may change on resume
            trainer.cfg = dataclasses.replace(trainer.cfg, **{k: v for k, v in overrides.items() if k in TrainConfig.RESUME_OVERRIDES})
        result = trainer.train()
    if trainer.rank == 0:
        click.echo(f"stopped at step {result['step']} ({result['stop_reason']}); "
                   f"validation loss {result.get('val_loss', float('nan')):.4g}; checkpoints in {out_dir}")


@cli.command()
@click.argument("model")
@click.argument("data", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output HDF5.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Lenses per chunk (the unit of resumption and of sharding).")
def predict(model, data, out_path, batch_size):
    """Reconstruct every lens of DATA (a rimlens HDF5 file) with MODEL (checkpoint, run folder or 'default').

    Resumable (finished chunks are kept in OUT.parts/); under torchrun the chunks are sharded over
    the processes and gathered into one file."""
    _predict_distributed(model, data, out_path, batch_size)


def _predict_distributed(model, data, out_path, batch_size):
    from rimlens.inference.predict import predict_file
    from rimlens.inference.sharding import process_group

    with process_group() as (rank, _):  # shards are independent: a CPU (gloo) group is enough to coordinate
        predict_file(model, data, out_path, batch_size=batch_size)
    if rank == 0:
        click.echo(f"wrote {out_path}")


@cli.command("export-model")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--checkpoint", default="best.pt", show_default=True)
def export_model_cmd(run_dir, out_dir, checkpoint):
    """Package a training run (weights, configuration, log, validation metrics) for distribution."""
    from rimlens.train.checkpoint import export_model

    click.echo(f"wrote {export_model(run_dir, out_dir, checkpoint)}")


@cli.command("train-vae")
@click.argument("kind", type=click.Choice(["source", "kappa"]))
@click.option("--preset", default="cpu64", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--resume", is_flag=True)
@click.option("--max-steps", type=click.IntRange(min=1), default=None)
@click.option("--max-minutes", type=float, default=None)
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Override a VAETrainConfig setting.")
def train_vae(kind, preset, out_dir, resume, max_steps, max_minutes, settings):
    """Train the source or log10-kappa VAE (priors for fine-tuning and a training-data family)."""
    from rimlens.config import get_preset
    from rimlens.train.vae import VAETrainConfig, VAETrainer

    train = {k: v for k, v in {"max_steps": max_steps, "max_minutes": max_minutes}.items() if v is not None}
    train.update(_parse_settings(settings))
    trainer = VAETrainer(kind, get_preset(preset), out_dir, resume=resume, train=None if resume else train)
    if resume and train:  # the checkpoint's configuration wins, except for what may change on resume
        trainer.cfg = dataclasses.replace(trainer.cfg, **{k: v for k, v in train.items() if k in VAETrainConfig.RESUME_OVERRIDES})
    last = trainer.train()
    click.echo(f"{kind} VAE: step {trainer.step}, validation loss {last.get('val_loss', float('nan')):.4g}; checkpoints in {out_dir}")


@cli.command()
@click.argument("model")
@click.argument("testset", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--map", "n_map", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also fit the classical MAP baseline to the first N lenses.")
@click.option("--finetune", "n_finetune", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also fine-tune the RIM on the first N lenses (needs the VAEs).")
@_with_finetune_options
@click.option("--source-vae", default=None, help="Source VAE checkpoint (default: the shipped one).")
@click.option("--kappa-vae", default=None, help="log10-kappa VAE checkpoint (default: the shipped one).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
def evaluate(model, testset, out_dir, n_map, n_finetune, finetune_mode, finetune_steps, refine, source_vae, kappa_vae,
             batch_size):
    """The paper's evaluation on a test set: chi2 distribution and vs SNR, coherence spectra, loss statistics, gallery."""
    from rimlens.evaluate.report import evaluate_testset

    from rimlens.inference.sharding import process_group

    vaes = _load_vaes(source_vae, kappa_vae) if n_finetune else None  # grids are checked by fine-tuning itself
    with process_group():  # under torchrun the ranks share the lenses
        m = evaluate_testset(model, testset, out_dir, batch_size=batch_size, n_map=n_map, n_finetune=n_finetune, vaes=vaes,
                             finetune_options=_finetune_options(finetune_mode, finetune_steps, refine))
    if m is None:  # not rank 0: rank 0 writes the report
        return
    r = m["rim"]
    click.echo(f"RIM: log10 loss {r['log10_loss_mean']:.2f} +- {r['log10_loss_std']:.2f}, median chi2_nu {r['chi2_nu_median']:.2f}, "
               f"{r['seconds_per_lens'] * 1e3:.0f} ms/lens; report in {out_dir / 'report.md'}")
    if "map" in m:
        click.echo(f"MAP: log10 loss {m['map']['log10_loss_mean']:.2f}, {m['map']['seconds_per_lens']:.2f} s/lens")


@cli.command("fit-map")
@click.argument("data", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output HDF5.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Only the first N lenses.")
@click.option("--regularization", type=click.Choice(["curvature", "gradient"]), default="curvature", show_default=True)
@click.option("--max-iterations", type=click.IntRange(min=1), default=200, show_default=True)
def fit_map_cmd(data, out_path, count, regularization, max_iterations):
    """Classical MAP fit (pixelated source and log10 kappa with smoothness priors, L-BFGS, several starts)."""
    import h5py
    import numpy as np
    import torch

    from rimlens.data.storage import read_lenses
    from rimlens.inference.map_fit import MAPOptions, fit_map
    from rimlens.io.atomic import atomic_path
    from rimlens.physics import LensSimulator

    d = read_lenses(data, slice(0, count))
    grid = d["preset"].grid
    sim = LensSimulator(grid.image_grid, grid.source_grid)
    opts = MAPOptions(regularization=regularization, max_iterations=max_iterations)
    r = fit_map(sim, torch.as_tensor(d["observation"]).double(), torch.as_tensor(d["psf"]).double(),
                torch.as_tensor(d["noise_sigma"]).double(), options=opts)
    with atomic_path(out_path) as tmp:
        with h5py.File(tmp, "w") as f:
            for k in ("source", "kappa", "chi2_nu", "objective"):
                f[k] = r[k].float().numpy()
            f.attrs.update({"format": "rimlens-map-fits-1", "data": str(data), "seconds": r["seconds"],
                            "options": json.dumps(opts.__dict__, default=list)})
    click.echo(f"fitted {len(r['chi2_nu'])} lenses in {r['seconds']:.1f} s (median chi2_nu {float(np.median(r['chi2_nu'])):.2f}); wrote {out_path}")


def main(argv=None) -> int:
    """Entry point: runs the click group, turning input errors into exit code 2."""
    os.environ.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))
    try:
        cli.main(args=argv, prog_name="rimlens", standalone_mode=False)
    except RimlensInputError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return 2
    except OSError as exc:
        click.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
