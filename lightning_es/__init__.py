"""lightning-es: fine-tune language models with Evolution Strategies.

The engine (this package's top level) imports neither Lightning nor TRL. ``ESStrategy`` is imported on first use
(``from lightning_es import ESStrategy``, or ``import lightning_es.strategy``), which also registers
``Trainer(strategy="es")`` with Lightning.
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
    "ESStrategy",
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


def __getattr__(name: str):
    if name == "ESStrategy":  # keeps Lightning (seconds to import) out of engine-only and TRL use
        from .strategy import ESStrategy

        return ESStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
