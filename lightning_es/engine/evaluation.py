"""The population evaluation of one ES iteration, shared by ``ESTrainer`` (TRL) and ``ESStrategy`` (Lightning).

It has each process score its members in rounds that every process runs in step (``processes.Processes``), combines
what the processes measured into one table that is identical everywhere, and raises an error on any process as the
same ``PopulationError`` on every process.

``score(members)`` returns, for the members of a round, sums of named quantities measured on this process:
``{"fitness": ..., "weight": ..., <name>: ...}``, each a sequence with one value per member. Sums over processes
make both layouts one formula: a member's fitness is ``sum(fitness) / sum(weight)``, e.g. the sum of its rewards over
the rows scored anywhere divided by their number. A name some process did not report counts 0 there. After every
round the processes agree on whether one of them failed (one small all-reduce, whose cost is negligible next to
scoring a member).
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .population import Member
from .processes import PopulationError, Processes

FITNESS = "fitness"
WEIGHT = "weight"
PROMPT = "prompt/"  # PROMPT + an id: a member's summed reward on one prompt (example) of the step; with "/count"

Score = Callable[[Sequence[Member]], Mapping[str, Sequence[float]]]


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
