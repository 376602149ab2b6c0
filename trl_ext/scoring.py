"""From the completions a member generated on this process to the sums the population loop combines.

A member's fitness follows GRPO's reward arithmetic: ``reward_weights`` times each function's reward, summed per
completion with a None (NaN) counting as 0 unless every function returned None (then the completion is unscored),
and averaged over the scored completions of every process (``sum_then_normalize``). With
``multi_objective_aggregation="normalize_then_sum"`` each function's member means are z-scored over the population
first, then weighted and summed. ``mask_truncated_completions`` leaves truncated completions out of the fitness.
"""

import math
from dataclasses import dataclass, field

import torch

from lightning_es.engine import PopulationScores
from lightning_es.engine.evaluation import FITNESS, WEIGHT
from lightning_es.engine.shaping import zscore


@dataclass
class ScoredRows:
    """What scoring some rows with one set of weights gave, on this process."""

    prompts: list
    completions: list
    rewards: torch.Tensor  # (rows, reward functions), NaN where a function returned None
    prompt_lengths: list[int]
    completion_lengths: list[int]
    truncated: list[bool]
    extra: dict[str, list] = field(default_factory=dict)  # columns reward functions added with log_extra
    metrics: dict[str, list[float]] = field(default_factory=dict)  # values reward functions gave log_metric
    member: int | None = None

    def split(self, size: int) -> list["ScoredRows"]:
        """Consecutive groups of ``size`` rows, one per member of a population scored in one batch (the metrics,
        given per reward-function call, go with the first)."""
        groups = []
        for start in range(0, len(self.completion_lengths), size):
            part = slice(start, start + size)
            groups.append(ScoredRows(
                self.prompts[part], self.completions[part], self.rewards[part], self.prompt_lengths[part],
                self.completion_lengths[part], self.truncated[part],
                {name: values[part] for name, values in self.extra.items()}, {} if groups else self.metrics,
            ))
        return groups


def weighted_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per completion: the weighted sum of the rewards (None counts 0), NaN when every function returned None."""
    weighted = (rewards_per_func * weights.to(rewards_per_func)).nansum(dim=1)
    return weighted.masked_fill(rewards_per_func.isnan().all(dim=1), math.nan)


def member_sums(rows: ScoredRows, weights: torch.Tensor, mask_truncated: bool) -> dict[str, float]:
    """The fitness sums of one member's rows on this process, for ``evaluation.evaluate_population``: the weighted
    rewards and their count, and per reward function its sum and count (for ``normalize_then_sum``)."""
    rewards = rows.rewards.clone()
    if mask_truncated:
        rewards[torch.tensor(rows.truncated, dtype=torch.bool)] = math.nan
    weighted = weighted_rewards(rewards, weights)
    counted = ~weighted.isnan()
    sums = {FITNESS: float(weighted[counted].sum()), WEIGHT: float(counted.sum())}
    for index in range(rewards.shape[1]):
        column = rewards[:, index]
        valid = ~column.isnan()
        sums[f"function/{index}"] = float(column[valid].sum())
        sums[f"function/{index}/count"] = float(valid.sum())
    return sums


def nothing(functions: int) -> dict[str, float]:
    """The sums of a stand-in row, which counts for nothing."""
    sums = {FITNESS: 0.0, WEIGHT: 0.0}
    for index in range(functions):
        sums[f"function/{index}"] = sums[f"function/{index}/count"] = 0.0
    return sums


def normalized_then_summed(scores: PopulationScores, weights: torch.Tensor) -> torch.Tensor:
    """Member fitness for ``normalize_then_sum``: each function's member means z-scored over the population (members
    with no reward from a function count as its mean), then weighted and summed."""
    fitness = torch.zeros_like(scores.fitness)
    for index, weight in enumerate(weights.tolist()):
        counts = scores.totals[f"function/{index}/count"]
        means = scores.totals[f"function/{index}"] / counts.clamp(min=1)
        defined = counts > 0
        standardized = torch.zeros_like(means)
        if defined.any():
            standardized[defined] = zscore(means[defined])
        fitness += weight * standardized
    return fitness
