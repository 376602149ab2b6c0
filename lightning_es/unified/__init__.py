"""The Lightning integration for the ``lightning`` package (``import lightning as L``; ``lightning.pytorch``).

``lightning_es.lightning`` is written against ``pytorch_lightning``. Lightning ships its trainer twice, as
``pytorch_lightning`` and as ``lightning.pytorch``: two copies of the same classes, and each ``Trainer`` accepts only
strategies and callbacks built on its own package's ``Strategy`` and ``Callback``. This package is the second build of
``lightning_es.lightning``, for ``lightning.pytorch``: each of its modules (``strategy``, ``callbacks``, ``progress``,
``population_log``, ``checkpoint_io``, ``resumable_loader``) is compiled from the same source file in
``lightning_es/lightning/``, with the imports mapped as Lightning's own build maps them when it makes one package from
the other (``pytorch_lightning`` -> ``lightning.pytorch``, ``lightning_fabric`` -> ``lightning.fabric``). There is one
source; ``lightning_es.unified.callbacks.ParameterDriftCallback`` is ``lightning_es.lightning.callbacks``' class, built
on ``lightning.pytorch.Callback``.

Importing this package registers ``"es"`` and ``"es_zero3"`` in ``lightning.pytorch``'s strategy registry (Lightning
has no entry point for external strategies, so a string ``strategy="es"`` needs this import first)::

    import lightning as L
    import lightning_es.unified  # registers strategy="es" with lightning.pytorch
    from lightning_es.unified.callbacks import ParameterDriftCallback

    L.Trainer(strategy="es", callbacks=[ParameterDriftCallback()])

It imports neither ``pytorch_lightning`` nor ``lightning_es.lightning``.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
from pathlib import Path

# as in Lightning's build (.actions/assistant.py), which makes lightning.pytorch from pytorch_lightning's source
IMPORT_MAPPING = (("pytorch_lightning", "lightning.pytorch"), ("lightning_fabric", "lightning.fabric"))
SOURCE = Path(__file__).resolve().parent.parent / "lightning"  # lightning_es/lightning/


def map_imports(source: str) -> str:
    """``source`` with ``pytorch_lightning``/``lightning_fabric`` (whole names) read as the ``lightning`` package's."""
    for old, new in IMPORT_MAPPING:
        source = re.sub(rf"\b{old}\b", new, source)
    return source


class _MappedLoader(importlib.machinery.SourceFileLoader):
    """Compiles a ``lightning_es/lightning/`` file with ``map_imports``. No bytecode cache: the file's ``.pyc`` is
    ``lightning_es.lightning``'s, compiled without the mapping."""

    def get_code(self, fullname):
        path = self.get_filename(fullname)
        return compile(map_imports(self.get_data(path).decode("utf-8")), path, "exec", dont_inherit=True)


class _MappedFinder(importlib.abc.MetaPathFinder):
    """Finds ``lightning_es.unified.<module>`` as ``lightning_es/lightning/<module>.py`` (a subpackage as its
    ``__init__.py``); nothing else."""

    prefix = __name__ + "."

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(self.prefix):
            return None
        where = SOURCE.joinpath(*fullname[len(self.prefix):].split("."))
        if (where / "__init__.py").is_file():  # a subpackage: its modules are found here too
            file, search = where / "__init__.py", []
        elif where.with_suffix(".py").is_file():
            file, search = where.with_suffix(".py"), None
        else:
            return None
        return importlib.util.spec_from_file_location(fullname, file, loader=_MappedLoader(fullname, str(file)),
                                                      submodule_search_locations=search)


if not any(isinstance(finder, _MappedFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MappedFinder())

from .checkpoint_io import AtomicCheckpointIO  # noqa: E402
from .progress import ESProgressBar  # noqa: E402
from .strategy import ESStrategy  # noqa: E402

__all__ = ["AtomicCheckpointIO", "ESProgressBar", "ESStrategy"]
