"""TRL integration of lightning-es: ``from trl_ext import ESTrainer as GRPOTrainer``."""

from .trl_internals import check_trl

check_trl()  # before the imports below use TRL's names: a clear error naming what the installed TRL lacks

from .config import ESConfig  # noqa: E402
from .trainer import ESTrainer  # noqa: E402

__all__ = ["ESConfig", "ESTrainer"]
