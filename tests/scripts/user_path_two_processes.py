"""ESConfig's defaults (bf16, low-rank noise) over the processes ``accelerate launch`` starts; each process prints
"every trainable parameter evolved" when every trainable parameter moved and every logged value is finite.

    accelerate launch --multi_gpu --num_processes 2 user_path_two_processes.py OUTPUT_DIR
"""

import math
import sys
from pathlib import Path

import torch
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leave import leave  # noqa: E402
from collective_guard import install as guard_collectives  # noqa: E402

guard_collectives()  # a collective the library calls on a host tensor fails here as under NCCL
from tiny import build_model, build_tokenizer  # noqa: E402

from trl_ext import ESConfig, ESTrainer  # noqa: E402


def mean_token_id(completion_ids, **kwargs):
    return [sum(ids) / max(len(ids), 1) / 300 for ids in completion_ids]


def main():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, tie=True, init_range=0.2)
    args = ESConfig(output_dir=sys.argv[1], max_steps=2, max_completion_length=8, report_to="none",
                    save_strategy="no", disable_tqdm=True, logging_steps=1)
    words = ["the quick brown", "what is 12", "count the apples", "brown fox"]
    dataset = Dataset.from_dict({"prompt": [f"{w} {i}" for i in range(4) for w in words]})  # two default batches
    trainer = ESTrainer(model, mean_token_id, args=args, train_dataset=dataset, processing_class=tokenizer)
    before = {name: trainer.es.master.value(name).detach().clone() for name in trainer.es.params}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    frozen = [n for n in trainable if n not in before or torch.equal(before[n], trainer.es.master.value(n))]
    infinite = [(k, v) for h in trainer.state.log_history for k, v in h.items()
                if isinstance(v, (int, float)) and not math.isfinite(v)]
    if frozen or infinite:
        raise AssertionError(f"never changed: {frozen[:4]}; not finite: {infinite[:4]}")
    print(f"process {trainer.accelerator.process_index}: every trainable parameter evolved", flush=True)
    leave()


if __name__ == "__main__":
    main()
