"""The processes that evaluate one population together, and how an error on one of them reaches all of them.

Layouts (``Processes``):

- replicated (default): every process holds the whole model and sees the same batch; the members are split over the
  processes, and each round a process scores one of its members (or, for a batched perturbation, all of them, or
  ``members_per_round`` of them at a time: the memory of one round is that of its rows);
- sharded: the processes hold one model (DeepSpeed ZeRO-3), score every member together, each on its own share of the
  batch, one member per round.

``together`` turns an error on any process into the same ``PopulationError`` on every process, so that no process is
left waiting in a collective for a peer that failed. What can be agreed on is an error raised between collectives: in
a reward function, a fitness check, anything a process computes on its own. An error inside a collective (in the
sharded layout, a forward pass that gathers parameters from the other processes) cannot be: the others are already
waiting inside it. gloo then fails fast on every process; NCCL waits for its timeout.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from . import collectives
from .population import Member

T = TypeVar("T")


class PopulationError(RuntimeError):
    """An error on one process while the processes of an ES run worked together (scoring the population, saving its
    state), raised with the same message on every process."""


@dataclass(frozen=True)
class Processes:
    """The processes that evaluate one population together (the default process group when it has several)."""

    rank: int = 0
    world_size: int = 1
    sharded: bool = False

    @classmethod
    def current(cls, sharded: bool = False) -> "Processes":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), sharded)
        return cls(sharded=sharded)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def rounds(self, members: Sequence[Member], batched: bool, members_per_round: int | None = None
               ) -> list[list[Member]]:
        """The members this process scores, grouped in rounds; every process has the same number of rounds.
        ``members_per_round``: at most this many members in one round of a batched population (default: all)."""
        if self.sharded:
            if batched:
                raise ValueError("a batched (low-rank) population cannot be scored on a sharded model.")
            return [[member] for member in members]
        if len(members) % self.world_size:
            raise ValueError(
                f"population_size ({len(members)}) must be a multiple of the number of processes ({self.world_size}): "
                "every process scores the same number of members."
            )
        local = list(members[self.rank :: self.world_size])
        if not batched:
            return [[member] for member in local]
        if members_per_round is not None and members_per_round < 1:
            raise ValueError(f"members_per_round must be at least 1, got {members_per_round}.")
        size = members_per_round or len(local)
        return [local[start:start + size] for start in range(0, len(local), size)]

    def together(self, action: Callable[[], T], where: str) -> T:
        """Run ``action`` on every process; if it raises on any of them, raise the same ``PopulationError`` (naming
        ``where``, the process and the error) on all of them, instead of leaving the others in their next collective."""
        failure, result = None, None
        try:
            result = action()
        except Exception as error:  # noqa: BLE001 - every error must reach the other processes
            failure = PopulationError(f"{where} (process {self.rank}): {type(error).__name__}: {error}")
            failure.__cause__ = error
        self._agree(failure)
        return result

    def _agree(self, failure: PopulationError | None) -> None:
        if not self.distributed:
            if failure is not None:
                raise failure
            return
        flags = torch.zeros(self.world_size)
        if failure is not None:
            flags[self.rank] = 1
        failed = torch.nonzero(collectives.all_reduce(flags)).flatten().tolist()
        if not failed:
            return
        message = collectives.broadcast_object(str(failure) if self.rank == failed[0] else None, src=failed[0])
        raise PopulationError(message) from failure

    def sum(self, table: torch.Tensor) -> torch.Tensor:
        return collectives.all_reduce(table).cpu() if self.distributed else table.cpu()

    def gather(self, value) -> list:
        """``value`` of every process (picklable objects), in rank order."""
        return collectives.all_gather_object(value) if self.distributed else [value]

    def broadcast(self, value):
        """Process 0's ``value`` (a picklable object), on every process."""
        return collectives.broadcast_object(value) if self.distributed else value

    def synchronize(self, tensors) -> None:
        """Give every process process 0's values of ``tensors`` (in place), as DDP does when it wraps a model: every
        process must start from the same weights, or the same update would move different models."""
        if self.distributed:
            for tensor in tensors:
                collectives.broadcast_(tensor)
