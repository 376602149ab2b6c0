"""The ZeRO-3 layout: each process holds a slice of every weight (DeepSpeed ZeRO-3 partitions) and evolves only that.

The noise for a slice is the same slice of the full-parameter noise (``ShardedNoise``), so a sharded run perturbs
and updates exactly as the unsharded run does, while no process ever holds more than one full tensor of noise.
Everything here reads DeepSpeed's parameter attributes (``ds_tensor``, ``ds_shape``, ``ds_process_group``,
``ds_status``) and never imports DeepSpeed (but to write its fp32 copies, ``write_deepspeed_copies``).
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import collectives
from ..master import MasterWeights
from ..noise import GaussianNoise
from .layout import TensorLayout


@dataclass(frozen=True)
class ShardLayout:
    """Where one process's slice sits in its parameter."""

    shape: torch.Size  # of the full parameter
    start: int  # first element of the flattened parameter held by this process
    size: int  # elements held by this process, padding after the parameter's end included (zeroed by ES)

    @property
    def held(self) -> int:
        """Elements of the real parameter in this slice (the rest is padding)."""
        return max(0, min(self.size, self.shape.numel() - self.start))


class ShardedNoise(GaussianNoise):
    """Noise for the local slices, cut from the full-parameter noise that an unsharded run would draw (``whole``)."""

    def __init__(self, layouts: Mapping[str, ShardLayout], whole: GaussianNoise | None = None):
        self.layouts = dict(layouts)
        self.whole = whole or GaussianNoise()

    def sample(self, member_seed: int, name: str, shape: torch.Size, device: torch.device | str) -> torch.Tensor:
        layout = self.layouts[name]
        full = self.whole.sample(member_seed, name, layout.shape, device).view(-1)
        shard = torch.zeros(layout.size, device=device, dtype=torch.float32)
        shard[: layout.held] = full[layout.start : layout.start + layout.held]
        return shard.view(shape)


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_tensor") and hasattr(param, "ds_shape")


def zero3_shards(params: Mapping[str, torch.nn.Parameter]) -> tuple[dict[str, torch.Tensor], dict[str, ShardLayout]]:
    """This process's partitions of ZeRO-3 parameters, and where each sits in its full parameter."""
    shards, layouts = {}, {}
    for name, p in params.items():
        if not is_zero3_partitioned(p):
            raise ValueError(
                f"{name} is not partitioned by DeepSpeed ZeRO-3; the sharded layout needs every evolved parameter "
                "inside a ZeRO-3 engine (deepspeed.initialize with zero_optimization.stage 3)."
            )
        size = p.ds_tensor.numel()
        rank = dist.get_rank(group=p.ds_process_group) if dist.is_initialized() else 0
        shards[name] = p.ds_tensor
        layouts[name] = ShardLayout(torch.Size(p.ds_shape), start=rank * size, size=size)
    groups = {id(p.ds_process_group) for p in params.values()}
    if len(groups) > 1:
        raise ValueError("the evolved parameters are partitioned over different process groups; ES needs one.")
    return shards, layouts


def deepspeed_fp32_partitions(params: Mapping[str, torch.nn.Parameter], optimizer) -> dict[str, torch.Tensor] | None:
    """DeepSpeed's own fp32 copy of each ZeRO-3 partition of ``params``: views into the flat fp32 groups of its
    ZeRO-3 optimizer (``fp32_partitioned_groups_flat``, at ``grad_position``), so that ES updates the copy DeepSpeed
    checkpoints (and ``zero_to_fp32.py`` reads) instead of keeping a second one that DeepSpeed's tools never see.
    None where there is none to share: no ZeRO-3 optimizer, a parameter outside its groups, groups swapped out to
    NVMe, or fp32 weights, whose partitions are DeepSpeed's fp32 copy themselves."""
    flats = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    positions = getattr(optimizer, "grad_position", None)
    if not flats or positions is None:
        return None
    views = {}
    for name, p in params.items():
        try:
            group, offset, numel = positions[optimizer.get_param_id(p)]
        except (KeyError, AttributeError):
            return None
        flat = flats[group]
        if flat.numel() < offset + numel or numel != p.ds_tensor.numel():  # swapped out: a placeholder
            return None
        view = flat.narrow(0, offset, numel)
        if view.data_ptr() == p.ds_tensor.data_ptr():
            return None
        views[name] = view
    return views


