"""An evaluation set of lenses made with lenstronomy (an independent simulator, never rimlens's
generator), written as a folder for ``rimlens reconstruct`` plus the truth of every lens.

    python benchmarks/lenstronomy_lenses.py --count 16 --seed 1 --out DIR [--lens-light]
        [--cutout 96|160|mixed] [--no-subhalos]

Each lens ``i`` (``DIR/lens0000`` ...) is drawn from ``numpy.random.default_rng([seed, i])``:

* mass: lenstronomy ``EPL``, theta_E ~ U(0.8", 1.8"), gamma ~ U(1.85, 2.15), axis ratio ~ U(0.6, 1),
  position angle ~ U(0, pi), centre uniform in a disc of 0.05"; external ``SHEAR`` with
  gamma_ext ~ U(0, 0.05) (``--shear-max``) at a random angle (origin at the lens centre); 0-2 subhaloes (equally
  likely; none with ``--no-subhalos``) at U(0.8, 1.2) theta_E from the centre, where the arcs are:
  truncated isothermal spheres (lenstronomy ``PJAFFE``, ``kappa -> b / (2 r)`` between its 0.005"
  core and its truncation radius ``sqrt(b theta_E)``, the tidal radius of an SIS in an SIS host;
  total mass ``pi b (r_s - r_a)``) with b ~ U(0.02", 0.06") -- untruncated SIS subhaloes would add
  mass everywhere (~+1.5 % to the Einstein radius);
* source: an elliptical Sersic (n ~ U(1, 2), R_e ~ U(0.1", 0.3"), q ~ U(0.5, 1)) centred within
  0.12 theta_E of the lens centre (inside the caustics), plus 2-4 circular Gaussian clumps
  (sigma ~ U(0.02", 0.05"), within 1.5 R_e of the Sersic centre, peak surface brightness
  U(0.3, 1) x the Sersic's central one); redrawn until the total magnification is >= 5 (bright
  arcs, multiple images);
* PSF: Gaussian, FWHM ~ U(0.08", 0.12"); the image is made with the analytic PSF at the
  supersampled resolution (``ImageModel``, ``supersampling_factor`` 5, ``supersampling_convolution``)
  and ``psf.fits`` is the PSF integrated over the 0.05" pixels (what a star's image would be),
  21 x 21, unit sum;
* pixels 0.05"; cut-out 96 px (4.8") or 160 px (8") (``--cutout mixed``: either, equally likely);
* noise: the arcs' peak SNR (noiseless arcs' brightest pixel / background sigma) ~ log-U(30, 300)
  sets sigma_bkg; an exposure-time-like factor ``t = 2 peak_arcs / sigma_bkg^2`` (counts per unit
  flux) adds Poisson variance, so that ``noise_map = sqrt(sigma_bkg^2 + (lens light + arcs) / t)``
  (at the arcs' peak the shot noise adds half the background variance); the realisation is Gaussian
  with that sigma per pixel;
* ``--lens-light``: an elliptical Sersic lens light (n ~ U(2, 4), R_e ~ U(0.5", 1.5"),
  q ~ U(0.6, 1), angle the mass's +- 10 deg, centred on the mass) scaled so that its brightest
  (PSF-convolved) pixel is log-U(15, 200) x the arcs' brightest pixel.

Written per lens: ``image.fits``, ``psf.fits``, ``noise_map.fits`` (``PIXSCALE`` 0.05, row 0 at the
bottom, x along columns, lenstronomy's flux per pixel) and ``truth.npz`` with

* ``theta_E``, ``gamma``, ``axis_ratio``, ``phi``, ``e1``, ``e2`` (lenstronomy's EPL), ``shear``
  (gamma_ext), ``shear_angle``, ``gamma1``, ``gamma2``, ``center`` (x, y arcsec from the cut-out's
  centre), ``n_subhalos``, ``snr``, ``sigma_bkg``, ``exposure``, ``psf_fwhm``, ``lens_light_ratio``;
* ``kappa``: the pixel-mean convergence of the EPL + subhaloes (the shear has none) on the model
  grid (64 px, 0.12"/px) centred on the true lens centre, exact by the divergence theorem with
  lenstronomy's deflections (:func:`rimlens.physics.lens_metrics.pixel_mean_kappa`);
* ``source``: the source on the model's source grid (64 px over 3") centred on the true lens
  centre's source-plane position (the origin of a model frame centred on the lens), averaged over
  8 x 8 sub-pixels and peak-normalised like rimlens;
* ``arcs_image``, ``lens_light_image``: the noiseless images (cut-out pixels);
* ``kwargs``: JSON of lenstronomy's model lists and keyword arguments (to recompute the truth on any
  grid: :func:`truth_kappa`, :func:`truth_source`).

``DIR/lenses.json`` lists every lens's parameters and this recipe's settings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import scipy.special
from lenstronomy.Data.imaging_data import ImageData
from lenstronomy.Data.psf import PSF
from lenstronomy.ImSim.image_model import ImageModel
from lenstronomy.LensModel.lens_model import LensModel
from lenstronomy.LightModel.light_model import LightModel
from lenstronomy.Util import param_util

from rimlens.io.fits import write_image
from rimlens.physics import PixelGrid
from rimlens.physics.lens_metrics import pixel_mean_kappa

__all__ = [
    "MODEL_GRID",
    "SLOPE_RANGE",
    "SOURCE_GRID",
    "THETA_E_RANGE_ARCSEC",
    "draw_lens",
    "make_lens",
    "truth_kappa",
    "truth_source",
]

PIXEL_SCALE = 0.05  # arcsec / px of the cut-outs
PSF_PIXELS = 21
SUPERSAMPLING = 5
MODEL_GRID = PixelGrid(64, 0.12)  # the shipped model's image grid (7.68")
SOURCE_GRID = PixelGrid(64, 3.0 / 64)  # its source grid (3")
MIN_MAGNIFICATION = 5.0
# the population prior of the main parameters (uniform): also what a Bayesian posterior of these lenses uses
THETA_E_RANGE_ARCSEC = (0.8, 1.8)
SLOPE_RANGE = (1.85, 2.15)
SUBHALO_CORE = 0.005  # arcsec


# ----------------------------------------------------------------------------- drawing
def _disc(rng, radius):
    r, a = radius * math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
    return r * math.cos(a), r * math.sin(a)


def _loguniform(rng, lo, hi):
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def draw_lens(
    rng: np.random.Generator, lens_light: bool, cutout: str = "96", subhalos: bool = True, shear_max: float = 0.05
) -> dict:
    """Parameters of one lens (JSON-ready): lenstronomy model lists and kwargs plus the noise recipe."""
    theta_e = rng.uniform(*THETA_E_RANGE_ARCSEC)
    gamma = rng.uniform(*SLOPE_RANGE)
    q = rng.uniform(0.6, 1.0)
    phi = rng.uniform(0, math.pi)
    cx, cy = _disc(rng, 0.05)
    e1, e2 = param_util.phi_q2_ellipticity(phi, q)
    g_ext, g_phi = rng.uniform(0, 1) * shear_max, rng.uniform(0, math.pi)
    g1, g2 = param_util.shear_polar2cartesian(g_phi, g_ext)
    lens_models = ["EPL", "SHEAR"]
    kwargs_lens = [
        dict(theta_E=theta_e, gamma=gamma, e1=e1, e2=e2, center_x=cx, center_y=cy),
        dict(gamma1=g1, gamma2=g2, ra_0=cx, dec_0=cy),
    ]
    n_sub = int(rng.integers(0, 3)) if subhalos else 0
    for _ in range(n_sub):
        r, a = rng.uniform(0.8, 1.2) * theta_e, rng.uniform(0, 2 * math.pi)
        b = rng.uniform(0.02, 0.06)  # Einstein radius of the untruncated SIS
        r_a, r_s = SUBHALO_CORE, math.sqrt(b * theta_e)  # core; tidal radius of an SIS in an SIS host
        lens_models.append("PJAFFE")
        kwargs_lens.append(
            dict(
                sigma0=b * (r_s - r_a) / (2 * r_a * r_s),  # kappa -> b / (2 r) for r_a << r << r_s
                Ra=r_a,
                Rs=r_s,
                center_x=cx + r * math.cos(a),
                center_y=cy + r * math.sin(a),
            )
        )
    n_pix = {"96": 96, "160": 160, "mixed": int(rng.choice([96, 160]))}[cutout]
    lens_light_kwargs = None
    if lens_light:
        ll_q, ll_phi = rng.uniform(0.6, 1.0), phi + math.radians(rng.uniform(-10, 10))
        le1, le2 = param_util.phi_q2_ellipticity(ll_phi, ll_q)
        lens_light_kwargs = dict(
            amp=1.0,
            R_sersic=rng.uniform(0.5, 1.5),
            n_sersic=rng.uniform(2.0, 4.0),
            e1=le1,
            e2=le2,
            center_x=cx,
            center_y=cy,
        )
    return {
        "lens_models": lens_models,
        "kwargs_lens": kwargs_lens,
        "theta_E": theta_e,
        "gamma": gamma,
        "axis_ratio": q,
        "phi": phi,
        "e1": e1,
        "e2": e2,
        "shear": g_ext,
        "shear_angle": g_phi,
        "gamma1": g1,
        "gamma2": g2,
        "center": [cx, cy],
        "n_subhalos": n_sub,
        "cutout_pixels": n_pix,
        "psf_fwhm": rng.uniform(0.08, 0.12),
        "snr": _loguniform(rng, 30, 300),
        "lens_light_ratio": _loguniform(rng, 15, 200) if lens_light else 0.0,
        "kwargs_lens_light": [lens_light_kwargs] if lens_light else [],
        "lens_light_models": ["SERSIC_ELLIPSE"] if lens_light else [],
    }


def _draw_source(rng, theta_e, center):
    sx, sy = _disc(rng, 0.12 * theta_e)
    sx, sy = sx + center[0], sy + center[1]
    n, r_e = rng.uniform(1.0, 2.0), rng.uniform(0.1, 0.3)
    e1, e2 = param_util.phi_q2_ellipticity(rng.uniform(0, math.pi), rng.uniform(0.5, 1.0))
    models = ["SERSIC_ELLIPSE"]
    kwargs = [dict(amp=1.0, R_sersic=r_e, n_sersic=n, e1=e1, e2=e2, center_x=sx, center_y=sy)]
    central = math.exp(scipy.special.gammaincinv(2 * n, 0.5))  # Sersic central SB / SB at R_e
    for _ in range(int(rng.integers(2, 5))):
        sigma = rng.uniform(0.02, 0.05)
        dx, dy = _disc(rng, 1.5 * r_e)
        peak = rng.uniform(0.3, 1.0) * central
        models.append("GAUSSIAN")
        kwargs.append(dict(amp=peak * 2 * math.pi * sigma**2, sigma=sigma, center_x=sx + dx, center_y=sy + dy))
    return models, kwargs


# ----------------------------------------------------------------------------- truth on any grid
def _mass_only(params):
    """Model list and kwargs of the convergence-carrying components (the shear has none)."""
    keep = [i for i, m in enumerate(params["lens_models"]) if m != "SHEAR"]
    return [params["lens_models"][i] for i in keep], [params["kwargs_lens"][i] for i in keep]


def truth_kappa(params: dict, grid: PixelGrid = MODEL_GRID, center=None) -> np.ndarray:
    """Exact pixel-mean convergence (``N x N``) of the lens's EPL + subhaloes on ``grid`` centred at
    ``center`` (arcsec, cut-out frame; default: the true lens centre)."""
    models, kwargs = _mass_only(params)
    lm = LensModel(models)
    c = params["center"] if center is None else center
    cusps = [(k["center_x"], k["center_y"]) for k in kwargs]
    return pixel_mean_kappa(lambda x, y: lm.alpha(x, y, kwargs), grid, c, singular_points=cusps)


def truth_source(params: dict, grid: PixelGrid = SOURCE_GRID, center=None, supersample: int = 8) -> np.ndarray:
    """The source (``N x N``, peak 1) averaged over ``supersample^2`` sub-pixels on a source grid
    centred at ``center`` (arcsec; default: the true lens centre; a model whose image grid is
    centred at ``c`` has its source grid centred at ``c`` too, ``beta = theta - alpha``)."""
    f = int(supersample)
    fine = PixelGrid(grid.n_pixels * f, grid.pixel_scale_arcsec / f)
    a = fine.axis().double().numpy()
    c = params["center"] if center is None else center
    x, y = np.meshgrid(a + c[0], a + c[1])
    sb = LightModel(params["source_models"]).surface_brightness(x.ravel(), y.ravel(), params["kwargs_source"])
    n = grid.n_pixels
    out = np.asarray(sb).reshape(n, f, n, f).mean(axis=(1, 3))
    return out / out.max()


# ----------------------------------------------------------------------------- images
def gaussian_psf_kernel(fwhm: float, pixel_scale: float = PIXEL_SCALE, size: int = PSF_PIXELS) -> np.ndarray:
    """The Gaussian PSF integrated over each pixel (``size x size``, odd, unit sum)."""
    sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
    edges = (np.arange(size + 1) - size / 2) * pixel_scale
    cdf = 0.5 * (1 + scipy.special.erf(edges / (math.sqrt(2) * sigma)))
    p = np.diff(cdf)
    k = np.outer(p, p)
    return k / k.sum()


def _image_model(params, n_pix):
    c = -(n_pix - 1) / 2 * PIXEL_SCALE
    data = ImageData(
        image_data=np.zeros((n_pix, n_pix)),
        ra_at_xy_0=c,
        dec_at_xy_0=c,
        transform_pix2angle=np.eye(2) * PIXEL_SCALE,
    )
    psf = PSF(psf_type="GAUSSIAN", fwhm=params["psf_fwhm"], pixel_size=PIXEL_SCALE, truncation=6)
    return ImageModel(
        data,
        psf,
        lens_model_class=LensModel(params["lens_models"]),
        source_model_class=LightModel(params["source_models"]),
        lens_light_model_class=LightModel(params["lens_light_models"]) if params["lens_light_models"] else None,
        kwargs_numerics={"supersampling_factor": SUPERSAMPLING, "supersampling_convolution": True},
    )


def _magnification(params, n_pix):
    """Lensed / unlensed source flux in the cut-out (noiseless, without PSF)."""
    lensed = _image_model(params, n_pix).image(
        params["kwargs_lens"], params["kwargs_source"], unconvolved=True, lens_light_add=False
    )
    no_lens = {**params, "lens_models": ["SHEAR"], "kwargs_lens": [dict(gamma1=0.0, gamma2=0.0)]}
    direct = _image_model(no_lens, n_pix).image(
        no_lens["kwargs_lens"], params["kwargs_source"], unconvolved=True, lens_light_add=False
    )
    return float(lensed.sum() / direct.sum())


def make_lens(
    rng: np.random.Generator, lens_light: bool, cutout: str = "96", subhalos: bool = True, shear_max: float = 0.05
) -> dict:
    """Draw and simulate one lens: ``{"params", "image", "noise_map", "psf", "arcs", "lens_light",
    "kappa", "source"}`` (images ``n x n`` cut-out pixels; kappa/source on the model grids)."""
    params = draw_lens(rng, lens_light, cutout, subhalos, shear_max)
    n_pix = params["cutout_pixels"]
    for _ in range(50):
        params["source_models"], params["kwargs_source"] = _draw_source(rng, params["theta_E"], params["center"])
        params["magnification"] = _magnification(params, n_pix)
        if params["magnification"] >= MIN_MAGNIFICATION:
            break
    model = _image_model(params, n_pix)
    arcs = model.image(params["kwargs_lens"], params["kwargs_source"], lens_light_add=False)
    peak = float(arcs.max())
    light = np.zeros_like(arcs)
    if lens_light:
        unit = model.image(
            params["kwargs_lens"], params["kwargs_source"], params["kwargs_lens_light"], source_add=False
        )
        scale = params["lens_light_ratio"] * peak / float(unit.max())
        params["kwargs_lens_light"][0]["amp"] *= scale
        light = unit * scale
    sigma_bkg = peak / params["snr"]
    exposure = 2 * peak / sigma_bkg**2
    noise_map = np.sqrt(sigma_bkg**2 + np.clip(arcs + light, 0, None) / exposure)
    image = arcs + light + rng.normal(size=arcs.shape) * noise_map
    params.update(sigma_bkg=sigma_bkg, exposure=exposure, arcs_peak=peak)
    return {
        "params": params,
        "image": image,
        "noise_map": noise_map,
        "psf": gaussian_psf_kernel(params["psf_fwhm"]),
        "arcs": arcs,
        "lens_light": light,
        "kappa": truth_kappa(params),
        "source": truth_source(params),
    }


def write_lens(folder: Path, lens: dict) -> None:
    """``image.fits``, ``psf.fits``, ``noise_map.fits`` and ``truth.npz`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    header = {"PIXSCALE": (PIXEL_SCALE, "arcsec / pixel")}
    write_image(folder / "image.fits", lens["image"], header)
    write_image(folder / "psf.fits", lens["psf"], header)
    write_image(folder / "noise_map.fits", lens["noise_map"], header)
    p = lens["params"]
    scalars = [
        "theta_E",
        "gamma",
        "axis_ratio",
        "phi",
        "e1",
        "e2",
        "shear",
        "shear_angle",
        "gamma1",
        "gamma2",
        "n_subhalos",
        "snr",
        "sigma_bkg",
        "exposure",
        "psf_fwhm",
        "lens_light_ratio",
        "magnification",
    ]
    np.savez_compressed(
        folder / "truth.npz",
        **{k: np.float64(p[k]) for k in scalars},
        center=np.asarray(p["center"], dtype=np.float64),
        kappa=lens["kappa"],
        kappa_pixel_scale=np.float64(MODEL_GRID.pixel_scale_arcsec),
        source=lens["source"],
        source_pixel_scale=np.float64(SOURCE_GRID.pixel_scale_arcsec),
        arcs_image=lens["arcs"],
        lens_light_image=lens["lens_light"],
        kwargs=np.asarray(json.dumps(p)),
    )


def load_truth(folder: Path) -> tuple[dict, dict]:
    """``(arrays, params)`` of a lens folder's ``truth.npz`` (``params`` from its ``kwargs`` JSON)."""
    with np.load(Path(folder) / "truth.npz") as d:
        arrays = {k: d[k] for k in d.files}
    return arrays, json.loads(str(arrays["kwargs"]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lens-light", action="store_true", help="add a Sersic lens light (and its shot noise)")
    ap.add_argument("--cutout", choices=["96", "160", "mixed"], default="96")
    ap.add_argument("--no-subhalos", action="store_true")
    ap.add_argument("--shear-max", type=float, default=0.05, help="external shear magnitude U(0, this)")
    args = ap.parse_args(argv)
    index = []
    for i in range(args.count):
        rng = np.random.default_rng([args.seed, i])
        lens = make_lens(rng, args.lens_light, args.cutout, not args.no_subhalos, args.shear_max)
        name = f"lens{i:04d}"
        write_lens(args.out / name, lens)
        p = lens["params"]
        index.append({"name": name, **{k: v for k, v in p.items() if not k.startswith(("kwargs", "source_models"))}})
        print(
            f'{name}: theta_E {p["theta_E"]:.2f}" gamma {p["gamma"]:.2f} q {p["axis_ratio"]:.2f} '
            f"shear {p['shear']:.3f} subhalos {p['n_subhalos']} SNR {p['snr']:.0f} "
            f"mu {p['magnification']:.1f} cut-out {p['cutout_pixels']} px",
            file=sys.stderr,
        )
    recipe = {"seed": args.seed, "count": args.count, "lens_light": args.lens_light, "cutout": args.cutout}
    recipe.update(
        subhalos=not args.no_subhalos, shear_max=args.shear_max, pixel_scale=PIXEL_SCALE, supersampling=SUPERSAMPLING
    )
    (args.out / "lenses.json").write_text(json.dumps({"recipe": recipe, "lenses": index}, indent=2))


if __name__ == "__main__":
    main()
