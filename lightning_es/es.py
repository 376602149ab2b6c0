"""Evolution Strategies over the parameters of a torch module: the engine that the trainers drive.

One ES step, as in OpenAI-ES and the ES-at-scale paper:

1. ``members(step)``: N members, each with an integer seed (antithetic pairs share one seed with opposite signs);
2. for every member, inside ``perturbed(member)``, measure its fitness (higher is better);
3. ``step(step, fitness)`` shapes the fitness (``zscore`` or ``centered_rank``), forms
   ``g = sum_i f_i * eps_i / (N * sigma)`` and applies ``theta += lr * g``; or ``write_gradients`` puts ``-g`` into
   ``.grad`` for a torch optimizer to consume.

The ES-at-scale paper writes its step as ``alpha / N * sum_i f_i * eps_i``; that is ``lr * g`` with
``lr = alpha * sigma`` (alpha = 5e-4 and sigma = 1e-3 give the default lr = 5e-7).

``perturbation="full"`` writes full-rank noise into the weights, one member at a time. ``perturbation="lowrank"``
applies rank-``rank`` noise to the ``nn.Linear`` weights through forward hooks, so a whole population runs as one
batch (``perturbation.apply_population``); it needs ``model`` to find the layers.

``noise`` replaces the Gaussian noise source, e.g. with ``sharding.ShardedNoise`` when ``params`` are ZeRO-3 slices.
"""

import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from .estimator import noise_coefficients
from .lowrank import LowRankPerturbation, hookable_linear_weights
from .master import MasterWeights
from .noise import GaussianNoise
from .perturbation import InPlacePerturbation
from .population import Member, Population
from .shaping import get_fitness_shaping
from .sharding import ShardedNoise, gather_full, slices_of

PERTURBATIONS = ("full", "lowrank")


@dataclass
class StepStats:
    update_norm: float
    fitness_mean: float
    fitness_std: float
    fitness_max: float