def release_gathered(params) -> None:
    """Drop full copies that ZeRO-3 keeps around (persistent small parameters), so the next forward re-gathers the
    partitions ES has just written."""
    for p in params:
        if is_zero3_partitioned(p) and p.ds_status.name == "AVAILABLE":
            p.partition()


class Zero3Layout(TensorLayout):
    """This process's slices (``shards``) of parameters laid out as ``slices`` say.

    ``partitioned``: the ZeRO-3 parameters the slices belong to, whose gathered copies are dropped after each write;
    ``group``: the process group the parameters are partitioned over (None: every process); ``shared_master``:
    DeepSpeed's fp32 partitions, to serve as the master copy (``deepspeed_fp32_partitions``).
    """

    def __init__(self, shards: Mapping[str, torch.Tensor], slices: Mapping[str, ShardLayout], partitioned=(),
                 group=None, shared_master: Mapping[str, torch.Tensor] | None = None):
        self.tensors = dict(shards)
        self.slices = dict(slices)
        self.partitioned = list(partitioned)
        self.group = group
        self.shared_master = shared_master
        # one fp32 truth: DeepSpeed's partitions are the master (shared_master) or are kept in step with it
        self.deepspeed_copies: dict[str, torch.nn.Parameter] = {}
        with torch.no_grad():  # DeepSpeed leaves a slice's padding uninitialised: zero it, as the noise there is
            for name, shard in self.tensors.items():
                shard.view(-1)[self.slices[name].held:].zero_()
                if shared_master is not None:
                    shared_master[name].view(-1)[self.slices[name].held:].zero_()

    @classmethod
    def from_zero3(cls, params: Mapping[str, torch.nn.Parameter], optimizer=None) -> "Zero3Layout":
        """Over the partitions of ``params``, parameters of a DeepSpeed ZeRO-3 engine; ``optimizer``: the engine's
        ZeRO-3 optimizer, whose fp32 partitions then serve as the master copy (``deepspeed_fp32_partitions``)."""
        shards, slices = zero3_shards(params)
        group = next(iter(params.values())).ds_process_group
        shared = None if optimizer is None else deepspeed_fp32_partitions(params, optimizer)
        layout = cls(shards, slices, partitioned=params.values(), group=group, shared_master=shared)
        if shared is None and getattr(optimizer, "fp32_partitioned_groups_flat", None):
            layout.deepspeed_copies = dict(params)
        return layout

    def write_deepspeed_copies(self, master: MasterWeights) -> None:
        """Where DeepSpeed keeps an fp32 copy that could not serve as the master (swapped out to NVMe), write the
        master into it before DeepSpeed checkpoints it, so that its checkpoint and ``zero_to_fp32.py`` hold the
        current weights rather than the step-0 ones."""
        from deepspeed.utils import safe_set_local_fp32_param

        for name, p in self.deepspeed_copies.items():
            safe_set_local_fp32_param(p, master[name])

    def noise(self, whole: GaussianNoise) -> GaussianNoise:
        return ShardedNoise(self.slices, whole)

    def written(self) -> None:
        release_gathered(self.partitioned)

    def shape(self, name: str) -> torch.Size:
        return self.slices[name].shape

    def real(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(-1)[: self.slices[name].held]

    def total_squared_norm(self, local: float) -> float:
        if not dist.is_initialized():
            return local
        return float(collectives.all_reduce(torch.tensor(local, dtype=torch.float64), group=self.group))

    def full_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Gather the slices into whole host tensors on the group's first process only: one process holds the
        checkpoint copy (the others get an empty dict)."""
        if not dist.is_initialized():
            return {name: self._unpadded(name, t.detach().cpu()) for name, t in tensors.items()}
        first = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        full = {}
        for name, tensor in tensors.items():
            pieces = collectives.gather(tensor, dst=first, group=self.group)
            if pieces is not None:
                full[name] = self._unpadded(name, torch.cat(pieces))
        return full

    def local_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        slices = {}
        for name, saved in tensors.items():
            layout = self.slices[name]
            if tuple(saved.shape) != tuple(layout.shape):
                raise ValueError(f"{name}: the saved tensor has shape {tuple(saved.shape)}, the model {tuple(layout.shape)}.")
            shard = torch.zeros(layout.size, dtype=saved.dtype)
            shard[: layout.held] = saved.reshape(-1)[layout.start : layout.start + layout.held]
            slices[name] = shard
        return slices

    def _unpadded(self, name: str, flat: torch.Tensor) -> torch.Tensor:
        shape = self.slices[name].shape
        return flat.reshape(-1)[: shape.numel()].view(shape)
