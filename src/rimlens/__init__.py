"""rimlens: strong-lens reconstruction with Recurrent Inference Machines.

Conventions (used everywhere in the package)
-------------------------------------------
* Maps are tensors of shape ``B x 1 x N x N`` (batch, channel, rows, columns).
* ``x`` runs along columns, ``y`` along rows, row 0 is the *bottom* of the image (FITS order).
* Pixel ``i`` of an ``N``-pixel axis with scale ``s`` (arcsec / pixel) has its centre at
  ``(i - (N - 1) / 2) * s``; the field of view is ``N * s`` edge to edge.
* Angles are in arcsec; convergence is dimensionless; surface brightness is in arbitrary units.

The public face (``from rimlens import load_model, reconstruct_observation, LensSimulator, ...``)
is loaded on first use, so ``import rimlens.physics`` alone stays light.

Layers import one way: ``errors``, ``distributed`` -> ``physics`` -> ``config`` -> ``nn`` -> ``io``
-> ``data`` -> ``inference`` -> ``train``, ``evaluate`` -> ``cli`` (tests/test_layers.py checks it).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "RimlensInputError": "rimlens.errors",
    "TrainingDivergedError": "rimlens.errors",
    "PixelGrid": "rimlens.physics",
    "PSF": "rimlens.physics",
    "LensSimulator": "rimlens.physics",
    "deflection": "rimlens.physics",
    "Preset": "rimlens.config",
    "get_preset": "rimlens.config",
    "RIM": "rimlens.nn",
    "rim_loss": "rimlens.nn",
    "load_model": "rimlens.io.checkpoint",
    "load_vae": "rimlens.io.checkpoint",
    "load_observation": "rimlens.io.observation",
    "prepare_observation": "rimlens.io.observation",
    "LensGenerator": "rimlens.data.lenses",
    "reconstruct": "rimlens.inference.predict",
    "reconstruct_observation": "rimlens.inference.pipeline",
    "reconstruct_prepared": "rimlens.inference.pipeline",
    "FinetuneOptions": "rimlens.inference.finetune",
    "finetune": "rimlens.inference.finetune",
    "fit_map": "rimlens.inference.map_fit",
    "Trainer": "rimlens.train",
    "evaluate_testset": "rimlens.evaluate",
}

__all__ = [
    "PSF",
    "RIM",
    "FinetuneOptions",
    "LensGenerator",
    "LensSimulator",
    "PixelGrid",
    "Preset",
    "RimlensInputError",
    "Trainer",
    "TrainingDivergedError",
    "__version__",
    "deflection",
    "evaluate_testset",
    "finetune",
    "fit_map",
    "get_preset",
    "load_model",
    "load_observation",
    "load_vae",
    "prepare_observation",
    "reconstruct",
    "reconstruct_observation",
    "reconstruct_prepared",
    "rim_loss",
]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rimlens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
