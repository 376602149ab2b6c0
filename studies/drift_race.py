"""The race: ES against a tuned GRPO, in training seconds to a held-out reward and in off-task drift at that moment.

    python studies/drift_race.py tune --model SmolLM2-135M-Instruct --task gsm8k   # GRPO's lr grid, ES's candidates
    python studies/drift_race.py race --model SmolLM2-135M-Instruct --task gsm8k   # seeds 1-3 of the chosen ones
    python studies/drift_race.py diagnose --model SmolLM2-135M-Instruct            # real against random reward
    python studies/drift_race.py render                                            # report from the saved runs

Every run trains one method from the base model for a budget of training seconds fixed per model in advance
(``BUDGETS``); held-out accuracy, format and reward (greedy, the same problems for every run) and the exact off-task
KL to the base model (the comparison recipe's probes, each followed by the base model's greedy answer) are measured
at the start and every ``MARKS`` seconds of training; evaluation time is not counted. A finished run is appended as
one JSON line to ``--runs`` and skipped when asked again, so a study cut short resumes where it stopped.

Tuning (seed 0, scored at the start and the end only) picks GRPO's AdamW learning rate and batch shape from
``GRPO_GRID`` / ``GRPO_1X8`` and ES's settings from ``ES_CANDIDATES``, each by its mean training reward over the
budget (the logged ``reward``), never by held-out problems. The race runs both choices on seeds 1, 2 and 3, scored
at the marks, and beside them the steadiest ES setting (the least update norm among those that learned:
``drift_race_report.steadiest``) and ``drift_race_report.ALWAYS_RACED`` (``es-before``, ESConfig's defaults before the
race, and the candidate default); the diagnosis runs those ES settings for the same iterations with the task's reward
and with random numbers. ``render`` writes ``result.json`` (per model:
``ratio``, ``kl_ratio``, ``accuracy_ratio``), ``report.md`` and the plots.
"""

import argparse
import itertools
import json
import logging
import math
import random
import tempfile
import time
from pathlib import Path

from drift_race_report import ALWAYS_RACED, chosen, mean_train_reward, race_labels, render, steadiest
from learning import REWARD_WEIGHTS, HeldOutCurve, demonstrations, task
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from lightning_es.drift import DriftProbe, parameter_delta, update_norm
from lightning_es.tasks import prompts_for
from lightning_es.tasks.models import resolve_model
from lightning_es.tasks.probes import OFF_TASK_PROMPTS, answered
from trl_ext import ESConfig, ESTrainer
from trl_ext.recipes import use_all_cpu_cores

MODELS = ("SmolLM2-135M-Instruct", "gemma-3-270m")
TASKS = ("gsm8k", "arithmetic")
# Fixed in advance, per model: the training seconds of a run, and the marks (training seconds) at which the race's
# runs are scored: dense early, where GRPO at a learning rate that learns reaches its reward (64 held-out problems
# cost about four ES iterations to score here, so marks are not free)
BUDGETS = {"SmolLM2-135M-Instruct": 180.0, "gemma-3-270m": 300.0}
MARKS = {"SmolLM2-135M-Instruct": (20, 40, 60, 90, 120, 150, 165), "gemma-3-270m": (30, 60, 90, 120, 180, 240, 270)}
EVAL_SIZE = 64
# held-out problems of the race's own: the earlier studies chose ES's settings on problems of learning.EVAL_SEED
EVAL_SEED = 2_000_003
TRAIN_SIZE = 256
PROBE_TOKENS = 32
TUNING_SEED = 0
SEEDS = (1, 2, 3)  # the race's, apart from the tuning seed, so that no run counts both in a choice and in the race
COMMON = dict(max_completion_length=24, report_to="none", bf16=False, save_strategy="no", logging_steps=1,
              disable_tqdm=True, reward_weights=REWARD_WEIGHTS, max_steps=10_000)
