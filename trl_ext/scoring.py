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

from lightning_es.engine import MemberScores, PopulationScores
from lightning_es.engine.shaping import zscore

KL = "kl"
KL_TOKENS = "kl/tokens"


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
    prompt_ids: list[list[int]] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)
    kl: torch.Tensor | None = None  # (rows,) each completion's summed per-token KL to the reference, when measured
    kl_tokens: torch.Tensor | None = None  # (rows,) the tokens it was summed over

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
                prompt_ids=self.prompt_ids[part], completion_ids=self.completion_ids[part],
                kl=None if self.kl is None else self.kl[part],
                kl_tokens=None if self.kl_tokens is None else self.kl_tokens[part],
            ))
        return groups


def weighted_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per completion: the weighted sum of the rewards (None counts 0), NaN when every function returned None."""
    weighted = (rewards_per_func * weights.to(rewards_per_func)).nansum(dim=1)
    return weighted.masked_fill(rewards_per_func.isnan().all(dim=1), math.nan)


def member_sums(rows: ScoredRows, weights: torch.Tensor, mask_truncated: bool,
                prompt_of_row: list[int]) -> MemberScores:
    """The fitness sums of one member's rows on this process, for ``evaluation.evaluate_population``: the weighted
    rewards and their count; per prompt of the step (``prompt_of_row``: each row's index among the step's prompts) its
    sum and count (for the shapings that read prompts); among the extra sums, per reward function its sum and count (for
    ``normalize_then_sum``) and, when measured, the KL to the reference summed over the completion tokens and their
    number."""
    rewards = rows.rewards.clone()
    if mask_truncated:
        rewards[torch.tensor(rows.truncated, dtype=torch.bool)] = math.nan
    weighted = weighted_rewards(rewards, weights)
    counted = ~weighted.isnan()
    extra = {}
    for index in range(rewards.shape[1]):
        column = rewards[:, index]
        valid = ~column.isnan()
        extra[f"function/{index}"] = [float(column[valid].sum())]
        extra[f"function/{index}/count"] = [float(valid.sum())]
    prompt_sums, prompt_counts = {}, {}
    for row, prompt in enumerate(prompt_of_row):
        key = f"{prompt:06d}"  # reported for every prompt, scored or not: one value per member
        prompt_sums[key] = [prompt_sums.get(key, [0.0])[0] + (float(weighted[row]) if counted[row] else 0.0)]
        prompt_counts[key] = [prompt_counts.get(key, [0.0])[0] + float(counted[row])]
    if rows.kl is not None:  # as in GRPO's loss, a truncated completion masked out of it leaves the KL too
        kept = ~torch.tensor(rows.truncated, dtype=torch.bool) if mask_truncated else torch.ones(len(rows.kl), dtype=torch.bool)
        extra[KL] = [float(rows.kl[kept].sum())]
        extra[KL_TOKENS] = [float(rows.kl_tokens[kept].sum())]
    return MemberScores([float(weighted[counted].sum())], [float(counted.sum())], prompt_sums, prompt_counts, extra)


def nothing(functions: int) -> MemberScores:
    """The sums of a stand-in row, which counts for nothing."""
    extra = {}
    for index in range(functions):
        extra[f"function/{index}"] = extra[f"function/{index}/count"] = [0.0]
    return MemberScores([0.0], [0.0], extra=extra)


def member_kl(scores: PopulationScores) -> torch.Tensor | None:
    """Each member's mean per-token KL to the reference over its completions (0 without tokens), if measured."""
    if KL not in scores.extra:
        return None
    return scores.extra[KL] / scores.extra[KL_TOKENS].clamp(min=1)


def normalized_then_summed(scores: PopulationScores, weights: torch.Tensor) -> torch.Tensor:
    """Member fitness for ``normalize_then_sum``: each function's member means z-scored over the population (members
    with no reward from a function count as its mean), then weighted and summed."""
    fitness = torch.zeros_like(scores.fitness)
    for index, weight in enumerate(weights.tolist()):
        counts = scores.extra[f"function/{index}/count"]
        means = scores.extra[f"function/{index}"] / counts.clamp(min=1)
        defined = counts > 0
        standardized = torch.zeros_like(means)
        if defined.any():
            standardized[defined] = zscore(means[defined])
        fitness += weight * standardized
    return fitness
