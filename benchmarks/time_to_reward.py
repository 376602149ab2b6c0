"""How long ES takes to reach GRPO's held-out reward, on this machine: ES and GRPO from the same base model, each
trained for the same wall-clock budget, held-out reward scored at fixed marks of training time.

    python benchmarks/time_to_reward.py                      # SmolLM2-135M-Instruct, GSM8K-style, 3 seeds, ~1 hour
    python benchmarks/time_to_reward.py --model Qwen/Qwen2.5-0.5B-Instruct --budget 1800

Methods: GRPO (GRPOTrainer, AdamW), ES with the settings before this study (``es-before``: the 0.1 recipe's) and ES
with the library's defaults (``es``). Every run scores the same held-out problems greedily (accuracy and answer format
separately; the reward is accuracy + 0.5 x format, as in training) at the start and every --mark seconds of training
(evaluation time is not counted), until --budget seconds. Writes --out/result.json and --out/reward.png, and prints,
last, the ratio "ES wall-clock to reach GRPO's final held-out reward / GRPO's wall-clock" (mean over seeds, with the
seeds' spread; a seed that never reaches it counts as not reached).
"""

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

from learning import REWARD_WEIGHTS, HeldOutCurve, seconds_to_reach, task
from trl import GRPOConfig, GRPOTrainer

from lightning_es.tasks.models import resolve_model
from trl_ext import ESConfig, ESTrainer
from trl_ext.recipes import use_all_cpu_cores

COMMON = dict(max_completion_length=24, report_to="none", bf16=False, save_strategy="no", logging_steps=1,
              disable_tqdm=True, reward_weights=REWARD_WEIGHTS, max_steps=10_000)
METHODS = {
    # what TRL users start from: AdamW on the policy gradient, 2 prompts x 4 completions
    "grpo": (GRPOTrainer, GRPOConfig, dict(per_device_train_batch_size=8, num_generations=4, learning_rate=1e-5,
                                           beta=0.0)),
    # the settings of the recipes before this study
    "es-before": (ESTrainer, ESConfig, dict(per_device_train_batch_size=8, population_size=8, perturbation="lowrank",
                                            perturbation_rank=1, sigma=1e-2, learning_rate=2e-5,
                                            max_completion_length=32)),
    # the library's defaults
    "es": (ESTrainer, ESConfig, dict()),
}


def run(method: str, args, seed: int) -> list[dict]:
    trainer_class, config_class, settings = METHODS[method]
    train, held_out, rewards = task(args.task, eval_size=args.eval_size)
    config = config_class(output_dir=tempfile.mkdtemp(prefix=f"{method}-"), seed=seed, **{**COMMON, **settings})
    trainer = trainer_class(resolve_model(args.model), list(rewards.values()), args=config, train_dataset=train)
    curve = HeldOutCurve(trainer, held_out, rewards, every_seconds=args.mark, budget_seconds=args.budget,
                         max_new_tokens=COMMON["max_completion_length"])
    trainer.add_callback(curve)
    trainer.train()
    return curve.points


def summarize(curves: dict[str, dict[int, list[dict]]]) -> dict:
    grpo = curves["grpo"]
    grpo_final = statistics.mean(points[-1]["reward"] for points in grpo.values())
    grpo_seconds = statistics.mean(points[-1]["seconds"] for points in grpo.values())
    result = {"grpo_final_reward": grpo_final, "grpo_seconds": grpo_seconds, "methods": {}}
    for method, runs in curves.items():
        reached = {seed: seconds_to_reach(points, grpo_final) for seed, points in runs.items()}
        ratios = [s / grpo_seconds if s is not None else float("inf") for s in reached.values()]
        finals = [points[-1] for points in runs.values()]
        result["methods"][method] = {
            "ratio_per_seed": ratios,
            "ratio": statistics.mean(ratios) if all(r != float("inf") for r in ratios) else float("inf"),
            "final_accuracy": [p["accuracy"] for p in finals],
            "final_format": [p["format"] for p in finals],
            "final_reward": [p["reward"] for p in finals],
            "iterations": [p["step"] for p in finals],
        }
    result["ratio"] = result["methods"]["es"]["ratio"]
    return result


