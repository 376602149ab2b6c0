"""ES against GRPO from one base model, over several seeds: task reward, off-task KL drift, update geometry, linear
mode connectivity, and a precision audit of both updates.

    python studies/compare_es_grpo.py                                   # embedded SmolLM2-135M-Instruct, GSM8K-style
    python studies/compare_es_grpo.py --task countdown --steps 50 --seeds 0 1 --report_dir outputs/compare-countdown

For each seed both trainers run the same number of iterations from the same base model (ES with ESConfig's defaults,
GRPO with AdamW), then:
- held-out accuracy and answer format, greedy, on the same problems for every seed;
- off-task KL to the base model on every probe prompt, with both estimators: ``exact`` (full next-token KL at every
  token of the chat-formatted probe followed by the base model's own greedy answer, teacher-forced: no sampling
  noise) and ``sampled`` (the ES-vs-GRPO paper's Monte Carlo estimate on continuations sampled from the trained
  model);
- update norm, moved fraction, cosine between the two updates, reward along the straight line between them;
- precision audit: the fraction of each update that bf16 weights would keep, for the whole update and for single steps.
The report folder gets `report.md` (per-seed and mean ± sd tables, and which of the four published findings hold
here), `metrics.json`, and PNG plots.
"""

import gc
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from lightning_es.drift import (
    DriftProbe, cosine_similarity, linear_connectivity, moved_fraction, parameter_delta, realised_fraction, snapshot,
    update_norm,
)
from lightning_es.tasks import countdown, gsm8k, prompts_for
from lightning_es.tasks.evaluation import greedy_scores
from lightning_es.tasks.models import resolve_model
from lightning_es.tasks.probes import OFF_TASK_PROMPTS, answered, render
from lightning_es.tasks.spread import shown
from trl_ext import ESConfig, ESTrainer
from trl_ext.callbacks import KLDriftCallback, ParameterDriftCallback
from trl_ext.recipes import parse_recipe_args, use_all_cpu_cores

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TASKS = {"gsm8k": gsm8k, "countdown": countdown}
METHODS = ("es", "grpo")
ES_SETTINGS = ("population_size", "per_device_train_batch_size", "relative_sigma", "relative_learning_rate",
               "perturbation", "perturbation_rank", "fitness_shaping", "es_anchor_decay")


@dataclass
class CompareArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Base model (default: embedded SmolLM2)."})
    task: str = field(default="gsm8k", metadata={"help": "'gsm8k' (GSM8K-style, final answer) or 'countdown'."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "One ES and one GRPO run per seed."})
    steps: int = field(default=20, metadata={"help": "Iterations for each method (the shared budget)."})
    prompts_per_step: int | None = field(default=None, metadata={"help": "ES prompts per iteration (default: ESConfig's)."})
    max_completion_length: int = field(default=24, metadata={"help": "New tokens per completion."})
    population_size: int | None = field(default=None, metadata={"help": "ES population (default: ESConfig's)."})
    es_relative_learning_rate: float | None = field(
        default=None, metadata={"help": "ES step, relative_learning_rate (default: ESConfig's)."})
    grpo_learning_rate: float = field(default=1e-4, metadata={
        "help": "GRPO AdamW learning rate (1e-4: tuned on SmolLM2-135M-Instruct in the drift race; Gemma-3-270M: 1e-6)."})
    grpo_prompts_per_step: int = field(default=2, metadata={"help": "GRPO prompts per iteration (backward is costly)."})
    grpo_generations: int = field(default=4, metadata={"help": "GRPO completions per prompt."})
    train_size: int = field(default=160, metadata={"help": "Training problems."})
    eval_size: int = field(default=32, metadata={"help": "Held-out problems for the task reward."})
    probes: int = field(default=len(OFF_TASK_PROMPTS), metadata={"help": "Off-task probe prompts (at most 24)."})
    probe_tokens: int = field(default=32, metadata={"help": "Tokens of each probe's answer scored for the KL."})
    kl_every: int = field(default=5, metadata={"help": "Measure drift (exact KL) during training every this many steps."})
    grid_points: int = field(default=5, metadata={"help": "Points on the interpolation line, endpoints included."})
    report_dir: str = field(default="outputs/compare", metadata={"help": "Where the report is written."})
    quick: bool = field(default=False, metadata={"help": "Smoke mode for tests."})


QUICK = dict(seeds=[0, 1], steps=2, prompts_per_step=2, max_completion_length=6, population_size=4,
             grpo_prompts_per_step=1, grpo_generations=2, train_size=8, eval_size=4, probes=3, probe_tokens=6,
             kl_every=1, grid_points=3)


