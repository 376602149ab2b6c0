"""The OpenAI-ES gradient estimate ``g = sum_i f_i * eps_i / (N * sigma)``, one parameter tensor at a time."""

from collections import defaultdict
from collections.abc import Sequence

import torch

from .noise import GaussianNoise
from .population import Member


def noise_coefficients(members: Sequence[Member], shaped_fitness: torch.Tensor) -> dict[int, float]:
    """Weight of each distinct noise seed: an antithetic pair contributes ``(f_plus - f_minus) * eps`` once."""
    coefficients: dict[int, float] = defaultdict(float)
    for member in members:
        coefficients[member.seed] += member.sign * float(shaped_fitness[member.index])
    return {seed: c for seed, c in coefficients.items() if c != 0.0}


def estimate_gradient(
    noise: GaussianNoise,
    coefficients: dict[int, float],
    name: str,
    shape: torch.Size,
    device: torch.device | str,
    population_size: int,
    sigma: float,
) -> torch.Tensor:
    gradient = torch.zeros(shape, device=device, dtype=torch.float32)
    for seed, coefficient in coefficients.items():
        gradient.add_(noise.sample(seed, name, shape, device), alpha=coefficient)
    return gradient.div_(population_size * sigma)
