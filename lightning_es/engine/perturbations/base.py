"""What every perturbation provides to ``EvolutionStrategy``: the noise kind, beside a layout that says where the
evolved tensors live (``layout.py``).

A perturbation owns the evolved tensors (``params``, those its ``layout`` holds), their fp32 master copy (``master``),
the noise scale (``sigma``) and, for noise relative to each tensor's size, per-tensor ``scales`` (``engine.scales``;
none: absolute noise). It applies a member (``apply``, a context manager inside which the model behaves as ``theta +
sigma * sign * eps_member`` and after which it is exactly ``theta`` again) and regenerates the noise of a weighted set
of seeds (``noise_sum``), which is all the ES estimate needs. Where the tensors live (whole on one process, or ZeRO-3
slices) is the layout's business; the perturbation passes on the questions that depend on it (``real``, ``shape``,
``numel``, ``total_squared_norm``, ``full_tensors``, ``local_tensors``, ``written``).
"""

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from types import MappingProxyType

import torch

from ..master import MasterWeights
from ..params import require_every
from ..noise import GaussianNoise
from ..population import Member
from .layout import ReplicatedLayout, TensorLayout


RELATIVE_NOISE = ", relative to each tensor's scale"  # how noise_kind names noise relative to each tensor


class Perturbation:
    batched = False  # True: ``apply_population(members)`` runs a whole population in one batch
    layout: TensorLayout
    params: dict[str, torch.Tensor]
    master: MasterWeights
    sigma: float
    noise: GaussianNoise
    scales: Mapping[str, torch.Tensor] = MappingProxyType({})  # per tensor, multiplying its noise; none: 1

    def __init__(self, params: Mapping[str, torch.Tensor] | TensorLayout, sigma: float,
                 noise: GaussianNoise | None = None):
        """``params``: the evolved tensors, whole on this process, or a ``TensorLayout`` holding them; ``noise``: the
        noise of whole tensors (default ``GaussianNoise``), which the layout cuts to the tensors it holds."""
        self.layout = params if isinstance(params, TensorLayout) else ReplicatedLayout(params)
        if not self.layout.tensors:
            raise ValueError("params is empty: ES needs at least one parameter to evolve.")
        self.params = self.layout.tensors
        self.sigma = sigma
        self.noise = self.layout.noise(noise or GaussianNoise())

    @property
    def noise_kind(self) -> str:
        """Which noise this perturbation draws from a seed; a checkpoint continues only under the same kind."""
        return "full" + self.scale_kind

    @property
    def scale_kind(self) -> str:
        return RELATIVE_NOISE if self.scales else ""

    def set_scales(self, scales: Mapping[str, torch.Tensor] | None) -> None:
        """Multiply each tensor's noise by its scale from now on (``engine.scales.relative_scales``); None: absolute."""
        if scales is None:
            self.scales = MappingProxyType({})
            return
        require_every(self.params, scales, "the noise scales")
        self.scales = {name: scales[name].to(self.params[name].device, torch.float32) for name in self.params}

    def scaled_noise(self, seed: int, name: str, draw: str | None = None, shape: torch.Size | None = None
                     ) -> torch.Tensor:
        """``noise.sample`` of ``draw`` (default: ``name``, in its shape) times the scale of tensor ``name`` (fp32)."""
        weight = self.params[name]
        eps = self.noise.sample(seed, draw or name, weight.shape if shape is None else shape, weight.device)
        scale = self.scales.get(name)
        return eps if scale is None else eps.mul_(scale.to(eps.device))

    def prepare(self, members: Sequence[Member]) -> None:
        """Called with each step's population before any of it is applied (a perturbation may keep what it draws for
        these members until the update)."""

    def close(self) -> None:
        """Take off the model whatever applying members installed on it (the next use installs it again)."""

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
            total.add_(self.scaled_noise(seed, name), alpha=coefficient)
        return total

    def add_noise_sum(self, coefficients: Mapping[int, float], name: str, scale: float) -> float:
        """Add ``scale * sum_s c_s * eps_s`` to the evolved tensor (through its fp32 master copy); return the squared
        norm of ``sum_s c_s * eps_s`` (unscaled: the ES estimate's norm follows from it even where ``scale`` is 0)."""
        update = self.noise_sum(coefficients, name)
        squared = float(update.double().pow(2).sum())
        self.master.add_(name, update.mul_(scale))
        return squared

    # where the tensors live: asked of the layout (one implementation each, in ``layout.py`` and ``zero3.py``)

    def real(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``layout.real``: the elements of ``tensor`` that belong to parameter ``name``, flattened."""
        return self.layout.real(name, tensor)

    def shape(self, name: str) -> torch.Size:
        """``layout.shape``: the whole tensor's shape."""
        return self.layout.shape(name)

    def numel(self, name: str) -> int:
        return self.layout.numel(name)

    def total_squared_norm(self, local: float) -> float:
        """``layout.total_squared_norm``: the squared norm of a whole update from this process's part of it."""
        return self.layout.total_squared_norm(local)

    def full_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``layout.full_tensors``: checkpoint form of per-parameter state (a collective when sharded)."""
        return self.layout.full_tensors(tensors)

    def local_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``layout.local_tensors``: the inverse of ``full_tensors``."""
        return self.layout.local_tensors(tensors)

    def written(self) -> None:
        """Called after the evolved tensors were written (perturbed, restored or updated): ``layout.written``."""
        self.layout.written()
