"""The ``rimlens`` command line: it parses arguments, calls one library function per command and
prints. Every user error (bad input, unreadable files) ends with a one-line message on stderr and
exit code 2, never a traceback; a diverged training run ends with a one-line message and code 1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
import torch

from rimlens.config import get_preset
from rimlens.data.storage import show_lenses, simulate_lenses
from rimlens.distributed import RankFailedError, process_group
from rimlens.errors import RimlensInputError, TrainingDivergedError
from rimlens.evaluate.report import evaluate_testset
from rimlens.inference.finetune import FinetuneOptions
from rimlens.inference.map_fit import MAPOptions, fit_map_file
from rimlens.inference.pipeline import FinetuneSetup, reconstruct_folder, reconstruct_observation, run_demo
from rimlens.inference.predict import predict_file
from rimlens.io.checkpoint import export_model, load_model
from rimlens.train.engine import train_rim
from rimlens.train.vae import train_vae

PATH = click.Path(path_type=Path)
FILE = click.Path(dir_okay=False, path_type=Path)
FOLDER = click.Path(file_okay=False, path_type=Path)


def _parse_settings(items) -> dict:
    """``KEY=VALUE`` options as a dict (values parsed as JSON when possible)."""
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


def _with_finetune_options(fn):
    options = [
        click.option("--source-vae", default=None, help="Source VAE checkpoint (default: the shipped one)."),
        click.option("--kappa-vae", default=None, help="log10-kappa VAE checkpoint (default: the shipped one)."),
        click.option(
            "--finetune-mode",
            type=click.Choice(["fast", "paper", "refine"]),
            default="fast",
            show_default=True,
            help="fast: EWC with 50 Fisher samples, RMSprop lr 1e-5, <= 200 steps, then pixel refinement; "
            "paper: 100 samples, lr 1e-6, <= 2000 steps; refine: pixel refinement of the RIM estimate only.",
        ),
        click.option(
            "--finetune-steps", type=click.IntRange(min=0), default=None, help="Override the fine-tuning step limit."
        ),
        click.option(
            "--refine/--no-refine",
            default=None,
            help="After fine-tuning, refine the maps in pixel space until chi2_nu < 1 (not in the paper; "
            "default: on with --finetune-mode fast, off with paper).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _finetune_setup(source_vae, kappa_vae, mode, steps, refine, model=None) -> FinetuneSetup:
    return FinetuneSetup.load(source_vae, kappa_vae, FinetuneOptions.for_mode(mode, steps, refine), model)


def _refuse(given: dict, why: str) -> None:
    named = [name for name, value in given.items() if value]
    if named:
        raise RimlensInputError(f"{', '.join(named)} cannot be used with {why}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rimlens")
def cli():
    """rimlens: reconstruct strong gravitational lenses (convergence and source) with a RIM."""


@cli.command()
@click.argument("image", type=PATH)
@click.option("--psf", "psf_path", type=FILE, default=None, help="PSF FITS (odd size).")
@click.option("--noise", "noise_path", type=FILE, default=None, help="1-sigma noise map FITS.")
@click.option("--sigma", type=float, default=None, help="One noise sigma for all pixels (instead of --noise).")
@click.option("--pixel-scale", type=float, default=None, help="arcsec / pixel (default: from the header).")
@click.option("--mask", "mask_path", type=FILE, default=None, help="FITS mask: non-zero = use the pixel.")
@click.option(
    "--center",
    type=float,
    nargs=2,
    default=None,
    metavar="X Y",
    help="Lens centre in arcsec from the image centre (default: the image centre).",
)
@click.option("--model", default="default", show_default=True, help="Checkpoint, run folder or 'default'.")
@click.option("--finetune", is_flag=True, help="Fine-tune the RIM on this observation (EWC prior, needs the VAEs).")
@_with_finetune_options
@click.option("--out", "out_dir", type=FOLDER, required=True)
def reconstruct(
    image,
    psf_path,
    noise_path,
    sigma,
    pixel_scale,
    mask_path,
    center,
    model,
    finetune,
    source_vae,
    kappa_vae,
    finetune_mode,
    finetune_steps,
    refine,
    out_dir,
):
    """Reconstruct the convergence and the source of a lens image (FITS) and write FITS/PNG/JSON products.

    IMAGE may also be a folder of lenses, one sub-folder each holding image.fits, psf.fits and
    noise_map.fits (or use --sigma): they are reconstructed into OUT/<name>/, resumably (finished
    lenses are skipped), sharded over processes under torchrun, with a table OUT/summary.csv.
    An HDF5 lens set (from `rimlens simulate`) is reconstructed into OUT/reconstructions.h5, as `predict`.
    """
    if image.suffix.lower() in (".h5", ".hdf5"):  # a simulated set: batched, resumable, sharded (as `predict`)
        _refuse(
            {
                "--psf": psf_path,
                "--noise": noise_path,
                "--mask": mask_path,
                "--center": center,
                "--sigma": sigma,
                "--pixel-scale": pixel_scale,
                "--finetune": finetune,
            },
            "an HDF5 lens set (it holds its own PSFs and noise; fine-tune a set with `rimlens evaluate --finetune N`)",
        )
        _predict(model, image, out_dir / "reconstructions.h5", 32)
        return
    rim = load_model(model)
    setup = _finetune_setup(source_vae, kappa_vae, finetune_mode, finetune_steps, refine, rim) if finetune else None
    if image.is_dir():
        _refuse(
            {"--psf": psf_path, "--noise": noise_path, "--mask": mask_path, "--center": center},
            "a folder of lenses (each sub-folder holds its own files)",
        )
        with process_group():
            done = reconstruct_folder(
                rim,
                image,
                out_dir,
                sigma=sigma,
                pixel_scale_arcsec=pixel_scale,
                finetune_with=setup,
                on_error=lambda name, msg: click.echo(f"error: {name}: {msg}", err=True),
            )
        if done is not None:
            click.echo(f"reconstructed {done.done}/{done.lenses} lenses; table in {done.table}")
        return
    if psf_path is None:
        raise RimlensInputError("--psf is required")
    s = reconstruct_observation(
        rim,
        image,
        psf_path,
        out_dir,
        noise=noise_path,
        sigma=sigma,
        pixel_scale_arcsec=pixel_scale,
        mask=mask_path,
        center_arcsec=tuple(center) if center else None,
        finetune_with=setup,
    )
    click.echo(f"chi2_nu {s['chi2_nu']:.3f} (baseline {s['baseline_chi2_nu']:.3f}); products in {out_dir}")


@cli.command()
@click.option(
    "--out", "out_dir", type=FOLDER, default=Path("demo_output"), show_default=True, help="Folder for the products."
)
@click.option("--model", default="default", show_default=True, help="Checkpoint, run folder or 'default'.")
@click.option("--seed", type=int, default=7, show_default=True, help="Seed of the simulated held-out lens.")
def demo(out_dir: Path, model: str, seed: int):
    """Reconstruct the real HST lens SLACS J2303+1422 and a held-out simulated lens with the shipped model."""
    r = run_demo(load_model(model), out_dir, seed)
    click.echo(f"SLACS J2303+1422: chi2_nu {r.slacs['chi2_nu']:.2f}, products in {out_dir / 'slacs2303'}")
    click.echo(
        f"simulated lens: chi2_nu {r.simulated['chi2_nu']:.2f}, source MSE {r.simulated['source_mse']:.4f}, "
        f"log10 kappa MSE {r.simulated['log10_kappa_mse']:.4f}; products in {out_dir / 'simulated'}"
    )
    click.echo(f"done in {r.seconds:.1f} s")


@cli.command()
@click.option("--preset", default="cpu64", show_default=True, help="Named configuration (tiny, cpu64, paper128).")
@click.option("--count", type=click.IntRange(min=1), required=True, help="Number of validated lenses.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same data, bit for bit.")
@click.option("--out", "out_path", type=FILE, required=True, help="Output HDF5 file.")
@click.option(
    "--split",
    type=click.Choice(["train", "test"]),
    default="train",
    show_default=True,
    help="Which galaxies (COSMOS split by galaxy) and particle-galaxy stream.",
)
@click.option(
    "--noise",
    type=click.Choice(["train", "high", "medium", "low"]),
    default=None,
    help="Noise recipe (high/medium/low = the paper's test sets); default: the preset's.",
)
@click.option("--block-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--kappa-mix",
    multiple=True,
    metavar="FAMILY=WEIGHT",
    help="Convergence families (sie, sie_substructure, particles, vae; tng for test sets only).",
)
@click.option("--source-mix", multiple=True, metavar="FAMILY=WEIGHT", help="Source families (cosmos, parametric, vae).")
@click.option("--overwrite", is_flag=True, help="Replace an existing finished file.")
def simulate(preset, count, seed, out_path, split, noise, block_size, kappa_mix, source_mix, overwrite):
    """Simulate validated lenses into an HDF5 file (an interrupted run resumes when re-run)."""
    s = simulate_lenses(
        out_path,
        preset,
        count,
        seed,
        split=split,
        noise=noise,
        block_size=block_size,
        kappa_mix=_parse_settings(kappa_mix),
        source_mix=_parse_settings(source_mix),
        overwrite=overwrite,
    )
    reasons = ", ".join(f"{k} {v}" for k, v in s.rejected.items())
    click.echo(f"wrote {s.count} lenses to {s.path} ({s.drawn} drawn; rejected: {reasons})")


@cli.command()
@click.argument("path", type=FILE)
@click.option("--out", "out_png", type=FILE, default=None, help="PNG to write (default: PATH with .png).")
@click.option("--count", type=click.IntRange(1, 32), default=4, show_default=True, help="Lenses to show.")
@click.option("--start", type=click.IntRange(min=0), default=0, show_default=True, help="First lens index.")
def show(path, out_png, count, start):
    """Picture of lenses in a file: observation, source, log10 kappa, with SNR and Einstein radius."""
    click.echo(f"wrote {show_lenses(path, out_png, start, count)}")


@cli.command()
@click.option("--preset", default="cpu64", show_default=True, help="Named configuration (tiny, cpu64, paper128).")
@click.option("--out", "out_dir", type=FOLDER, required=True, help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Override the preset's step limit.")
@click.option("--max-minutes", type=float, default=None, help="Stop (with a checkpoint) after this wall time.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Global batch size.")
@click.option("--lr", type=float, default=None, help="Initial learning rate.")
@click.option("--seed", type=int, default=None)
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override any training setting (rimlens.config.TrainConfig), e.g. --set val_every=500.",
)
@click.option(
    "--init-from", default=None, help="Start from these weights (e.g. 'default' to keep training the shipped model)."
)
def train(preset, out_dir, resume, max_steps, max_minutes, batch_size, lr, seed, device, settings, init_from):
    """Train a RIM (single process, or multi-GPU / multi-node under torchrun)."""
    overrides = {
        k: v
        for k, v in {
            "max_steps": max_steps,
            "max_minutes": max_minutes,
            "batch_size": batch_size,
            "learning_rate": lr,
            "seed": seed,
        }.items()
        if v is not None
    }
    result = train_rim(
        get_preset(preset),
        out_dir,
        resume=resume,
        settings={**overrides, **_parse_settings(settings)},
        device=device,
        init_from=init_from,
    )
    if result is not None:
        click.echo(
            f"stopped at step {result.step} ({result.stop_reason}); validation loss {result.val_loss:.4g}; "
            f"checkpoints in {out_dir}"
        )


@cli.command()
@click.argument("model")
@click.argument("data", type=FILE)
@click.option("--out", "out_path", type=FILE, required=True, help="Output HDF5.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Lenses per chunk (the unit of resumption and of sharding).",
)
def predict(model, data, out_path, batch_size):
    """Reconstruct every lens of DATA (a rimlens HDF5 file) with MODEL (checkpoint, run folder or 'default').

    Resumable (finished chunks are kept in OUT.parts/); under torchrun the chunks are sharded over
    the processes and gathered into one file."""
    _predict(model, data, out_path, batch_size)


def _predict(model, data, out_path, batch_size):
    with process_group() as (rank, _):  # shards are independent: a CPU (gloo) group is enough to coordinate
        predict_file(model, data, out_path, batch_size=batch_size)
    if rank == 0:
        click.echo(f"wrote {out_path}")


@cli.command("export-model")
@click.argument("run_dir", type=FOLDER)
@click.option("--out", "out_dir", type=FOLDER, required=True)
@click.option("--checkpoint", default="best.pt", show_default=True)
def export_model_cmd(run_dir, out_dir, checkpoint):
    """Package a training run (weights, configuration, log, validation metrics) for distribution."""
    click.echo(f"wrote {export_model(run_dir, out_dir, checkpoint)}")


@cli.command("train-vae")
@click.argument("kind", type=click.Choice(["source", "kappa"]))
@click.option("--preset", default="cpu64", show_default=True)
@click.option("--out", "out_dir", type=FOLDER, required=True)
@click.option("--resume", is_flag=True)
@click.option("--max-steps", type=click.IntRange(min=1), default=None)
@click.option("--max-minutes", type=float, default=None)
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Override a VAETrainConfig setting.")
def train_vae_cmd(kind, preset, out_dir, resume, max_steps, max_minutes, settings):
    """Train the source or log10-kappa VAE (priors for fine-tuning and a training-data family)."""
    limits = {k: v for k, v in {"max_steps": max_steps, "max_minutes": max_minutes}.items() if v is not None}
    trainer, result = train_vae(kind, preset, out_dir, resume=resume, settings={**limits, **_parse_settings(settings)})
    click.echo(
        f"{trainer.kind} VAE: step {result.step}, validation loss {result.val_loss:.4g}; checkpoints in {out_dir}"
    )


@cli.command()
@click.argument("model")
@click.argument("testset", type=FILE)
@click.option("--out", "out_dir", type=FOLDER, required=True)
@click.option(
    "--map",
    "n_map",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also fit the classical MAP baseline to the first N lenses.",
)
@click.option(
    "--finetune",
    "n_finetune",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also fine-tune the RIM on the first N lenses (needs the VAEs).",
)
@_with_finetune_options
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
def evaluate(
    model, testset, out_dir, n_map, n_finetune, source_vae, kappa_vae, finetune_mode, finetune_steps, refine, batch_size
):
    """The paper's evaluation on a test set: chi2 distribution and vs SNR, coherence spectra, loss statistics, gallery."""
    setup = _finetune_setup(source_vae, kappa_vae, finetune_mode, finetune_steps, refine) if n_finetune else None
    with process_group():  # under torchrun the ranks share the lenses
        m = evaluate_testset(
            model,
            testset,
            out_dir,
            batch_size=batch_size,
            n_map=n_map,
            n_finetune=n_finetune,
            vaes=(setup.source_vae, setup.kappa_vae) if setup else None,
            finetune_options=setup.options if setup else None,
        )
    if m is None:  # not rank 0: rank 0 writes the report
        return
    r = m["rim"]
    click.echo(
        f"RIM: log10 loss {r['log10_loss_mean']:.2f} +- {r['log10_loss_std']:.2f}, median chi2_nu "
        f"{r['chi2_nu_median']:.2f}, {r['seconds_per_lens'] * 1e3:.0f} ms/lens; report in {out_dir / 'report.md'}"
    )
    if "map" in m:
        click.echo(f"MAP: log10 loss {m['map']['log10_loss_mean']:.2f}, {m['map']['seconds_per_lens']:.2f} s/lens")


