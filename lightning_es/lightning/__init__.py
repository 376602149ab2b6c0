"""The Lightning integration: ``Trainer(strategy="es")``. Importing this package registers the strategy names."""

from .checkpoint_io import AtomicCheckpointIO
from .progress import ESProgressBar
from .strategy import ESStrategy

__all__ = ["AtomicCheckpointIO", "ESProgressBar", "ESStrategy"]
