"""Wall-clock of a small TRL-style GRPO training script, run with GRPOTrainer and through the one-line swap to ESTrainer.

    python benchmarks/swap_speed.py [--steps 20] [--repeats 3] [--population N] [--perturbation full|lowrank]

The script is TRL's test-suite kind: a tiny Qwen2 built locally, `GRPOConfig(learning_rate=0.1,
per_device_train_batch_size=3, num_generations=3, max_completion_length=8)` and otherwise TRL's defaults, one reward
function. ES runs with the library's defaults unless --population / --perturbation override them (to compare with
earlier defaults). Prints each trainer's median time over --repeats interleaved runs and the ratio ES / GRPO
(``es_vs_grpo``), last; ``--out DIR`` writes them to ``DIR/result.json``.
"""

import logging
import statistics
import tempfile

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from common import arguments, interleaved, ratios, write_result
from tiny import build_model, build_tokenizer  # tests/, on the path from common
from trl_ext import ESTrainer
from trl_ext.config import to_es_config

PROMPTS = ["the quick", "what is 12", "count the", "brown fox", "lazy dog", "apples and", "is 42", "jumps over"]


def reward_short(completion_ids, **kwargs):
    return [-float(len(ids)) for ids in completion_ids]


def run(trainer_class, steps: int, es_overrides: dict) -> None:
    tokenizer = build_tokenizer()
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), learning_rate=0.1, per_device_train_batch_size=3,
                      num_generations=3, max_completion_length=8, max_steps=steps, report_to="none", use_cpu=True,
                      bf16=False, save_strategy="no", disable_tqdm=True)
    if es_overrides:  # the swapped script's config, with other ES settings than the defaults
        args = to_es_config(args)
        for name, value in es_overrides.items():
            setattr(args, name, value)
    trainer = trainer_class(build_model(tokenizer), reward_short, args=args,
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    trainer.train()


def main():
    parser = arguments(__doc__, repeats=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--population", type=int, default=None)
    parser.add_argument("--perturbation", default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    es_overrides = {k: v for k, v in (("population_size", args.population), ("perturbation", args.perturbation))
                    if v is not None}
    times = interleaved({"GRPOTrainer": lambda: run(GRPOTrainer, args.steps, {}),
                         "ESTrainer": lambda: run(ESTrainer, args.steps, es_overrides)}, args.repeats, warmup=0)
    settings = ", ".join(f"{k}={v}" for k, v in es_overrides.items()) or "library defaults"
    print(f"tiny Qwen2, {args.steps} steps, TRL-style GRPOConfig; ES with {settings}; median of {args.repeats} runs")
    seconds = {name: statistics.median(values) for name, values in times.items()}
    for name, median in seconds.items():
        print(f"{name:12s} {median:7.2f} s")
    write_result(args.out, {"steps": args.steps, "repeats": args.repeats, "es_settings": es_overrides,
                            "seconds_median": seconds, "es_vs_grpo": ratios(times["ESTrainer"], times["GRPOTrainer"])})


if __name__ == "__main__":
    main()
