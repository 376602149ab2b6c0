"""Weights of the noise terms in the OpenAI-ES estimate ``g = sum_i f_i * eps_i / (N * sigma)``."""

from collections import defaultdict
from collections.abc import Sequence

import torch

from .population import Member


def noise_coefficients(members: Sequence[Member], shaped_fitness: torch.Tensor) -> dict[int, float]:
    """Weight of each distinct noise seed: an antithetic pair contributes ``(f_plus - f_minus) * eps`` once."""
    coefficients: dict[int, float] = defaultdict(float)
    for member in members:
        coefficients[member.seed] += member.sign * float(shaped_fitness[member.index])
    return {seed: c for seed, c in coefficients.items() if c != 0.0}
