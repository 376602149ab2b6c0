"""Deprecated location: ``lightning_es.metrics`` moved to ``lightning_es.drift.metrics`` (also importable from
``lightning_es.drift``)."""

import warnings

from .drift.metrics import *  # noqa: F403

warnings.warn("lightning_es.metrics moved to lightning_es.drift.metrics; import it from there.", DeprecationWarning, stacklevel=2)
