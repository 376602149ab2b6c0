"""The accuracy race's report, rebuilt from its saved runs by ``python studies/accuracy_race.py render``: result.json,
report.md and one plot per model and task.

It answers, per model, of the ES setting and the GRPO setting raced, over the seeds both methods ran (paired), on
``word_problems`` (and on ``arithmetic``, the transfer task, under ``"transfer"``):

- ``difference`` (the primary endpoint): does ES raise test accuracy as much as GRPO? Per seed, ES's gain on the whole
  test split (end of the budget minus start) minus GRPO's; its mean, a paired t-interval, and a bootstrap interval
  that resamples the problems as well as the seeds (the test split is a sample of problems too).
- ``time_to_target``: in how many training seconds does each method reach the start accuracy plus 80% of GRPO's mean
  gain (on the problems scored at the marks; linearly between marks; a run that never does counts as its budget)?
- ``kl_at_matched_accuracy``: at the highest accuracy every run reached, how far has each method drifted off-task
  (the exact KL to the base model, linearly between marks)?

The tables list every run of the race and of the tuning; the plots show accuracy against training seconds and
against off-task KL.
"""

import json
import math
import statistics
from pathlib import Path

import mpmath
import numpy as np

MAIN_TASK, TRANSFER_TASK = "word_problems", "arithmetic"
METHODS = ("es", "grpo")
TARGET_SHARE = 0.8  # of GRPO's mean gain: a level GRPO reaches within its budget, not only at its very end
KL_RESOLUTION = 1e-6  # the exact KL estimator's: below it a KL is indistinguishable from none
REPLICATES, BOOTSTRAP_SEED = 10_000, 0
CONFIDENCE = 0.95


def of(runs: list[dict], phase: str, model: str, task: str, label: str | None = None) -> list[dict]:
    """The runs of one phase on (model, task), of one setting if ``label`` is given, by setting and seed."""
    return sorted((r for r in runs if (r["phase"], r["model"], r["task"]) == (phase, model, task)
                   and label in (None, r["label"])), key=lambda r: (r["label"], r["seed"]))


def raced_label(runs: list[dict], model: str, task: str, method: str, given: str | None = None) -> str | None:
    """The setting of ``method`` to compare: ``given``, else the only one raced (None if none was)."""
    if given is not None:
        return given
    labels = sorted({r["label"] for r in of(runs, "race", model, task) if r["method"] == method})
    if len(labels) > 1:
        raise ValueError(f"{model} {task}: {method} raced several settings, {labels}; name the one to compare "
                         f"(labels={{{model!r}: {{{method!r}: ...}}}}).")
    return labels[0] if labels else None


def consistent(group: list[dict], model: str, task: str, label: str) -> list[dict]:
    """``group``, the race runs of one label, if all ran one budget and the same resolved settings (a label such as
    ``es-defaults`` resolves at the commit a run is made: a changed default must not be paired with the old one)."""
    for field in ("budget_seconds", "settings"):
        seen = {json.dumps(r.get(field), sort_keys=True): r["seed"] for r in group}
        if len(seen) > 1:
            raise ValueError(f"{model} {task} {label}: its race runs differ in {field} (e.g. seeds "
                             f"{sorted(seen.values())}); race the seeds again under one, or give the other a new "
                             "label.")
    return group


def paired(runs: list[dict], model: str, task: str, es_label: str, grpo_label: str) -> dict[str, list[dict]]:
    """The race runs of both settings on the seeds both ran, in the same seed order."""
    by_seed = {method: {r["seed"]: r for r in consistent(of(runs, "race", model, task, label), model, task, label)}
               for method, label in zip(METHODS, (es_label, grpo_label))}
    seeds = sorted(by_seed["es"].keys() & by_seed["grpo"].keys())
    return {method: [by_seed[method][seed] for seed in seeds] for method in METHODS}


def whole_split_gain(run: dict) -> float:
    return run["marks"][-1]["test_accuracy"] - run["marks"][0]["test_accuracy"]


