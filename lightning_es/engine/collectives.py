"""Every collective the library runs (and the drift metrics' sync) goes through here.

A collective's tensors must live where the process group's backend works: NCCL refuses host tensors, gloo works on
host memory. The library's tensors live wherever their job puts them (fitness tables and metric states on the host,
weight slices beside the weights), so each call here moves its tensors to the group's device and the results back.
A test runs the multi-process paths with every ``torch.distributed`` collective called from elsewhere in the library
refused (``tests/test_gpu_paths.py``).
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

_depth = 0  # > 0 while a collective of this module runs: what the test's guard reads


@contextmanager
def _collective() -> Iterator[None]:
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def inside() -> bool:
    """Whether a collective of this module is running (for the test that refuses collectives called elsewhere)."""
    return _depth > 0


def group_device(group=None) -> torch.device:
    """Where the tensors of a collective over ``group`` must live: this process's GPU under NCCL, else the host."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """The sum of ``tensor`` over ``group``, on ``tensor``'s device (``tensor`` itself is left as it was)."""
    with _collective():
        moved = tensor.detach().to(group_device(group), copy=True)
        dist.all_reduce(moved, group=group)
        return moved.to(tensor.device)


def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """``tensor`` of every process of ``group`` (same shapes), in rank order, on ``tensor``'s device; the signature of
    torchmetrics' ``dist_sync_fn``."""
    with _collective():
        moved = tensor.detach().to(group_device(group)).contiguous()
        pieces = [torch.empty_like(moved) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, moved, group=group)
        return [piece.to(tensor.device) for piece in pieces]


def gather(tensor: torch.Tensor, dst: int, group=None) -> list[torch.Tensor] | None:
    """``tensor`` of every process of ``group``, in rank order, on the host of global rank ``dst``; None elsewhere."""
    with _collective():
        moved = tensor.detach().to(group_device(group)).contiguous()
        first = dist.get_rank() == dst
        pieces = [torch.empty_like(moved) for _ in range(dist.get_world_size(group))] if first else None
        dist.gather(moved, pieces, dst=dst, group=group)
        return [piece.cpu() for piece in pieces] if first else None


def broadcast_(tensor: torch.Tensor, src: int = 0, group=None) -> None:
    """Give ``tensor`` (in place) process ``src``'s values."""
    with _collective():
        device = group_device(group)
        moved = tensor.data if tensor.device == device else tensor.detach().to(device)
        dist.broadcast(moved, src=src, group=group)
        if moved is not tensor.data:
            tensor.data.copy_(moved)


def all_gather_object(value, group=None) -> list:
    """``value`` (a picklable object) of every process, in rank order."""
    with _collective():
        gathered = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, value, group=group)
        return gathered


def broadcast_object(value, src: int = 0, group=None):
    """Process ``src``'s ``value`` (a picklable object), on every process."""
    with _collective():
        message = [value]
        dist.broadcast_object_list(message, src=src, group=group, device=group_device(group))
        return message[0]
