"""The ``rimlens`` command line.

Every user error (bad input, unreadable files) ends with a one-line message on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from rimlens.errors import RimlensInputError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rimlens")
def cli():
    """rimlens: reconstruct strong gravitational lenses (convergence and source) with a RIM."""


@cli.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_output"),
              show_default=True, help="Folder for the products.")
@click.option("--seed", type=int, default=0, show_default=True)
def demo(out_dir: Path, seed: int):
    """Simulate an example lens (SIE + Sersic source with clumps) and write a picture of it."""
    import torch

    from rimlens.evaluate.figures import lens_panels
    from rimlens.physics import PSF, LensSimulator, PixelGrid, profiles

    torch.manual_seed(seed)
    image_grid, source_grid = PixelGrid.from_fov(64, 7.68), PixelGrid.from_fov(64, 3.0)
    sim = LensSimulator(image_grid, source_grid)
    kappa = profiles.pixelate(profiles.sie_kappa, image_grid, 4, theta_e_arcsec=1.3, axis_ratio=0.7,
                              phi_rad=0.5, center_x=0.03, center_y=-0.05, core_arcsec=0.01)
    sx, sy = source_grid.coordinates()
    source = profiles.sersic(sx, sy, 1.0, 0.25, 1.5, 0.7, -0.4, 0.1, 0.05)
    for cx, cy, a in [(0.25, 0.1, 0.8), (-0.15, 0.2, 0.5)]:
        source = source + a * profiles.gaussian_kappa(sx, sy, 1.0, 0.05, cx, cy)
    source = (source / source.max())[None, None]
    psf = PSF.gaussian(0.1, image_grid.pixel_scale_arcsec)
    lens = sim.simulate(source, kappa, psf, 0.02, generator=torch.Generator().manual_seed(seed))
    out_dir.mkdir(parents=True, exist_ok=True)
    png = lens_panels([{
        "observation": lens.observation[0, 0].numpy(), "source": source[0, 0].numpy(), "kappa": kappa[0, 0].numpy(),
        "image_scale": image_grid.pixel_scale_arcsec, "source_scale": source_grid.pixel_scale_arcsec,
        "title": f"simulated observation (peak SNR {float(lens.snr[0]):.0f})",
    }], out_dir / "demo_lens.png")
    click.echo(f"wrote {png}")


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
@click.option("--overwrite", is_flag=True, help="Replace an existing finished file.")
def simulate(preset, count, seed, out_path, split, noise, block_size, overwrite):
    """Simulate validated lenses into an HDF5 file (an interrupted run resumes when re-run)."""
    from rimlens.config import get_preset
    from rimlens.data.storage import generate_dataset, read_lenses

    if out_path.exists() and not overwrite:
        raise RimlensInputError(f"{out_path} exists; pass --overwrite to replace it")
    cfg = get_preset(preset)
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
def train(preset, out_dir, resume, max_steps, max_minutes, batch_size, lr, seed, device, settings):
    """Train a RIM (single process, or multi-GPU / multi-node under torchrun)."""
    import dataclasses

    import torch.distributed as dist

    from rimlens.config import get_preset
    from rimlens.train import Trainer

    cfg = get_preset(preset)
    overrides = {k: v for k, v in {"max_steps": max_steps, "max_minutes": max_minutes, "batch_size": batch_size,
                                   "learning_rate": lr, "seed": seed}.items() if v is not None}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise RimlensInputError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    if overrides:
        cfg = dataclasses.replace(cfg, train={**cfg.train, **overrides})
    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        import torch

        dist.init_process_group("nccl" if torch.cuda.is_available() and device != "cpu" else "gloo")
        started = True
    try:
        trainer = Trainer(cfg, out_dir, resume=resume, device=device)
        if resume and overrides:  # the checkpoint's configuration wins, except for the limits asked for now
            trainer.cfg = dataclasses.replace(trainer.cfg, **{k: v for k, v in overrides.items() if k in ("max_steps", "max_minutes")})
        result = trainer.train()
    finally:
        if started:
            dist.destroy_process_group()
    if trainer.rank == 0:
        click.echo(f"stopped at step {result['step']} ({result['stop_reason']}); "
                   f"validation loss {result.get('val_loss', float('nan')):.4g}; checkpoints in {out_dir}")


@cli.command()
@click.argument("model")
@click.argument("data", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output HDF5.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
def predict(model, data, out_path, batch_size):
    """Reconstruct every lens of DATA (a rimlens HDF5 file) with MODEL (checkpoint, run folder or 'default')."""
    from rimlens.inference.predict import predict_file

    predict_file(model, data, out_path, batch_size=batch_size)
    click.echo(f"wrote {out_path}")


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
    from rimlens.train.vae import VAETrainer

    train = {k: v for k, v in {"max_steps": max_steps, "max_minutes": max_minutes}.items() if v is not None}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise RimlensInputError(f"--set expects KEY=VALUE, got {item!r}")
        train[key] = json.loads(value)
    trainer = VAETrainer(kind, get_preset(preset), out_dir, resume=resume, train=None if resume else train)
    if resume and train:
        import dataclasses

        trainer.cfg = dataclasses.replace(trainer.cfg, **{k: v for k, v in train.items() if k in ("max_steps", "max_minutes")})
    last = trainer.train()
    click.echo(f"{kind} VAE: step {trainer.step}, validation loss {last.get('val_loss', float('nan')):.4g}; checkpoints in {out_dir}")


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
