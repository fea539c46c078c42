"""Inference: the RIM loop, fine-tuning and classical MAP fits."""

from rimlens.inference.rim import RIM, RIMConfig, RIMOutput

__all__ = ["RIM", "RIMConfig", "RIMOutput"]
