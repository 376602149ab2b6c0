"""A progress bar that counts ES steps.

``Trainer(max_steps=N)`` leaves ``max_epochs=-1``: Lightning's bars then describe training by epoch only ("Epoch 0"
with ``TQDMProgressBar``, "Epoch 0/-2" with ``RichProgressBar``, which prints ``max_epochs - 1``), though the run is
bounded by steps. ``ESProgressBar`` describes it as "ES step 3/20" whenever ``max_steps`` is set, and as Lightning
does otherwise.
"""

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar


class ESProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` whose training description is "ES step <steps done>/<max_steps>" when ``max_steps`` is set
    (Lightning's "Epoch <n>" otherwise); the bar and its metrics are Lightning's."""

    @staticmethod
    def step_description(trainer: "pl.Trainer") -> str | None:
        """"ES step k/N" for a run bounded by ``max_steps``; None for one bounded by epochs only."""
        if trainer.max_steps is None or trainer.max_steps < 0:
            return None
        return f"ES step {trainer.global_step}/{trainer.max_steps}"

    def _describe(self, trainer: "pl.Trainer", refresh: bool) -> None:
        description = self.step_description(trainer)
        if description is not None:
            self.train_progress_bar.set_description(description, refresh=refresh)

    def on_train_epoch_start(self, trainer: "pl.Trainer", *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._describe(trainer, refresh=True)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs, batch: Any,
                           batch_idx: int) -> None:
        self._describe(trainer, refresh=False)  # shown when Lightning's update below refreshes the bar
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
