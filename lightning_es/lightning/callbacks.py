"""Drift callbacks for Lightning, logging the same names as the TRL callbacks (``drift/kl``, ``drift/update_norm``,
``drift/relative_norm``, ``drift/moved_fraction``, ``drift/norm/<layer type>``) through ``pl_module.log``."""

from collections.abc import Sequence

import pytorch_lightning as pl

from ..drift import DriftProbe, KLDrift, parameter_drift, snapshot


def _model(pl_module: pl.LightningModule, attribute: str | None):
    return getattr(pl_module, attribute) if attribute else pl_module


class KLDriftCallback(pl.Callback):
    """KL(current || starting weights) on off-task probe prompts every ``every_n_steps`` training steps.

    ``model_attribute`` names the module's attribute holding the causal LM (``None``: the LightningModule itself).
    The processes split the probes; the metric reduces over all of them.
    """

    def __init__(self, probe_prompts: Sequence[str], tokenizer, every_n_steps: int = 10, estimator: str = "sampled",
                 max_new_tokens: int = 32, batch_size: int = 8, model_attribute: str | None = "model"):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}.")
        if not probe_prompts:
            raise ValueError("probe_prompts is empty: the drift probe needs at least one off-task prompt.")
        self.probe_prompts = list(probe_prompts)
        self.tokenizer = tokenizer
        self.every_n_steps = every_n_steps
        self.options = dict(estimator=estimator, max_new_tokens=max_new_tokens, batch_size=batch_size)
        self.model_attribute = model_attribute
        self.probe = None

    def on_train_start(self, trainer, pl_module):
        share = self.probe_prompts[trainer.global_rank :: trainer.world_size] or self.probe_prompts[:1]
        self.probe = DriftProbe(_model(pl_module, self.model_attribute), self.tokenizer, share, **self.options)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every_n_steps == 0:
            metric = self.probe.measure(_model(pl_module, self.model_attribute), KLDrift(), step=step)
            pl_module.log("drift/kl", float(metric.compute()), on_step=True, on_epoch=False)


class ParameterDriftCallback(pl.Callback):
    """L2 norm of the update from the start, relative norm, per layer type, and fraction of weights moved."""

    def __init__(self, every_n_steps: int = 10, threshold: float = 1e-6, model_attribute: str | None = None):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}.")
        self.every_n_steps = every_n_steps
        self.threshold = threshold
        self.model_attribute = model_attribute
        self.start = None

    def on_train_start(self, trainer, pl_module):
        self.start = snapshot(_model(pl_module, self.model_attribute))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every_n_steps == 0:
            values = parameter_drift(_model(pl_module, self.model_attribute), self.start, self.threshold)
            pl_module.log_dict(values, on_step=True, on_epoch=False)
