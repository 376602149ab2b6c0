"""``LowRankPerturbation``: the members' factors, their noise sums and the update.

Member i's noise on a matrix is ``A_i B_i^T / sqrt(r)`` (A carries the tensor's scale under relative noise), on a
vector full-rank noise. The factors of a step's members are drawn once (``prepare``, called with each step's
population) and used again by the update; they are kept until the next step: (rows + columns) x rank x 4 bytes per
matrix and member of the step. The update of a matrix is one product of the weighted factors side by side, added
without a dense update tensor where no master copy is kept.
"""

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ...master import MasterWeights
from ...noise import GaussianNoise
from ...population import Member
from ..base import Perturbation
from .hooks import PopulationHooks
from .structure import InputGroups, added_vectors, check_hookable, is_matrix, parameter_owners


class LowRankPerturbation(Perturbation):
    batched = True

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, nn.Parameter],
        sigma: float,
        rank: int = 1,
        noise: GaussianNoise | None = None,
        master_device: torch.device | str | None = None,
        copy_all: bool = False,
    ):
        """``copy_all``: keep an fp32 master copy of fp32 weights too, to measure a step another optimizer takes."""
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}.")
        super().__init__(params, sigma, noise)
        self.owners = parameter_owners(model, self.params)
        check_hookable(self.owners, self.params)
        self.rank = rank
        # nothing is written into the weights, so fp32 weights need no restore source and take updates directly
        self.master = MasterWeights(self.params, device=master_device, only_low_precision=not copy_all,
                                    shared=self.layout.shared_master)
        self.added_vectors = added_vectors(self.owners)  # the other vectors are swapped into their module
        self._step_seeds: frozenset[int] = frozenset()  # the seeds of the step whose factors are kept (prepare)
        self._drawn: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.hooks = PopulationHooks(self.owners, InputGroups(model, self.owners, rank))

    @property
    def _groups(self) -> InputGroups:
        return self.hooks.groups

    @property
    def _broadcasts(self) -> dict[tuple, bool]:
        return self.hooks.broadcasts

    @property
    def noise_kind(self) -> str:
        # "every parameter": before, the low-rank noise evolved nn.Linear weights only; such a checkpoint is refused
        return f"lowrank(rank={self.rank}, every parameter)" + self.scale_kind

    def prepare(self, members: Sequence[Member]) -> None:
        """Keep the factors of these members (a step's population) once drawn, for the hooks and for the update."""
        seeds = frozenset(m.seed for m in members)
        if seeds != self._step_seeds:
            self._step_seeds, self._drawn = seeds, {}

    def set_scales(self, scales) -> None:
        super().set_scales(scales)
        self._drawn = {}  # A carries the scale

    def factors(self, seed: int, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Member ``seed``'s factors of a matrix: A (rows x r, times the matrix's scale) and B (cols x r), fp32; drawn
        once per step for the members of ``prepare`` (do not modify them)."""
        drawn = self._drawn.get((seed, name))
        if drawn is not None:
            return drawn
        rows, cols = weight.shape[0], weight[0].numel()
        a = self.scaled_noise(seed, name, f"{name}#A", torch.Size([rows, self.rank]))  # A carries the tensor's scale
        b = self.noise.sample(seed, f"{name}#B", torch.Size([cols, self.rank]), weight.device)
        if seed in self._step_seeds:
            self._drawn[seed, name] = a, b
        return a, b

    def dense_noise(self, seed: int, name: str) -> torch.Tensor:
        """Member ``seed``'s noise of one parameter as a dense fp32 tensor of its shape."""
        p = self.params[name]
        if not is_matrix(p):
            return self.scaled_noise(seed, name)
        a, b = self.factors(seed, name, p)
        return (a @ b.T).div_(math.sqrt(self.rank)).view(p.shape)

    def apply_population(self, members: Sequence[Member]) -> Iterator[None]:
        """Inside, the model computes as ``members``. The hooks are registered once, on first use, and read the
        population's buffers, refilled here in place: nothing about the forward changes from one step to the next but
        the buffers' values, which a compiled forward (``torch.compile``, static-cache decoding) then reads."""
        return self.hooks.computing(self, members)

    @contextmanager
    def apply(self, member: Member) -> Iterator[None]:
        with self.apply_population([member]):
            yield

    def close(self) -> None:
        """Take the hooks off the model and free the buffers they read and the step's factors (the hooks do nothing
        outside ``apply_population``; the next use registers them again)."""
        self.hooks.remove()
        self._drawn, self._step_seeds = {}, frozenset()

    def _stacked_factors(self, coefficients: Mapping[int, float], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``A B^T = sum_s c_s * eps_s * sqrt(r)``: the weighted factors side by side."""
        weight = self.params[name]
        a_columns, b_columns = [], []
        for seed, coefficient in coefficients.items():
            a, b = self.factors(seed, name, weight)
            a_columns.append(a * coefficient)
            b_columns.append(b)
        return torch.cat(a_columns, dim=1), torch.cat(b_columns, dim=1)

    def noise_sum(self, coefficients: Mapping[int, float], name: str) -> torch.Tensor:
        """``sum_s c_s * eps_s`` for one parameter; for a matrix, a single matmul of the stacked factors."""
        p = self.params[name]
        if not coefficients:
            return torch.zeros(p.shape, device=p.device, dtype=torch.float32)
        if not is_matrix(p):
            return super().noise_sum(coefficients, name)
        a, b = self._stacked_factors(coefficients, name)
        return (a @ b.T).div_(math.sqrt(self.rank)).view(p.shape)

    def add_noise_sum(self, coefficients: Mapping[int, float], name: str, scale: float) -> float:
        """For a matrix without a master copy (fp32), the update ``scale * sum_s c_s eps_s`` is one ``addmm_`` into
        the weight, and the squared norm of ``sum_s c_s eps_s`` comes from the factors' small Gram matrices: no dense
        update tensor."""
        p = self.params[name]
        if name in self.master.copies or not coefficients or not is_matrix(p):
            return super().add_noise_sum(coefficients, name, scale)
        a, b = self._stacked_factors(coefficients, name)
        alpha = 1 / math.sqrt(self.rank)
        with torch.no_grad():
            p.view(p.shape[0], -1).addmm_(a.to(p.dtype), b.T.to(p.dtype), alpha=scale * alpha)
        a, b = a.double(), b.double()
        return float(((a.T @ a) * (b.T @ b)).sum()) * alpha**2
