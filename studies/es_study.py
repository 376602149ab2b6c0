"""How well an ES setting learns on this machine: held-out reward against iterations and training seconds.

    python studies/es_study.py --task gsm8k --label lowrank-r1 --set perturbation=lowrank perturbation_rank=1 \
        --seeds 0 1 2 --max_steps 20 --eval_every 5 --out outputs/study/study.jsonl

Trains ESTrainer from the embedded SmolLM2-135M-Instruct (or --model) with the settings below plus every --set
key=value (ESConfig fields), once per seed, and appends one JSON line per held-out evaluation (greedy, the same
problems for every seed) to --out: label, task, seed, settings, iteration, training seconds (evaluation excluded),
accuracy, answer format and their weighted sum (the training reward). `summarize_study.py` turns the lines into tables.
"""

import argparse
import ast
import tempfile

from learning import REWARD_WEIGHTS, HeldOutCurve, append_jsonl, demonstrations, task
from transformers import AutoTokenizer

from lightning_es.tasks import prompts_for
from lightning_es.tasks.models import resolve_model
from trl_ext import ESConfig, ESTrainer
from trl_ext.recipes import use_all_cpu_cores

BASE = dict(
    per_device_train_batch_size=4, num_generations=1, max_completion_length=24, population_size=8,
    perturbation="lowrank", perturbation_rank=1, sigma=1e-2, learning_rate=1e-4,
    fitness_shaping="zscore",  # the study's shaping (the library's default since the accuracy race: prompt_zscore)
)


def parse_settings(pairs: list[str]) -> dict:
    settings = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            settings[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            settings[key] = value
    return settings


def run(args, seed: int, settings: dict, start: dict | None = None) -> list[dict]:
    train, held_out, rewards = task(args.task, args.train_size, args.eval_size)
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    # a model without a chat template is asked in plain text, after two answered problems of the task
    train, held_out = (prompts_for(tokenizer, split, demonstrations(args.task)) for split in (train, held_out))
    config = ESConfig(
        output_dir=tempfile.mkdtemp(prefix="es-study-"), max_steps=args.max_steps, seed=seed, save_strategy="no",
        report_to="none", bf16=False, logging_steps=1, disable_tqdm=True, reward_weights=REWARD_WEIGHTS,
        **{**BASE, **settings},
    )
    trainer = ESTrainer(path, list(rewards.values()), args=config, train_dataset=train, processing_class=tokenizer)
    curve = HeldOutCurve(trainer, held_out, rewards, every_steps=args.eval_every, at_steps=args.eval_at,
                         start=start)
    trainer.add_callback(curve)
    trainer.train()
    return [{"label": args.label, "task": args.task, "seed": seed, "settings": {**BASE, **settings}, **point}
            for point in curve.points]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="gsm8k", choices=["gsm8k", "arithmetic", "countdown"])
    parser.add_argument("--model", default=None, help="Default: the embedded SmolLM2-135M-Instruct.")
    parser.add_argument("--label", required=True)
    parser.add_argument("--set", nargs="*", default=[], help="ESConfig fields, key=value")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--eval_every", type=int, default=5)
    parser.add_argument("--eval_at", type=int, nargs="*", default=[], help="Also evaluate after these iterations.")
    parser.add_argument("--train_size", type=int, default=256)
    parser.add_argument("--eval_size", type=int, default=32)
    parser.add_argument("--out", default="outputs/study/study.jsonl")
    args = parser.parse_args()
    use_all_cpu_cores()
    settings = parse_settings(args.set)
    start = None
    for seed in args.seeds:
        rows = run(args, seed, settings, start)
        start = {key: rows[0][key] for key in ("step", "seconds", "accuracy", "format", "reward")}
        append_jsonl(args.out, rows)
        last = rows[-1]
        print(f"{args.label} {args.task} seed {seed}: iteration {last['step']}, {last['seconds']:.0f} s, "
              f"accuracy {rows[0]['accuracy']:.3f} -> {last['accuracy']:.3f}, "
              f"format {rows[0]['format']:.3f} -> {last['format']:.3f}", flush=True)


if __name__ == "__main__":
    main()