def plot(curves, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for method, runs in curves.items():
        for index, metric in enumerate(("reward", "accuracy", "format")):
            for seed, points in runs.items():
                axes[index].plot([p["seconds"] for p in points], [p[metric] for p in points],
                                 color={"grpo": "C0", "es-before": "C2", "es": "C1"}[method], alpha=0.7,
                                 label=method if seed == min(runs) else None)
            axes[index].set_title(f"held-out {metric}")
            axes[index].set_xlabel("training seconds")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def markdown(result: dict, curves: dict) -> str:
    """The report's table: per method, the final held-out scores and the time to GRPO's final reward, over seeds."""
    def spread(values):
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    lines = [
        f"GRPO's final held-out reward: {result['grpo_final_reward']:.3f} (mean of its seeds) after "
        f"{result['grpo_seconds']:.0f} s of training.", "",
        "| method | iterations in the budget | s / iteration | final accuracy | final format | final reward "
        "| time to GRPO's final reward / GRPO's time, per seed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, summary in result["methods"].items():
        finals = [points[-1] for points in curves[method].values()]
        pace = statistics.mean(p["seconds"] / p["step"] for p in finals)
        ratios = ", ".join("not reached" if r == float("inf") else f"{r:.2f}" for r in summary["ratio_per_seed"])
        lines.append(f"| {method} | {', '.join(str(p['step']) for p in finals)} | {pace:.1f} | "
                     f"{spread(summary['final_accuracy'])} | {spread(summary['final_format'])} | "
                     f"{spread(summary['final_reward'])} | {ratios} |")
    lines += ["", "Held-out reward at the marks (mean over seeds, at the seeds' mean training seconds):", ""]
    for method, runs in curves.items():
        lines.append(f"- {method}: " + ", ".join(
            f"{statistics.mean(p['seconds'] for p in row):.0f} s {statistics.mean(p['reward'] for p in row):.3f}"
            for row in zip(*runs.values())))
    return "\n".join(lines) + "\n"


def report(curves: dict, args, out: Path) -> None:
    result = summarize(curves)
    result["settings"] = {"budget_seconds": args.budget, "mark_seconds": args.mark, "task": args.task,
                          "model": args.model or "SmolLM2-135M-Instruct", "seeds": args.seeds,
                          "methods": {m: {**COMMON, **METHODS[m][2]} for m in curves}}
    result["curves"] = curves
    (out / "result.json").write_text(json.dumps(result, indent=1))
    plot(curves, out / "reward.png")
    (out / "report.md").write_text(markdown(result, curves))
    print(markdown(result, curves))
    if result["grpo_final_reward"] <= max(points[0]["reward"] for points in curves["grpo"].values()):
        print("GRPO ended at or below the base model's held-out reward: every method reaches it at once, and the "
              "ratio below says nothing. Give it a longer --budget.")
    es = result["methods"]["es"]["ratio_per_seed"]
    print(f"ratio (ES wall-clock to reach GRPO's final held-out reward / GRPO's wall-clock): {result['ratio']:.2f} "
          f"(seeds {min(es):.2f}-{max(es):.2f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Default: the embedded SmolLM2-135M-Instruct.")
    parser.add_argument("--task", default="gsm8k", choices=["gsm8k", "arithmetic", "countdown"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=300.0, help="Training seconds per run.")
    parser.add_argument("--mark", type=float, default=60.0, help="Seconds of training between held-out scores.")
    parser.add_argument("--eval_size", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default="outputs/time-to-reward")
    parser.add_argument("--curves", default=None, help="Report from the curves.json of an earlier run; train nothing.")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.curves:
        saved = json.loads(Path(args.curves).read_text())
        report({method: {int(seed): points for seed, points in runs.items()} for method, runs in saved.items()}, args, out)
        return
    use_all_cpu_cores()
    logging.disable(logging.WARNING)
    curves = {method: {} for method in args.methods}
    for seed in args.seeds:  # methods interleaved, so that a slow phase of the machine does not hit one alone
        for method in args.methods:
            curves[method][seed] = run(method, args, seed)
            last = curves[method][seed][-1]
            print(f"{method} seed {seed}: {last['seconds']:.0f} s, {last['step']} steps, accuracy {last['accuracy']:.3f}, "
                  f"format {last['format']:.3f}", flush=True)
            (out / "curves.json").write_text(json.dumps(curves, indent=1))
    report(curves, args, out)


if __name__ == "__main__":
    main()
