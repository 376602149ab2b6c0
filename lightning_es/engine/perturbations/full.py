"""Full-rank noise written into the weights, one population member at a time (the ES-at-scale method).

Inside ``apply(member)`` every evolved tensor holds ``theta + sigma * sign * eps_member``, perturbed from the fp32
master copy and rounded once; on exit the master is copied back, so the weights are exactly ``theta`` again in any
dtype. The tensors may be whole (the default layout) or this process's ZeRO-3 slices (``Zero3Layout``,
``ShardedPerturbation``), whose noise is the same slice of the whole tensor's.
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from ..master import MasterWeights
from ..noise import GaussianNoise
from ..population import Member
from ..precision import perturbed_value
from .base import Perturbation
from .layout import TensorLayout
from .zero3 import ShardLayout, Zero3Layout


class FullRankPerturbation(Perturbation):

    def __init__(
        self,
        params: Mapping[str, torch.nn.Parameter] | TensorLayout,
        sigma: float,
        noise: GaussianNoise | None = None,
        master_device: torch.device | str | None = None,
    ):
        """``params``: whole tensors, or a layout holding the tensors (``Zero3Layout``), which also says whether fp32
        copies kept elsewhere serve as the master copy (``TensorLayout.shared_master``)."""
        super().__init__(params, sigma, noise)
        self.master = MasterWeights(self.params, device=master_device, shared=self.layout.shared_master)

    @contextmanager
    def apply(self, member: Member) -> Iterator[None]:
        try:
            with torch.no_grad():
                for name, p in self.params.items():
                    eps = self.scaled_noise(member.seed, name)
                    p.copy_(perturbed_value(self.master[name], eps, self.sigma * member.sign, p.dtype))
                    del eps
            self.written()
            yield
        finally:
            self.master.restore()
            self.written()


class ShardedPerturbation(FullRankPerturbation):
    """``FullRankPerturbation`` on a ``Zero3Layout``: this process's slices of parameters partitioned by DeepSpeed
    ZeRO-3, perturbed and updated exactly as the unsharded run's whole tensors."""

    layout: Zero3Layout

    def __init__(self, shards: Mapping[str, torch.Tensor] | Zero3Layout, layouts: Mapping[str, ShardLayout] | None,
                 sigma: float, master_device: torch.device | str | None = None, partitioned=(), group=None,
                 shared_master: Mapping[str, torch.Tensor] | None = None):
        """``shards``, ``layouts``, ``partitioned``, ``group``, ``shared_master``: ``Zero3Layout``'s arguments; or
        ``shards`` a ``Zero3Layout`` (and the others left out)."""
        layout = shards if isinstance(shards, Zero3Layout) else Zero3Layout(
            shards, layouts, partitioned=partitioned, group=group, shared_master=shared_master)
        super().__init__(layout, sigma, master_device=master_device)

    @classmethod
    def from_zero3(cls, params: Mapping[str, torch.nn.Parameter], sigma: float,
                   master_device: torch.device | str | None = None, optimizer=None) -> "ShardedPerturbation":
        """Over the partitions of ``params``, parameters of a DeepSpeed ZeRO-3 engine; ``optimizer``: the engine's
        ZeRO-3 optimizer, whose fp32 partitions then serve as the master copy (``Zero3Layout.from_zero3``)."""
        return cls(Zero3Layout.from_zero3(params, optimizer), None, sigma, master_device)

    def write_deepspeed_copies(self) -> None:
        """Bring DeepSpeed's fp32 copies that are not the master up to date before DeepSpeed checkpoints them
        (``Zero3Layout.write_deepspeed_copies``)."""
        self.layout.write_deepspeed_copies(self.master)
