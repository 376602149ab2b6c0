"""What every perturbation provides to ``EvolutionStrategy``.

A perturbation owns the evolved tensors (``params``), their fp32 master copy (``master``) and the noise scale
(``sigma``). It applies a member (``apply``, a context manager inside which the model behaves as ``theta + sigma *
sign * eps_member`` and after which it is exactly ``theta`` again) and regenerates the noise of a weighted set of seeds
(``noise_sum``), which is all the ES estimate needs. The remaining methods describe where the tensors live; the
defaults are for one process holding whole tensors, ``ShardedPerturbation`` overrides them for ZeRO-3 slices.
"""

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager

import torch

from ..master import MasterWeights
from ..noise import GaussianNoise
from ..population import Member


class Perturbation:
    batched = False  # True: ``apply_population(members)`` runs a whole population in one batch

    @property
    def noise_kind(self) -> str:
        """Which noise this perturbation draws from a seed; a checkpoint continues only under the same kind."""
        return "full"
    params: dict[str, torch.Tensor]
    master: MasterWeights
    sigma: float
    noise: GaussianNoise

    def apply(self, member: Member) -> AbstractContextManager[None]:
        raise NotImplementedError

    def apply_population(self, members: Sequence[Member]) -> AbstractContextManager[None]:
        """Only when ``batched``: inside, batch rows are grouped by member, in the order of ``members``."""
        raise NotImplementedError(f"{type(self).__name__} applies one member at a time (batched=False).")

    def noise_sum(self, coefficients: Mapping[int, float], name: str) -> torch.Tensor:
        """``sum_s c_s * eps_s`` (fp32) for one evolved tensor, regenerating one seed's full-rank noise at a time."""
        weight = self.params[name]
        total = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        for seed, coefficient in coefficients.items():
            total.add_(self.noise.sample(seed, name, weight.shape, weight.device), alpha=coefficient)
        return total

    def add_noise_sum(self, coefficients: Mapping[int, float], name: str, scale: float) -> float:
        """Add ``scale * sum_s c_s * eps_s`` to the evolved tensor (through its fp32 master copy); return the squared
        norm of ``sum_s c_s * eps_s`` (unscaled: the ES estimate's norm follows from it even where ``scale`` is 0)."""
        update = self.noise_sum(coefficients, name)
        squared = float(update.double().pow(2).sum())
        self.master.add_(name, update.mul_(scale))
        return squared

    def written(self) -> None:
        """Called after the evolved tensors were written (perturbed, restored or updated)."""

    def total_squared_norm(self, local: float) -> float:
        """The squared norm of a whole update from this process's part of it."""
        return local

    def full_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint form of per-parameter state (master, anchor): whole tensors on the host. A collective when the
        tensors are sharded; then only process 0 receives them (the others get an empty dict)."""
        return {name: t.detach().cpu() for name, t in tensors.items()}

    def local_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of ``full_tensors``: this process's part of each saved tensor."""
        return dict(tensors)
