"""TRL integration of lightning-es: ``from trl_ext import ESTrainer as GRPOTrainer``."""

from .config import ESConfig
from .trainer import ESTrainer

__all__ = ["ESConfig", "ESTrainer"]
