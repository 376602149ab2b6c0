"""Full-rank noise written into the weights, one population member at a time (the ES-at-scale method).

Inside ``apply(member)`` every evolved tensor holds ``theta + sigma * sign * eps_member``, perturbed from the fp32
master copy and rounded once; on exit the master is copied back, so the weights are exactly ``theta`` again in any
dtype.
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from ..master import MasterWeights
from ..noise import GaussianNoise
from ..population import Member
from ..precision import perturbed_value
from .base import Perturbation


class FullRankPerturbation(Perturbation):

    def __init__(
        self,
        params: Mapping[str, torch.nn.Parameter],
        sigma: float,
        noise: GaussianNoise | None = None,
        master_device: torch.device | str | None = None,
        shared_master: Mapping[str, torch.Tensor] | None = None,
    ):
        """``shared_master``: fp32 copies of the weights kept elsewhere, to serve as the master copy (``MasterWeights``)."""
        if not params:
            raise ValueError("params is empty: ES needs at least one parameter to evolve.")
        self.params = dict(params)
        self.sigma = sigma
        self.noise = noise or GaussianNoise()
        self.master = MasterWeights(self.params, device=master_device, shared=shared_master)

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
