"""Can the log-slope be read from the images at all, and what biases it on a peer's lenses?

    python benchmarks/lenstronomy_lenses.py --count 64 --seed 77 --cutout mixed --shear-max 0.1 --out LV
    python benchmarks/peer_validation.py LV --preset cpu64 --out peer_val_cpu64.npz
    OMP_NUM_THREADS=1 python benchmarks/slope_learnability.py --peer peer_val_cpu64.npz --lenses LV \\
        [--minutes 25] [--train 6000] [--small-sources]

1. Source sizes: flux-weighted rms and half-light radii (and offset from the optical axis) of the cpu64
   population's sources (test split) against the peer's (``--lenses``: lenstronomy truth), on the source grid.
2. A small CNN (4 double-conv blocks, 0.34 M parameters) regresses gamma - 2 from the image (data and
   data / sigma) on ``--train`` power-law (EPL) lenses of the cpu64 population (random rotations/flips) for
   ``--minutes`` on one core; reported: its median slope error on 400 held-out lenses of that population and
   on the peer set, with the median bias and the correlation with the truth, beside the shipped RIM's and
   guessing gamma = 2. ``--small-sources``: parametric sources only, half-light radii U(0.06, 0.3)" within
   0.15" of the axis (near the peer's), to test whether the source-size prior sets the slope bias.

A diagnostic, not a model rimlens ships: it asks whether the slope is learnable from these images on a CPU
budget (the RIM's slope error on its own power laws is barely below guessing) and what transfers.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common import write_peer_file
from rimlens.config import ParametricSourceConfig, get_preset
from rimlens.data.lenses import LensGenerator
from rimlens.data.random import child_rng
from rimlens.io.checkpoint import load_model
from rimlens.physics.lens_metrics import log_slope
from rimlens.train.peer import PeerValidationSet, load_peer_validation


def source_sizes(source: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(rms radius, half-light radius, centroid offset from the axis), arcsec, of one source map."""
    s = np.clip(source, 0, None)
    f = s.sum()
    cx, cy = (s * x).sum() / f, (s * y).sum() / f
    rms = float(np.sqrt((s * ((x - cx) ** 2 + (y - cy) ** 2)).sum() / f))
    r = np.hypot(x - cx, y - cy).ravel()
    order = np.argsort(r)
    half = float(r[order][np.searchsorted(np.cumsum(s.ravel()[order]) / f, 0.5)])
    return rms, half, float(np.hypot(cx, cy))