@cli.command("fit-map")
@click.argument("data", type=FILE)
@click.option("--out", "out_path", type=FILE, required=True, help="Output HDF5.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Only the first N lenses.")
@click.option("--regularization", type=click.Choice(["curvature", "gradient"]), default="curvature", show_default=True)
@click.option("--max-iterations", type=click.IntRange(min=1), default=200, show_default=True)
def fit_map_cmd(data, out_path, count, regularization, max_iterations):
    """Classical MAP fit (pixelated source and log10 kappa with smoothness priors, L-BFGS, several starts)."""
    r = fit_map_file(data, out_path, count, MAPOptions(regularization=regularization, max_iterations=max_iterations))
    click.echo(
        f"fitted {r.chi2_nu.shape[0]} lenses in {r.seconds:.1f} s (median chi2_nu {float(r.chi2_nu.median()):.2f}); "
        f"wrote {out_path}"
    )


def main(argv=None) -> int:
    """Entry point: runs the click group; input errors give exit code 2, a diverged training 1."""
    if "OMP_NUM_THREADS" not in os.environ:  # torch is imported already: set its pool as the variable would
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        cli.main(args=argv, prog_name="rimlens", standalone_mode=False)
    except RimlensInputError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    except (TrainingDivergedError, RankFailedError) as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
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
