"""What the lens light costs a reconstruction (issue 10's goal: <= 1.5x), on SLACS J1430+4105 as distributed.

    OMP_NUM_THREADS=1 python benchmarks/bench_lens_light.py [--lens DIR] [--repeats 7]

``DIR`` holds ``image.fits``, ``psf.fits`` and ``noise_map.fits`` at 0.05"/px (default: the project's
shared copy of J1430+4105, ``../shared/data/slacs_hst_lenses/slacs1430+4105`` from the repository root).

Prints the median seconds of ``reconstruct_prepared`` with ``lens_light="none"`` and ``"mge"`` (same
process, same prepared observation, the shipped model, timed round-robin), their ratio, and the first
light fit alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import compare_times, machine, median_time
from rimlens.inference import pipeline
from rimlens.io.checkpoint import load_model
from rimlens.io.observation import load_observation, prepare_observation
from rimlens.physics import PSF


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--lens", type=Path, default=Path("../shared/data/slacs_hst_lenses/slacs1430+4105"))
    args = ap.parse_args(argv)
    model = load_model("default")
    d = args.lens
    obs = load_observation(d / "image.fits", d / "psf.fits", d / "noise_map.fits", pixel_scale_arcsec=0.05)
    prep = prepare_observation(obs, model.grid.image_grid, "auto")
    fit_psf = PSF.from_kernel(prep.kernel_for(pipeline.FIT_SUPERSAMPLE or 1))
    times = compare_times(  # round-robin: machine noise hits both alike
        {
            "none": lambda: pipeline.reconstruct_prepared(model, prep, lens_light="none"),
            "mge": lambda: pipeline.reconstruct_prepared(model, prep, lens_light="mge"),
        },
        repeats=args.repeats,
        min_time=0.0,
    )
    none, mge = times["none"], times["mge"]
    first_fit = median_time(lambda: pipeline._fit_light(prep, prep.observation, fit_psf, None), args.repeats)
    print(f"{machine()}, medians of {args.repeats}")
    print(f"reconstruct_prepared: lens light none {none:.3f} s, mge {mge:.3f} s, ratio {mge / none:.2f}")
    print(f"first lens-light fit alone: {first_fit:.3f} s")


if __name__ == "__main__":
    main()
