"""The DeepSpeed configs the sharded layout (ZeRO-3) runs with, checked once for both integrations."""

import json
import os
from pathlib import Path


def check_zero3_config(deepspeed_config: dict | str | os.PathLike) -> dict:
    """The config as a dict (from a dict or a JSON path), refused with the reason unless it is a ZeRO stage 3 config
    without the sections ES cannot honour."""
    if not isinstance(deepspeed_config, dict):
        path = Path(deepspeed_config)
        if not path.is_file():
            raise FileNotFoundError(f"deepspeed_config {path} does not exist; pass a dict or a DeepSpeed JSON file.")
        deepspeed_config = json.loads(path.read_text())
    stage = deepspeed_config.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ValueError(
            f"the DeepSpeed config has zero_optimization.stage={stage!r}; the sharded ES layout needs stage 3 (stages 1 "
            "and 2 shard optimizer state and gradients, which ES does not have). Set it to 3, or run without "
            "DeepSpeed to replicate the model on every process."
        )
    owned = sorted({"optimizer", "scheduler"} & set(deepspeed_config))
    if owned:
        sections = " and ".join(repr(k) for k in owned)
        raise ValueError(
            f"the DeepSpeed config has {sections}: ES takes its own step on the weights, so DeepSpeed would keep an "
            "fp32 copy (and optimizer state) that ES never updates and that DeepSpeed's checkpoints would save as the "
            "weights, and its scheduler advances only inside engine.step(), which ES never calls. Remove "
            f"{sections}; set ES's step with learning_rate (relative_learning_rate), and under ESTrainer its schedule "
            "with lr_scheduler_type."
        )
    return {"train_micro_batch_size_per_gpu": 1, **deepspeed_config}