# GRPO on TRL's defaults (fp32 and no gradient checkpointing, the fastest on a CPU; beta 0, no reference model;
# the linear schedule over max_steps=10_000 is constant within a budget) in two shapes: 2 prompts x 4 completions,
# as ES's 2 prompts, over the learning-rate grid, and TRL's 1 prompt x 8 completions at two rates of the grid
GRPO_SHAPES = {"": dict(per_device_train_batch_size=8, num_generations=4),
               "1x8-": dict(per_device_train_batch_size=8, num_generations=8)}
GRPO_GRID = (1e-6, 1e-5, 3e-5, 1e-4, 3e-4)
GRPO_1X8 = (3e-5, 1e-4)
# ES: ESConfig's defaults before the race, then the study's levers, one at a time where they can be
ES_BEFORE = dict(population_size=8, per_device_train_batch_size=2, relative_sigma=0.03, relative_learning_rate=1.5e-3,
                 fitness_shaping="zscore", lr_scheduler_type="constant")
ES_CANDIDATES = {
    "es-before": {},
    "es-lr3e-3": dict(relative_learning_rate=3e-3),
    "es-pop16": dict(population_size=16),
    "es-prompts4": dict(per_device_train_batch_size=4),
    # evidence_zscore needs prompts to read the chance spread from; at 2 it takes no step (issue 18)
    "es-prompts4-evidence": dict(per_device_train_batch_size=4, fitness_shaping="evidence_zscore"),
    # what the first race suggested: evidence shaping drifted least but learned slowly, so a larger step where
    # it takes one (the shrinkage keeps steps without evidence small)
    "es-prompts4-evidence-lr3e-3": dict(per_device_train_batch_size=4, fitness_shaping="evidence_zscore",
                                        relative_learning_rate=3e-3),
    "es-anchor": dict(es_anchor_decay=20.0),
    "es-beta": dict(beta=0.1),
    # a decaying step that needs no max_steps: 4 iterations of warm-up to 6e-3, then 6e-3 * sqrt(4 / iteration)
    "es-lr6e-3-invsqrt": dict(relative_learning_rate=6e-3, lr_scheduler_type="inverse_sqrt", warmup_steps=4),
    # absolute units, ESConfig's defaults before relative noise
    "es-absolute": dict(relative_sigma=None, relative_learning_rate=None, sigma=1e-2, learning_rate=1e-4),
}


def grpo_label(learning_rate: float, shape: str = "") -> str:
    return f"grpo-{shape}lr{learning_rate:.0e}".replace("e-0", "e-")


def label_settings(label: str) -> tuple[str, dict]:
    """(method, trainer settings) of a run label: ``grpo-[1x8-]lr<value>`` or an ES candidate."""
    if label.startswith("grpo-"):
        shape, _, learning_rate = label.removeprefix("grpo-").rpartition("lr")
        return "grpo", {**GRPO_SHAPES[shape], "learning_rate": float(learning_rate), "gradient_checkpointing": False}
    settings = {**ES_BEFORE, **ES_CANDIDATES[label]}
    return "es", {k: v for k, v in settings.items() if v is not None}


class RandomReward:
    """A reward of random numbers, seeded: what ES does with no signal at all."""

    __name__ = "random_reward"

    def __init__(self, seed: int):
        self.random = random.Random(seed)

    def __call__(self, completions, **kwargs):
        return [self.random.random() for _ in completions]


class DriftCurve(HeldOutCurve):
    """HeldOutCurve plus, at each mark, the exact off-task KL to the base model and the update's L2 norm, both from
    the probe's one copy of the start weights; without ``held_out`` problems, only those two."""

    def __init__(self, trainer, probe: DriftProbe, held_out, *args, **kwargs):
        self.probe = probe
        super().__init__(trainer, held_out, *args, **kwargs)

    def evaluate(self, step: int) -> None:
        if self.held_out is not None:
            super().evaluate(step)
        else:
            self.points.append({"step": step, "seconds": round(self.training_seconds, 2)})
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        self.points[-1]["kl"] = float(self.probe.measure(model).compute())
        self.points[-1]["update_norm"] = update_norm(parameter_delta(model, self.probe.reference.of_model(model)))


