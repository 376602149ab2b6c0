"""How a population member is applied to the model: the swappable part of ``EvolutionStrategy``.

Two choices, kept apart: the noise kind (a ``Perturbation``) and where the evolved tensors live (its ``layout``).

- ``FullRankPerturbation`` (``full.py``): full-rank noise written into the weights, one member at a time;
- ``LowRankPerturbation`` (``lowrank/``): rank-r noise on matrices (full-rank on vectors) through forward hooks, a
  whole population per batch;
- ``ReplicatedLayout`` (``layout.py``): whole tensors on every process, the default;
- ``Zero3Layout`` (``zero3.py``): this process's DeepSpeed ZeRO-3 slices, whose noise is cut from the unsharded run's
  noise; ``ShardedPerturbation`` is full-rank noise on it.

``build_perturbation`` maps the integrations' configuration strings to these objects.
"""

from collections.abc import Mapping

import torch

from ..scales import relative_scales
from .base import Perturbation
from .full import FullRankPerturbation, ShardedPerturbation
from .layout import ReplicatedLayout, TensorLayout
from .lowrank import LowRankPerturbation, parameter_owners
from .zero3 import ShardedNoise, ShardLayout, Zero3Layout

PERTURBATIONS = ("full", "lowrank")


def build_perturbation(
    kind: str,
    params: Mapping[str, torch.nn.Parameter],
    sigma: float,
    model: torch.nn.Module | None = None,
    rank: int = 1,
    master_device: torch.device | str | None = None,
    sharded: bool = False,
    copy_all: bool = False,
    relative: bool = False,
    zero3_optimizer=None,
) -> Perturbation:
    """``kind`` is ``"full"`` or ``"lowrank"``; ``sharded``: ``params`` are parameters of a DeepSpeed ZeRO-3 engine
    (``zero3_optimizer``: the engine's optimizer, whose fp32 partitions then serve as ES's master copy);
    ``copy_all``: an fp32 master copy of every evolved weight (full-rank keeps one anyway), for an optimizer's step;
    ``relative``: noise relative to each tensor's scale at this moment (``engine.scales``), ``sigma`` a fraction of it."""
    perturbation = _build(kind, params, sigma, model, rank, master_device, sharded, copy_all, zero3_optimizer)
    if relative:
        perturbation.set_scales(relative_scales(perturbation))
    return perturbation


def refuse_on_zero3(kind: str) -> None:
    """The sharded layout (DeepSpeed ZeRO-3 partitions) runs full-rank noise only."""
    if kind != "full":
        raise ValueError(
            f"perturbation={kind!r} does not run on DeepSpeed ZeRO-3 partitions: the sharded layout evolves each "
            "process's slices with full-rank noise. Set perturbation='full' (the default is 'lowrank'), or drop "
            "ZeRO-3.")


def _build(kind, params, sigma, model, rank, master_device, sharded, copy_all, zero3_optimizer) -> Perturbation:
    if kind not in PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {kind!r}.")
    if sharded:
        refuse_on_zero3(kind)
        return ShardedPerturbation.from_zero3(params, sigma, master_device, optimizer=zero3_optimizer)
    if kind == "full":
        return FullRankPerturbation(params, sigma, master_device=master_device)
    if model is None:
        raise ValueError("perturbation='lowrank' needs model= to find the modules that use the evolved parameters.")
    return LowRankPerturbation(model, params, sigma, rank, master_device=master_device, copy_all=copy_all)


__all__ = [
    "PERTURBATIONS",
    "FullRankPerturbation",
    "LowRankPerturbation",
    "Perturbation",
    "ReplicatedLayout",
    "ShardLayout",
    "ShardedNoise",
    "ShardedPerturbation",
    "TensorLayout",
    "Zero3Layout",
    "build_perturbation",
    "parameter_owners",
]
