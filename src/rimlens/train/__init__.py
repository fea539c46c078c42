"""Training: configuration, engine (single process or DDP under torchrun), checkpoints."""

from rimlens.train.checkpoint import load_checkpoint, load_model
from rimlens.train.engine import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer", "load_checkpoint", "load_model"]
