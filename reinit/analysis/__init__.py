"""Analyses of trained networks: margins and norms, flatness, layer robustness, memorization.

Pure functions over linen models and variables (jax, flax, numpy; no TensorFlow): the paper's
three explanations of why LW generalizes (larger margin without larger weight norm, flatter
minima, less memorization), plus layer robustness. `launch/analyze.py` runs them on a finished
run and writes `WORKDIR/analysis.json`; `launch.report` tabulates them.
"""

from reinit.analysis.flatness import classification_loss
from reinit.analysis.flatness import folded_classification_loss
from reinit.analysis.flatness import hessian_top_eigenvalue
from reinit.analysis.flatness import hessian_vector_product
from reinit.analysis.flatness import loss_increase
from reinit.analysis.flatness import mean_loss
from reinit.analysis.flatness import perturb
from reinit.analysis.margins import conv_operator
from reinit.analysis.margins import conv_spectral_norm
from reinit.analysis.margins import dense_spectral_norm
from reinit.analysis.margins import find_linear_layers
from reinit.analysis.margins import fold_batchnorm
from reinit.analysis.margins import gaussian_start
from reinit.analysis.margins import folded_kernel
from reinit.analysis.margins import folded_parameters
from reinit.analysis.margins import layer_norms
from reinit.analysis.margins import LinearLayer
from reinit.analysis.margins import logit_margins
from reinit.analysis.margins import margin_statistics
from reinit.analysis.margins import norm_summary
from reinit.analysis.margins import normalize_margins
from reinit.analysis.margins import operator_spectral_norm
from reinit.analysis.margins import unfold_parameters
from reinit.analysis.memorization import memorization_metrics
from reinit.analysis.robustness import layer_robustness
from reinit.analysis.robustness import reset_unit

__all__ = [
    "LinearLayer",
    "classification_loss",
    "conv_operator",
    "conv_spectral_norm",
    "dense_spectral_norm",
    "find_linear_layers",
    "fold_batchnorm",
    "gaussian_start",
    "folded_classification_loss",
    "folded_kernel",
    "folded_parameters",
    "hessian_top_eigenvalue",
    "hessian_vector_product",
    "layer_norms",
    "layer_robustness",
    "logit_margins",
    "loss_increase",
    "margin_statistics",
    "mean_loss",
    "memorization_metrics",
    "norm_summary",
    "normalize_margins",
    "operator_spectral_norm",
    "perturb",
    "reset_unit",
    "unfold_parameters",
]
