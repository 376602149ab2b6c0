"""Train the tiny model for a few ES steps and save its weights; run with 1 process or under accelerate launch.

    train_tiny.py WEIGHTS OUTPUT_DIR [PROMPTS_PER_PROCESS [NUM_GENERATIONS]]
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import build_model, build_tokenizer  # noqa: E402

from trl_ext import ESConfig, ESTrainer  # noqa: E402


def token_rate(completion_ids, **kwargs):
    return [sum(t < 150 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def main(weights_path: str, output_dir: str, per_device_prompts: int = 2, num_generations: int = 2):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    dataset = Dataset.from_dict({"prompt": ["the quick", "what is 12", "count the", "brown fox", "lazy dog", "is 42"]})
    args = ESConfig(
        output_dir=output_dir, max_steps=3, per_device_train_batch_size=per_device_prompts * num_generations,
        num_generations=num_generations, population_size=8,
        sigma=0.02, learning_rate=1e-3, max_completion_length=5, report_to="none", bf16=False,
        save_strategy="no", disable_tqdm=True, logging_steps=1,
    )
    trainer = ESTrainer(model, token_rate, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    weights = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # gathers a ZeRO-3 model (collective)
    if trainer.accelerator.is_main_process:
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
        update_norms = [h["es/update_norm"] for h in trainer.state.log_history if "es/update_norm" in h]
        torch.save({"weights": weights, "rewards": rewards, "update_norms": update_norms,
                    "processes": trainer.accelerator.num_processes}, weights_path)
    trainer.accelerator.wait_for_everyone()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))
