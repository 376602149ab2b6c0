"""How far fine-tuning moved a model: off-task KL drift (``probe``, ``metrics``) and update geometry (``geometry``),
from the start weights the drift callbacks pick (``start_point``)."""

from .geometry import (
    Connectivity,
    cosine_similarity,
    layer_type,
    linear_connectivity,
    moved_fraction,
    parameter_delta,
    parameter_drift,
    realised_fraction,
    sharded_parameter_drift,
    snapshot,
    update_norm,
    weights_restored,
)
from .metrics import KLDrift, exact_token_kl, sampled_token_kl
from .probe import ESTIMATORS, DriftProbe
from .start_point import start_point

__all__ = [
    "ESTIMATORS",
    "Connectivity",
    "DriftProbe",
    "KLDrift",
    "cosine_similarity",
    "exact_token_kl",
    "layer_type",
    "linear_connectivity",
    "moved_fraction",
    "parameter_delta",
    "parameter_drift",
    "realised_fraction",
    "sampled_token_kl",
    "sharded_parameter_drift",
    "snapshot",
    "start_point",
    "update_norm",
    "weights_restored",
]
