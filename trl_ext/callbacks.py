"""Drift callbacks for transformers Trainers: they work with `ESTrainer` and with TRL's `GRPOTrainer` alike.

Like TRL's own callbacks they take the trainer, and add their values to the trainer's next log entry, under the same
names as the Lightning callbacks: ``drift/kl``; ``drift/update_norm``, ``drift/relative_norm``,
``drift/moved_fraction``, ``drift/norm/<layer type>``, and for ESTrainer ``drift/realised_fraction``.

Drift is measured from the weights the run started from, across resumes. Under ``ESTrainer`` the callbacks use the
one copy of the start weights ES keeps (``es.keep_start()``), which its checkpoints carry in ``es_state.pt``. Under
other trainers each callback keeps a host copy of the trainable parameters' start values, and each checkpoint folder
gets them in ``drift_reference.pt``, written by ``on_save`` (a trainer may call ``save_reference`` earlier, before it
writes ``trainer_state.json``; each folder is written once); a resumed run reads them back from the checkpoint it
resumes from (``trainer.resumed_checkpoint`` where the trainer sets it, else ``<output_dir>/checkpoint-<step>``).
Both callbacks hold the same start weights, so they share the file.

Under DeepSpeed ZeRO-3 (``ESTrainer``'s sharded layout) each process holds slices of the weights: the KL passes run on
every process over all probes together (each forward gathers the weights, the start ones while they are swapped in),
and the parameter drift is summed from each process's slices of the weights (in the model's dtype) and of the start
weights.
"""

import logging
import os
from collections.abc import Sequence

import torch
from transformers import TrainerCallback

from lightning_es.drift import DriftProbe, KLDrift, parameter_drift, sharded_parameter_drift, start_point
from lightning_es.drift.geometry import check_same_parameters, summed
from lightning_es.engine import StartWeights

logger = logging.getLogger(__name__)

REFERENCE_NAME = "drift_reference.pt"


class _TrainerDriftCallback(TrainerCallback):
    def __init__(self, trainer, every_n_steps: int):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}.")
        self.trainer = trainer
        self.every_n_steps = every_n_steps
        self._written: set[str] = set()  # the reference files this run has written

    @property
    def model(self):
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def due(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    # ---- the start weights, across resumes ---------------------------------------------------------------------

    start: StartWeights | None = None  # what this callback measures from, set when training begins

    def _measure_from(self, start: StartWeights) -> None:
        self.start = start

    @property
    def _es(self):
        """The trainer's ES, whose copy of the start weights is shared (None: another trainer, or not built yet)."""
        return getattr(self.trainer, "es", None)

    def save_reference(self, checkpoint_dir: str) -> None:
        """Write the start weights (host) to ``checkpoint_dir/drift_reference.pt``, atomically, on the process
        that saves (``args.should_save``). The trainer and ``on_save`` may both ask for a checkpoint, and the drift
        callbacks of a trainer hold the same start weights: a file this run has written already is not written again.
        """
        if not self.trainer.args.should_save or self.start is None or self.start is getattr(self._es, "start", None):
            return  # nothing yet, or ES's copy, which es_state.pt carries
        weights = self.start.state_dict()
        path = os.path.join(checkpoint_dir, REFERENCE_NAME)
        key = os.path.realpath(path)
        handler = getattr(self.trainer, "callback_handler", None)
        siblings = [c for c in getattr(handler, "callbacks", ()) if isinstance(c, _TrainerDriftCallback)]
        if any(key in c._written for c in [self, *siblings]) and os.path.exists(path):
            return
        os.makedirs(checkpoint_dir, exist_ok=True)
        torch.save(weights, path + ".tmp")  # the trainable parameters, in the model's dtype
        os.replace(path + ".tmp", path)
        self._written.add(key)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):  # else the checkpoint went elsewhere (a hyperparameter search's run folder)
            self.save_reference(folder)

    def on_train_begin(self, args, state, control, **kwargs):
        self._written.clear()  # a new run: the files of an earlier one may hold other start weights
        step = state.global_step
        checkpoint = getattr(self.trainer, "resumed_checkpoint", None) or os.path.join(
            args.output_dir, f"checkpoint-{step}")
        path = os.path.join(checkpoint, REFERENCE_NAME)

        def saved():  # the start weights a drift callback saved in the checkpoint resumed from
            if step > 0 and os.path.exists(path):
                return torch.load(path, map_location="cpu", weights_only=True)
            return None

        self._measure_from(start_point(
            self.model, self._es, step, saved, lambda weights: self._own_start(weights, path), logger.warning,
            type(self).__name__,
            es_lacks=f"resuming at step {step} from a checkpoint whose es_state.pt holds no start weights (it was "
                     "saved without the drift callbacks, beta or es_anchor_decay)",
            saved_lacks=f"resuming at step {step} from {checkpoint}, which holds no {REFERENCE_NAME} (it was saved "
                        "without the drift callbacks, or by a version that did not save their start weights)",
        ))

    def _own_start(self, saved: dict[str, torch.Tensor] | None = None, source: str = REFERENCE_NAME) -> StartWeights:
        """A host copy of the trainable parameters' start values: the current ones, or ``saved`` (read from
        ``source``); one per trainer, shared by its drift callbacks."""
        handler = getattr(self.trainer, "callback_handler", None)
        for other in [self, *getattr(handler, "callbacks", ())]:
            if saved is None and isinstance(other, _TrainerDriftCallback) and other.start is not None:
                return other.start
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if saved is not None:
            try:
                check_same_parameters(trainable, saved, "the model's trainable parameters", source)
            except ValueError as error:
                raise ValueError(f"{type(self).__name__} cannot measure drift from {source}: {error}") from None
        return StartWeights(trainable, saved)

    def log(self, values: dict[str, float]) -> None:
        """Join the trainer's next log entry (TRL trainers buffer metrics in ``_metrics``), else log now."""
        buffered = getattr(self.trainer, "_metrics", None)
        if buffered is None:
            self.trainer.log(values)
            return
        for key, value in values.items():
            buffered["train"][key].append(value)