def gains_by_problem(run: dict) -> np.ndarray:
    """Per test problem: 1 learned, -1 forgotten, 0 unchanged."""
    start, end = (np.frombuffer(run["marks"][i]["test_correct"].encode(), dtype=np.uint8) for i in (0, -1))
    return end.astype(int) - start.astype(int)


def t_quantile(probability: float, dof: int) -> float:
    """Student's t quantile (``probability`` > 0.5), by bisection on its tail, the regularized incomplete beta function
    (scipy is no dependency of the project; mpmath comes with torch's sympy)."""
    tail = 1 - probability

    def upper_tail(x: float) -> float:  # P(T > x), x >= 0
        return float(mpmath.betainc(dof / 2, 0.5, 0, dof / (dof + x * x), regularized=True)) / 2

    low, high = 0.0, 1.0
    while upper_tail(high) > tail:
        low, high = high, 2 * high
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if upper_tail(middle) > tail else (low, middle)
    return (low + high) / 2


def t_interval(values: list[float]) -> list[float] | None:
    """The t-interval of the mean of ``values``, one per seed (of paired differences: the paired t-interval); None
    for a single seed: no spread to measure."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half = t_quantile((1 + CONFIDENCE) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return [mean - half, mean + half]


def bootstrap_interval(differences: np.ndarray, replicates: int = REPLICATES,
                       seed: int = BOOTSTRAP_SEED) -> list[float]:
    """Percentile interval of the mean paired difference of gains, resampling the seeds and then the problems.

    ``differences``: seeds x problems, ES's gain minus GRPO's on each problem. A replicate draws the problems once for
    every seed: both methods, at their start and end, were scored on the same problems."""
    rng = np.random.default_rng(seed)
    seeds, problems = differences.shape
    drawn_seeds = rng.integers(0, seeds, size=(replicates, seeds))
    # how often each problem is drawn, in a draw of as many problems with replacement
    drawn_problems = rng.multinomial(problems, np.full(problems, 1 / problems), size=replicates)
    per_seed = drawn_problems @ differences.T / problems  # replicates x seeds
    statistic = np.take_along_axis(per_seed, drawn_seeds, axis=1).mean(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(statistic, [tail, 100 - tail])
    return [float(low), float(high)]


def first_crossing(marks: list[dict], level: float, metric: str) -> float | None:
    """``metric`` where accuracy first reaches ``level``, linearly between the marks around it (None: never)."""
    if marks[0]["accuracy"] >= level:
        return marks[0][metric]
    for before, after in zip(marks, marks[1:]):
        if after["accuracy"] >= level:
            share = (level - before["accuracy"]) / (after["accuracy"] - before["accuracy"])
            return before[metric] + share * (after[metric] - before[metric])
    return None


def time_to_reach(run: dict, target: float) -> dict:
    """When ``run`` first reaches ``target``; a run that never does counts as its whole budget. Its last mark falls at
    the first step end past the budget: a crossing there is read at the budget (the accuracy the budget bought)."""
    seconds = first_crossing(run["marks"], target, "seconds")
    reached = seconds is not None
    return {"seed": run["seed"], "reached": reached,
            "seconds": min(seconds, run["budget_seconds"]) if reached else run["budget_seconds"]}


def start_accuracy(pairs: dict[str, list[dict]]) -> float:
    """On the marks' problems: the base model's, the same for every run (greedy decoding)."""
    return statistics.fmean(r["marks"][0]["accuracy"] for method in METHODS for r in pairs[method])


def marks_gain(run: dict) -> float:
    return run["marks"][-1]["accuracy"] - run["marks"][0]["accuracy"]


def time_to_target(pairs: dict[str, list[dict]]) -> dict:
    """Target: the start plus ``TARGET_SHARE`` of GRPO's mean gain on the marks' problems (none if GRPO gained none)."""
    gain = statistics.fmean(marks_gain(r) for r in pairs["grpo"])
    if gain <= 0:
        return {"target": None, "es_reached": None, "grpo_reached": None, "es_median": None, "grpo_median": None,
                "ratio": None, "why": f"GRPO's mean gain on the marks' problems is {gain:+.3f}: no target above "
                                      "the start"}
    target = start_accuracy(pairs) + TARGET_SHARE * gain
    moments = {method: [time_to_reach(r, target) for r in pairs[method]] for method in METHODS}
    medians = {method: statistics.median(m["seconds"] for m in moments[method]) for method in METHODS}
    return {"target": target, "es_reached": sum(m["reached"] for m in moments["es"]),
            "grpo_reached": sum(m["reached"] for m in moments["grpo"]), "es_median": medians["es"],
            "grpo_median": medians["grpo"], "ratio": medians["es"] / medians["grpo"]}


def matched_accuracy(pairs: dict[str, list[dict]]) -> float:
    """The highest accuracy every run of both methods reached (at some mark)."""
    return min(max(p["accuracy"] for p in r["marks"]) for method in METHODS for r in pairs[method])


def kl_at_matched_accuracy(pairs: dict[str, list[dict]]) -> dict:
    level, start = matched_accuracy(pairs), start_accuracy(pairs)
    if level <= start:
        return {"accuracy": None, "es": None, "grpo": None, "ratio": None,
                "why": f"some run never rose above the start accuracy {start:.3f}"}
    medians = {method: statistics.median(first_crossing(r["marks"], level, "kl") for r in pairs[method])
               for method in METHODS}
    ratio = "unbounded" if medians["grpo"] < KL_RESOLUTION else medians["es"] / medians["grpo"]
    return {"accuracy": level, "es": medians["es"], "grpo": medians["grpo"], "ratio": ratio}


def side(group: list[dict]) -> dict:
    """One method's setting, seeds and mean test accuracy over the whole test split."""
    return {"label": group[0]["label"], "settings": group[0]["settings"], "seeds": [r["seed"] for r in group],
            "accuracy_start": statistics.fmean(r["marks"][0]["test_accuracy"] for r in group),
            "accuracy_end": statistics.fmean(r["marks"][-1]["test_accuracy"] for r in group)}


