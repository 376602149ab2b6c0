"""ES against GRPO from one base model: task reward, off-task KL drift, update geometry, linear mode connectivity.

    python recipes/compare_es_grpo.py                                   # embedded SmolLM2-135M-Instruct, GSM8K-style
    python recipes/compare_es_grpo.py --task countdown --steps 50 --report_dir outputs/compare-countdown

Both trainers run the same number of iterations on the same prompts, with KL-drift and parameter-drift callbacks.
The report folder gets `report.md` (summary table), `metrics.json`, and PNG plots: reward curves, KL-drift curves
and the reward along the straight line between the two solutions.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from lightning_es.tasks.evaluation import greedy_scores
from lightning_es.drift import (
    cosine_similarity, linear_connectivity, moved_fraction, parameter_delta, snapshot, update_norm,
)
from lightning_es.tasks.models import resolve_model
from lightning_es.tasks import countdown, gsm8k
from lightning_es.tasks.probes import OFF_TASK_PROMPTS, chat
from trl_ext import ESConfig, ESTrainer
from trl_ext.callbacks import KLDriftCallback, ParameterDriftCallback
from trl_ext.recipes import parse_recipe_args, use_all_cpu_cores

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TASKS = {"gsm8k": gsm8k, "countdown": countdown}


@dataclass
class CompareArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Base model (default: embedded SmolLM2)."})
    task: str = field(default="gsm8k", metadata={"help": "'gsm8k' (GSM8K-style, final answer) or 'countdown'."})
    steps: int = field(default=20, metadata={"help": "Iterations for each method (the shared budget)."})
    prompts_per_step: int = field(default=8, metadata={"help": "Prompts per iteration for both methods."})
    max_completion_length: int = field(default=32, metadata={"help": "New tokens per completion."})
    population_size: int = field(default=8, metadata={"help": "ES population."})
    es_learning_rate: float = field(default=1e-6, metadata={"help": "ES step size (lr = alpha * sigma)."})
    grpo_learning_rate: float = field(default=1e-5, metadata={"help": "GRPO AdamW learning rate."})
    grpo_prompts_per_step: int = field(default=2, metadata={"help": "GRPO prompts per iteration (backward is costly)."})
    grpo_generations: int = field(default=4, metadata={"help": "GRPO completions per prompt."})
    train_size: int = field(default=160, metadata={"help": "Training problems."})
    eval_size: int = field(default=16, metadata={"help": "Held-out problems for the task reward."})
    kl_every: int = field(default=5, metadata={"help": "Measure drift every this many iterations."})
    kl_estimator: str = field(
        default="sampled",
        metadata={"help": "'sampled' (the ES-vs-GRPO paper's Monte Carlo estimate; noisy for small drifts) or 'exact'."},
    )
    grid_points: int = field(default=5, metadata={"help": "Points on the interpolation line, endpoints included."})
    report_dir: str = field(default="outputs/compare", metadata={"help": "Where the report is written."})
    seed: int = field(default=0, metadata={"help": "Seed for data, noise and sampling."})
    quick: bool = field(default=False, metadata={"help": "Smoke mode for tests."})


QUICK = dict(steps=2, prompts_per_step=2, max_completion_length=6, population_size=4, grpo_prompts_per_step=1,
             grpo_generations=2,
             train_size=8, eval_size=4, kl_every=1, grid_points=3)


def task_data(args):
    module = TASKS[args.task]
    if args.task == "gsm8k":
        train, test = gsm8k.load_splits(train_size=args.train_size, eval_size=args.eval_size, seed=args.seed,
                                        style="final_answer")
    else:
        train = countdown.generate(args.train_size, seed=args.seed)
        test = countdown.generate(args.eval_size, seed=args.seed + 1_000_003)
    return module, train, test


def task_reward(model, tokenizer, test, module, args) -> dict[str, float]:
    scores = greedy_scores(model, tokenizer, test, {"accuracy": module.correctness_reward,
                                                   "format": module.format_reward}, args.max_completion_length)
    return {**scores, "reward": scores["accuracy"] + 0.5 * scores["format"]}


def train(method, args, base_path, module, train_dataset, tokenizer):
    common = dict(
        output_dir=str(Path(args.report_dir) / method), max_steps=args.steps, max_completion_length=args.max_completion_length,
        logging_steps=1, save_strategy="no", report_to="none", bf16=False, seed=args.seed, disable_tqdm=True,
        reward_weights=[1.0, 0.5],
    )
    if method == "es":
        config = ESConfig(per_device_train_batch_size=args.prompts_per_step, population_size=args.population_size,
                          learning_rate=args.es_learning_rate, **common)
        trainer_class = ESTrainer
    else:
        config = GRPOConfig(per_device_train_batch_size=args.grpo_prompts_per_step * args.grpo_generations,
                            num_generations=args.grpo_generations, learning_rate=args.grpo_learning_rate,
                            gradient_checkpointing=False, **common)
        trainer_class = GRPOTrainer
    trainer = trainer_class(model=base_path, reward_funcs=[module.correctness_reward, module.format_reward],
                            args=config, train_dataset=train_dataset, processing_class=tokenizer)
    probes = chat(OFF_TASK_PROMPTS[: 2 if args.quick else None])
    trainer.add_callback(KLDriftCallback(trainer, probes, every_n_steps=args.kl_every, estimator=args.kl_estimator,
                                         max_new_tokens=16))
    trainer.add_callback(ParameterDriftCallback(trainer, every_n_steps=args.kl_every))
    trainer.train()
    return trainer


def series(history, key):
    points = [(entry["step"], entry[key]) for entry in history if key in entry]
    return [p[0] for p in points], [p[1] for p in points]


def plot(path, title, ylabel, curves, xlabel="iteration"):
    figure, axis = plt.subplots(figsize=(6, 4))
    for label, (x, y) in curves.items():
        axis.plot(x, y, marker="o", label=label)
    axis.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(args):
    report = Path(args.report_dir)
    report.mkdir(parents=True, exist_ok=True)
    base_path = resolve_model(args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(base_path, padding_side="left")
    module, train_dataset, test = task_data(args)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    start = snapshot(base)
    results = {"before": task_reward(base, tokenizer, test, module, args)}
    deltas, histories = {}, {}
    for method in ("es", "grpo"):
        trainer = train(method, args, base_path, module, train_dataset, tokenizer)
        model = trainer.accelerator.unwrap_model(trainer.model)
        deltas[method] = parameter_delta(model, start)
        histories[method] = trainer.state.log_history
        kl = series(histories[method], "drift/kl")[1]
        results[method] = {
            **task_reward(model, tokenizer, test, module, args),
            "off_task_kl": kl[-1],
            "update_norm": update_norm(deltas[method]),
            "relative_norm": update_norm(deltas[method]) / update_norm(start),
            "moved_fraction": moved_fraction(deltas[method]),
        }
        del trainer, model
    results["cosine_es_grpo"] = cosine_similarity(deltas["es"], deltas["grpo"])
    grid = [i / (args.grid_points - 1) for i in range(args.grid_points)]
    endpoints = {m: {n: start[n] + deltas[m][n] for n in start} for m in deltas}
    path = linear_connectivity(base, endpoints["es"], endpoints["grpo"],
                               lambda m: task_reward(m, tokenizer, test, module, args)["reward"], grid)
    results["interpolation"] = {"alphas": path.alphas, "reward": path.values, "barrier": path.barrier}

    plot(report / "reward.png", "Training reward (population mean for ES)", "reward",
         {m.upper(): series(histories[m], "reward") for m in histories})
    plot(report / "kl_drift.png", "Off-task KL(current || base)", "KL per token",
         {m.upper(): series(histories[m], "drift/kl") for m in histories})
    plot(report / "interpolation.png", "Task reward on (1 - a) theta_ES + a theta_GRPO", "reward",
         {"path": (path.alphas, path.values)}, xlabel="a")
    (report / "metrics.json").write_text(json.dumps({**results, "history": histories}, indent=1, default=float))
    (report / "report.md").write_text(markdown(results, args))
    print((report / "report.md").read_text())
    return results


def markdown(results, args) -> str:
    rows = [
        ("task accuracy (held-out)", "accuracy", "{:.1%}"), ("answer format rate", "format", "{:.1%}"),
        ("task reward (accuracy + 0.5 format)", "reward", "{:.3f}"), ("off-task KL (last probe)", "off_task_kl", "{:.4f}"),
        ("update L2 norm", "update_norm", "{:.4f}"), ("update norm / base norm", "relative_norm", "{:.2e}"),
        ("fraction of weights moved (>1e-6)", "moved_fraction", "{:.3f}"),
    ]
    lines = [
        f"# ES vs GRPO on {args.task}: {args.steps} iterations each (ES: {args.population_size} members x "
        f"{args.prompts_per_step} prompts; GRPO: {args.grpo_prompts_per_step} prompts x {args.grpo_generations} "
        "completions)",
        "", "| metric | base | ES | GRPO |", "| --- | --- | --- | --- |",
    ]
    for label, key, style in rows:
        base = style.format(results["before"][key]) if key in results["before"] else "-"
        lines.append(f"| {label} | {base} | {style.format(results['es'][key])} | {style.format(results['grpo'][key])} |")
    lines += [
        "", f"- cosine(ES update, GRPO update): {results['cosine_es_grpo']:.4f}",
        f"- barrier on the straight line ES to GRPO (task reward): {results['interpolation']['barrier']:.4f}",
        f"- reward along the line at a = {results['interpolation']['alphas']}: "
        f"{[round(v, 3) for v in results['interpolation']['reward']]}",
        "", "Plots: reward.png, kl_drift.png, interpolation.png.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    use_all_cpu_cores()
    (arguments,) = parse_recipe_args((CompareArguments,), {}, QUICK)
    main(arguments)
