"""The ES engine: no Lightning, no TRL. Integrations (``lightning_es.lightning``, ``trl_ext``) build on it."""

from .build import build_evolution_strategy
from .es import EvolutionStrategy, StepStats
from .evaluation import MemberScores, PopulationScores, evaluate_population
from .iteration import Iteration, run_iteration
from .master import MasterWeights
from .noise import GaussianNoise, derive_seed
from .params import select_parameters
from .perturbations import (
    PERTURBATIONS,
    FullRankPerturbation,
    LowRankPerturbation,
    Perturbation,
    ShardedPerturbation,
    build_perturbation,
)
from .population import Member, Population
from .processes import PopulationError, Processes
from .scales import relative_scales
from .settings import ESSettings
from .shaping import FITNESS_SHAPING, centered_rank, evidence_zscore, prompt_zscore, zscore
from .start import StartWeights

__all__ = [
    "FITNESS_SHAPING",
    "PERTURBATIONS",
    "ESSettings",
    "EvolutionStrategy",
    "FullRankPerturbation",
    "GaussianNoise",
    "Iteration",
    "LowRankPerturbation",
    "MasterWeights",
    "Member",
    "MemberScores",
    "Perturbation",
    "Population",
    "PopulationError",
    "PopulationScores",
    "Processes",
    "ShardedPerturbation",
    "StartWeights",
    "StepStats",
    "build_evolution_strategy",
    "build_perturbation",
    "centered_rank",
    "derive_seed",
    "evaluate_population",
    "evidence_zscore",
    "prompt_zscore",
    "relative_scales",
    "run_iteration",
    "select_parameters",
    "zscore",
]
