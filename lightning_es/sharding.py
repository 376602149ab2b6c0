"""ES over DeepSpeed ZeRO-3 partitions: each process holds a slice of every weight and evolves only that slice.

The noise for a slice is the same slice of the full-parameter noise (``ShardedNoise``), so a sharded run perturbs
and updates exactly as the unsharded run does, while no process ever holds more than one full tensor of noise.
Everything here reads DeepSpeed's parameter attributes (``ds_tensor``, ``ds_shape``, ``ds_process_group``) and
imports DeepSpeed only where it must gather.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .noise import GaussianNoise


@dataclass(frozen=True)
class ShardLayout:
    shape: torch.Size  # of the full parameter
    start: int  # first element of the flattened parameter held by this process
    size: int  # elements held by this process, zero padding after the parameter's end included

    @property
    def held(self) -> int:
        """Elements of the real parameter in this slice (the rest is padding)."""
        return max(0, min(self.size, self.shape.numel() - self.start))


class ShardedNoise:
    """Noise for the local slices, cut from the full-parameter noise that an unsharded run would draw."""

    def __init__(self, layouts: Mapping[str, ShardLayout], noise: GaussianNoise | None = None):
        self.layouts = dict(layouts)
        self.noise = noise or GaussianNoise()

    def sample(self, member_seed: int, name: str, shape: torch.Size, device: torch.device | str) -> torch.Tensor:
        layout = self.layouts[name]
        full = self.noise.sample(member_seed, name, layout.shape, device).view(-1)
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
    return shards, layouts


def release_gathered(params) -> None:
    """Drop full copies that ZeRO-3 keeps around (persistent small parameters), so the next forward re-gathers the
    partitions ES has just written."""
    for p in params:
        if is_zero3_partitioned(p) and p.ds_status.name == "AVAILABLE":
            p.partition()


def gather_full(shards: Mapping[str, torch.Tensor], layouts: Mapping[str, ShardLayout]) -> dict[str, torch.Tensor]:
    """All-gather slices into full host tensors (a collective: every process of the group calls it)."""
    full = {}
    for name, shard in shards.items():
        layout = layouts[name]
        pieces = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, shard.contiguous())
        full[name] = torch.cat(pieces)[: layout.shape.numel()].view(layout.shape).cpu()
    return full


def slices_of(full: Mapping[str, torch.Tensor], layouts: Mapping[str, ShardLayout]) -> dict[str, torch.Tensor]:
    """This process's slice of each full tensor, shaped like its partition (no communication)."""
    slices = {}
    for name, layout in layouts.items():
        if tuple(full[name].shape) != tuple(layout.shape):
            raise ValueError(f"{name}: the saved tensor has shape {tuple(full[name].shape)}, the model {tuple(layout.shape)}.")
        shard = torch.zeros(layout.size, dtype=full[name].dtype)
        shard[: layout.held] = full[name].reshape(-1)[layout.start : layout.start + layout.held]
        slices[name] = shard
    return slices
