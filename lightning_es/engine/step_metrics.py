"""What one ES iteration logs under ``es/``, the same names and meanings in both integrations (docs/logged_metrics.md).

Units are in the names where they differ: ``es/relative_sigma`` is a fraction of each tensor's scale, ``es/sigma``
absolute, and ``es/learning_rate`` (transformers' ``learning_rate`` under ESTrainer) is the step in the units of the
noise, the value that passed as ``learning_rate`` runs the same step; ``es/update_norm`` is the L2 norm of the change applied
to the weights, ``es/grad_estimate_norm`` that of the ES estimate ``g`` (it grows with the parameter count over sigma:
not a loss gradient's norm, which is why it is not logged as ``grad_norm``).
"""

import math

from .es import EvolutionStrategy
from .iteration import Iteration
from .settings import ESSettings


def step_metrics(iteration: Iteration, es: EvolutionStrategy, settings: ESSettings, step_size: float | None) -> dict:
    """``step_size``: the step this iteration took in the settings' units (None when an optimizer took it)."""
    scored = iteration.scored
    fitness = iteration.fitness[scored].double()
    units = "relative_" if settings.relative_noise else ""
    metrics = {
        "es/fitness_mean": float(fitness.mean()) if fitness.numel() else math.nan,
        "es/fitness_std": float(fitness.std(unbiased=False)) if fitness.numel() else math.nan,
        "es/fitness_max": float(fitness.max()) if fitness.numel() else math.nan,
        "es/unscored_members": int((~scored).sum()),
        f"es/{units}sigma": settings.noise_sigma,
        "es/no_signal": float(not bool(iteration.shaped(es).any())),
    }
    tied = iteration.frac_prompts_tied
    if tied is not None:
        metrics["es/frac_prompts_tied"] = tied
    stats = iteration.stats
    if stats is not None:
        metrics["es/grad_estimate_norm"] = stats.gradient_norm
        if step_size is not None:
            metrics["es/update_norm"] = stats.update_norm
            metrics["es/learning_rate"] = step_size
    return metrics
