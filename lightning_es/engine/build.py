"""From ``ESSettings`` and a model to the ``EvolutionStrategy`` both integrations run."""

import torch

from .es import EvolutionStrategy
from .params import select_parameters
from .perturbations import build_perturbation
from .settings import ESSettings


def build_evolution_strategy(settings: ESSettings, model: torch.nn.Module, seed: int, sharded: bool = False,
                             copy_all: bool = False, zero3_optimizer=None) -> EvolutionStrategy:
    """``seed``: the noise seed; ``sharded``: the model's parameters are DeepSpeed ZeRO-3 partitions
    (``zero3_optimizer``: its engine's optimizer, whose fp32 partitions serve as the master copy); ``copy_all``: an
    fp32 master copy of every evolved weight, for a torch optimizer's step."""
    if sharded:
        settings.check_sharded()
    perturbation = build_perturbation(
        settings.perturbation, select_parameters(model, settings.param_spec), settings.noise_sigma, model=model,
        rank=settings.perturbation_rank, master_device=settings.es_master_device, sharded=sharded, copy_all=copy_all,
        relative=settings.relative_noise, zero3_optimizer=zero3_optimizer,
    )
    return EvolutionStrategy(
        perturbation, population_size=settings.population_size, learning_rate=settings.step_size(),
        antithetic=settings.antithetic, fitness_shaping=settings.fitness_shaping, seed=seed,
        es_anchor_decay=settings.es_anchor_decay, es_start_device=settings.es_start_device,
    )
