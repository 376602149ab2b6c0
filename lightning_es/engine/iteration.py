"""One ES iteration, the loop both integrations run: members, rounds over processes, fitness, shaping, the update.

An integration supplies only what it knows: ``score`` (how its framework makes the model answer and rewards it, as a
``MemberScores``), optionally ``fitness`` (a transform of the combined scores, e.g. TRL's KL penalty), and which update
it wants: ``"step"`` (the in-place ES step), ``"gradients"`` (``-g`` into ``.grad`` for a torch optimizer) or ``None``
(the integration writes the gradients later, as Lightning's ``backward`` does).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .es import EvolutionStrategy, StepStats
from .evaluation import PopulationScores, Score, evaluate_population
from .processes import Processes

# -> (fitness, per_prompt, penalty): what is shaped, per member and per prompt, and what is charged after shaping
Fitness = Callable[[PopulationScores], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
UPDATES = ("step", "gradients", None)


@dataclass
class Iteration:
    scores: PopulationScores  # every member's sums, combined over processes
    fitness: torch.Tensor  # per member, what was shaped (NaN for a member left out)
    per_prompt: torch.Tensor  # (members, prompts) mean rewards, for a shaping that reads them
    stats: StepStats | None  # of the update, when one was taken
    penalty: torch.Tensor | None = None  # per member, subtracted from the shaped fitness (TRL's beta * KL)

    @property
    def scored(self) -> torch.Tensor:
        """Which members take part: those something was scored for."""
        return self.scores.scored

    @property
    def frac_prompts_tied(self) -> float | None:
        """Share of the step's prompts on which every member that took part scored the same mean reward: prompts that
        tell no member from another (TRL's ``frac_reward_zero_std``, across members). None when no prompts were
        reported (a scalar fitness)."""
        table = self.per_prompt[self.scored]
        if table.shape[1] == 0 or table.shape[0] == 0:
            return None
        first = table[:1]
        tied = ((table == first) | (table.isnan() & first.isnan())).all(dim=0)
        return float(tied.double().mean())

    def shaped(self, es: EvolutionStrategy) -> torch.Tensor:
        return es.shaped(self.fitness, self.scored, self.per_prompt, self.penalty)


def _plain(scores: PopulationScores) -> tuple[torch.Tensor, torch.Tensor, None]:
    return scores.fitness, scores.per_prompt, None


def run_iteration(
    es: EvolutionStrategy,
    step: int,
    score: Score,
    processes: Processes,
    update: str | None = "step",
    learning_rate: float | None = None,
    fitness: Fitness = _plain,
    batched: bool = False,
    members_per_round: int | None = None,
    check: Callable[[Iteration], None] | None = None,
) -> Iteration:
    """Score every member of step ``step`` over ``processes`` and apply ``update`` with ``learning_rate`` (default:
    the strategy's). ``check`` sees the iteration before the update (e.g. to refuse scores a shaping cannot read)."""
    if update not in UPDATES:
        raise ValueError(f"update must be one of {UPDATES}, got {update!r}.")
    scores = evaluate_population(es.members(step), step, score, processes, batched=batched,
                                 members_per_round=members_per_round)
    member_fitness, per_prompt, penalty = fitness(scores)
    iteration = Iteration(scores, member_fitness, per_prompt, None, penalty)
    if check is not None:
        check(iteration)
    if update == "step":
        iteration.stats = es.step(step, member_fitness, lr=learning_rate, scored=iteration.scored, per_prompt=per_prompt,
                                  penalty=penalty)
    elif update == "gradients":
        iteration.stats = es.write_gradients(step, member_fitness, scored=iteration.scored, per_prompt=per_prompt,
                                             penalty=penalty)
    return iteration
