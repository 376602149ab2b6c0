"""How a population member is applied to the model.

A perturbation is any object with ``apply(member)``, a context manager inside which the model behaves as
``theta + sigma * sign * eps_member`` and after which it is exactly ``theta`` again. ``InPlacePerturbation`` writes the
perturbed weights; a hook-based or batched low-rank variant can replace it without touching the rest of the engine.
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from .master import MasterWeights
from .noise import GaussianNoise
from .population import Member


class InPlacePerturbation:
    batched = False

    def __init__(
        self,
        params: Mapping[str, torch.nn.Parameter],
        master: MasterWeights,
        noise: GaussianNoise,
        sigma: float,
    ):
        self.params = dict(params)
        self.master = master
        self.noise = noise
        self.sigma = sigma

    @contextmanager
    def apply(self, member: Member) -> Iterator[None]:
        try:
            with torch.no_grad():
                for name, p in self.params.items():
                    eps = self.noise.sample(member.seed, name, p.shape, p.device)
                    # Perturb from the fp32 master and round once, instead of adding noise to rounded weights.
                    eps.mul_(self.sigma * member.sign).add_(self.master[name].to(p.device))
                    p.copy_(eps)
                    del eps
            yield
        finally:
            self.master.restore()

    def noise_sum(self, coefficients: dict[int, float], name: str, weight: torch.Tensor) -> torch.Tensor:
        """``sum_s c_s * eps_s`` for one weight, regenerating one seed's noise at a time."""
        total = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        for seed, coefficient in coefficients.items():
            total.add_(self.noise.sample(seed, name, weight.shape, weight.device), alpha=coefficient)
        return total
