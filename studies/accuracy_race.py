"""The accuracy race: does ES raise held-out accuracy (not format) as much as a GRPO tuned as carefully, in the same
training seconds, and at what off-task drift?

    python studies/accuracy_race.py tune --model SmolLM2-135M-Instruct --labels es-base grpo-lr1e-5   # validation
    python studies/accuracy_race.py race --model SmolLM2-135M-Instruct --labels es-base grpo-lr1e-5 --seeds 1 2 3
    python studies/accuracy_race.py render      # report.md, result.json and plots (accuracy_race_report.py)

Tasks and splits come from ``lightning_es.tasks.generated`` (disjoint by construction). Both methods get the same
training reward, the exact-match accuracy of the final answer, on ``TRAIN_SIZE`` training problems drawn with the
run's seed. Each run trains from the base model for the model's budget of training seconds (``BUDGETS``, fixed in
advance; evaluation excluded) and is scored greedily at the start, at the model's marks and at the end:
``tune`` on the validation split (seed 0 of the settings), ``race`` on the first ``MARK_PROBLEMS`` test problems at
each mark and on the whole test split at the end. Each score carries accuracy, format, the per-problem correctness
string, the exact off-task KL to the base model (the comparison recipe's probes, each followed by the base model's
own greedy answer) and the update's L2 norm, beside the training and CPU seconds. A finished run is appended as one
line to ``runs.jsonl`` (and its final weights' change saved under ``--weights`` for the findings report); a run
asked again is skipped, so a study cut short resumes where it stopped.
"""

import argparse
import json
import logging
import subprocess
import tempfile
import time
from pathlib import Path

from safetensors.torch import save_file
from transformers import AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from accuracy_race_report import render
from lightning_es.drift import DriftProbe, parameter_delta, update_norm
from lightning_es.tasks import generated, gsm8k, prompts_for
from lightning_es.tasks.evaluation import greedy_scores
from lightning_es.tasks.models import resolve_model
from lightning_es.tasks.probes import OFF_TASK_PROMPTS, answered
from trl_ext import ESConfig, ESTrainer
from trl_ext.recipes import use_all_cpu_cores

MODELS = ("SmolLM2-135M-Instruct", "gemma-3-270m")
TASKS = tuple(generated.TASKS)
STYLE, MAX_NEW_TOKENS = "one_line", 32  # docs/reports/accuracy-race/tasks.md
TRAIN_SIZE, VALIDATION_SIZE, TEST_SIZE, MARK_PROBLEMS = 1000, 200, 500, 200
# Fixed before the race: the training seconds of a run, and the marks at which it is scored. SmolLM2: at 480 s (about
# 16 ES iterations of 8 prompts x 16 members, or GRPO steps of 4 x 4) GRPO gained 10 points and ES none; ES's
# horizon pilot (1,500 s, validation every 300 s) gained from about 900 s on (+5.5 points at 1,500 s): the race
# gives both methods 1,500 s, and tuning runs at the race's budget and marks, on validation. Gemma-3-270M takes about
# twice SmolLM2's seconds per ES iteration and three times per GRPO step here (its 262k-token vocabulary):
# 3,000 s, about as many ES iterations as SmolLM2's 1,500 s.
BUDGETS = {"SmolLM2-135M-Instruct": 1500.0, "gemma-3-270m": 3000.0}
MARKS = {"SmolLM2-135M-Instruct": (150, 300, 600, 900, 1200), "gemma-3-270m": (300, 600, 1200, 1800, 2400)}
# A horizon pilot: one configuration on validation for longer than a model's budget, scored every HORIZON_MARK
# seconds, to see whether a method learns at all before the budget is fixed
HORIZON_BUDGET, HORIZON_MARK = 1500.0, 300
PROBE_TOKENS = 32
TUNING_SEED = 0
COMMON = dict(max_completion_length=MAX_NEW_TOKENS, report_to="none", bf16=False, save_strategy="no",
              logging_steps=1, disable_tqdm=True, max_steps=100_000, lr_scheduler_type="constant")
