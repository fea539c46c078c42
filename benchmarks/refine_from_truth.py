"""Does fitting the data to the noise cost the slope?  The pixel refinement started from the truth.

    python benchmarks/lenstronomy_lenses.py --count 16 --seed 31 --cutout mixed --shear-max 0.1 --out S1
    OMP_NUM_THREADS=2 python benchmarks/refine_from_truth.py S1 [--model default] [--json OUT.json]

For every lenstronomy lens of the set (no lens light) on the model grid of the prepared observation:

1. **from the truth**: kappa = the exact pixel means of the peer's EPL + subhaloes (as the evaluation's
   truth), the true external shear, the true source (peak-normalised, flux scale fitted), the source
   re-fitted with kappa fixed (L-BFGS); then the refinement (``--finetune-mode refine``,
   :func:`rimlens.inference.finetune.refine_estimate`), which fits the data to the noise;
2. **from the RIM**: the same refinement started from the RIM's maps (what ``--finetune`` does).

For both, the slope, Einstein-radius and kappa errors of the refined map against the truth (as
``eval_lenstronomy.py``: about the true centre, 0.5-2 theta_E). If the refinement spent kappa's freedom
on the residuals, its slope would drift from the truth too; if it stays, the slope error of
``--finetune`` is the starting estimate's, i.e. the RIM's.

It also reports what the model family leaves out: the deflection, at the rays, of the peer's lens minus
that of its in-field pixel means (mass beyond the field), in 0.4-2 theta_E -- as it is, after removing
its best constant + linear part (a source shift and an external shear: what the model can absorb),
and after a harmonic expansion up to third order (what external multipoles would absorb).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lenstronomy_lenses import _mass_only, load_truth, truth_kappa, truth_source
from rimlens.inference.finetune import FinetuneOptions, fit_simulator, refine_estimate
from rimlens.inference.quality import rim_input
from rimlens.io.checkpoint import load_model
from rimlens.io.observation import load_observation, prepare_observation
from rimlens.physics import PSF
from rimlens.physics.lens_metrics import einstein_radius_of_map, kappa_error_in_annulus, log_slope
from rimlens.physics.likelihood import chi_squared, reduced_chi_squared


def _fit_source(sim, data, psf, sigma, mask, kappa, shear, source, steps=300):
    """Source pixels by L-BFGS with kappa and shear fixed; returns ``(source, chi2_nu)``."""
    s = source.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([s], lr=1, max_iter=steps, line_search_fn="strong_wolfe", history_size=50)

    def closure():
        opt.zero_grad()
        loss = 0.5 * chi_squared(sim.forward(s.clamp_min(0), kappa, psf, shear=shear, check=False), data, sigma, mask)
        loss = loss.sum() / data.numel()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        s = s.detach().clamp_min(0)
        return s, float(reduced_chi_squared(sim.forward(s, kappa, psf, shear=shear, check=False), data, sigma, mask)[0])


def _truncation(sim, kappa, params, center):
    """RMS |alpha_peer - alpha_map| (arcsec) in 0.4-2 theta_E: raw, minus constant + linear, minus cubic."""
    from lenstronomy.LensModel.lens_model import LensModel

    models, kwargs = _mass_only(params)
    with torch.no_grad():
        a_map = sim.ray_deflection(kappa.double(), check=False)[0].reshape(2, -1).numpy()
    xy = torch.stack(sim.ray_grid.coordinates(torch.float64), -1).reshape(-1, 2).numpy()
    ax, ay = LensModel(models).alpha(xy[:, 0] + center[0], xy[:, 1] + center[1], kwargs)
    d = (ax - a_map[0]) - 1j * (ay - a_map[1])  # conj of the residual deflection: analytic if harmonic
    c = np.asarray(params["center"]) - np.asarray(center)
    r = np.hypot(xy[:, 0] - c[0], xy[:, 1] - c[1])
    sel = (r > 0.4 * params["theta_E"]) & (r < 2.0 * params["theta_E"])
    z, d = (xy[sel, 0] + 1j * xy[sel, 1]), d[sel]
    out = [float(np.sqrt(np.mean(np.abs(d) ** 2)))]
    for degree in (1, 3):
        basis = np.stack([z**k for k in range(degree + 1)], 1)
        coef, *_ = np.linalg.lstsq(basis, d, rcond=None)
        out.append(float(np.sqrt(np.mean(np.abs(d - basis @ coef) ** 2))))
    return out


def _scores(kappa, truth, grid, center):
    k, t = kappa[0, 0].double().numpy(), truth[0, 0].double().numpy()
    theta = einstein_radius_of_map(t, grid, center)
    return {
        "theta_err": abs(einstein_radius_of_map(k, grid, center) / theta - 1),
        "gamma_err": abs(log_slope(k, grid, theta, center) - log_slope(t, grid, theta, center)),
        "kappa_err": kappa_error_in_annulus(k, t, grid, theta, center),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lenses", type=Path)
    ap.add_argument("--model", default="default")
    ap.add_argument("--count", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    model = load_model(args.model).eval()
    sim = fit_simulator(model)
    options = FinetuneOptions.refine_only()
    folders = sorted(p for p in args.lenses.iterdir() if (p / "truth.npz").exists())[: args.count]
    rows = []
    for folder in folders:
        _, params = load_truth(folder)
        obs = load_observation(folder / "image.fits", folder / "psf.fits", folder / "noise_map.fits", None, 0.05, None)
        prep = prepare_observation(obs, model.grid.image_grid, "auto")
        data, sigma, _ = rim_input(prep.observation, prep)
        fit_psf = PSF.from_kernel(prep.kernel_for(sim.supersample))
        grid, c_rec = model.grid.image_grid, prep.center_arcsec
        d = (params["center"][0] - c_rec[0], params["center"][1] - c_rec[1])
        truth = torch.tensor(truth_kappa(params, grid, c_rec), dtype=data.dtype)[None, None]
        shear = torch.tensor([[params["gamma1"], params["gamma2"]]], dtype=data.dtype)
        src = torch.tensor(truth_source(params, model.grid.source_grid, c_rec), dtype=data.dtype)[None, None]
        with torch.no_grad():
            img = sim.forward(src, truth, fit_psf, shear=shear, check=False)
            w = prep.mask / sigma**2
            src = src * float((img * data * w).sum() / (img * img * w).sum())
        t0 = time.time()
        src, chi2_truth = _fit_source(sim, data, fit_psf, sigma, prep.mask, truth, shear, src)
        from_truth = refine_estimate(sim, data, fit_psf, sigma, src, truth, shear, prep.mask, options)
        t_truth = time.time() - t0
        with torch.no_grad():
            out = model(data, PSF.from_kernel(prep.psf), sigma, mask=prep.mask)
        from_rim = refine_estimate(
            sim, data, fit_psf, sigma, out.final_source, out.final_kappa, out.final_shear, prep.mask, options
        )
        row = {
            "lens": folder.name,
            "n_subhalos": int(params["n_subhalos"]),
            "truth_start_chi2_nu": chi2_truth,
            "truth_refined_chi2_nu": from_truth.chi2_nu,
            "rim_refined_chi2_nu": from_rim.chi2_nu,
            "seconds_truth": t_truth,
        }
        row.update({f"truth_{k}": v for k, v in _scores(from_truth.kappa, truth, grid, d).items()})
        row.update({f"rim_{k}": v for k, v in _scores(from_rim.kappa, truth, grid, d).items()})
        row.update({f"rim_start_{k}": v for k, v in _scores(out.final_kappa, truth, grid, d).items()})
        row.update(
            dict(
                zip(
                    ("alpha_rms_raw", "alpha_rms_after_shear", "alpha_rms_after_cubic"),
                    _truncation(sim, truth, params, c_rec),
                    strict=True,
                )
            )
        )
        rows.append(row)
        print(
            f"{folder.name}: truth start chi2 {chi2_truth:.2f} -> {from_truth.chi2_nu:.2f}, slope err "
            f"{row['truth_gamma_err']:.3f} | RIM {row['rim_start_gamma_err']:.3f} -> refined {row['rim_gamma_err']:.3f} "
            f'(chi2 {from_rim.chi2_nu:.2f}) | beyond-field alpha rms {row["alpha_rms_after_shear"]:.4f}"',
            flush=True,
        )

    def med(key):
        return float(np.nanmedian([r[key] for r in rows]))

    print(f"\n| median over {len(rows)} lenses | refined from the truth | RIM | refined from the RIM |")
    print("|---|---|---|---|")
    for key, name in (
        ("theta_err", "Einstein radius error"),
        ("gamma_err", "slope error"),
        ("kappa_err", "kappa error in 0.5-2 theta_E"),
    ):
        print(f"| {name} | {med('truth_' + key):.3f} | {med('rim_start_' + key):.3f} | {med('rim_' + key):.3f} |")
    print(
        f"| chi2_nu | {med('truth_refined_chi2_nu'):.2f} (start {med('truth_start_chi2_nu'):.2f}) | | {med('rim_refined_chi2_nu'):.2f} |"
    )
    print(
        f"\nbeyond-field deflection, rms in 0.4-2 theta_E (arcsec): raw {med('alpha_rms_raw'):.4f}, after a shift + "
        f"shear {med('alpha_rms_after_shear'):.4f}, after cubic harmonics {med('alpha_rms_after_cubic'):.4f}"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