class StepPrecisionAudit(TrainerCallback):
    """Every ``every`` steps, the fraction of that single step that bf16 weights would keep (`realised_fraction`);
    steps that moved nothing are left out."""

    def __init__(self, trainer, every: int):
        self.trainer, self.every, self.before, self.fractions = trainer, every, None, []

    def on_step_begin(self, args, state, control, **kwargs):
        if (state.global_step + 1) % self.every == 0:
            self.before = snapshot(self.trainer.accelerator.unwrap_model(self.trainer.model))

    def on_step_end(self, args, state, control, **kwargs):
        if self.before is not None:
            step = parameter_delta(self.trainer.accelerator.unwrap_model(self.trainer.model), self.before)
            kept = realised_fraction(self.before, step)
            if not math.isnan(kept):  # a step that moved nothing has nothing to keep
                self.fractions.append(kept)
            self.before = None


def task_data(args, tokenizer):
    """(training, held-out) prompts as the model is asked: through its chat template, or as plain-text questions."""
    if args.task == "gsm8k":
        splits = gsm8k.load_splits(train_size=args.train_size, eval_size=args.eval_size, seed=0, style="final_answer")
        shown = gsm8k.demonstrations("final_answer")
    else:
        splits = countdown.generate(args.train_size, seed=0), countdown.generate(args.eval_size, seed=1_000_003)
        shown = countdown.DEMONSTRATIONS
    return tuple(prompts_for(tokenizer, split, shown) for split in splits)


def task_reward(model, tokenizer, test, module, args) -> dict[str, float]:
    scores = greedy_scores(model, tokenizer, test, {"accuracy": module.correctness_reward,
                                                   "format": module.format_reward}, args.max_completion_length)
    return {**scores, "reward": scores["accuracy"] + 0.5 * scores["format"]}


def kl_probes(base, tokenizer, args) -> dict[str, DriftProbe]:
    """Both KL estimators on the same probe prompts, with the base model as their reference."""
    prompts = OFF_TASK_PROMPTS[: args.probes]
    return {"exact": DriftProbe(base, tokenizer, answered(base, tokenizer, prompts, args.probe_tokens), estimator="exact"),
            "sampled": DriftProbe(base, tokenizer, render(tokenizer, prompts), estimator="sampled",
                                  max_new_tokens=args.probe_tokens)}


def es_config(args, **common) -> ESConfig:
    """ESConfig's defaults, but for what the arguments set."""
    chosen = {"population_size": args.population_size, "relative_learning_rate": args.es_relative_learning_rate,
              "per_device_train_batch_size": args.prompts_per_step}
    return ESConfig(**{k: v for k, v in chosen.items() if v is not None}, **common)


def settings(args) -> dict:
    """What a seed's results depend on: the arguments but the seeds and the folder, and the ES settings they give
    (ESConfig's defaults can change between two runs of the recipe)."""
    config = es_config(args, output_dir=args.report_dir, bf16=False)  # as train() builds it
    return {"arguments": {k: v for k, v in vars(args).items() if k not in ("seeds", "report_dir")},
            "es": {name: getattr(config, name) for name in ES_SETTINGS}}


def saved_runs(path: Path, now: dict) -> dict:
    """The seeds already in the report's metrics.json, so that a run cut short continues where it stopped; refused
    if they were run with other settings."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if "settings" not in saved:
        raise SystemExit(f"{path} was written by an earlier version of this recipe, which did not record the settings "
                         "its seeds were run with: pass another --report_dir, or delete it to start over.")
    if saved["settings"] != now:
        raise SystemExit(f"{path} holds seeds run with other settings ({saved['settings']}; now {now}): pass "
                         "another --report_dir, or delete it to start over.")
    return {int(seed): run for seed, run in saved["runs"].items()}


def save_runs(path: Path, saved: dict) -> None:
    """Written beside, then moved over the last: a run killed while writing keeps the seeds it had saved."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(saved, indent=1, default=float))
    os.replace(partial, path)