# The candidates, one factor at a time from a base (a label's settings never change: a new setting gets a new label)
ES_BASE = dict(per_device_train_batch_size=8, population_size=16, fitness_shaping="prompt_zscore")
ES_LABELS = {
    "es-base": {},
    "es-lr3e-3": dict(learning_rate=3e-3),
    "es-lr7e-4": dict(learning_rate=7.5e-4),
    "es-prompts16": dict(per_device_train_batch_size=16),
    "es-pop8": dict(population_size=8),
    "es-zscore": dict(fitness_shaping="zscore"),
    # a member at relative_sigma 0.03 answers half the prompts differently from its base (off-task KL 0.076 per token,
    # docs/reports/noise-scale), and the members answered 7-10% of their training problems right where the base
    # answers 13.5% of validation: a third of that noise, for steps read from nearer the base. The step is
    # lr * sum_i f_i eps_i / (N sigma): lr a third as large keeps its size (lr / sigma 0.05, as the base)
    "es-sigma0.01": dict(relative_sigma=0.01, learning_rate=5e-4),
    "es-defaults": None,  # ESConfig's defaults as they stand when the run is made (recorded in the run's settings)
}
GRPO_BASE = dict(per_device_train_batch_size=16, num_generations=4, learning_rate=1e-5, gradient_checkpointing=False)
GRPO_LABELS = {
    "grpo-lr1e-5": {},
    "grpo-lr3e-6": dict(learning_rate=3e-6),
    "grpo-lr3e-5": dict(learning_rate=3e-5),
    "grpo-lr1e-4": dict(learning_rate=1e-4),
    "grpo-temp0.7": dict(temperature=0.7),
    # sampled at TRL's temperature 1.0, SmolLM2 answered 1 of 384 training completions right in 24 steps at lr 1e-5
    # (greedy: 13.5% of validation), and one step's gradient, carried on by Adam's momentum, taught it to answer
    # without the calculation (validation 1.5%): the temperature first
    "grpo-temp0.5": dict(temperature=0.5),
    "grpo-8x8": dict(num_generations=8),
    # at the 1,500 s budget, around temperature 0.7 (the best of the 480 s runs)
    "grpo-temp0.7-lr3e-5": dict(temperature=0.7, learning_rate=3e-5),
    "grpo-temp0.7-lr3e-6": dict(temperature=0.7, learning_rate=3e-6),
    # the shape at the tuned temperature: 2 prompts x 8 completions in the same 16 rows
    "grpo-temp0.7-gen8": dict(temperature=0.7, num_generations=8),
    # Gemma-3-270M tunes the learning rate alone, around SmolLM2's tuned GRPO (ES: es-lr7e-4, es-defaults, es-lr3e-3)
    "grpo-temp0.7-gen8-lr3e-6": dict(temperature=0.7, num_generations=8, learning_rate=3e-6),
    "grpo-temp0.7-gen8-lr3e-5": dict(temperature=0.7, num_generations=8, learning_rate=3e-5),
}

# What each model races, on both tasks (the transfer task takes the main task's settings): ES at ESConfig's defaults;
# GRPO at the best of its tuning on validation (report: "Tuning"). Gemma-3-270M's GRPO is set after its tuning.
RACE_LABELS = {"SmolLM2-135M-Instruct": {"es": "es-defaults", "grpo": "grpo-temp0.7-gen8"},
               "gemma-3-270m": {"es": "es-defaults"}}


def label_settings(label: str) -> tuple[str, dict]:
    """(method, trainer settings) of a run label."""
    if label in GRPO_LABELS:
        return "grpo", {**GRPO_BASE, **GRPO_LABELS[label]}
    if label in ES_LABELS:
        if ES_LABELS[label] is None:
            return "es", {}
        return "es", {**ES_BASE, **ES_LABELS[label]}
    raise SystemExit(f"unknown label {label!r}: one of {sorted(ES_LABELS) + sorted(GRPO_LABELS)}.")


def split(phase: str) -> str:
    """The split a phase scores: validation (tune, horizon) or test (race)."""
    return "test" if phase == "race" else "validation"


def asked(tokenizer, problems):
    """Problems as prompts, as every run asks them (the demonstrations go to a model without a chat template only:
    Gemma-3-270M)."""
    return prompts_for(tokenizer, problems, gsm8k.demonstrations(STYLE))


def held_out(tokenizer, task: str, phase: str):
    """The prompts of the problems a phase scores, the same for every run."""
    size = TEST_SIZE if split(phase) == "test" else VALIDATION_SIZE
    return asked(tokenizer, generated.dataset(task, split(phase), size, seed=0, style=STYLE))


def budget_of(model_name: str, phase: str) -> float:
    """A run's training seconds: the model's race budget, or a horizon pilot's."""
    return HORIZON_BUDGET if phase == "horizon" else BUDGETS[model_name]


def score(model, tokenizer, problems) -> dict:
    """Greedy accuracy and format, with per-problem strings of each (1 right / formatted, 0 not)."""
    marks = {"correct": [], "formatted": []}

    def recorded(name, reward):
        def record(completions, **columns):
            scores = reward(completions, **columns)
            marks[name].extend(int(s) for s in scores)
            return scores
        return record

    greedy_scores(model, tokenizer, problems, {"accuracy": recorded("correct", gsm8k.correctness_reward),
                                               "format": recorded("formatted", gsm8k.format_reward)},
                  MAX_NEW_TOKENS, batch_size=50)
    return summary({name: "".join(map(str, values)) for name, values in marks.items()})


