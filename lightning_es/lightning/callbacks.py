"""Drift callbacks for Lightning, logging the same names as the TRL callbacks (``drift/kl``, ``drift/update_norm``,
``drift/relative_norm``, ``drift/moved_fraction``, ``drift/norm/<layer type>``) through ``pl_module.log``.

Drift is measured from the weights the run started from, across resumes. Under ``ESStrategy`` the callbacks use the
one copy of the start weights ES keeps (``es.keep_start()``), which the strategy's checkpoints carry. Otherwise each
callback keeps the trainable parameters' start values (on the host, in their dtype) in the checkpoint's
``callbacks`` entry (``state_dict``), and ``fit(ckpt_path=...)`` gives them back (``load_state_dict``) before
``on_train_start``, which then keeps them instead of taking the resumed weights.
"""

import logging
from collections.abc import Sequence

import pytorch_lightning as pl
import torch

from ..drift import DriftProbe, KLDrift, parameter_drift, sharded_parameter_drift, start_point
from ..engine import StartWeights

logger = logging.getLogger(__name__)


def _model(pl_module: pl.LightningModule, attribute: str | None):
    return getattr(pl_module, attribute) if attribute else pl_module


class _StartPoint(pl.Callback):
    """Saves the start weights in checkpoints and restores them on resume.

    Lightning restores callback states (``load_state_dict``) before ``on_train_start``: the loaded weights wait in
    ``_restored`` until ``on_train_start`` adopts them through ``_start`` (the choice itself is ``start_point``'s).
    """

    model_attribute: str | None
    _restored: dict[str, torch.Tensor] | None = None
    start: StartWeights | None = None
    _shared = False  # the start is ES's copy, which the strategy's checkpoint carries

    def state_dict(self) -> dict:
        if self._restored is not None:
            return {"start_weights": self._restored}
        if self.start is None or self._shared:
            return {}
        return {"start_weights": self.start.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict.get("start_weights")

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> StartWeights:
        """In ``on_train_start``: ES's start weights, the restored ones, or a copy of the current ones."""
        model = _model(pl_module, self.model_attribute)
        restored, self._restored = self._restored, None
        es, step, name = getattr(trainer.strategy, "es", None), trainer.global_step, type(self).__name__

        def own(saved):
            trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
            missing = set() if saved is None else set(trainable) - set(saved)
            if missing:
                raise ValueError(f"{name} cannot measure drift from the checkpoint's start weights: they lack "
                                 f"{len(missing)} of the model's trainable parameters, e.g. {sorted(missing)[:3]}.")
            return StartWeights(trainable, saved)

        resumed = f"training resumes at step {step} and "
        self.start = start_point(
            model, es, step, lambda: restored, own, logger.warning, name,
            es_lacks=resumed + "the strategy's checkpoint holds no start weights",
            saved_lacks=resumed + (f"the checkpoint {trainer.ckpt_path} holds no state for {name} (it was saved "
                                   "without this callback, or by a version that did not save its start weights)"
                                   if trainer.ckpt_path else "no checkpoint was restored"),
        )
        self._shared = es is not None
        return self.start


class KLDriftCallback(_StartPoint):
    """KL(current || starting weights) on off-task probe prompts every ``every_n_steps`` training steps.

    The arguments are those of the TRL ``KLDriftCallback`` (less its ``trainer``), with the same defaults:

    - ``probe_prompts``: probe texts, or conversations (lists of messages) rendered with the chat template;
    - ``tokenizer``: None takes the LightningModule's ``tokenizer`` attribute;
    - ``estimator``: ``"exact"`` (the default) takes the full next-token KL at every position of the probe text, never
      negative; ``"sampled"`` samples ``max_new_tokens`` tokens at temperature 1 and averages the log-probability
      difference of the sampled tokens (the ES-vs-GRPO paper's estimate, a Monte Carlo one that can read negative);
    - ``batch_size``: probes per forward pass;

    and, keyword-only, where Lightning needs it: ``model_attribute`` names the module's attribute holding the causal LM
    (``None``: the LightningModule itself). Replicated processes split the probes; under ZeRO-3 each forward gathers
    the parameters from every process, so every process probes them all. The metric reduces over all processes. The
    starting weights are kept in checkpoints. ``measure`` reads the KL on demand (before and after ``fit``).
    """

    def __init__(self, probe_prompts: Sequence[str | list[dict]], tokenizer=None, every_n_steps: int = 10,
                 estimator: str = "exact", max_new_tokens: int = 32, batch_size: int = 8, *,
                 model_attribute: str | None = "model"):
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

    def _build_probe(self, trainer, pl_module) -> None:
        tokenizer = self.tokenizer if self.tokenizer is not None else getattr(pl_module, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"KLDriftCallback was given no tokenizer and {type(pl_module).__name__} has no `tokenizer` "
                             "attribute: pass KLDriftCallback(probe_prompts, tokenizer).")
        prompts = [
            p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            for p in self.probe_prompts
        ]
        if getattr(trainer.strategy, "sharded", False):  # ZeRO-3: every forward is every process's, so all probe all
            share = prompts
        else:
            share = prompts[trainer.global_rank :: trainer.world_size] or prompts[:1]
        self.probe = DriftProbe(_model(pl_module, self.model_attribute), tokenizer, share, **self.options,
                                reference=self._start(trainer, pl_module))

    def on_train_start(self, trainer, pl_module):
        self._build_probe(trainer, pl_module)

    def measure(self, trainer, pl_module) -> float:
        """The off-task KL of the module's model from the start weights now, reduced over the processes (every process
        calls it). Before ``fit`` the start weights are the current ones (a host copy, which ``fit`` replaces with the
        start it picks), so it reads 0; after ``fit``, the drift of the run."""
        if self.probe is None:
            self._build_probe(trainer, pl_module)
        return float(self.probe.measure(_model(pl_module, self.model_attribute), KLDrift(),
                                        step=trainer.global_step).compute())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every_n_steps == 0:
            metric = self.probe.measure(_model(pl_module, self.model_attribute), KLDrift(), step=step)
            pl_module.log("drift/kl", float(metric.compute()), on_step=True, on_epoch=False)


class ParameterDriftCallback(_StartPoint):
    """L2 norm of the update from the start, relative norm, per layer type, and fraction of weights moved beyond
    ``threshold``. The arguments are those of the TRL ``ParameterDriftCallback`` (less its ``trainer``), with the same
    defaults, and keyword-only ``model_attribute``: the module's attribute holding the model to measure (``None``, the
    default: the LightningModule itself). The start weights are kept in checkpoints."""

    def __init__(self, every_n_steps: int = 10, threshold: float = 1e-6, *, model_attribute: str | None = None):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}.")
        self.every_n_steps = every_n_steps
        self.threshold = threshold
        self.model_attribute = model_attribute

    def on_train_start(self, trainer, pl_module):
        self._start(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every_n_steps == 0:
            es = getattr(trainer.strategy, "es", None)
            if es is not None and getattr(trainer.strategy, "sharded", False):  # ZeRO-3: the model holds placeholders
                values = sharded_parameter_drift(es, self.threshold)
            else:
                model = _model(pl_module, self.model_attribute)
                values = parameter_drift(model, self.start.of_model(model), self.threshold, self.start.names_in(model))
            pl_module.log_dict(values, on_step=True, on_epoch=False)