def split_size(pairs: dict[str, list[dict]]) -> int:
    """How many test problems every run was scored on (they must be the same)."""
    counts = {len(r["marks"][i]["test_correct"]) for method in METHODS for r in pairs[method] for i in (0, -1)}
    if len(counts) > 1:
        raise ValueError(f"the paired runs were scored on different numbers of test problems: {sorted(counts)}")
    return counts.pop()


def selected(runs: list[dict], model: str, task: str, labels: dict[str, str] | None = None) -> dict | None:
    """The paired race runs of (model, task) under ``labels`` ({method: label}; a method left out: the only setting
    it raced); None until both methods have raced a seed in common."""
    es_label, grpo_label = (raced_label(runs, model, task, method, (labels or {}).get(method)) for method in METHODS)
    if es_label is None or grpo_label is None:
        return None
    pairs = paired(runs, model, task, es_label, grpo_label)
    return pairs if pairs["es"] else None


def raced(runs: list[dict], labels: dict[str, dict[str, str]] | None = None) -> dict[tuple[str, str], dict]:
    """{(model, task): paired race runs} to compare: each model raced on ``MAIN_TASK`` under ``labels`` ({model:
    {method: label}} for a model whose race has several settings of a method), and its ``TRANSFER_TASK`` once raced
    with the same settings (the transfer asks whether the main task's tuning carries over)."""
    chosen = {}
    for model in dict.fromkeys(r["model"] for r in runs if r["phase"] == "race"):
        main = selected(runs, model, MAIN_TASK, (labels or {}).get(model))
        if main is None:
            continue
        chosen[model, MAIN_TASK] = main
        same = {method: main[method][0]["label"] for method in METHODS}
        transfer = selected(runs, model, TRANSFER_TASK, same)
        if transfer is None:
            continue
        for method in METHODS:
            if transfer[method][0]["settings"] != main[method][0]["settings"]:
                raise ValueError(f"{model}: {TRANSFER_TASK} raced {same[method]} under other settings than "
                                 f"{MAIN_TASK} did; race it again under the main task's.")
        chosen[model, TRANSFER_TASK] = transfer
    return chosen