def train(method, args, seed, base_path, module, train_dataset, tokenizer, probe_texts):
    common = dict(
        output_dir=str(Path(args.report_dir) / f"{method}-seed{seed}"), max_steps=args.steps,
        max_completion_length=args.max_completion_length, logging_steps=1, save_strategy="no", report_to="none",
        bf16=False, seed=seed, disable_tqdm=True, reward_weights=[1.0, 0.5],
    )
    if method == "es":
        config = es_config(args, **common)
        trainer_class = ESTrainer
    else:
        config = GRPOConfig(per_device_train_batch_size=args.grpo_prompts_per_step * args.grpo_generations,
                            num_generations=args.grpo_generations, learning_rate=args.grpo_learning_rate,
                            gradient_checkpointing=False, **common)
        trainer_class = GRPOTrainer
    trainer = trainer_class(model=base_path, reward_funcs=[module.correctness_reward, module.format_reward],
                            args=config, train_dataset=train_dataset, processing_class=tokenizer)
    trainer.add_callback(KLDriftCallback(trainer, probe_texts, every_n_steps=args.kl_every, estimator="exact"))
    trainer.add_callback(ParameterDriftCallback(trainer, every_n_steps=args.kl_every))
    audit = StepPrecisionAudit(trainer, args.kl_every)
    trainer.add_callback(audit)
    trainer.train()
    return trainer, audit.fractions


def run_seed(seed, args, base, start, base_path, module, data, tokenizer, probes) -> dict:
    train_dataset, test = data
    result, deltas = {}, {}
    for method in METHODS:
        trainer, step_fractions = train(method, args, seed, base_path, module, train_dataset, tokenizer,
                                        probes["exact"].prompts)
        model = trainer.accelerator.unwrap_model(trainer.model)
        deltas[method] = parameter_delta(model, start)
        for probe in probes.values():  # the trained model computes the reference pass, with the base's weights
            probe.set_reference(model, weights=start)
        result[method] = {
            **task_reward(model, tokenizer, test, module, args),
            **{f"kl_{name}": probe.measure_each(model) for name, probe in probes.items()},
            "update_norm": update_norm(deltas[method]),
            "relative_norm": update_norm(deltas[method]) / update_norm(start),
            "moved_fraction": moved_fraction(deltas[method]),
            "bf16_kept_update": realised_fraction(start, deltas[method]),
            "bf16_kept_step": statistics.mean(step_fractions) if step_fractions else math.nan,
            "history": trainer.state.log_history,
        }
        del trainer, model
        gc.collect()  # the trainer and its callbacks hold each other: free its model before the next one is built
    result["cosine_es_grpo"] = cosine_similarity(deltas["es"], deltas["grpo"])
    grid = [i / (args.grid_points - 1) for i in range(args.grid_points)]
    endpoints = {m: {n: start[n] + deltas[m][n] for n in start} for m in deltas}
    path = linear_connectivity(base, endpoints["es"], endpoints["grpo"],
                               lambda m: task_reward(m, tokenizer, test, module, args)["reward"], grid)
    result["interpolation"] = {"alphas": path.alphas, "reward": path.values, "barrier": path.barrier}
    return result


def spread(values) -> str:
    """mean ± sample standard deviation; NaN (e.g. the kept share of an update that is zero) propagates."""
    return shown(list(values), ".4g", ".2g")


