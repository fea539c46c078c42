"""Evaluation: figures of merit and the ``rimlens evaluate`` report."""

from rimlens.evaluate.metrics import chi2_nu_distribution, coherence_spectrum, lens_losses
from rimlens.evaluate.report import aggregate, compute_methods, evaluate_testset, write_report

__all__ = [
    "aggregate",
    "chi2_nu_distribution",
    "coherence_spectrum",
    "compute_methods",
    "evaluate_testset",
    "lens_losses",
    "write_report",
]