def comparison(pairs: dict[str, list[dict]], overlap: int = 0) -> dict:
    """The race's result on the paired runs of one (model, task); ``overlap``: its test problems met in training."""
    problems = split_size(pairs)
    differences = [whole_split_gain(e) - whole_split_gain(g) for e, g in zip(pairs["es"], pairs["grpo"])]
    by_problem = np.array([gains_by_problem(e) - gains_by_problem(g) for e, g in zip(pairs["es"], pairs["grpo"])])
    return {"task": pairs["es"][0]["task"], "test_problems": problems, "overlap": overlap,
            "es": side(pairs["es"]), "grpo": side(pairs["grpo"]),
            "difference": {"mean": statistics.fmean(differences), "ci95": t_interval(differences),
                           "bootstrap95": bootstrap_interval(by_problem)},
            "time_to_target": time_to_target(pairs), "kl_at_matched_accuracy": kl_at_matched_accuracy(pairs)}


def result(chosen: dict[tuple[str, str], dict], overlap: dict[str, int] | None = None) -> dict:
    """Per model of ``chosen`` (``raced``'s pairs): its main task's comparison, with the transfer task's under
    ``"transfer"``. ``overlap``: {task: test problems met in training}."""
    results = {}
    for (model, task), pairs in chosen.items():
        entry = comparison(pairs, (overlap or {}).get(task, 0))
        if task == MAIN_TASK:
            results[model] = entry
        else:
            results[model]["transfer"] = entry
    return results


def race_table(runs: list[dict]) -> str:
    lines = ["| model | task | method | label | seed | test accuracy start -> end | gain | steps | KL end | "
             "update norm end |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in sorted((r for r in runs if r["phase"] == "race"),
                      key=lambda r: (r["model"], r["task"], r["method"], r["label"], r["seed"])):
        first, last = run["marks"][0], run["marks"][-1]
        lines.append(f"| {run['model']} | {run['task']} | {run['method']} | {run['label']} | {run['seed']} | "
                     f"{first['test_accuracy']:.3f} -> {last['test_accuracy']:.3f} | {whole_split_gain(run):+.3f} | "
                     f"{last['step']} | {last['kl']:.4g} | {last['update_norm']:.2f} |")
    return "\n".join(lines) + "\n"


def tuning_table(runs: list[dict]) -> str:
    """The validation runs: tuning at the race's budget, and horizon pilots (longer budgets, every mark listed)."""
    lines = ["| model | task | phase | method | label | settings | budget (s) | steps | validation accuracy at the marks "
             "| KL end | update norm end |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in sorted((r for r in runs if r["phase"] in ("tune", "horizon")),
                      key=lambda r: (r["model"], r["task"], r["phase"] != "tune", r["method"], r["label"], r["seed"])):
        last = run["marks"][-1]
        settings = ", ".join(f"{name}={value}" for name, value in run["settings"].items())
        accuracies = " -> ".join(f"{p['accuracy']:.3f}" for p in run["marks"])
        lines.append(f"| {run['model']} | {run['task']} | {run['phase']} | {run['method']} | {run['label']} | "
                     f"{settings} | {run['budget_seconds']:.0f} | {last['step']} | {accuracies} | {last['kl']:.4g} | "
                     f"{last['update_norm']:.2f} |")
    return "\n".join(lines) + "\n"


def mean_curve(group: list[dict]) -> tuple[list[float], list[float], list[float]]:
    """(seconds, accuracy, KL) of the mean over runs at the marks: each run is read at the median seconds of each
    mark, since a run's marks fall at the first step end past them and a long step may skip one."""
    count = max(len(r["marks"]) for r in group)
    seconds = [statistics.median(r["marks"][i]["seconds"] for r in group if len(r["marks"]) > i) for i in range(count)]

    def mean_at_marks(metric: str) -> list[float]:
        return np.mean([np.interp(seconds, [p["seconds"] for p in r["marks"]], [p[metric] for p in r["marks"]])
                        for r in group], axis=0).tolist()

    return seconds, mean_at_marks("accuracy"), mean_at_marks("kl")


