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
    params = select_parameters(model, settings.param_spec)
    rounded = sorted({str(p.dtype).removeprefix("torch.") for p in params.values() if p.dtype != torch.float32})
    if copy_all and rounded:
        raise ValueError(
            f"an optimizer takes the step (es_optimizer='trainer' in ESConfig, or an optimizer from "
            f"configure_optimizers under ESStrategy) on weights stored as {', '.join(rounded)}: it steps the weights "
            "themselves, so a step smaller than their rounding is lost, and ES's steps mostly are. Keep the weights "
            "in fp32 (ESConfig: model_init_kwargs={'dtype': 'float32'}, with bf16=True or fp16=True to autocast the "
            "forwards; ESStrategy: precision='bf16-mixed'), or let ES step its fp32 master copy (es_optimizer='sgd'; "
            "no optimizer from configure_optimizers).")
    perturbation = build_perturbation(
        settings.perturbation, params, settings.noise_sigma, model=model,
        rank=settings.perturbation_rank, master_device=settings.es_master_device, sharded=sharded, copy_all=copy_all,
        relative=settings.relative_noise, zero3_optimizer=zero3_optimizer,
    )
    return EvolutionStrategy(
        perturbation, population_size=settings.population_size, learning_rate=settings.step_size(),
        antithetic=settings.antithetic, fitness_shaping=settings.fitness_shaping, seed=seed,
        es_anchor_decay=settings.es_anchor_decay, es_start_device=settings.es_start_device,
    )
