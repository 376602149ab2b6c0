"""The population evaluation of one ES iteration, shared by ``ESTrainer`` (TRL) and ``ESStrategy`` (Lightning).

It decides which members this process scores, in rounds that every process runs in step; combines what the
processes measured into one table that is identical everywhere; and turns an error on any process into the same
``PopulationError`` on every process, so that no process is left waiting in a collective for a peer that failed.

Layouts (``Processes``):

- replicated (default): every process holds the whole model and sees the same batch; the members are split over the
  processes, and each round a process scores one of its members (or, for a batched perturbation, all of them, or
  ``members_per_round`` of them at a time: the memory of one round is that of its rows);
- sharded: the processes hold one model (DeepSpeed ZeRO-3), score every member together, each on its own share of the
  batch, one member per round.

``score(members)`` returns, for the members of a round, sums of named quantities measured on this process:
``{"fitness": ..., "weight": ..., <name>: ...}``, each a sequence with one value per member. Sums over processes
make both layouts one formula: a member's fitness is ``sum(fitness) / sum(weight)``, e.g. the sum of its rewards over
the rows scored anywhere divided by their number. A name some process did not report counts 0 there. After every
round the processes agree on whether one of them failed (one small all-reduce, whose cost is negligible next to
scoring a member).

What can be agreed on is an error raised between collectives: in a reward function, a fitness check, anything a
process computes on its own. An error inside a collective (in the sharded layout, a forward pass that gathers
parameters from the other processes) cannot be: the others are already waiting inside it. gloo then fails fast on
every process; NCCL waits for its timeout.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist

from .population import Member

FITNESS = "fitness"
WEIGHT = "weight"
PROMPT = "prompt/"  # PROMPT + an id: a member's summed reward on one prompt (example) of the step; with "/count"

Score = Callable[[Sequence[Member]], Mapping[str, Sequence[float]]]
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
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def current(cls, sharded: bool = False, device: torch.device | str = "cpu") -> "Processes":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), sharded, torch.device(device))
        return cls(sharded=sharded, device=torch.device(device))

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
        flags = torch.zeros(self.world_size, device=self.device)
        if failure is not None:
            flags[self.rank] = 1
        dist.all_reduce(flags)
        failed = torch.nonzero(flags).flatten().tolist()
        if not failed:
            return
        message = [str(failure) if self.rank == failed[0] else None]
        dist.broadcast_object_list(message, src=failed[0], device=self._object_device)
        raise PopulationError(message[0]) from failure

    def sum(self, table: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            table = table.to(self.device)
            dist.all_reduce(table)
        return table.cpu()

    def gather(self, value) -> list:
        """``value`` of every process (picklable objects), in rank order."""
        if not self.distributed:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast(self, value):
        """Process 0's ``value`` (a picklable object), on every process."""
        if not self.distributed:
            return value
        message = [value]
        dist.broadcast_object_list(message, src=0, device=self._object_device)
        return message[0]

    def synchronize(self, tensors) -> None:
        """Give every process process 0's values of ``tensors`` (in place), as DDP does when it wraps a model: every
        process must start from the same weights, or the same update would move different models."""
        if self.distributed:
            for tensor in tensors:
                dist.broadcast(tensor.data, src=0)

    @property
    def _object_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None


@dataclass
class PopulationScores:
    totals: dict[str, torch.Tensor]  # every name's sums over processes, (N,) float64 each

    @property
    def fitness(self) -> torch.Tensor:
        """Per member; NaN for a member nothing was scored for (see ``scored``)."""
        return self.mean(FITNESS)

    @property
    def scored(self) -> torch.Tensor:
        """Which members had something scored (a weight above 0): only they can take part in the step."""
        return self.totals[WEIGHT] > 0

    def mean(self, name: str) -> torch.Tensor:
        """Per member: the sum of ``name`` divided by the weight (its mean over what was scored)."""
        return self.totals[name] / self.totals[WEIGHT]

    @property
    def per_prompt(self) -> torch.Tensor:
        """(members, prompts): each member's mean reward on each prompt (example) of the step that ``score`` reported
        per prompt (``PROMPT``), NaN where it has none; no columns when none was."""
        names = sorted(name for name in self.totals if name.startswith(PROMPT) and not name.endswith("/count"))
        columns = [self.totals[name] / self.totals[f"{name}/count"] for name in names]
        if not columns:
            return torch.full((self.totals[WEIGHT].numel(), 0), float("nan"), dtype=torch.float64)
        return torch.stack(columns, dim=1)


def evaluate_population(
    members: Sequence[Member],
    step: int,
    score: Score,
    processes: Processes,
    batched: bool = False,
    members_per_round: int | None = None,
) -> PopulationScores:
    """Score ``members`` (every member of step ``step``) over ``processes``; the same result on every process.
    A member whose weights sum to zero (nothing scored) is marked in ``PopulationScores.scored``. A batched
    population is scored ``members_per_round`` members at a time (default: all of a process's at once)."""
    size = len(members)
    totals: dict[str, torch.Tensor] = {}
    for round_members in processes.rounds(members, batched, members_per_round):
        measured = processes.together(lambda: score(round_members), f"ES step {step}, population {_members(round_members)}")
        for name, values in measured.items():
            column = totals.setdefault(name, torch.zeros(size, dtype=torch.float64))
            for member, value in zip(round_members, values, strict=True):
                column[member.index] += float(value)

    names = sorted(set().union(*processes.gather(sorted(totals))))
    missing = {FITNESS, WEIGHT} - set(names)
    if missing:
        raise PopulationError(f"ES step {step}: score returned no {sorted(missing)} for the population.")
    zeros = torch.zeros(size, dtype=torch.float64)
    combined = processes.sum(torch.stack([totals.get(name, zeros) for name in names]))
    return PopulationScores(dict(zip(names, combined)))


def _members(members: Sequence[Member]) -> str:
    indices = [member.index for member in members]
    return f"member {indices[0]}" if len(indices) == 1 else f"members {indices}"