class KLDriftCallback(_TrainerDriftCallback):
    """KL(current || starting policy) on off-task probe prompts, every ``every_n_steps`` steps.

    The arguments after ``trainer`` are those of the Lightning ``KLDriftCallback``, with the same defaults:

    - ``probe_prompts``: probe texts, or conversations (lists of messages) rendered with the chat template;
    - ``tokenizer``: None takes the trainer's ``processing_class`` (its tokenizer, for a processor);
    - ``estimator``: ``"exact"`` (the default) takes the full next-token KL at every position of the probe text, never
      negative; ``"sampled"`` samples ``max_new_tokens`` tokens at temperature 1 and averages the log-probability
      difference of the sampled tokens (the ES-vs-GRPO paper's estimate, a Monte Carlo one that can read negative);
    - ``batch_size``: probes per forward pass.

    The processes split the probes (under ZeRO-3 every process probes them all).
    """

    def __init__(self, trainer, probe_prompts: Sequence[str | list[dict]], tokenizer=None, every_n_steps: int = 10,
                 estimator: str = "exact", max_new_tokens: int = 32, batch_size: int = 8):
        if isinstance(tokenizer, int):  # KLDriftCallback(trainer, prompts, 10): every_n_steps was third before
            raise TypeError(f"KLDriftCallback's third argument is tokenizer, got {tokenizer!r}: pass every_n_steps="
                            f"{tokenizer} by name.")
        super().__init__(trainer, every_n_steps)
        if tokenizer is None:
            tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        prompts = [
            p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            for p in probe_prompts
        ]
        accelerator = trainer.accelerator
        es = self._es
        if not getattr(trainer, "sharded", False):  # ZeRO-3: every forward is every process's, so all probe all
            prompts = prompts[accelerator.process_index :: accelerator.num_processes] or prompts[:1]
        self.probe = DriftProbe(self.model, tokenizer, prompts, estimator=estimator, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, seed=trainer.args.seed,
                                reference=None if es is None else es.keep_start())
        self.start = self.probe.reference

    def _measure_from(self, start):
        super()._measure_from(start)
        self.probe.use_reference(start)

    def on_step_end(self, args, state, control, **kwargs):
        if self.due(state.global_step):
            metric = self.probe.measure(self.model, KLDrift(), step=state.global_step)
            self.log({"drift/kl": float(metric.compute())})


class ParameterDriftCallback(_TrainerDriftCallback):
    """How far the weights moved from the start: L2 norm, norm relative to the start, per layer type, the fraction
    of weights moved beyond ``threshold``, and for ESTrainer the fraction of the last step realised in the model's
    dtype (projection of the realised change on the intended fp32 change; 1.0 = fully realised). The arguments after
    ``trainer`` are those of the Lightning ``ParameterDriftCallback``, with the same defaults."""

    def __init__(self, trainer, every_n_steps: int = 10, threshold: float = 1e-6):
        super().__init__(trainer, every_n_steps)
        self.threshold = threshold
        self.before_step = None

    @property
    def _sharded_es(self):
        """The trainer's ES when it holds ZeRO-3 slices (the model's parameters are then empty placeholders)."""
        es = self._es
        return es if es is not None and getattr(self.trainer, "sharded", False) else None

    def on_step_begin(self, args, state, control, **kwargs):
        es = getattr(self.trainer, "es", None)
        if es is not None and es.master.copies and self.due(state.global_step + 1):  # else nothing to compare
            weights = es.params if self._sharded_es is not None else dict(self.model.named_parameters())
            # the evolved tensors with a master copy only: a frozen base (PEFT) is never read here
            self.before_step = ({n: weights[n].detach().to("cpu", torch.float32, copy=True) for n in es.master.copies},
                                {n: es.master.copies[n].cpu().clone() for n in es.master.copies})

    def on_step_end(self, args, state, control, **kwargs):
        if not self.due(state.global_step):
            return
        if self._sharded_es is not None:
            values = sharded_parameter_drift(self._sharded_es, self.threshold)
        else:
            values = parameter_drift(self.model, self.start.of_model(self.model), self.threshold,
                                     self.start.names_in(self.model))
        if self.before_step is not None:  # none without a master copy: fp32 weights take the step whole
            values["drift/realised_fraction"] = self._realised_fraction(*self.before_step)
        self.before_step = None
        self.log(values)

    def _realised_fraction(self, params_before, master_before) -> float:
        es = self.trainer.es
        sharded = self._sharded_es is not None
        params = es.params if sharded else dict(self.model.named_parameters())
        sums = torch.zeros(2, dtype=torch.float64)  # the realised change along the intended one, and its square
        for name, master in es.master.copies.items():
            intended = master.cpu().double() - master_before[name].double()
            realised = params[name].detach().cpu().double() - params_before[name].double()
            if sharded:
                intended, realised = es.perturbation.real(name, intended), es.perturbation.real(name, realised)
            sums += torch.stack([(realised * intended).sum(), intended.pow(2).sum()])
        dot, intended_sq = summed(es.perturbation, sums)  # over the processes that hold slices
        return dot / intended_sq if intended_sq else float("nan")

