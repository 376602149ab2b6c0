"""A GRPO script that sets many GRPOConfig fields, as users write it; tests/test_swap.py swaps one line to run it with
ES. Reward functions record what they receive; EXTRA_FIELDS (JSON) adds fields, e.g. one ES refuses."""

import json
import os

from datasets import Dataset
from trl import GRPOConfig
from trl import GRPOTrainer

calls = []


def reward_length(prompts, completions, completion_ids, target, trainer_state, log_metric, log_extra, **kwargs):
    calls.append({"step": trainer_state.global_step, "prompts": list(prompts), "completion_ids": completion_ids,
                  "target": list(target)})
    log_metric("length_seen", sum(len(ids) for ids in completion_ids) / len(completion_ids))
    log_extra("target_echo", list(target))
    return [float(len(ids)) for ids in completion_ids]


async def reward_low_tokens(completion_ids, **kwargs):
    return [sum(t < 150 for t in ids) / max(1, len(ids)) for ids in completion_ids]


prompts = ["the quick", "count the", "brown fox", "is 42", "lazy dog", "what is 12"]
dataset = Dataset.from_dict({"prompt": prompts, "target": [str(i) for i in range(len(prompts))]})
args = GRPOConfig(
    output_dir=os.environ["OUTPUT_DIR"],
    max_steps=4,
    per_device_train_batch_size=4,
    num_generations=2,
    max_completion_length=5,
    temperature=0.9,
    top_k=50,
    seed=7,
    logging_steps=1,
    save_strategy="steps",
    save_steps=2,
    lr_scheduler_type="cosine",
    warmup_steps=1,
    reward_weights=[1.0, 2.0],
    log_completions=True,
    num_completions_to_print=2,
    repetition_penalty=1.1,
    multi_objective_aggregation="normalize_then_sum",
    eval_strategy="steps",
    eval_steps=2,
    per_device_eval_batch_size=3,
    num_generations_eval=3,
    shuffle_dataset=False,
    loss_type="grpo",
    num_iterations=2,
    epsilon=0.3,
    scale_rewards="batch",
    report_to="none",
    bf16=False,
    use_cpu=True,
    disable_tqdm=True,
    **json.loads(os.environ.get("EXTRA_FIELDS", "{}")),
)
trainer = GRPOTrainer(model=os.environ["MODEL_DIR"], reward_funcs=[reward_length, reward_low_tokens], args=args,
                      train_dataset=dataset, eval_dataset=dataset)
trainer.train()