def train(model_name: str, task_name: str, label: str, seed: int, phase: str, start: dict | None,
          random_reward: bool = False, max_steps: int | None = None) -> dict:
    """One run. ``tune``: scored at the start and the end of the budget; ``race``: also at the model's marks;
    ``diagnose``: ``max_steps`` iterations, off-task KL and update norm only. ``start``: the base model's scores
    (greedy, the same for every run of a model and task) when known."""
    method, settings = label_settings(label)
    path = resolve_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", truncation_side="left")
    train_data, held_out, rewards = task(task_name, TRAIN_SIZE, EVAL_SIZE, eval_seed=EVAL_SEED)
    reward_funcs = [RandomReward(seed)] if random_reward else list(rewards.values())
    trainer_class, config_class = (GRPOTrainer, GRPOConfig) if method == "grpo" else (ESTrainer, ESConfig)
    common = {**COMMON, "max_steps": max_steps or COMMON["max_steps"]}
    if random_reward:
        common["reward_weights"] = None
    config = config_class(output_dir=tempfile.mkdtemp(prefix=f"race-{label}-"), seed=seed, **common, **settings)
    # a base model (Gemma-3-270M) is shown two answered problems of the task first, without which it marks none of its
    # answers and neither method has a reward to learn from (SmolLM2 keeps its chat template)
    shown = demonstrations(task_name)
    trainer = trainer_class(path, reward_funcs, args=config, train_dataset=prompts_for(tokenizer, train_data, shown),
                            processing_class=tokenizer)
    model = trainer.accelerator.unwrap_model(trainer.model)
    probe = DriftProbe(model, tokenizer, answered(model, tokenizer, max_new_tokens=PROBE_TOKENS), estimator="exact",
                       batch_size=len(OFF_TASK_PROMPTS))
    scored = None if phase == "diagnose" else prompts_for(tokenizer, held_out, shown)
    curve = DriftCurve(trainer, probe, scored, rewards, at_seconds=MARKS[model_name] if phase == "race" else (),
                       budget_seconds=None if max_steps else BUDGETS[model_name],
                       max_new_tokens=COMMON["max_completion_length"], start=start)
    trainer.add_callback(curve)
    started, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    history = trainer.state.log_history
    return {"model": model_name, "task": task_name, "label": label, "method": method, "seed": seed, "phase": phase,
            "reward_kind": "random" if random_reward else "task", "settings": settings,
            "budget_seconds": BUDGETS[model_name], "eval_seed": EVAL_SEED, "points": curve.points,
            "train_reward": [[e["step"], e["reward"]] for e in history if "reward" in e],
            # seconds per step as the trainer logs them, and CPU seconds beside wall seconds: a run that shared the
            # machine shows as CPU time well below twice its wall time on these 2 cores
            "step_seconds": [e["step_time"] for e in history if "step_time" in e],
            "wall_seconds": round(time.perf_counter() - started, 1),
            "cpu_seconds": round(time.process_time() - cpu, 1)}


def load_runs(path: Path) -> list[dict]:
    """The saved runs; a last line cut short by a killed write is left out."""
    runs = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"{path}: leaving out a line that is not JSON (a write cut short): {line[:80]}...")
    return runs


def key(run: dict) -> tuple:
    return run["phase"], run["model"], run["task"], run["label"], run["seed"], run["reward_kind"]


def tuning_labels() -> list[str]:
    grid = [grpo_label(lr) for lr in sorted(GRPO_GRID, key=lambda lr: abs(math.log(lr / 1e-4)))]
    grid += [grpo_label(lr, "1x8-") for lr in GRPO_1X8]
    # interleaved, the likeliest choices first, so that a slow phase of the machine or a cut session hits both
    return [label for pair in itertools.zip_longest(grid, ES_CANDIDATES) for label in pair if label]


