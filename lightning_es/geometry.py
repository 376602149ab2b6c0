"""Deprecated location: ``lightning_es.geometry`` moved to ``lightning_es.drift.geometry`` (also importable from
``lightning_es.drift``)."""

import warnings

from .drift.geometry import *  # noqa: F403

warnings.warn("lightning_es.geometry moved to lightning_es.drift.geometry; import it from there.", DeprecationWarning, stacklevel=2)
