"""Lightning checkpoints written atomically: a crash mid-write leaves the previous file, never a truncated one."""

import os
from pathlib import Path

from lightning_fabric.utilities.cloud_io import _is_local_file_protocol
from pytorch_lightning.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if not _is_local_file_protocol(path):  # object stores write whole objects already
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        os.replace(partial, path)
