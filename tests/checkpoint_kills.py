"""The run that tests/test_fault_injection.py kills in the middle of its checkpoint saves (imported by the forkserver
that starts the runs, so that each of them skips the imports)."""

import time

from datasets import Dataset

from tiny import build_model, build_tokenizer
from trl_ext import ESConfig, ESTrainer

MAX_STEPS = 4


def token_rate(completion_ids, **kwargs):
    return [sum(t < 150 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def build_trainer(output_dir: str) -> ESTrainer:
    """4 steps over 5 prompts (the second epoch starts at step 3), a checkpoint after each, only the newest kept."""
    tokenizer = build_tokenizer()
    args = ESConfig(
        output_dir=output_dir, max_steps=MAX_STEPS, per_device_train_batch_size=4, num_generations=2, population_size=4,
        sigma=0.02, learning_rate=1e-3, max_completion_length=4, report_to="none", bf16=False, use_cpu=True,
        save_strategy="steps", save_steps=1, save_total_limit=1, disable_tqdm=True, logging_steps=1,
    )
    dataset = Dataset.from_dict({"prompt": ["the quick", "what is 12", "count the", "brown fox", "lazy dog"]})
    # a larger MLP, so that a checkpoint takes long enough to be cut in the middle of its files
    return ESTrainer(build_model(tokenizer, intermediate_size=2048), token_rate, args=args, train_dataset=dataset,
                     processing_class=tokenizer)


def train_reporting_saves(output_dir: str, connection) -> None:
    """Train from scratch; send ``(step, "start" | "end", monotonic time)`` around every checkpoint save."""
    trainer = build_trainer(output_dir)
    save = trainer._save_checkpoint

    def reporting_save(model, trial):
        connection.send((trainer.state.global_step, "start", time.monotonic()))
        save(model, trial)
        connection.send((trainer.state.global_step, "end", time.monotonic()))

    trainer._save_checkpoint = reporting_save
    trainer.train()
