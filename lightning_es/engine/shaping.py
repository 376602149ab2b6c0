"""Fitness shaping: turn raw member fitness into the weights of the ES gradient estimate."""

from collections.abc import Callable

import torch


def zscore(fitness: torch.Tensor) -> torch.Tensor:
    """(R - mean) / std, as the ES-at-scale reference does; all zeros when every member scored the same."""
    fitness = fitness.double()
    std = fitness.std(unbiased=False)
    if std == 0:
        return torch.zeros_like(fitness)
    return (fitness - fitness.mean()) / std


def centered_rank(fitness: torch.Tensor) -> torch.Tensor:
    """Ranks mapped to [-0.5, 0.5] as in OpenAI-ES; tied members share their average rank."""
    fitness = fitness.double()
    n = fitness.numel()
    order = torch.argsort(fitness, stable=True)
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.arange(n, dtype=torch.float64)
    for value in fitness.unique():
        tied = fitness == value
        ranks[tied] = ranks[tied].mean()
    return ranks / (n - 1) - 0.5


FITNESS_SHAPING: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "zscore": zscore,
    "centered_rank": centered_rank,
}


def get_fitness_shaping(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in FITNESS_SHAPING:
        raise ValueError(f"fitness_shaping must be one of {sorted(FITNESS_SHAPING)}, got {name!r}.")
    return FITNESS_SHAPING[name]