def plot(runs: list[dict], model: str, entry: dict, pairs: dict[str, list[dict]], out: Path) -> str:
    """Accuracy against training seconds and against off-task KL: every run of the two settings compared, and their
    means over the paired seeds; returns the file's name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_time, by_kl) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, colour in zip(METHODS, ("C0", "C1")):
        for run in of(runs, "race", model, entry["task"], entry[method]["label"]):
            accuracy = [p["accuracy"] for p in run["marks"]]
            by_time.plot([p["seconds"] for p in run["marks"]], accuracy, color=colour, linewidth=0.7, alpha=0.6)
            by_kl.plot([p["kl"] for p in run["marks"]], accuracy, color=colour, linewidth=0.7, alpha=0.6)
        seconds, accuracy, kl = mean_curve(pairs[method])
        legend = f"{entry[method]['label']}, mean of the {len(pairs[method])} paired seeds"
        by_time.plot(seconds, accuracy, color=colour, linewidth=2.5, marker="o", label=legend)
        by_kl.plot(kl, accuracy, color=colour, linewidth=2.5, marker="o", label=legend)
    by_time.set(title=f"{model}, {entry['task']}", xlabel="training seconds",
                ylabel=f"test accuracy (first {len(pairs['es'][0]['marks'][0]['correct'])} problems)")
    by_kl.set(title=f"{model}, {entry['task']}", xlabel="off-task KL to the base model (exact)",
              ylabel="test accuracy")
    by_time.legend()
    figure.tight_layout()
    name = f"{model}-{entry['task']}.png"
    figure.savefig(out / name, dpi=100)
    plt.close(figure)
    return name


def ratio_text(ratio: float | str) -> str:
    return ratio if isinstance(ratio, str) else f"{ratio:.3g}"


def interval(bounds: list[float] | None) -> str:
    return "n/a (one seed)" if bounds is None else f"[{bounds[0]:+.3f}, {bounds[1]:+.3f}]"


def tuned_as(runs: list[dict], model: str, side_entry: dict) -> str:
    """The tuning runs (validation, ``MAIN_TASK``) that ran a raced setting: the same resolved settings, any label."""
    same = [r for r in runs if r["phase"] in ("tune", "horizon") and (r["model"], r["task"]) == (model, MAIN_TASK)
            and r["settings"] == side_entry["settings"]]
    if not same:
        return "not among the tuning runs"
    return "tuned as " + ", ".join(f"`{r['label']}` ({r['phase']}, {r['budget_seconds']:.0f} s: validation "
                                   f"{r['marks'][0]['accuracy']:.3f} -> {r['marks'][-1]['accuracy']:.3f})"
                                   for r in same)


def in_words(runs: list[dict], model: str, entry: dict, pairs: dict[str, list[dict]]) -> list[str]:
    """The comparison's fields (of the paired runs ``pairs``) as sentences."""
    es, grpo, difference = entry["es"], entry["grpo"], entry["difference"]
    marks_problems = len(pairs["es"][0]["marks"][0]["correct"])
    lines = [f"ES `{es['label']}` against GRPO `{grpo['label']}`, paired over the seeds both ran: "
             f"{', '.join(map(str, es['seeds']))}. Test split: {entry['test_problems']} problems (overlap with "
             f"training: {entry['overlap']}). ES's settings: {tuned_as(runs, model, es)}; GRPO's: "
             f"{tuned_as(runs, model, grpo)}.", "",
             f"- Test accuracy, mean over seeds: ES {es['accuracy_start']:.3f} -> {es['accuracy_end']:.3f}, GRPO "
             f"{grpo['accuracy_start']:.3f} -> {grpo['accuracy_end']:.3f}.",
             f"- **Difference of gains, ES - GRPO** (the primary endpoint): {difference['mean']:+.3f}; 95% paired "
             f"t-interval {interval(difference['ci95'])}; 95% bootstrap interval over seeds and problems "
             f"{interval(difference['bootstrap95'])} (each replicate draws the seeds, and one draw of the problems "
             "for all of them: every run was scored on the same problems)."]
    timing = entry["time_to_target"]
    if timing["target"] is None:
        lines.append(f"- Time to target: n/a, {timing['why']}.")
    else:
        per_seed = {method: ", ".join(f"{m['seconds']:.0f}" + ("" if m["reached"] else " (not reached)")
                                      for m in (time_to_reach(r, timing["target"]) for r in pairs[method]))
                    for method in METHODS}
        lines.append(f"- Time to target accuracy {timing['target']:.3f} (start + {TARGET_SHARE:.0%} of GRPO's mean "
                     f"gain, on the first {marks_problems} test problems): ES reached it in {timing['es_reached']} of "
                     f"{len(es['seeds'])} seeds, median {timing['es_median']:.0f} s ({per_seed['es']}); GRPO in "
                     f"{timing['grpo_reached']}, median {timing['grpo_median']:.0f} s ({per_seed['grpo']}); ES / GRPO "
                     f"{timing['ratio']:.2f} (a run that never reached counts as its budget).")
    matched = entry["kl_at_matched_accuracy"]
    if matched["accuracy"] is None:
        lines.append(f"- Off-task KL at matched accuracy: n/a, {matched['why']}.")
    else:
        lines.append(f"- Off-task KL at matched accuracy {matched['accuracy']:.3f} (the highest every run reached): "
                     f"median ES {matched['es']:.4g}, GRPO {matched['grpo']:.4g}; ES / GRPO "
                     f"{ratio_text(matched['ratio'])}.")
    return lines


