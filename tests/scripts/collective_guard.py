"""Refuse any torch.distributed collective that the library (or torchmetrics) calls outside
``lightning_es.engine.collectives``: there a collective's tensors are moved to the process group's device, which NCCL
needs and gloo does not check. The multi-process test scripts install it before they start, so a collective on a host
tensor that would fail under NCCL fails here, on gloo, too. Collectives of accelerate, transformers, Lightning and
DeepSpeed are theirs to place and are let through."""

import functools
import os
import sys

import torch.distributed as dist

from lightning_es.engine import collectives

GUARDED = ("all_reduce", "all_gather", "gather", "broadcast", "reduce", "scatter", "all_gather_object",
           "broadcast_object_list", "gather_object", "all_gather_into_tensor", "reduce_scatter_tensor")
LIBRARY = tuple(os.sep + part + os.sep for part in ("lightning_es", "trl_ext", "torchmetrics"))
TORCH = os.sep + "torch" + os.sep


def caller() -> str:
    """The file of the nearest frame outside torch itself."""
    frame = sys._getframe(2)
    while frame is not None and TORCH in frame.f_code.co_filename:
        frame = frame.f_back
    return "" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


def guarded(name: str, collective):
    @functools.wraps(collective)
    def call(*args, **kwargs):
        where = caller()
        if not collectives.inside() and any(part in where for part in LIBRARY):
            raise RuntimeError(f"torch.distributed.{name} called at {where}, outside lightning_es.engine.collectives: "
                               "its tensors are not moved to the process group's device (NCCL refuses host tensors).")
        return collective(*args, **kwargs)

    return call


def install() -> None:
    for name in GUARDED:
        if hasattr(dist, name):
            setattr(dist, name, guarded(name, getattr(dist, name)))
