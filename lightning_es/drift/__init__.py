"""How far fine-tuning moved a model: off-task KL drift (``probe``, ``metrics``) and update geometry (``geometry``)."""

from .geometry import (
    Connectivity,
    cosine_similarity,
    linear_connectivity,
    moved_fraction,
    parameter_delta,
    realised_fraction,
    snapshot,
    update_norm,
    weights_restored,
)
from .metrics import KLDrift, exact_token_kl, sampled_token_kl
from .probe import ESTIMATORS, DriftProbe, layer_type, parameter_drift

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
    "snapshot",
    "update_norm",
    "weights_restored",
]