def planned(phase: str, model: str, task_name: str, runs: list[dict], labels: list[str] | None,
            seeds: tuple[int, ...] = SEEDS) -> list[tuple]:
    """(task, label, seed, reward kind) of each run of ``phase``, in the order they run. The race and the diagnosis
    start only once the tuning they race is complete (``labels``: the tuning runs asked for, default all)."""
    if phase == "tune":
        return [(task_name, label, TUNING_SEED, "task") for label in tuning_labels()]
    tuning_task = task_name if phase == "race" else "gsm8k"
    tuned = {r["label"] for r in runs if (r["phase"], r["model"], r["task"]) == ("tune", model, tuning_task)}
    missing = [label for label in labels or tuning_labels() if label not in tuned]
    if missing:
        raise SystemExit(f"{phase}: tune {model} on {tuning_task} first (missing: {', '.join(missing)}).")
    if phase == "race":
        return [(task_name, label, seed, "task") for seed in seeds for label in race_labels(runs, model, task_name)]
    labels = dict.fromkeys([*ALWAYS_RACED, chosen(runs, model, "gsm8k", "es"), steadiest(runs, model, "gsm8k")])
    return [("gsm8k", label, seed, kind) for seed in seeds for label in labels for kind in ("task", "random")]


def check_unchanged(runs: list[dict]) -> None:
    """A saved run counts only while its label still means the same settings and budget."""
    for run in runs:
        now = label_settings(run["label"])[1], BUDGETS[run["model"]], EVAL_SEED
        if (run["settings"], run["budget_seconds"], run.get("eval_seed")) != now:
            raise SystemExit(f"{run['label']} ({run['model']}, {run['task']}, seed {run['seed']}) was run with "
                             f"{run['settings']}, budget {run['budget_seconds']}, held-out seed "
                             f"{run.get('eval_seed')}; "
                             f"it now means {now}: move the old runs aside or give the new settings a new label.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["tune", "race", "diagnose", "render"])
    parser.add_argument("--model", default=MODELS[0], choices=MODELS)
    parser.add_argument("--task", default="gsm8k", choices=TASKS)
    parser.add_argument("--labels", nargs="*", help="Only the phase's runs of these labels (tune: the settings to try; "
                        "race, diagnose: the tuning runs to choose from).")
    parser.add_argument("--seeds", nargs="*", type=int, default=SEEDS, choices=SEEDS,
                        help="race, diagnose: only these of the race's seeds (a study split over sessions).")
    parser.add_argument("--diagnose_steps", type=int, default=20, help="Iterations of each diagnosis run.")
    parser.add_argument("--runs", default="docs/reports/drift-race/runs.jsonl")
    parser.add_argument("--out", default="docs/reports/drift-race")
    args = parser.parse_args()
    runs_path = Path(args.runs)
    runs_path.parent.mkdir(parents=True, exist_ok=True)
    if args.phase == "render":
        return render(load_runs(runs_path), Path(args.out))
    use_all_cpu_cores()
    logging.disable(logging.WARNING)
    runs = load_runs(runs_path)
    check_unchanged(runs)
    if args.labels and args.phase != "tune":
        runs = [r for r in runs if r["phase"] != "tune" or r["label"] in args.labels]
    done = {key(r) for r in runs}
    for task_name, label, seed, kind in planned(args.phase, args.model, args.task, runs, args.labels,
                                                   tuple(args.seeds)):
        if (args.phase == "tune" and args.labels and label not in args.labels) or (
                args.phase, args.model, task_name, label, seed, kind) in done:
            continue
        start = next((r["points"][0] for r in runs if (r["model"], r["task"]) ==
                      (args.model, task_name) and "accuracy" in r["points"][0]), None)
        run = train(args.model, task_name, label, seed, args.phase, start, random_reward=kind == "random",
                    max_steps=args.diagnose_steps if args.phase == "diagnose" else None)
        with runs_path.open("a") as file:
            file.write(json.dumps(run) + "\n")
        runs.append(run)
        first, last = run["points"][0], run["points"][-1]
        scores = (f"reward {first['reward']:.3f} -> {last['reward']:.3f}, accuracy {last['accuracy']:.3f}, "
                  if "reward" in last else "")
        print(f"{args.phase} {args.model} {task_name} {label} seed {seed} ({kind} reward): {last['step']} steps, "
              f"{last['seconds']:.0f} s, {scores}KL {last['kl']:.3f}, update norm {last['update_norm']:.1f}, "
              f"mean training reward {mean_train_reward(run):.3f}, wall {run['wall_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