class EvolutionStrategy:
    def __init__(
        self,
        params: Mapping[str, torch.nn.Parameter],
        population_size: int = 32,
        sigma: float = 1e-3,
        lr: float = 5e-7,
        antithetic: bool = True,
        fitness_shaping: str | Callable[[torch.Tensor], torch.Tensor] = "zscore",
        seed: int = 0,
        master_device: torch.device | str | None = None,
        perturbation: str = "full",
        rank: int = 1,
        model: torch.nn.Module | None = None,
        anchor_decay: float = 0.0,
        noise: GaussianNoise | None = None,
    ):
        if not sigma > 0 or not math.isfinite(sigma):
            raise ValueError(f"sigma must be a positive finite number, got {sigma}.")
        if not lr >= 0 or not math.isfinite(lr):
            raise ValueError(f"lr must be a non-negative finite number, got {lr}.")
        if not params:
            raise ValueError("params is empty: ES needs at least one parameter to evolve.")
        if not anchor_decay >= 0:
            raise ValueError(f"anchor_decay must be non-negative, got {anchor_decay}.")
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}.")
        self.population = Population(population_size, antithetic, seed)
        self.sigma = sigma
        self.lr = lr
        self.shape_fitness = fitness_shaping if callable(fitness_shaping) else get_fitness_shaping(fitness_shaping)
        self.noise = noise or GaussianNoise()
        if perturbation == "full":
            self.params = dict(params)
            self.master = MasterWeights(self.params, device=master_device)
            self.perturbation = InPlacePerturbation(self.params, self.master, self.noise, sigma)
        else:
            if model is None:
                raise ValueError("perturbation='lowrank' needs model= to find the nn.Linear layers.")
            layers = hookable_linear_weights(model, params)
            self.params = {name: params[name] for name in layers}
            self.master = MasterWeights(self.params, device=master_device, only_low_precision=True)
            self.perturbation = LowRankPerturbation(layers, self.noise, sigma, rank)
        self.anchor_decay = anchor_decay
        self.anchor = (
            {n: self.master.value(n).to(master_device or p.device, copy=True) for n, p in self.params.items()}
            if anchor_decay
            else None
        )

    @property
    def population_size(self) -> int:
        return self.population.size

    def members(self, step: int) -> list[Member]:
        return self.population.members(step)

    def local_members(self, step: int, rank: int = 0, world_size: int = 1) -> list[Member]:
        return self.population.local_members(step, rank, world_size)

    def perturbed(self, member: Member) -> AbstractContextManager[None]:
        return self.perturbation.apply(member)

    def _check_fitness(self, fitness: torch.Tensor) -> torch.Tensor:
        fitness = torch.as_tensor(fitness, dtype=torch.float64).flatten().cpu()
        if fitness.numel() != self.population_size:
            raise ValueError(f"fitness has {fitness.numel()} values for a population of {self.population_size}.")
        if not torch.isfinite(fitness).all():
            bad = torch.nonzero(~torch.isfinite(fitness)).flatten().tolist()
            raise ValueError(f"fitness of members {bad} is not finite ({fitness[bad].tolist()}).")
        return fitness

    def gradients(self, step: int, fitness: torch.Tensor):
        """Yield ``(name, g)`` for every evolved tensor; only one tensor's estimate is alive at a time."""
        shaped = self.shape_fitness(self._check_fitness(fitness))
        coefficients = noise_coefficients(self.members(step), shaped)
        for name, p in self.params.items():
            yield name, self.perturbation.noise_sum(coefficients, name, p).div_(self.population_size * self.sigma)

    def step(self, step: int, fitness: torch.Tensor, lr: float | None = None) -> StepStats:
        """Apply ``theta += lr * g`` through the fp32 master copy.

        With ``anchor_decay`` (lambda) the step is followed by ``theta <- theta_0 + (1 - lr * lambda) (theta -
        theta_0)``: a pull towards the starting weights that bounds the random walk of weakly constrained directions.
        """
        lr = self.lr if lr is None else lr
        squared_norm = 0.0
        for name, gradient in self.gradients(step, fitness):
            gradient.mul_(lr)
            if self.anchor is not None:
                anchor = self.anchor[name].to(gradient.device)
                moved = self.master.value(name).to(gradient.device) + gradient - anchor
                gradient.sub_(moved, alpha=lr * self.anchor_decay)
            squared_norm += float(gradient.double().pow(2).sum())
            self.master.add_(name, gradient)
        return self._stats(fitness, self._norm(squared_norm))

    def write_gradients(self, step: int, fitness: torch.Tensor) -> StepStats:
        """Store ``-g`` in ``.grad`` (optimizers minimise), for a torch optimizer to take the step.

        Call ``master.sync_from_model()`` after the optimizer has stepped. The reported norm is that of ``g``.
        """
        squared_norm = 0.0
        for name, gradient in self.gradients(step, fitness):
            squared_norm += float(gradient.double().pow(2).sum())
            p = self.params[name]
            p.grad = gradient.neg_().to(p.dtype)
        return self._stats(fitness, self._norm(squared_norm))

    @property
    def sharded(self) -> bool:
        return isinstance(self.noise, ShardedNoise)

    def _norm(self, squared_norm: float) -> float:
        """L2 norm of the whole update; sharded, each process holds a slice, so the squares are summed over them."""
        if self.sharded and torch.distributed.is_initialized():
            device = next(iter(self.params.values())).device
            squared = torch.tensor(squared_norm, dtype=torch.float64, device=device)
            torch.distributed.all_reduce(squared)
            squared_norm = float(squared)
        return math.sqrt(squared_norm)

    def state_dict(self) -> dict:
        """What a checkpoint needs beyond the model's weights: the noise seed and, for weights stored below fp32,
        the exact fp32 master copy, as full tensors (gathered from every process when sharded: a collective)."""
        state = {"seed": self.population.seed}
        if any(p.dtype != torch.float32 for p in self.params.values()):
            master = self.master
            state["master"] = gather_full(master.copies, self.noise.layouts) if self.sharded else master.state_dict()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Adopt ``state_dict()`` after the model's weights were loaded; without a master copy they are exact."""
        if "master" not in state:
            self.master.sync_from_model()
            return
        master = state["master"]
        self.master.load_state_dict(slices_of(master, self.noise.layouts) if self.sharded else master)

    def _stats(self, fitness: torch.Tensor, update_norm: float) -> StepStats:
        fitness = self._check_fitness(fitness)
        return StepStats(
            update_norm=update_norm,
            fitness_mean=float(fitness.mean()),
            fitness_std=float(fitness.std(unbiased=False)),
            fitness_max=float(fitness.max()),
        )
