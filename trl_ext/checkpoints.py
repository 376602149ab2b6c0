"""Which ``checkpoint-N`` folders an ES run can resume from.

transformers writes a checkpoint file by file (weights, optimizer, RNG states, ``es_state.pt``, then
``trainer_state.json``) and only then pushes it and deletes older checkpoints (``save_total_limit``). A folder is
resumable when its ``trainer_state.json`` reads as JSON (so everything before it was written) and it holds the ES
state; a process killed in the middle of a save leaves the previous, complete checkpoint in place. A save into a folder
that already holds a checkpoint (a run resumed from an older one) first removes its ``trainer_state.json``, so the
folder is incomplete until the new one is whole.
"""

import json
import os

from transformers.trainer_utils import sort_checkpoints

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