def summary(strings: dict, size: int | None = None) -> dict:
    """Accuracy and format of the first ``size`` problems (all by default) of per-problem strings."""
    strings = {name: strings[name][:size] for name in ("correct", "formatted")}
    count = len(strings["correct"])
    return {"accuracy": strings["correct"].count("1") / count, "format": strings["formatted"].count("1") / count,
            **strings}


class RaceClock(TrainerCallback):
    """Scores the model at the start, at each mark (training seconds) and at the budget, where it stops training;
    counts training wall and CPU seconds only (evaluation excluded). A score has ``accuracy``, ``format`` and
    ``correct`` on ``problems``; in the race, the start and the end score the whole test split (``test_*``), of which
    ``problems`` is the head."""

    def __init__(self, trainer, probe, problems, marks, budget, whole_split=None, start=None):
        self.trainer, self.probe, self.problems, self.whole_split = trainer, probe, problems, whole_split
        self.marks, self.budget = sorted(marks), budget
        self.points = []
        self.start = start
        self.seconds = self.cpu_seconds = 0.0

    def model(self):
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def evaluate(self, step: int, whole: bool = False) -> None:
        """``whole``: the whole test split (the race's start and end), its head standing for the marks' subset."""
        model, tokenizer = self.model(), self.trainer.processing_class
        if step == 0 and self.start is not None:
            scores = dict(self.start)
        elif whole and self.whole_split is not None:
            full = score(model, tokenizer, self.whole_split)
            scores = {**summary(full, len(self.problems)), **{f"test_{name}": value for name, value in full.items()}}
        else:
            scores = score(model, tokenizer, self.problems)
        point = {"step": step, "seconds": round(self.seconds, 2), "cpu_seconds": round(self.cpu_seconds, 2), **scores}
        point["kl"] = float(self.probe.measure(model).compute())
        point["update_norm"] = update_norm(parameter_delta(model, self.probe.reference.of_model(model)))
        self.points.append(point)

    def on_train_begin(self, args, state, control, **kwargs):
        self.evaluate(0, whole=True)
        self._since = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += time.perf_counter() - self._since[0]
        self.cpu_seconds += time.process_time() - self._since[1]
        if self.seconds >= self.budget:
            self.evaluate(state.global_step, whole=True)
            control.should_training_stop = True
        elif self.marks and self.seconds >= self.marks[0]:
            self.evaluate(state.global_step)
            self.marks = [mark for mark in self.marks if mark > self.seconds]
        self._since = time.perf_counter(), time.process_time()


