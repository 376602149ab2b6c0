"""Deprecated location: ``lightning_es.strategy`` moved to ``lightning_es.lightning`` (``from lightning_es import
ESStrategy`` keeps working). Importing it still registers ``strategy="es"``."""

import warnings

from .lightning.strategy import *  # noqa: F403
from .lightning.strategy import ESStrategy  # noqa: F401

warnings.warn("lightning_es.strategy moved to lightning_es.lightning; import ESStrategy from lightning_es.",
              DeprecationWarning, stacklevel=2)