def markdown(runs: list[dict], results: dict, chosen: dict[tuple[str, str], dict],
             plots: dict[tuple[str, str], str]) -> str:
    lines = ["# The accuracy race: ES against a tuned GRPO", "",
             "Rebuilt by `python studies/accuracy_race.py render` from `runs.jsonl` (one line per finished run).", ""]
    if not any(r["phase"] == "race" for r in runs):
        lines += ["No race has run yet: only the tuning below.", ""]
    elif not results:
        lines += [f"No model has both methods raced on a common seed of {MAIN_TASK} yet.", ""]
    for model, entry in results.items():
        lines += [f"## {model}", ""]
        for task_entry in (entry, entry.get("transfer")):
            if task_entry is None:
                continue
            role = "the main task" if task_entry["task"] == MAIN_TASK else '`"transfer"` in result.json'
            lines += [f"### {task_entry['task']} ({role})", "", *in_words(runs, model, task_entry, chosen[model, task_entry["task"]]), "",
                      f"![accuracy against training seconds and KL]({plots[model, task_entry['task']]})", ""]
    if any(r["phase"] == "race" for r in runs):
        lines += ["## Every race run", "", race_table(runs)]
    if any(r["phase"] in ("tune", "horizon") for r in runs):
        lines += ["## Tuning and horizon pilots (validation split)", "", tuning_table(runs)]
    return "\n".join(lines)


def render(runs: list[dict], out: Path, overlap: dict[str, int] | None = None,
           labels: dict[str, dict[str, str]] | None = None) -> dict:
    """Writes result.json, report.md and the plots into ``out``; returns the result. ``overlap``: the caller's
    count, per task, of test problems also among the training problems (0 by default: the splits are disjoint by
    construction)."""
    out.mkdir(parents=True, exist_ok=True)
    chosen = raced(runs, labels)
    results = result(chosen, overlap)
    plots = {(model, task_entry["task"]): plot(runs, model, task_entry, chosen[model, task_entry["task"]], out)
             for model, entry in results.items() for task_entry in (entry, entry.get("transfer")) if task_entry}
    (out / "result.json").write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    (out / "report.md").write_text(markdown(runs, results, chosen, plots))
    return results
