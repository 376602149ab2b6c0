"""A plain TRL GRPO script, as users write it. tests/test_trainer.py swaps one line to run it with ES."""

import os

from datasets import Dataset
from trl import GRPOConfig
from trl import GRPOTrainer


def reward_length_match(completions, target, **kwargs):
    return [-abs(len(c) - len(t)) for c, t in zip(completions, target)]


dataset = Dataset.from_dict({"prompt": ["the quick", "count the", "brown fox", "is 42"], "target": ["fox", "a", "b", "c"]})
args = GRPOConfig(
    output_dir=os.environ["OUTPUT_DIR"],
    max_steps=2,
    per_device_train_batch_size=4,
    num_generations=2,
    max_completion_length=4,
    report_to="none",
    bf16=False,
    use_cpu=True,
    save_strategy="no",
    disable_tqdm=True,
)
trainer = GRPOTrainer(model=os.environ["MODEL_DIR"], reward_funcs=[reward_length_match], args=args, train_dataset=dataset)
trainer.train()
