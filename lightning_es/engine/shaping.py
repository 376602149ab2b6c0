"""Fitness shaping: turn raw member fitness into the weights of the ES gradient estimate.

``zscore`` and ``centered_rank`` give every step the same size whatever the evidence: a single lucky answer on one of
two prompts becomes a unit-variance step, and a reward of random numbers moves the weights as far as a real one.
``evidence_zscore`` scales the z-score by how much of the members' spread exceeds what chance would give, and
``prompt_zscore`` (the default) normalises each prompt's rewards across the members as GRPO normalises a prompt's
completions, so that its step shrinks with the evidence too: both read the members' mean reward per prompt.
"""

from collections.abc import Callable

import torch


def zscore(fitness: torch.Tensor) -> torch.Tensor:
    """(R - mean) / std, as the ES-at-scale reference does; all zeros when every member scored the same."""
    fitness = fitness.double()
    std = fitness.std(unbiased=False)
    if std == 0:
        return torch.zeros_like(fitness)
    return (fitness - fitness.mean()) / std


def centered_rank(fitness: torch.Tensor) -> torch.Tensor:
    """Ranks mapped to [-0.5, 0.5] as in OpenAI-ES; tied members share their average rank."""
    fitness = fitness.double()
    n = fitness.numel()
    order = torch.argsort(fitness, stable=True)
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.arange(n, dtype=torch.float64)
    for value in fitness.unique():
        tied = fitness == value
        ranks[tied] = ranks[tied].mean()
    return ranks / (n - 1) - 0.5


def evidence_zscore(fitness: torch.Tensor, per_prompt: torch.Tensor) -> torch.Tensor:
    """The z-score of ``fitness`` times the share of its variance that is signal rather than chance.

    ``per_prompt`` (members x prompts) holds each member's mean reward on each prompt of the step. In a two-way
    analysis of variance without replication, the member-by-prompt residual says how much a member's mean moves by
    chance (which prompts it happened to be lucky on): its variance ``V / P`` is what the members' means would spread
    by even if no member were better than another. With ``B`` the variance of the members' means, the signal's share is
    ``k = max(0, 1 - (V / P) / B)`` (the positive-part James-Stein factor), and the shaped fitness is
    ``k * zscore(fitness)``: a step as large as the z-score's when every member is consistently better or worse on
    every prompt, none when a member's lead comes from one prompt, and for a reward of random numbers small steps that
    do not accumulate into a random walk. Prompts some member has no reward for are left out of the estimate; with fewer
    than two prompts left there is no estimate of chance, and the plain z-score is returned. With few prompts a lead
    that shows on one prompt only cannot be told from chance: on the main job's 2 prompts per step (GSM8K-style,
    SmolLM2) no step was taken in 20 iterations, so it needs more prompts per iteration.
    """
    fitness = fitness.double()
    table = torch.as_tensor(per_prompt, dtype=torch.float64)
    table = table[:, ~table.isnan().any(dim=0)]
    members, prompts = table.shape
    shaped = zscore(fitness)
    if prompts < 2 or members < 2:
        return shaped
    means = table.mean(dim=1)
    between = means.var(unbiased=False)
    if between == 0:
        return shaped
    residual = table - means[:, None] - table.mean(dim=0)[None, :] + table.mean()
    chance = residual.pow(2).sum() / ((members - 1) * (prompts - 1)) / prompts
    return shaped * float((1 - chance / between).clamp(min=0))


evidence_zscore.uses_prompts = True
evidence_zscore.min_prompts = 2  # one prompt leaves no residual to tell a lead from chance


def prompt_zscore(fitness: torch.Tensor, per_prompt: torch.Tensor) -> torch.Tensor:
    """GRPO's group normalisation with the members as the group: each prompt's rewards are centred and scaled across
    the members (z-scored), a prompt on which every member tied contributes 0, and a member's shaped fitness is the
    mean of its scores over the prompts.

    Scaling per prompt is what differs from the z-score of the mean rewards (centring alone would change nothing
    under a z-score): a prompt where members differ by one answer counts as much as one where they differ by many, and
    the step shrinks with the evidence: its spread is 1 when every prompt ranks the members alike, about
    ``1 / sqrt(prompts)`` when their rankings are unrelated, and 0 when every prompt is tied. ``fitness`` is used only
    when no prompt has a reward from every member (then its z-score is returned).
    """
    table = torch.as_tensor(per_prompt, dtype=torch.float64)
    table = table[:, ~table.isnan().any(dim=0)]
    if table.shape[1] == 0:
        return zscore(fitness)
    spread = table.std(dim=0, unbiased=False)
    scores = torch.where(spread > 0, (table - table.mean(dim=0)) / spread.clamp(min=1e-12), torch.zeros_like(table))
    return scores.mean(dim=1)


prompt_zscore.uses_prompts = True
prompt_zscore.min_prompts = 0  # no column, or one: the z-score of the fitness


def uses_prompts(shaping: Callable) -> bool:
    """Whether ``shaping`` takes the members' per-prompt rewards as its second argument."""
    return getattr(shaping, "uses_prompts", False)


def min_prompts(shaping: Callable) -> int:
    """The fewest prompts per step ``shaping`` can read: 0 for one that reads none, or for ``prompt_zscore`` (with no
    prompt, or one, it is the z-score); 2 for ``evidence_zscore`` and, unless it says otherwise (``min_prompts``), for
    a callable that reads prompts."""
    return getattr(shaping, "min_prompts", 2 if uses_prompts(shaping) else 0)


DEFAULT_FITNESS_SHAPING = "prompt_zscore"  # docs/reports/accuracy-race/
FITNESS_SHAPING: dict[str, Callable[..., torch.Tensor]] = {
    "zscore": zscore,
    "centered_rank": centered_rank,
    "evidence_zscore": evidence_zscore,
    "prompt_zscore": prompt_zscore,
}


def get_fitness_shaping(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in FITNESS_SHAPING:
        raise ValueError(f"fitness_shaping must be one of {sorted(FITNESS_SHAPING)}, got {name!r}.")
    return FITNESS_SHAPING[name]
