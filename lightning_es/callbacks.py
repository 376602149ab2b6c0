"""Deprecated location: ``lightning_es.callbacks`` moved to ``lightning_es.lightning.callbacks``."""

import warnings

from .lightning.callbacks import KLDriftCallback, ParameterDriftCallback  # noqa: F401

warnings.warn("lightning_es.callbacks moved to lightning_es.lightning.callbacks; import it from there.",
              DeprecationWarning, stacklevel=2)
