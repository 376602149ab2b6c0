"""Which ``checkpoint-N`` folders an ES run can resume from.

transformers writes a checkpoint file by file (weights, optimizer, RNG states, ``es_state.pt``, then
``trainer_state.json``) and only then pushes it and deletes older checkpoints (``save_total_limit``). A folder is
resumable when its ``trainer_state.json`` reads as JSON (so everything before it was written) and it holds the ES
state; a process killed in the middle of a save leaves the previous, complete checkpoint in place. A save into a folder
that already holds a checkpoint (a run resumed from an older one) first removes its ``trainer_state.json``, so the
folder is incomplete until the new one is whole.
"""

import json
import logging
import os

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

logger = logging.getLogger(__name__)

ES_STATE_NAME = "es_state.pt"
TRAINER_STATE_NAME = "trainer_state.json"


def why_not_resumable(checkpoint: str) -> str | None:
    """None for a complete ES checkpoint, else what is missing."""
    if not os.path.isdir(checkpoint):
        return "it is not a folder"
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE_NAME)) as file:
            json.load(file)
    except (OSError, ValueError):
        return f"its {TRAINER_STATE_NAME} is missing or incomplete (the save was interrupted)"
    if not os.path.exists(os.path.join(checkpoint, ES_STATE_NAME)):
        return (f"it has no {ES_STATE_NAME}: it was not written by ESTrainer, or saved with save_only_model=True, which "
                "skips the state a resumed run needs")
    return None


def last_resumable_checkpoint(output_dir: str) -> str | None:
    """The highest-numbered complete checkpoint in ``output_dir``, or None."""
    if not os.path.isdir(output_dir):
        return None
    return next((path for path in reversed(sort_checkpoints(output_dir)) if why_not_resumable(path) is None), None)


class ESCheckpoints:
    """Mixin of ``ESTrainer``: checkpoints carry the ES state, are written so that a kill mid-save leaves one resume
    accepts, and resume picks a complete one."""

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """As ``Trainer.train``; ``resume_from_checkpoint=True`` takes the newest checkpoint that is complete (one a
        process killed mid-save left unfinished is skipped), and a given path must be complete."""
        if resume_from_checkpoint:  # process 0 decides, so that every process resumes from the same checkpoint
            chosen = self._checkpoint_to_resume(resume_from_checkpoint) if self.processes.rank == 0 else None
            resume_from_checkpoint = self.processes.broadcast(chosen)
            if isinstance(resume_from_checkpoint, Exception):
                raise resume_from_checkpoint
        self.resumed_checkpoint = resume_from_checkpoint or None  # where callbacks find their saved state
        try:
            return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        finally:
            if self.es is not None:
                self.es.perturbation.close()

    def _checkpoint_to_resume(self, requested) -> str | Exception:
        if requested is True:
            newest = last_resumable_checkpoint(self.args.output_dir)
            return newest or ValueError(
                f"resume_from_checkpoint=True, but {self.args.output_dir} holds no complete ES checkpoint."
            )
        reason = why_not_resumable(requested)
        if reason is None:
            return requested
        newest = last_resumable_checkpoint(os.path.dirname(os.path.abspath(requested)))
        return FileNotFoundError(
            f"resume_from_checkpoint={requested} cannot be resumed: {reason}. "
            + (f"The newest complete checkpoint beside it is {newest}." if newest else "Start a new run.")
        )

    def _save_checkpoint(self, model, trial):
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save and os.path.exists(os.path.join(folder, TRAINER_STATE_NAME)):
            # a run resumed from an older checkpoint saves over this one: incomplete until the new state is written
            os.remove(os.path.join(folder, TRAINER_STATE_NAME))
        if self.sharded:
            self._ensure_es()
            self.es.perturbation.write_deepspeed_copies()
        super()._save_checkpoint(model, trial)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial):
        """transformers' loop runs one step before it checks ``max_steps``: a run resumed from its final checkpoint
        (one that ends mid-epoch) would train a step more than the uninterrupted run. Nothing is left to train then."""
        epochs_trained, steps_in_epoch = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        if 0 < max_steps <= self.state.global_step:
            return num_train_epochs, 0
        return epochs_trained, steps_in_epoch

    def _save_rng_state(self, output_dir: str) -> None:
        """Beside the RNG states, the ES state (seed, fp32 master, anchor): written before trainer_state.json, which
        transformers writes last before it pushes the checkpoint and deletes older ones, so a checkpoint is never
        pushed, nor its predecessor deleted, before it can be resumed."""
        save_rng_state = super()._save_rng_state
        self.processes.together(lambda: save_rng_state(output_dir), "saving the RNG states")
        self._ensure_es()
        state = self.es.state_dict()  # a collective when sharded

        def save_es_state():
            if self.args.should_save:
                path = os.path.join(output_dir, ES_STATE_NAME)
                torch.save(state, path + ".tmp")
                os.replace(path + ".tmp", path)
            for callback in self.callback_handler.callbacks:  # the drift callbacks' start weights
                if hasattr(callback, "save_reference"):
                    callback.save_reference(output_dir)

        self.processes.together(save_es_state, f"saving {ES_STATE_NAME}")

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        self._ensure_es()
        # memory-mapped: a sharded process reads only its slices of the saved fp32 tensors
        self.es.load_state_dict(torch.load(os.path.join(checkpoint, ES_STATE_NAME), map_location="cpu",
                                           weights_only=True, mmap=True))
        if self.beta > 0 and not self._adapters_only and not self.es.start_restored:
            logger.warning(
                "beta=%g: the checkpoint %s holds no start weights (it was trained with beta=0 and without the drift "
                "callbacks or es_anchor_decay): the KL penalty is measured from the resumed weights, not from the "
                "weights the run started from.", self.beta, checkpoint)