def as_peer_set(lenses, preset) -> PeerValidationSet:
    """Own lenses in the peer-set form (truth slopes and Einstein radii from the maps, as for the peer's)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "own.npz"
        write_peer_file(lenses, preset, path)
        return load_peer_validation(path, preset.grid.image_grid)


def features(s: PeerValidationSet) -> torch.Tensor:
    """``B x 2 x N x N``: the data and the data in units of 100 sigma, zero where masked."""
    obs, m = s.observation.float(), s.mask.float()
    return torch.cat([obs * m, obs / s.noise_sigma.float().clamp_min(1e-6) * m / 100.0], 1)


class SlopeCNN(nn.Module):
    def __init__(self, width: int = 24):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GELU(), nn.Conv2d(o, o, 3, padding=1), nn.GELU())

        w = width
        self.features = nn.Sequential(
            block(2, w), nn.AvgPool2d(2), block(w, 2 * w), nn.AvgPool2d(2), block(2 * w, 4 * w), nn.AvgPool2d(2)
        )
        self.last = block(4 * w, 4 * w)
        self.head = nn.Sequential(nn.Linear(8 * w, 64), nn.GELU(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.last(self.features(x))
        return self.head(torch.cat([z.mean((-2, -1)), z.amax((-2, -1))], 1))[:, 0]


def predict(net: nn.Module, x: torch.Tensor) -> np.ndarray:
    net.eval()
    with torch.no_grad():
        p = torch.cat([net(x[i : i + 64]) for i in range(0, len(x), 64)])
    net.train()
    return p.numpy() + 2.0


def report(name: str, pred: np.ndarray, truth: np.ndarray) -> str:
    ok = np.isfinite(pred) & np.isfinite(truth)
    d = pred[ok] - truth[ok]
    corr = np.corrcoef(pred[ok], truth[ok])[0, 1]
    return f"| {name} | {np.median(np.abs(d)):.3f} | {np.median(d):+.3f} | {corr:.2f} |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer", type=Path, required=True, help="peer validation set on the cpu64 grid")
    ap.add_argument("--lenses", type=Path, default=None, help="the peer's lens folders (for source sizes)")
    ap.add_argument("--minutes", type=float, default=25.0)
    ap.add_argument("--train", type=int, default=6000)
    ap.add_argument("--small-sources", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    base = get_preset("cpu64")
    data = dataclasses.replace(base.data, kappa_mix={"epl": 1.0})
    if args.small_sources:
        small = ParametricSourceConfig(r_eff_arcsec=(0.06, 0.3), max_offset_arcsec=0.15)
        data = dataclasses.replace(data, source_mix={"parametric": 1.0}, parametric_source=small)
    preset = dataclasses.replace(base, data=data)

    sg = preset.grid.source_grid
    x, y = (t.numpy() for t in sg.coordinates(torch.float64))
    own_src = LensGenerator(preset, split="test", bank_seed=0).draw(child_rng(5, 5), 200).source
    rows = [("rimlens cpu64 population" + (" (small sources)" if args.small_sources else ""), own_src)]
    if args.lenses is not None:
        sys.path.insert(0, str(Path(__file__).parent))
        from lenstronomy_lenses import load_truth, truth_source

        peer_src = []
        for folder in sorted(p for p in args.lenses.iterdir() if (p / "truth.npz").exists()):
            _, params = load_truth(folder)
            peer_src.append(truth_source(params, sg, params["center"]))
        rows.append((f"peer ({args.lenses.name})", torch.as_tensor(np.array(peer_src))[:, None]))
    print('| sources | rms radius (") 10/50/90% | half-light radius (") | offset from the axis (") |')
    print("|---|---|---|---|")
    for name, src in rows:
        a = np.array([source_sizes(s[0].double().numpy(), x, y) for s in src])
        cells = [" / ".join(f"{v:.2f}" for v in np.percentile(a[:, i], [10, 50, 90])) for i in range(3)]
        print(f"| {name} | {' | '.join(cells)} |")

    t0 = time.time()
    train = as_peer_set(LensGenerator(preset, split="train", bank_seed=0).draw(child_rng(1, 1), args.train), preset)
    val = as_peer_set(LensGenerator(preset, split="test", bank_seed=0).draw(child_rng(2, 2), 400), preset)
    print(f"\n{args.train} + 400 EPL lenses drawn in {time.time() - t0:.0f} s", flush=True)
    xt, yt = features(train), torch.as_tensor(train.gamma, dtype=torch.float32) - 2
    keep = torch.isfinite(yt)
    xt, yt = xt[keep], yt[keep]
    net = SlopeCNN()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    rng = np.random.default_rng(0)
    t0, step = time.time(), 0
    while time.time() - t0 < 60 * args.minutes:
        idx = torch.as_tensor(rng.integers(0, len(xt), 32))
        xb = torch.rot90(xt[idx], int(rng.integers(4)), (-2, -1))  # the slope is invariant: augment
        if rng.random() < 0.5:
            xb = xb.flip(-1)
        loss = nn.functional.smooth_l1_loss(net(xb), yt[idx], beta=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step == 3000:
            for group in opt.param_groups:
                group["lr"] = 3e-4
    print(f"CNN: {step} steps of 32 in {time.time() - t0:.0f} s (one core)\n")

    peer = load_peer_validation(args.peer, preset.grid.image_grid)
    rim = load_model("default").eval()
    with torch.no_grad():
        out = rim(peer.observation.float(), peer.psf.float(), peer.noise_sigma.float(), mask=peer.mask)
    rim_gamma = np.array(
        [log_slope(k[0], peer.grid, t) for k, t in zip(out.final_kappa.double().numpy(), peer.theta_e, strict=True)]
    )
    vg, pg = np.asarray(val.gamma), np.asarray(peer.gamma)
    print("| slope estimate | median abs(error) | median bias | correlation with the truth |")
    print("|---|---|---|---|")
    print(report("CNN, own held-out EPL lenses", predict(net, features(val)), vg))
    print(report("gamma = 2, own held-out EPL lenses", np.full_like(vg, 2.0), vg).replace("| nan |", "| — |"))
    print(report(f"CNN, peer set ({len(pg)})", predict(net, features(peer)), pg))
    print(report("shipped RIM, peer set", rim_gamma, pg))
    print(report("gamma = 2, peer set", np.full_like(pg, 2.0), pg).replace("| nan |", "| — |"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
