"""The ``rimlens`` command line.

Every user error (bad input, unreadable files) ends with a one-line message on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

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
