"""lightning-es: fine-tune language models with Evolution Strategies.

- ``lightning_es.engine``: the ES algorithm and the population loop (no Lightning or TRL import); re-exported here;
- ``lightning_es.lightning``: ``Trainer(strategy="es")``, imported on first use (``from lightning_es import
  ESStrategy``), which also registers the strategy with Lightning;
- ``lightning_es.drift``: KL drift, update geometry and linear connectivity;
- ``lightning_es.tasks``: the recipes' tasks (GSM8K, Countdown), embedded model and greedy evaluation;
- ``trl_ext`` (a sibling package): ``ESTrainer``/``ESConfig`` for TRL.
"""

from .engine import *  # noqa: F403
from .engine import __all__ as _engine_names

__all__ = ["ESStrategy", *_engine_names]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "ESStrategy":  # keeps Lightning (seconds to import) out of engine-only and TRL use
        from .lightning import ESStrategy

        return ESStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