def commit() -> str:
    """The checkout's commit, with "-dirty" if it has uncommitted changes (a run then ran code no commit holds)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def train(model_name: str, task: str, label: str, seed: int, phase: str, start: dict | None, weights: Path) -> dict:
    method, settings = label_settings(label)
    path = resolve_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", truncation_side="left")
    train_data = asked(tokenizer, generated.dataset(task, "train", TRAIN_SIZE, seed=seed, style=STYLE))
    scored = held_out(tokenizer, task, phase)
    trainer_class, config_class = (GRPOTrainer, GRPOConfig) if method == "grpo" else (ESTrainer, ESConfig)
    config = config_class(output_dir=tempfile.mkdtemp(prefix=f"race-{label}-"), seed=seed, **COMMON, **settings)
    trainer = trainer_class(path, [gsm8k.correctness_reward], args=config, train_dataset=train_data,
                            processing_class=tokenizer)
    model = trainer.accelerator.unwrap_model(trainer.model)
    probe = DriftProbe(model, tokenizer, answered(model, tokenizer, max_new_tokens=PROBE_TOKENS), estimator="exact",
                       batch_size=len(OFF_TASK_PROMPTS))
    budget = budget_of(model_name, phase)
    marks = range(HORIZON_MARK, int(budget), HORIZON_MARK) if phase == "horizon" else MARKS[model_name]
    problems = scored.select(range(MARK_PROBLEMS)) if phase == "race" else scored
    clock = RaceClock(trainer, probe, problems, marks, budget,
                      whole_split=scored if phase == "race" else None, start=start)
    trainer.add_callback(clock)
    started = time.perf_counter()
    trainer.train()
    resolved = {name: getattr(config, name) for name in sorted({*settings, *ES_BASE, *GRPO_BASE, "temperature",
                                                                "learning_rate", "beta"}) if hasattr(config, name)}
    if method == "es":
        resolved.update(relative_sigma=config.relative_sigma, perturbation=config.perturbation,
                        perturbation_rank=config.perturbation_rank)
    saved = weights / model_name / task / phase / f"{label}-seed{seed}-{budget:.0f}s.safetensors"
    saved.parent.mkdir(parents=True, exist_ok=True)
    delta = parameter_delta(model, probe.reference.of_model(model))
    save_file({name: tensor.contiguous() for name, tensor in delta.items()}, str(saved))
    history = trainer.state.log_history
    return {"model": model_name, "task": task, "method": method, "label": label, "seed": seed, "phase": phase,
            "settings": resolved, "budget_seconds": budget, "commit": commit(), "marks": clock.points,
            "train_reward": [[e["step"], e["reward"]] for e in history if "reward" in e],
            "no_signal": [e["es/no_signal"] for e in history if "es/no_signal" in e],
            "weights_delta": str(saved), "wall_seconds": round(time.perf_counter() - started, 1)}


def overlap(runs: list[dict]) -> dict[str, int]:
    """Per task raced: test problems whose text, or numbers and answer, occur among the problems any raced run
    trained on or the validation problems (0 by construction; counted, not assumed)."""
    def key(problem):
        return tuple(sorted(problem["numbers"])), problem["answer"]

    counts = {}
    for task in sorted({r["task"] for r in runs if r["phase"] == "race"}):
        seeds = {r["seed"] for r in runs if (r["phase"], r["task"]) == ("race", task)}
        seen = [p for seed in seeds for p in generated.problems(task, "train", TRAIN_SIZE, seed=seed)]
        seen += generated.problems(task, "validation", VALIDATION_SIZE, seed=0)
        texts, keys = {p["question"] for p in seen}, {key(p) for p in seen}
        counts[task] = sum(p["question"] in texts or key(p) in keys
                           for p in generated.problems(task, "test", TEST_SIZE, seed=0))
    return counts


def load_runs(path: Path) -> list[dict]:
    """The saved runs; a last line cut short by a killed write is left out."""
    runs = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"{path}: leaving out a line that is not JSON (a write cut short): {line[:80]}...")
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["tune", "horizon", "race", "render"])
    parser.add_argument("--model", default=MODELS[0], choices=MODELS)
    parser.add_argument("--task", default="word_problems", choices=TASKS)
    parser.add_argument("--labels", nargs="*", default=[])
    parser.add_argument("--seeds", nargs="*", type=int, default=[TUNING_SEED])
    parser.add_argument("--runs", type=Path, default=Path("docs/reports/accuracy-race/runs.jsonl"))
    parser.add_argument("--weights", type=Path, default=Path("outputs/accuracy-race"),
                        help="Where each run's change of the weights is saved (for the findings report).")
    args = parser.parse_args()
    runs = load_runs(args.runs)
    if args.phase == "render":
        render(runs, args.runs.parent, overlap=overlap(runs), labels=RACE_LABELS)
        print(f"wrote {args.runs.parent / 'report.md'} and result.json")
        return
    if args.phase in ("tune", "horizon") and args.seeds != [TUNING_SEED]:
        raise SystemExit(f"{args.phase} runs seed {TUNING_SEED} only; the race runs the others.")
    raced = RACE_LABELS[args.model].values()
    if args.phase == "race" and not set(args.labels) <= set(raced):
        raise SystemExit(f"{args.model} races {sorted(raced)} (RACE_LABELS, set from its tuning), not "
                         f"{sorted(set(args.labels) - set(raced))}.")
    use_all_cpu_cores()
    logging.disable(logging.WARNING)
    args.runs.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for label in args.labels:
            if (split(args.phase), args.model, args.task, label, seed, budget_of(args.model, args.phase)) in {
                    (split(r["phase"]), r["model"], r["task"], r["label"], r["seed"], r["budget_seconds"]) for r in runs}:
                continue  # done (a horizon pilot at the budget is that budget's tuning run)
            start = next((r["marks"][0] for r in runs if (split(r["phase"]), r["model"], r["task"]) ==
                          (split(args.phase), args.model, args.task)), None)
            run = train(args.model, args.task, label, seed, args.phase, start, args.weights)
            with args.runs.open("a") as file:
                file.write(json.dumps(run) + "\n")
            runs.append(run)
            first, last = run["marks"][0], run["marks"][-1]
            print(f"{args.phase} {args.model} {args.task} {label} seed {seed}: {last['step']} steps in "
                  f"{last['seconds']:.0f} s, accuracy {first['accuracy']:.3f} -> {last['accuracy']:.3f}, "
                  f"KL {last['kl']:.3f}, update norm {last['update_norm']:.2f}, wall {run['wall_seconds']:.0f} s",
                  flush=True)


if __name__ == "__main__":
    main()
