"""Training: the shared loop, the RIM engine (single process or DDP under torchrun), the VAEs."""

from rimlens.train.engine import Trainer, train_rim
from rimlens.train.loop import TrainingLoop, TrainResult
from rimlens.train.vae import VAETrainer, train_vae

__all__ = ["TrainResult", "Trainer", "TrainingLoop", "VAETrainer", "train_rim", "train_vae"]