def findings(runs: dict, before: dict, args) -> list[str]:
    """Plain statements of which published ES-vs-GRPO findings hold in these runs, with their evidence."""
    seeds = list(runs)
    value = lambda method, key: [runs[s][method][key] for s in seeds]  # noqa: E731
    mean_kl = lambda method, name: [statistics.mean(runs[s][method][f"kl_{name}"]) for s in seeds]  # noqa: E731
    one_problem = 1 / args.eval_size
    against = f" (GRPO at AdamW lr {args.grpo_learning_rate:g})"
    lines = []

    es_acc, grpo_acc = value("es", "accuracy"), value("grpo", "accuracy")
    gap = statistics.mean(es_acc) - statistics.mean(grpo_acc)
    noise = max(max(es_acc) - min(es_acc), max(grpo_acc) - min(grpo_acc), one_problem)
    parity = abs(gap) <= noise
    lines.append(
        f"1. Accuracy parity{against}: {'holds' if parity else 'does not hold'}. Held-out accuracy ES "
        f"{spread(es_acc)}, GRPO {spread(grpo_acc)} (base {before['accuracy']:.3f}); the gap {gap:+.3f} is "
        f"{'within' if parity else 'beyond'} the seeds' range ({noise:.3f}). Task reward ES "
        f"{spread(value('es', 'reward'))}, GRPO {spread(value('grpo', 'reward'))}."
    )
    ratios = [e / g if g else math.inf for e, g in zip(value("es", "update_norm"), value("grpo", "update_norm"))]
    larger = all(r > 1 for r in ratios)
    lines.append(
        f"2. Larger update norm for ES{against}: {'holds' if larger else 'does not hold'}. ES/GRPO L2 norm per seed "
        f"{', '.join(f'{r:.1f}x' for r in ratios)} (ES {spread(value('es', 'update_norm'))}, GRPO "
        f"{spread(value('grpo', 'update_norm'))})."
    )
    pairs = [(e, g) for s in seeds for e, g in zip(runs[s]["es"]["kl_exact"], runs[s]["grpo"]["kl_exact"])]
    es_higher = sum(e > g for e, g in pairs)
    every_seed = all(e > g for e, g in zip(mean_kl("es", "exact"), mean_kl("grpo", "exact")))
    every_seed_lower = all(e < g for e, g in zip(mean_kl("es", "exact"), mean_kl("grpo", "exact")))
    verdict = "holds" if every_seed and es_higher > len(pairs) / 2 else (
        "is reversed" if every_seed_lower and es_higher < len(pairs) / 2 else "is not established")
    lines.append(
        f"3. Larger off-task KL for ES{against}: {verdict}. Exact teacher-forced KL (mean over {args.probes} "
        f"probes) ES {spread(mean_kl('es', 'exact'))}, GRPO {spread(mean_kl('grpo', 'exact'))}; ES higher on {es_higher} of "
        f"{len(pairs)} (seed, probe) pairs. Sampled estimate: ES {spread(mean_kl('es', 'sampled'))}, GRPO "
        f"{spread(mean_kl('grpo', 'sampled'))}."
    )
    cosines = [runs[s]["cosine_es_grpo"] for s in seeds]
    barriers = [runs[s]["interpolation"]["barrier"] for s in seeds]
    orthogonal = all(abs(c) < 0.1 for c in cosines)
    no_barrier = all(b <= one_problem for b in barriers)
    lines.append(
        f"4. Near-orthogonal updates with no barrier on the linear path{against}: "
        f"{'holds' if orthogonal and no_barrier else 'does not hold'}. Cosine per seed "
        f"{', '.join(f'{c:.4f}' for c in cosines)} ({'all' if orthogonal else 'not all'} below 0.1 in size); barrier "
        f"in task reward per seed {', '.join(f'{b:.3f}' for b in barriers)} ({'all' if no_barrier else 'not all'} "
        f"within one held-out problem, {one_problem:.3f})."
    )
    return lines


def markdown(runs: dict, before: dict, es: dict, args) -> str:
    seeds = list(runs)
    rows = [
        ("held-out accuracy", "accuracy"), ("answer format rate", "format"), ("task reward (accuracy + 0.5 format)",
                                                                              "reward"),
        ("off-task KL, exact (mean over probes)", "kl_exact"), ("off-task KL, sampled (mean over probes)",
                                                                "kl_sampled"),
        ("update L2 norm", "update_norm"), ("update norm / base norm", "relative_norm"),
        ("fraction of weights moved (>1e-6)", "moved_fraction"),
        ("share of the whole update bf16 weights keep", "bf16_kept_update"),
        ("share of one step bf16 weights keep", "bf16_kept_step"),
    ]

    def reading(seed, method, key):
        value = runs[seed][method][key]
        return statistics.mean(value) if isinstance(value, list) else value

    model = args.model_name_or_path or "SmolLM2-135M-Instruct"
    lines = [
        f"# ES vs GRPO on {args.task}, {model}: {args.steps} iterations each, seeds {', '.join(map(str, seeds))}",
        "", f"ES: {es['population_size']} members, {es['per_device_train_batch_size']} prompts per iteration, "
        f"{es['perturbation']} noise (rank {es['perturbation_rank']}), relative_sigma {es['relative_sigma']:g}, "
        f"relative_learning_rate {es['relative_learning_rate']:g}, {es['fitness_shaping']} shaping; GRPO: "
        f"{args.grpo_prompts_per_step} prompts x {args.grpo_generations} completions, AdamW lr "
        f"{args.grpo_learning_rate:g}; {args.max_completion_length} new tokens; {args.eval_size} held-out problems; "
        f"{args.probes} off-task probes.", "",
        "## Which published findings hold here", "", *findings(runs, before, args), "",
        "## Mean ± sd over seeds", "", "| metric | base | ES | GRPO |", "| --- | --- | --- | --- |",
    ]
    for label, key in rows:
        base = f"{before[key]:.4g}" if key in before else "-"
        lines.append(f"| {label} | {base} | {spread(reading(s, 'es', key) for s in seeds)} | "
                     f"{spread(reading(s, 'grpo', key) for s in seeds)} |")
    lines += ["", "## Per seed", "", "| metric | " + " | ".join(f"ES {s} | GRPO {s}" for s in seeds) + " |",
              "| --- |" + " --- | --- |" * len(seeds)]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(f"{reading(s, 'es', key):.4g} | {reading(s, 'grpo', key):.4g}"
                                                   for s in seeds) + " |")
    lines.append("| cosine(ES update, GRPO update) | " + " | ".join(f"{runs[s]['cosine_es_grpo']:.4f} | -"
                                                                    for s in seeds) + " |")
    lines.append("| barrier on the line (task reward) | " + " | ".join(f"{runs[s]['interpolation']['barrier']:.3f} | -"
                                                                      for s in seeds) + " |")
    lines += ["", "Plots: reward.png (training reward), kl_drift.png (exact off-task KL during training), "
              "kl_probes.png (final KL per probe, ES against GRPO), interpolation.png (reward on the line).", ""]
    return "\n".join(lines)


