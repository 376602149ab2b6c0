"""lightning-es: fine-tune language models with Evolution Strategies.

The engine (this package's top level) imports neither Lightning nor TRL.
"""

from .es import EvolutionStrategy, StepStats
from .master import MasterWeights
from .noise import GaussianNoise, derive_seed
from .params import select_parameters
from .perturbation import InPlacePerturbation
from .population import Member, Population
from .shaping import FITNESS_SHAPING, centered_rank, zscore

__all__ = [
    "FITNESS_SHAPING",
    "EvolutionStrategy",
    "GaussianNoise",
    "InPlacePerturbation",
    "MasterWeights",
    "Member",
    "Population",
    "StepStats",
    "centered_rank",
    "derive_seed",
    "select_parameters",
    "zscore",
]
__version__ = "0.1.0"
