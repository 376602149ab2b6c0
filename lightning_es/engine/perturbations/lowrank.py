"""Low-rank perturbations applied through forward hooks, for a whole population in one batch (EGGROLL).

Member i's noise on a linear weight W (out x in) is ``eps_i = A_i B_i^T / sqrt(r)`` with A_i (out x r) and
B_i (in x r) standard normal, regenerated from the member seed: entries of eps_i have unit variance, like full-rank
noise. A hook adds ``sigma * sign_i * (x B_i) A_i^T / sqrt(r)`` to the layer's output, so the weights are never
modified and every member shares one batched ``x W^T``. Batch rows are grouped by member, in the order the members
were given: rows ``[m * R, (m + 1) * R)`` belong to member ``m``.

Only ``nn.Linear`` weights are perturbed this way; a weight shared with an ``nn.Embedding`` (tied embeddings) is left
out, because a hook on the output layer would perturb only one of its two uses.
"""

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..master import MasterWeights
from ..noise import GaussianNoise
from ..population import Member
from .base import Perturbation


def hookable_linear_weights(model: nn.Module, params: Mapping[str, nn.Parameter]) -> dict[str, nn.Linear]:
    """The selected parameters that are weights of ``nn.Linear`` layers, mapped to their layer."""
    names = {id(p): name for name, p in params.items()}
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {
        names[id(m.weight)]: m
        for m in model.modules()
        if isinstance(m, nn.Linear) and id(m.weight) in names and id(m.weight) not in embedded
    }


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
        self.layers = hookable_linear_weights(model, params)
        if not self.layers:
            raise ValueError("low-rank perturbations need at least one nn.Linear weight among the evolved parameters.")
        self.params = {name: params[name] for name in self.layers}
        self.sigma = sigma
        self.rank = rank
        self.noise = noise or GaussianNoise()
        # nothing is written into the weights, so fp32 weights need no restore source and take updates directly
        self.master = MasterWeights(self.params, device=master_device, only_low_precision=not copy_all)

    @property
    def noise_kind(self) -> str:
        return f"lowrank(rank={self.rank})"

    def factors(self, seed: int, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_features, in_features = weight.shape
        a = self.noise.sample(seed, f"{name}#A", torch.Size([out_features, self.rank]), weight.device)
        b = self.noise.sample(seed, f"{name}#B", torch.Size([in_features, self.rank]), weight.device)
        return a, b

    @contextmanager
    def apply_population(self, members: Sequence[Member]) -> Iterator[None]:
        handles = []
        try:
            for name, layer in self.layers.items():
                handles.append(layer.register_forward_hook(self._hook(name, layer.weight, members)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def apply(self, member: Member) -> Iterator[None]:
        with self.apply_population([member]):
            yield

    def _hook(self, name: str, weight: torch.Tensor, members: Sequence[Member]):
        with torch.no_grad():
            pairs = [self.factors(m.seed, name, weight) for m in members]
            a = torch.stack([p[0] for p in pairs]).to(weight.dtype)  # (M, out, r)
            b = torch.stack([p[1] for p in pairs]).to(weight.dtype)  # (M, in, r)
            scale = torch.tensor([self.sigma * m.sign / math.sqrt(self.rank) for m in members], dtype=weight.dtype,
                                 device=weight.device)
            a_t = (a * scale[:, None, None]).transpose(1, 2).contiguous()  # (M, r, out)
        count = len(members)

        def hook(module, args, output):
            x = args[0]
            if x.shape[0] % count:
                raise RuntimeError(f"batch of {x.shape[0]} rows cannot be split among {count} population members.")
            projected = torch.bmm(x.reshape(count, -1, x.shape[-1]), b)  # (M, rows, r): x B_i, member by member
            if not output.is_contiguous():
                return output + torch.bmm(projected, a_t).reshape(output.shape)
            # add sigma (x B_i) A_i^T in one pass over the output, without a delta tensor; rank 1 is an outer product,
            # which a broadcast multiply-add does faster than a matrix product with an inner size of 1
            grouped = output.view(count, -1, output.shape[-1])
            if self.rank == 1:
                grouped.addcmul_(projected, a_t)
            else:
                grouped.baddbmm_(projected, a_t)
            return output

        return hook

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
        """``sum_s c_s * eps_s`` for one weight, as a single matmul of the stacked factors."""
        weight = self.params[name]
        if not coefficients:
            return torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        a, b = self._stacked_factors(coefficients, name)
        return (a @ b.T) / math.sqrt(self.rank)

    def add_noise_sum(self, coefficients: Mapping[int, float], name: str, scale: float) -> float:
        """For a weight without a master copy (fp32), the update ``scale * sum_s c_s eps_s`` is one ``addmm_`` into
        the weight, and its squared norm comes from the factors' small Gram matrices: no dense update tensor."""
        if name in self.master.copies or not coefficients:
            return super().add_noise_sum(coefficients, name, scale)
        a, b = self._stacked_factors(coefficients, name)
        alpha = scale / math.sqrt(self.rank)
        with torch.no_grad():
            self.params[name].addmm_(a.to(self.params[name].dtype), b.T.to(self.params[name].dtype), alpha=alpha)
        a, b = a.double(), b.double()
        return float(((a.T @ a) * (b.T @ b)).sum()) * alpha**2
