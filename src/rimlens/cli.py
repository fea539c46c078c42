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
from rimlens.inference.pipeline import (
    FIT_SUPERSAMPLE,
    FinetuneSetup,
    reconstruct_folder,
    reconstruct_observation,
    run_demo,
)
from rimlens.inference.posterior import PosteriorOptions
from rimlens.inference.power_law import SLOPE_SIGMA_SYSTEMATIC, SUBHALO_EVIDENCE_THRESHOLD
from rimlens.inference.predict import predict_file
from rimlens.io.checkpoint import export_model, load_model
from rimlens.train.engine import train_rim
from rimlens.train.vae import train_vae

__all__ = ["cli", "main"]

PATH = click.Path(path_type=Path)
FILE = click.Path(dir_okay=False, path_type=Path)
FOLDER = click.Path(file_okay=False, path_type=Path)
POSITIVE, COUNT = click.IntRange(min=1), click.IntRange(min=0)
SPLIT, NOISE = click.Choice(["train", "test"]), click.Choice(["train", "high", "medium", "low"])


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


def _options(*options):
    """Apply several click options as one decorator (in the order written)."""

    def apply(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


MODEL = click.option("--model", default="default", show_default=True, help="Checkpoint, run folder or 'default'.")
FINETUNE_MODES = click.Choice(["fast", "paper", "refine"])
FINETUNE_OPTIONS = _options(
    click.option("--source-vae", default=None, help="Source VAE checkpoint (default: the shipped one)."),
    click.option("--kappa-vae", default=None, help="log10-kappa VAE checkpoint (default: the shipped one)."),
    click.option(
        "--finetune-mode",
        type=FINETUNE_MODES,
        default="refine",
        show_default=True,
        help="refine (pixel refinement only), fast (EWC weight fine-tuning, then refinement) or paper (see README).",
    ),
    click.option("--finetune-steps", type=COUNT, default=None, help="Override the fine-tuning step limit."),
    click.option("--refine/--no-refine", default=None, help="Pixel refinement after EWC (default: mode's)."),
)


def _finetune_setup(o: dict, model=None) -> FinetuneSetup:
    options = FinetuneOptions.for_mode(o["finetune_mode"], o["finetune_steps"], o["refine"])
    return FinetuneSetup.load(o["source_vae"], o["kappa_vae"], options, model)


def _center(text: str) -> str | tuple[float, float] | None:
    """``--center``: ``auto``, ``cutout`` (``None``) or ``X,Y`` in arcsec."""
    if text in ("auto", "cutout"):
        return None if text == "cutout" else "auto"
    try:
        x, y = (float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise RimlensInputError(f"--center must be auto, cutout or X,Y in arcsec, got {text!r}") from None
    return (x, y)


def _refuse(given: dict, why: str) -> None:
    """Refuse options (by parameter name) that make no sense with this input, naming their flags."""
    flags = {p.name: p.opts[0] for p in click.get_current_context().command.params}
    named = [flags[k] for k, v in given.items() if v]
    if named:
        raise RimlensInputError(f"{', '.join(named)} cannot be used with {why}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rimlens")
def cli():
    """rimlens: reconstruct strong gravitational lenses (convergence and source) with a RIM."""


@cli.command()
@click.argument("image", type=PATH)
@click.option("--psf", type=FILE, default=None, help="PSF FITS (odd size).")
@click.option("--noise", type=FILE, default=None, help="1-sigma noise map FITS.")
@click.option("--sigma", type=float, default=None, help="One noise sigma for all pixels (instead of --noise).")
@click.option("--pixel-scale", "pixel_scale_arcsec", type=float, default=None, help="arcsec / pixel (default: header).")
@click.option("--mask", type=FILE, default=None, help="FITS mask: non-zero = use the pixel.")
@click.option(
    "--lens-light",
    type=click.Choice(["auto", "mge", "none"]),
    default="auto",
    show_default=True,
    help="Model the lens galaxy's light (auto: when it dominates the centre; none: subtracted data).",
)
@click.option(
    "--center", default="auto", show_default=True, metavar="auto|cutout|X,Y", help="Lens centre (X,Y: arcsec)."
)
@MODEL
@click.option("--finetune", is_flag=True, help="Fine-tune the RIM on this observation (EWC prior, needs the VAEs).")
@FINETUNE_OPTIONS
@click.option(
    "--posterior",
    type=click.IntRange(min=2),
    default=None,
    metavar="N",
    help="N posterior samples of the pixelated maps (low-rank Laplace about the pixel-refined fit): kappa/source become "
    "posterior means, plus kappa_std.fits, source_std.fits, posterior_samples.h5 and percentiles in summary.json. "
    "Over-confident on lenstronomy lenses (README); the calibrated posterior is --power-law --power-law-posterior N.",
)
@click.option(
    "--fit-supersample",
    type=click.IntRange(min=1),
    default=FIT_SUPERSAMPLE,
    show_default=True,
    help="Rays per pixel side of the forward model fitted after the RIM (data are pixel-integrated).",
)
@click.option(
    "--power-law",
    is_flag=True,
    help="Also measure an elliptical power law + external shear on the cut-out's own pixels (pixelated source; "
    "up to two subhaloes where the Bayesian evidence asks for them; slope at the evidence's maximum): "
    f"summary.json's power_law block, the slope's width statistical and systematic ({SLOPE_SIGMA_SYSTEMATIC:g}, calibrated on "
    "lenstronomy lenses). 2-10 min per lens on one core, up to 50 with two subhaloes.",
)
@click.option(
    "--power-law-subhalos",
    type=click.IntRange(0, 4),
    default=2,
    show_default=True,
    help="With --power-law: at most this many pseudo-Jaffe subhaloes, each kept only if it raises the Bayesian "
    f"evidence by more than {SUBHALO_EVIDENCE_THRESHOLD:g}, natural log (0: none).",
)
@click.option(
    "--power-law-posterior",
    type=click.IntRange(min=2),
    default=None,
    metavar="N",
    help="With --power-law: N samples of its posterior (Laplace approximation of the evidence, source and lens light "
    "marginalised, widths calibrated on lenstronomy lenses; coverage in the README): power_law_kappa.fits / _std, "
    "power_law_source.fits / _std, "
    "power_law_samples.h5, 16/50/84 percentiles in summary.json, power_law.png. Seconds per lens.",
)
@click.option("--out", "out_dir", type=FOLDER, required=True)
def reconstruct(image: Path, model: str, finetune: bool, out_dir: Path, **o):
    """Reconstruct the convergence and the source of a lens image (FITS) and write FITS/PNG/JSON products.

    IMAGE may also be a folder of lenses, one sub-folder each holding image.fits, psf.fits and
    noise_map.fits (or use --sigma): they are reconstructed into OUT/<name>/, resumably (finished
    lenses are skipped), sharded over processes under torchrun, with a table OUT/summary.csv.
    An HDF5 lens set (from `rimlens simulate`) is reconstructed into OUT/reconstructions.h5, as `predict`.
    """
    inputs = {
        k: o.pop(k) for k in ("psf", "noise", "sigma", "pixel_scale_arcsec", "mask", "lens_light", "fit_supersample")
    }
    center = _center(o.pop("center"))
    power_law = o.pop("power_law")
    power_law_subhalos = o.pop("power_law_subhalos")
    if power_law_subhalos != 2 and not power_law:
        raise click.UsageError("--power-law-subhalos needs --power-law")
    power_law_posterior = o.pop("power_law_posterior") or 0
    if power_law_posterior and not power_law:
        raise click.UsageError("--power-law-posterior needs --power-law")
    n_posterior = o.pop("posterior")
    posterior = None if n_posterior is None else PosteriorOptions(n_samples=n_posterior)
    if image.suffix.lower() in (".h5", ".hdf5"):  # a simulated set: batched, resumable, sharded (as `predict`)
        given = {
            **inputs,
            "lens_light": inputs["lens_light"] != "auto",
            "finetune": finetune,
            "center": center != "auto",
            "posterior": posterior is not None,
            "fit_supersample": inputs["fit_supersample"] != FIT_SUPERSAMPLE,
            "power_law": power_law,
        }
        _refuse(given, "an HDF5 lens set (fine-tune a set with `evaluate --finetune N`)")
        return _predict(model, image, out_dir / "reconstructions.h5", 32)
    rim = load_model(model)
    setup = _finetune_setup(o, rim) if finetune else None
    if image.is_dir():
        given = {
            "psf": inputs["psf"],
            "noise": inputs["noise"],
            "mask": inputs["mask"],
            "center": isinstance(center, tuple),
        }
        _refuse(given, "a folder (each lens has its own)")
        with process_group():
            done = reconstruct_folder(
                rim,
                image,
                out_dir,
                sigma=inputs["sigma"],
                center_arcsec=center,
                lens_light=inputs["lens_light"],
                finetune_with=setup,
                on_error=_echo_error,
                pixel_scale_arcsec=inputs["pixel_scale_arcsec"],
                posterior=posterior,
                fit_supersample=inputs["fit_supersample"],
                power_law=power_law,
                power_law_subhalos=power_law_subhalos,
                power_law_posterior=power_law_posterior,
            )
        if done is not None:
            click.echo(f"reconstructed {done.done}/{done.lenses} lenses; table in {done.table}")
        return None
    s = reconstruct_observation(
        rim,
        image,
        out_dir=out_dir,
        center_arcsec=center,
        finetune_with=setup,
        posterior=posterior,
        power_law=power_law,
        power_law_subhalos=power_law_subhalos,
        power_law_posterior=power_law_posterior,
        **inputs,
    )
    shear = s.get("external_shear")
    shear_text = f"; external shear {shear['magnitude']:.3f} at {shear['angle_deg']:.0f} deg" if shear else ""
    mass = s.get("lens_mass", {})
    theta, slope = mass.get("einstein_radius_arcsec"), mass.get("log_slope")
    mass_text = "" if theta is None else f'Einstein radius {theta:.3f}", '
    mass_text += "" if slope is None else f"log-slope {slope:.2f}; "
    click.echo(
        f"{mass_text}chi2_nu {s['chi2_nu']:.3f} (baseline {s['baseline_chi2_nu']:.3f}){shear_text}; products in {out_dir}"
    )
    if "posterior" in s:
        t = s["posterior"]["einstein_radius_arcsec_p16_p50_p84"]
        click.echo(
            f'posterior ({n_posterior} samples): Einstein radius {t[1]:.3f}" (+{t[2] - t[1]:.3f} / -{t[1] - t[0]:.3f})'
        )
    if "power_law" in s:
        p = s["power_law"]
        if "error" in p:
            click.echo(f"warning: no power-law measurement: {p['error']}", err=True)
        else:
            sigma, stat = p["log_slope_sigma"], p["log_slope_sigma_statistical"]
            click.echo(
                f'power law: Einstein radius {p["einstein_radius_arcsec"]:.3f}", log-slope {p["log_slope"]:.3f}'
                + ("" if sigma is None else f" ± {sigma:.3f} (statistical ± {stat:.3f})")
                + f", axis ratio {p['axis_ratio']:.2f}, chi2_nu {p['chi2_nu']:.3f}"
                + (f", {len(p['subhalos'])} subhalo(s)" if p.get("subhalos") else "")
            )
            if "error" in p.get("posterior", {}):
                click.echo(f"warning: no power-law posterior: {p['posterior']['error']}", err=True)
            elif "posterior" in p:
                q = p["posterior"]
                t, g = q["einstein_radius_arcsec_p16_p50_p84"], q["log_slope_p16_p50_p84"]
                click.echo(
                    f'power-law posterior ({q["samples"]} samples): Einstein radius {t[1]:.3f}" '
                    f"(+{t[2] - t[1]:.3f} / -{t[1] - t[0]:.3f}), log-slope {g[1]:.3f} (+{g[2] - g[1]:.3f} / "
                    f"-{g[1] - g[0]:.3f}); samples' chi2_nu {q['chi2_nu_p16_p50_p84'][1]:.3f}"
                )
                if q.get("warning"):
                    click.echo(f"warning: {q['warning']}", err=True)
    for warning in s["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    return None


@cli.command()
@click.option("--out", "out_dir", type=FOLDER, default=Path("demo_output"), show_default=True, help="Products folder.")
@MODEL
@click.option("--seed", type=int, default=7, show_default=True, help="Seed of the simulated held-out lens.")
def demo(out_dir: Path, model: str, seed: int):
    """Reconstruct the real HST lens SLACS J2303+1422 and a held-out simulated lens with the shipped model."""
    r = run_demo(load_model(model), out_dir, seed)
    theta = r.slacs.get("lens_mass", {}).get("einstein_radius_arcsec")
    theta_text = f'Einstein radius {theta:.3f}" (published SIE 1.62", Bolton et al. 2008), ' if theta else ""
    click.echo(f"SLACS J2303+1422: {theta_text}chi2_nu {r.slacs['chi2_nu']:.2f}, products in {out_dir / 'slacs2303'}")
    s = r.simulated
    click.echo(
        f"simulated lens: chi2_nu {s['chi2_nu']:.2f}, source MSE {s['source_mse']:.4f}, "
        f"log10 kappa MSE {s['log10_kappa_mse']:.4f}; products in {out_dir / 'simulated'}"
    )
    click.echo(f"done in {r.seconds:.1f} s")


@cli.command()
@click.option(
    "--preset", default="cpu64", show_default=True, help="Named configuration (tiny, cpu64, hst128, paper128)."
)
@click.option("--count", type=POSITIVE, required=True, help="Number of validated lenses.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same data, bit for bit.")
@click.option("--out", "out_path", type=FILE, required=True, help="Output HDF5 file.")
@click.option("--split", type=SPLIT, default="train", show_default=True, help="Galaxies and particle stream used.")
@click.option("--noise", type=NOISE, default=None, help="Noise recipe (high/medium/low: the paper's test sets).")
@click.option("--block-size", type=POSITIVE, default=64, show_default=True)
@click.option(
    "--kappa-mix", multiple=True, metavar="FAMILY=W", help="sie, sie_substructure, particles, vae, tng (tests)."
)
@click.option("--source-mix", multiple=True, metavar="FAMILY=W", help="cosmos, parametric, vae.")
@click.option("--overwrite", is_flag=True, help="Replace an existing finished file.")
def simulate(preset: str, count: int, seed: int, out_path: Path, kappa_mix, source_mix, **o):
    """Simulate validated lenses into an HDF5 file (an interrupted run resumes when re-run)."""
    s = simulate_lenses(
        out_path, preset, count, seed, kappa_mix=_parse_settings(kappa_mix), source_mix=_parse_settings(source_mix), **o
    )
    reasons = ", ".join(f"{k} {v}" for k, v in s.rejected.items())
    click.echo(f"wrote {s.count} lenses to {s.path} ({s.drawn} drawn; rejected: {reasons})")


@cli.command()
@click.argument("path", type=FILE)
@click.option("--out", "out_png", type=FILE, default=None, help="PNG to write (default: PATH with .png).")
@click.option("--count", type=click.IntRange(1, 32), default=4, show_default=True, help="Lenses to show.")
@click.option("--start", type=COUNT, default=0, show_default=True, help="First lens index.")
def show(path: Path, out_png: Path | None, count: int, start: int):
    """Picture of lenses in a file: observation, source, log10 kappa, with SNR and Einstein radius."""
    click.echo(f"wrote {show_lenses(path, out_png, start, count)}")


@cli.command()
@click.option(
    "--preset", default="cpu64", show_default=True, help="Named configuration (tiny, cpu64, hst128, paper128)."
)
@click.option("--out", "out_dir", type=FOLDER, required=True, help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--max-steps", type=POSITIVE, default=None, help="Override the preset's step limit.")
@click.option("--max-minutes", type=float, default=None, help="Stop (with a checkpoint) after this wall time.")
@click.option("--batch-size", type=POSITIVE, default=None, help="Global batch size.")
@click.option("--lr", "learning_rate", type=float, default=None, help="Initial learning rate.")
@click.option("--seed", type=int, default=None)
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option(
    "--set", "settings", multiple=True, metavar="KEY=VALUE", help="Any TrainConfig setting, e.g. val_every=500."
)
@click.option("--init-from", default=None, help="Start from these weights ('default': the shipped model's).")
def train(preset: str, out_dir: Path, resume: bool, device, settings, init_from, **limits):
    """Train a RIM (single process, or multi-GPU / multi-node under torchrun)."""
    given = {**{k: v for k, v in limits.items() if v is not None}, **_parse_settings(settings)}
    result = train_rim(get_preset(preset), out_dir, resume=resume, settings=given, device=device, init_from=init_from)
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
    "--batch-size", type=POSITIVE, default=32, show_default=True, help="Lenses per chunk (resume/shard unit)."
)
def predict(model: str, data: Path, out_path: Path, batch_size: int):
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
def export_model_cmd(run_dir: Path, out_dir: Path, checkpoint: str):
    """Package a training run (weights, configuration, log, validation metrics) for distribution."""
    click.echo(f"wrote {export_model(run_dir, out_dir, checkpoint)}")


@cli.command("train-vae")
@click.argument("kind", type=click.Choice(["source", "kappa"]))
@click.option("--preset", default="cpu64", show_default=True)
@click.option("--out", "out_dir", type=FOLDER, required=True)
@click.option("--resume", is_flag=True)
@click.option("--max-steps", type=POSITIVE, default=None)
@click.option("--max-minutes", type=float, default=None)
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Override a VAETrainConfig setting.")
def train_vae_cmd(kind: str, preset: str, out_dir: Path, resume: bool, settings, **limits):
    """Train the source or log10-kappa VAE (priors for fine-tuning and a training-data family)."""
    given = {**{k: v for k, v in limits.items() if v is not None}, **_parse_settings(settings)}
    trainer, result = train_vae(kind, preset, out_dir, resume=resume, settings=given)
    click.echo(
        f"{trainer.kind} VAE: step {result.step}, validation loss {result.val_loss:.4g}; checkpoints in {out_dir}"
    )


@cli.command()
@click.argument("model")
@click.argument("testset", type=FILE)
@click.option("--out", "out_dir", type=FOLDER, required=True)
@click.option(
    "--map", "n_map", type=COUNT, default=0, show_default=True, help="MAP baseline on the first N lenses too."
)
@click.option(
    "--finetune", "n_finetune", type=COUNT, default=0, show_default=True, help="Fine-tuned RIM on the first N too."
)
@FINETUNE_OPTIONS
@click.option("--batch-size", type=POSITIVE, default=32, show_default=True)
def evaluate(model: str, testset: Path, out_dir: Path, n_map: int, n_finetune: int, batch_size: int, **o):
    """The paper's evaluation on a test set: chi2 distribution and vs SNR, coherence spectra, loss statistics, gallery."""
    setup = _finetune_setup(o) if n_finetune else None
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
@click.option("--count", type=POSITIVE, default=None, help="Only the first N lenses.")
@click.option("--regularization", type=click.Choice(["curvature", "gradient"]), default="curvature", show_default=True)
@click.option("--max-iterations", type=POSITIVE, default=200, show_default=True)
def fit_map_cmd(data: Path, out_path: Path, count: int | None, **options):
    """Classical MAP fit (pixelated source and log10 kappa with smoothness priors, L-BFGS, several starts)."""
    r = fit_map_file(data, out_path, count, MAPOptions(**options))
    click.echo(
        f"fitted {r.chi2_nu.shape[0]} lenses in {r.seconds:.1f} s (median chi2_nu {float(r.chi2_nu.median()):.2f})"
        f"; wrote {out_path}"
    )


def _echo_error(*parts: str) -> None:
    click.echo("error: " + ": ".join(parts), err=True)


def main(argv=None) -> int:
    """Entry point: runs the click group; input errors give exit code 2, a diverged training 1."""
    if "OMP_NUM_THREADS" not in os.environ:  # torch is imported already: set its pool as the variable would
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        cli.main(args=argv, prog_name="rimlens", standalone_mode=False)
    except RimlensInputError as exc:
        _echo_error(str(exc))
        return 2
    except (TrainingDivergedError, RankFailedError) as exc:
        _echo_error(str(exc))
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