def series(history, key):
    points = [(entry["step"], entry[key]) for entry in history if key in entry]
    return [p[0] for p in points], [p[1] for p in points]


def plots(report: Path, runs: dict) -> None:
    colours = {"es": "C1", "grpo": "C0"}
    for name, key, title in (("reward.png", "reward", "Training reward (population mean for ES)"),
                             ("kl_drift.png", "drift/kl", "Off-task KL(current || base), exact")):
        figure, axis = plt.subplots(figsize=(6, 4))
        for seed, run in runs.items():
            for method in METHODS:
                axis.plot(*series(run[method]["history"], key), color=colours[method], alpha=0.7,
                          label=method.upper() if seed == min(runs) else None)
        axis.set(title=title, xlabel="iteration")
        axis.legend()
        figure.tight_layout()
        figure.savefig(report / name, dpi=100)
        plt.close(figure)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for index, estimator in enumerate(("exact", "sampled")):
        for seed, run in runs.items():
            axes[index].scatter(run["grpo"][f"kl_{estimator}"], run["es"][f"kl_{estimator}"], label=f"seed {seed}")
        low, high = axes[index].get_xlim()
        axes[index].plot([low, high], [low, high], color="grey", linewidth=0.8)
        axes[index].set(title=f"off-task KL per probe ({estimator})", xlabel="GRPO", ylabel="ES")
        axes[index].legend()
    figure.tight_layout()
    figure.savefig(report / "kl_probes.png", dpi=100)
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(6, 4))
    for seed, run in runs.items():
        axis.plot(run["interpolation"]["alphas"], run["interpolation"]["reward"], marker="o", label=f"seed {seed}")
    axis.set(title="Task reward on (1 - a) theta_ES + a theta_GRPO", xlabel="a", ylabel="reward")
    axis.legend()
    figure.tight_layout()
    figure.savefig(report / "interpolation.png", dpi=100)
    plt.close(figure)


def main(args):
    if not 1 <= args.probes <= len(OFF_TASK_PROMPTS):
        raise ValueError(f"probes must be between 1 and {len(OFF_TASK_PROMPTS)}, got {args.probes}.")
    report = Path(args.report_dir)
    report.mkdir(parents=True, exist_ok=True)
    now = settings(args)
    saved = saved_runs(report / "metrics.json", now)  # before the model loads: other settings are refused at once
    base_path = resolve_model(args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(base_path, padding_side="left")
    module, data = TASKS[args.task], task_data(args, tokenizer)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    start = snapshot(base)
    before = task_reward(base, tokenizer, data[1], module, args)
    probes = kl_probes(base, tokenizer, args)
    for seed in args.seeds:
        if seed in saved:
            print(f"seed {seed}: already in {report / 'metrics.json'}", flush=True)
            continue
        saved[seed] = run_seed(seed, args, base, start, base_path, module, data, tokenizer, probes)
        save_runs(report / "metrics.json", {"settings": now, "before": before, "runs": saved})
        print(f"seed {seed}: " + ", ".join(f"{m} accuracy {saved[seed][m]['accuracy']:.3f} format "
                                           f"{saved[seed][m]['format']:.3f}" for m in METHODS), flush=True)
    runs = {seed: saved[seed] for seed in args.seeds}
    plots(report, runs)
    (report / "report.md").write_text(markdown(runs, before, now["es"], args))
    print((report / "report.md").read_text())
    return runs


if __name__ == "__main__":
    use_all_cpu_cores()
    (arguments,) = parse_recipe_args((CompareArguments,), {}, QUICK)
    main(arguments)
