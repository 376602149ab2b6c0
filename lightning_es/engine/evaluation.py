"""The population evaluation of one ES iteration, shared by ``ESTrainer`` (TRL) and ``ESStrategy`` (Lightning).

It has each process score its members in rounds that every process runs in step (``processes.Processes``), combines
what the processes measured into one table that is identical everywhere, and raises an error on any process as the
same ``PopulationError`` on every process.

``score(members)`` returns a ``MemberScores`` for the members of a round: sums measured on this process, one value
per member. Sums over processes make both layouts one formula: a member's fitness is ``fitness / weight``, e.g. the
sum of its rewards over the rows scored anywhere divided by their number. A prompt or extra sum some process did not
report counts 0 there. After every round the processes agree on whether one of them failed (one small all-reduce,
whose cost is negligible next to scoring a member).
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .population import Member
from .processes import Processes


@dataclass
class MemberScores:
    """Sums for the members of one round, measured on this process; every sequence has one value per member."""

    fitness: Sequence[float]  # the member's summed reward (or fitness) over what it was scored on here
    weight: Sequence[float]  # how much was scored (e.g. rows): fitness / weight is the mean; 0 means nothing
    prompt_sums: Mapping[str, Sequence[float]] = field(default_factory=dict)  # per prompt id: its summed reward
    prompt_counts: Mapping[str, Sequence[float]] = field(default_factory=dict)  # per prompt id: rows scored on it
    extra: Mapping[str, Sequence[float]] = field(default_factory=dict)  # other sums, combined alike (e.g. KL)


def joined(records: Sequence[MemberScores]) -> MemberScores:
    """One round's record from the records of its members, in order (a sum one member lacks is 0 for it)."""
    def column(part, key):
        return [value for record in records for value in getattr(record, part).get(key, [0.0] * len(record.fitness))]

    def merged(part):
        return {key: column(part, key) for key in sorted({k for record in records for k in getattr(record, part)})}

    return MemberScores([v for r in records for v in r.fitness], [v for r in records for v in r.weight],
                        merged("prompt_sums"), merged("prompt_counts"), merged("extra"))


@dataclass
class PopulationScores:
    """Every member's sums over all processes, (N,) float64 tensors; the same on every process."""

    fitness_sum: torch.Tensor
    weight: torch.Tensor
    prompt_sums: dict[str, torch.Tensor]
    prompt_counts: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor]

    @property
    def fitness(self) -> torch.Tensor:
        """Per member; NaN for a member nothing was scored for (see ``scored``)."""
        return self.fitness_sum / self.weight

    @property
    def scored(self) -> torch.Tensor:
        """Which members had something scored (a weight above 0): only they can take part in the step."""
        return self.weight > 0

    def mean(self, name: str) -> torch.Tensor:
        """Per member: the extra sum ``name`` divided by the weight (its mean over what was scored)."""
        return self.extra[name] / self.weight

    @property
    def per_prompt(self) -> torch.Tensor:
        """(members, prompts): each member's mean reward on each prompt of the step (in the order of the prompt ids),
        NaN where it has none; no columns when no prompt was reported."""
        ids = sorted(self.prompt_sums)
        if not ids:
            return torch.full((self.weight.numel(), 0), float("nan"), dtype=torch.float64)
        return torch.stack([self.prompt_sums[i] / self.prompt_counts[i] for i in ids], dim=1)


Score = Callable[[Sequence[Member]], MemberScores]

# how a record's parts travel in the one all-reduce of a step: a key per tensor
_FITNESS, _WEIGHT, _PROMPT, _COUNT, _EXTRA = "fitness", "weight", "prompt:", "count:", "extra:"


def _columns(scores: MemberScores) -> dict[str, Sequence[float]]:
    columns = {_FITNESS: scores.fitness, _WEIGHT: scores.weight}
    columns |= {_PROMPT + key: values for key, values in scores.prompt_sums.items()}
    columns |= {_COUNT + key: values for key, values in scores.prompt_counts.items()}
    return columns | {_EXTRA + key: values for key, values in scores.extra.items()}


def _record(totals: dict[str, torch.Tensor]) -> PopulationScores:
    def part(prefix):
        return {key[len(prefix):]: value for key, value in totals.items() if key.startswith(prefix)}

    return PopulationScores(totals[_FITNESS], totals[_WEIGHT], part(_PROMPT), part(_COUNT), part(_EXTRA))


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
        measured = processes.together(lambda: _columns(score(round_members)),
                                      f"ES step {step}, population {_members(round_members)}")
        for name, values in measured.items():
            column = totals.setdefault(name, torch.zeros(size, dtype=torch.float64))
            for member, value in zip(round_members, values, strict=True):
                column[member.index] += float(value)

    names = sorted(set().union(*processes.gather(sorted(totals))))
    zeros = torch.zeros(size, dtype=torch.float64)
    combined = processes.sum(torch.stack([totals.get(name, zeros) for name in names]))
    return _record(dict(zip(names, combined)))


def _members(members: Sequence[Member]) -> str:
    indices = [member.index for member in members]
    return f"member {indices[0]}" if len(indices) == 1 else f"members {indices}"
