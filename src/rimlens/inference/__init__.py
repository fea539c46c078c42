"""Inference: batched reconstruction, the observation-to-products pipeline, test-time fine-tuning,
the classical MAP baseline, and resumable work sharded over processes.

(``finetune`` is not re-exported here: the name is its module's, ``rimlens.inference.finetune``;
``from rimlens import finetune`` gives the function.)"""

from rimlens.inference.finetune import FinetuneOptions, FinetuneResult
from rimlens.inference.map_fit import MAPOptions, MAPResult, fit_map
from rimlens.inference.pipeline import FinetuneSetup, Reconstruction, reconstruct_observation, reconstruct_prepared
from rimlens.inference.power_law import PowerLawMeasurement, measure_power_law
from rimlens.inference.predict import BatchReconstruction, predict_file, reconstruct

__all__ = [
    "BatchReconstruction",
    "FinetuneOptions",
    "FinetuneResult",
    "FinetuneSetup",
    "MAPOptions",
    "MAPResult",
    "PowerLawMeasurement",
    "Reconstruction",
    "fit_map",
    "measure_power_law",
    "predict_file",
    "reconstruct",
    "reconstruct_observation",
    "reconstruct_prepared",
]
