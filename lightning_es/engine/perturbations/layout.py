"""Where the evolved tensors live: a perturbation's layout, beside its noise (as Lightning's strategy sits beside its
precision and checkpoint I/O plugins).

A layout holds the tensors this process evolves (``tensors``) and answers everything that depends on where they live:
each tensor's whole shape, which held elements are real, norms over every process, the checkpoint form of
per-tensor state, the noise of a held tensor given the whole tensor's, and what to do after the tensors were written.
The noise kind (``Perturbation`` subclasses) never asks where a tensor lives; the layout never draws noise itself.

- ``ReplicatedLayout``: whole tensors on this process (every process holds the same ones);
- ``Zero3Layout`` (``zero3.py``): this process's slices of DeepSpeed ZeRO-3 partitioned parameters.
"""

from collections.abc import Mapping

import os

import torch
import torch.distributed as dist

from ..noise import GaussianNoise


class TensorLayout:
    tensors: dict[str, torch.Tensor]  # what this process evolves, by name
    shared_master: Mapping[str, torch.Tensor] | None = None  # fp32 copies kept elsewhere, to serve as the master copy

    def noise(self, whole: GaussianNoise) -> GaussianNoise:
        """The noise of the held tensors, given ``whole``, the noise drawn for whole tensors."""
        return whole

    def shape(self, name: str) -> torch.Size:
        """The whole tensor's shape (a sharded process holds a slice)."""
        raise NotImplementedError

    def numel(self, name: str) -> int:
        return self.shape(name).numel()

    def real(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The elements of ``tensor`` (held like the evolved tensor ``name``) that belong to the parameter, flattened
        (a sharded slice ends in padding)."""
        raise NotImplementedError

    def total_squared_norm(self, local: float) -> float:
        """The squared norm of a whole update from this process's part of it."""
        raise NotImplementedError

    def full_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint form of per-parameter state (master, anchor): whole tensors on the host, on the processes that
        write checkpoints only (the others get an empty dict). A collective when the tensors are sharded."""
        raise NotImplementedError

    def local_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of ``full_tensors``: this process's part of each saved tensor."""
        raise NotImplementedError

    def written(self) -> None:
        """Called after the evolved tensors were written (perturbed, restored or updated)."""


class ReplicatedLayout(TensorLayout):
    """Whole tensors on this process; ``shared_master``: fp32 copies of them kept elsewhere (``MasterWeights``)."""

    def __init__(self, params: Mapping[str, torch.Tensor], shared_master: Mapping[str, torch.Tensor] | None = None):
        self.tensors = dict(params)
        self.shared_master = shared_master

    def shape(self, name: str) -> torch.Size:
        return self.tensors[name].shape

    def real(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(-1)

    def total_squared_norm(self, local: float) -> float:
        return local

    def full_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if dist.is_available() and dist.is_initialized() and int(os.environ.get("LOCAL_RANK", dist.get_rank())) != 0:
            # every process holds the same tensors: one host copy per node (where checkpoints are written: process 0,
            # or each node's first with TRL's save_on_each_node), not one per process
            return {}
        return {name: t.detach().cpu() for name, t in tensors.items()}

    def local_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(tensors)
