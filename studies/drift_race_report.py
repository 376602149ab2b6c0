"""The race's report, rebuilt from its saved runs (``drift_race.py render``): result.json, report.md and plots.

Per model, on the GSM8K-style task: the target is the tuned GRPO's final held-out reward (mean over its seeds); each
run's moment is the training seconds at which its held-out reward first reaches the target (linearly between marks;
a run that never does counts as its whole budget, and its KL is read at the end). ``ratio`` = ES's mean seconds / GRPO's
mean seconds; ``kl_ratio`` = ES's mean off-task KL at its moments / GRPO's. On the second task, ``accuracy_ratio`` =
ES's mean held-out accuracy gain at the end of the budget / GRPO's. The random-reward diagnosis (``diagnosis``) goes
into result.json beside them.
"""

import itertools
import json
import statistics
from pathlib import Path

from learning import at_seconds, seconds_to_reach

from lightning_es.tasks.spread import shown

SECOND_TASK = "arithmetic"
STEADY_SHARE = 0.8


def at_budget(run: dict, metric: str) -> float:
    """``metric`` at the end of the run's budget: its last step may end past it, and is not counted. A tuning run,
    scored only at its start and its end, gives its last score (linear from the start would mean nothing)."""
    if run["phase"] == "tune":
        return run["points"][-1][metric]
    return at_seconds(run["points"], run["budget_seconds"], metric)


def moment(run: dict, target: float) -> dict:
    """When ``run`` first reaches ``target`` held-out reward within its budget (else the budget), and its off-task KL
    then."""
    seconds = seconds_to_reach(run["points"], target)
    reached = seconds is not None and seconds <= run["budget_seconds"]
    seconds = seconds if reached else run["budget_seconds"]
    return {"seed": run["seed"], "reached": reached, "seconds": seconds, "kl": at_seconds(run["points"], seconds, "kl")}


def mean_train_reward(run: dict) -> float:
    return statistics.mean(r for _, r in run["train_reward"]) if run["train_reward"] else float("-inf")


def tuned(runs: list[dict], model: str, task: str, method: str) -> list[dict]:
    return [r for r in runs if (r["phase"], r["model"], r["task"], r["method"]) == ("tune", model, task, method)]


def chosen(runs: list[dict], model: str, task: str, method: str) -> str | None:
    """The tuning run (seed 0) of ``method`` with the highest mean training reward."""
    candidates = tuned(runs, model, task, method)
    return max(candidates, key=mean_train_reward)["label"] if candidates else None


def late_train_reward(run: dict) -> float:
    rewards = [r for _, r in run["train_reward"]]
    return statistics.mean(rewards[-max(1, len(rewards) // 3):]) if rewards else float("-inf")


def steadiest(runs: list[dict], model: str, task: str) -> str | None:
    """The ES tuning run that moved its weights least (update norm at the end of its budget) among those whose training
    reward over their last third of iterations came within ``STEADY_SHARE`` of the best ES run's: drift weighed in the
    choice from the weights alone, without the off-task probes or the held-out problems."""
    candidates = tuned(runs, model, task, "es")
    if not candidates:
        return None
    best = max(late_train_reward(r) for r in candidates)
    learned = [r for r in candidates if late_train_reward(r) >= STEADY_SHARE * best]
    return min(learned, key=lambda r: at_budget(r, "update_norm"))["label"]


# raced on every model and task beside the choices: ESConfig's defaults before the race, and the candidate default
# (a larger population: on SmolLM2's tuning it drifted least among the settings that learned as fast on GSM8K, and
# learned fastest on the arithmetic task; added once those tuning runs were in, before any race of it)
ALWAYS_RACED = ("es-before", "es-pop16")


def race_labels(runs: list[dict], model: str, task: str) -> list[str]:
    """What the race runs: the chosen GRPO, the chosen ES, the steadiest ES, and ``ALWAYS_RACED``."""
    labels = [chosen(runs, model, task, "grpo"), chosen(runs, model, task, "es"), steadiest(runs, model, task)]
    return list(dict.fromkeys([label for label in labels if label] + list(ALWAYS_RACED)))


def of(runs: list[dict], phase: str, model: str, task: str, label: str) -> list[dict]:
    """The runs of one setting in one phase, by seed."""
    return sorted((r for r in runs if (r["phase"], r["model"], r["task"], r["label"]) == (phase, model, task, label)),
                  key=lambda r: r["seed"])


def race(runs: list[dict], model: str) -> dict | None:
    """``ratio`` and ``kl_ratio`` on GSM8K, ``accuracy_ratio`` on the second task, with what they are made of."""
    grpo, es = chosen(runs, model, "gsm8k", "grpo"), chosen(runs, model, "gsm8k", "es")
    if grpo is None or es is None:
        return None
    grpo_runs = of(runs, "race", model, "gsm8k", grpo)
    if not grpo_runs or not of(runs, "race", model, "gsm8k", es):
        return None
    target = statistics.mean(at_budget(r, "reward") for r in grpo_runs)
    start = max(r["points"][0]["reward"] for r in grpo_runs)
    result = {"grpo": grpo, "es": es, "target_reward": target, "methods": {}}
    for label in race_labels(runs, model, "gsm8k"):
        moments = [moment(r, target) for r in of(runs, "race", model, "gsm8k", label)]
        if moments:
            result["methods"][label] = {"moments": moments, "reached": sum(m["reached"] for m in moments),
                                        "seconds": statistics.mean(m["seconds"] for m in moments),
                                        "kl": statistics.mean(m["kl"] for m in moments)}
    grpo_moment = result["methods"][grpo]
    if target <= start or not grpo_moment["seconds"] or not grpo_moment["kl"]:
        result.update(ratio=None, kl_ratio=None, why=f"the tuned GRPO ended at {target:.3f}, not above the base "
                      f"model's held-out reward {start:.3f}: every run reaches it at once")
    else:
        for label, summary in result["methods"].items():
            summary["ratio"] = summary["seconds"] / grpo_moment["seconds"]
            summary["kl_ratio"] = summary["kl"] / grpo_moment["kl"]
            # a seed that never reached the target counts as the whole budget: the ratio is then a lower bound
            summary["ratio_is_lower_bound"] = summary["reached"] < len(summary["moments"])
        result.update({k: result["methods"][es][k] for k in ("ratio", "kl_ratio", "ratio_is_lower_bound")})
    result["seeds"] = {label: [m["seed"] for m in summary["moments"]] for label, summary in result["methods"].items()}
    second = accuracy_gain(runs, model)
    if second:
        result.update(second)
    return result


def accuracy_gain(runs: list[dict], model: str) -> dict | None:
    grpo, es = chosen(runs, model, SECOND_TASK, "grpo"), chosen(runs, model, SECOND_TASK, "es")
    if grpo is None or es is None or not of(runs, "race", model, SECOND_TASK, grpo) or not of(
            runs, "race", model, SECOND_TASK, es):
        return None
    gains = {label: [at_budget(r, "accuracy") - r["points"][0]["accuracy"]
                     for r in of(runs, "race", model, SECOND_TASK, label)]
             for label in race_labels(runs, model, SECOND_TASK)}
    gains = {label: values for label, values in gains.items() if values}
    grpo_gain = statistics.mean(gains[grpo])
    second = {"second_task": {"grpo": grpo, "es": es, "accuracy_gain": gains}}
    if grpo_gain <= 0:
        return second | {"accuracy_ratio": None, "accuracy_why": f"the tuned GRPO's accuracy gain is {grpo_gain:.3f}"}
    second["second_task"]["accuracy_ratio"] = {label: statistics.mean(values) / grpo_gain
                                               for label, values in gains.items() if label != grpo}
    return second | {"accuracy_ratio": second["second_task"]["accuracy_ratio"][es]}


def defaults_rule(results: dict) -> dict | None:
    """The rule for ESConfig's new defaults, fixed (stop 24's note) before any Gemma run: ``es-pop16`` replaces
    ``es-before`` if on every model it is no slower (``ratio``), drifts no more (``kl_ratio``) and gains no less
    accuracy (``accuracy_ratio``); ``es-before`` stays if the reverse holds; if they trade off, the lower mean over the
    models of ``ratio`` x ``kl_ratio`` wins. A model's ``accuracy_ratio`` not yet raced leaves the verdict open only
    while speed and drift alone do not already trade off. The geometric mean is given beside the stated (arithmetic)
    one: the ratios' scales differ by orders of magnitude between models whose tuned GRPO barely moves and others."""
    before, candidate = ALWAYS_RACED
    scores = {}
    for model, result in results.items():
        methods = (result or {}).get("methods", {})
        accuracy = (result or {}).get("second_task", {}).get("accuracy_ratio") or {}
        if any(label not in methods or "ratio" not in methods[label] for label in ALWAYS_RACED):
            return None
        scores[model] = {label: {"ratio": methods[label]["ratio"], "kl_ratio": methods[label]["kl_ratio"],
                                 "accuracy_ratio": accuracy.get(label),
                                 "product": methods[label]["ratio"] * methods[label]["kl_ratio"]}
                         for label in ALWAYS_RACED}

    def no_worse(a: str, b: str) -> bool:  # in speed and drift
        return all(s[a][m] <= s[b][m] for s in scores.values() for m in ("ratio", "kl_ratio"))

    def dominates(a: str, b: str) -> bool | None:
        if not no_worse(a, b):
            return False
        accuracies = [(s[a]["accuracy_ratio"], s[b]["accuracy_ratio"]) for s in scores.values()]
        return None if None in sum(accuracies, ()) else all(x >= y for x, y in accuracies)

    verdicts = dominates(candidate, before), dominates(before, candidate)
    if None in verdicts:
        return None
    means = {label: statistics.mean(s[label]["product"] for s in scores.values()) for label in ALWAYS_RACED}
    geometric = {label: statistics.geometric_mean(s[label]["product"] for s in scores.values())
                 for label in ALWAYS_RACED}
    if any(verdicts):
        winner, why = (candidate if verdicts[0] else before), "no worse on every count"
    else:
        winner, why = min(means, key=means.get), "trade-off: lower mean of ratio x kl_ratio"
    return {"scores": scores, "mean_product": means, "geometric_mean_product": geometric,
            "winner": winner, "why": why, "geometric_winner": min(geometric, key=geometric.get)}


def study_rows(runs: list[dict], phase: str, model: str, task: str) -> list[dict]:
    """Every setting run in ``phase`` on (model, task): its scores at the end of the budget over its seeds, and its
    training reward."""
    labels = dict.fromkeys(r["label"] for r in runs if (r["phase"], r["model"], r["task"]) == (phase, model, task))
    rows = []
    for label in labels:
        group = of(runs, phase, model, task, label)
        last = [r["points"][-1] for r in group]
        rows.append({"label": label, "seeds": [r["seed"] for r in group],
                     "mean_train_reward": [mean_train_reward(r) for r in group],
                     **{metric: [at_budget(r, metric) for r in group]
                        for metric in ("reward", "accuracy", "format", "kl", "update_norm")},
                     "iterations": [p["step"] for p in last],
                     "seconds_per_iteration": [p["seconds"] / max(p["step"], 1) for p in last]})
    return sorted(rows, key=lambda row: -statistics.mean(row["mean_train_reward"]))


def diagnosis(runs: list[dict], model: str) -> list[dict]:
    """Update norm and off-task KL after the same iterations with the task's reward and with random numbers, and
    their ratio ``task_over_random`` (means over seeds): near 1, the weights move as far as a random walk takes them,
    whatever the signal adds."""
    rows = []
    diagnosed = [r for r in runs if (r["phase"], r["model"]) == ("diagnose", model)]
    for label in dict.fromkeys(r["label"] for r in diagnosed):
        row = {"label": label, "iterations": diagnosed[0]["points"][-1]["step"]}
        for kind in ("task", "random"):
            group = [r for r in diagnosed if (r["label"], r["reward_kind"]) == (label, kind)]
            row[kind] = {"update_norm": [r["points"][-1]["update_norm"] for r in group],
                         "kl": [r["points"][-1]["kl"] for r in group], "seeds": [r["seed"] for r in group]}
        if row["task"]["kl"] and row["random"]["kl"]:
            row["task_over_random"] = {metric: statistics.mean(row["task"][metric]) / statistics.mean(
                row["random"][metric]) for metric in ("update_norm", "kl")}
        rows.append(row)
    return rows


def plot(runs: list[dict], results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in results if results[m]]
    if not models:
        return
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for axis, model in zip(axes[0], models):
        for colour, label in zip(("C0", "C1", "C2", "C3"), results[model]["methods"]):
            for index, run in enumerate(of(runs, "race", model, "gsm8k", label)):
                axis.plot([p["kl"] for p in run["points"]], [p["reward"] for p in run["points"]], color=colour,
                          alpha=0.7, marker=".", label=label if index == 0 else None)
        axis.axhline(results[model]["target_reward"], color="grey", linewidth=0.8, linestyle="--")
        axis.set(title=f"{model}, GSM8K-style", xlabel="off-task KL to the base model (exact, nats/token)",
                 ylabel="held-out reward")
        axis.legend()
    figure.tight_layout()
    figure.savefig(out / "reward_vs_kl.png", dpi=100)
    plt.close(figure)
    tasks = ("gsm8k", SECOND_TASK)
    figure, axes = plt.subplots(len(tasks), len(models), figsize=(6 * len(models), 8), squeeze=False)
    for column, model in enumerate(models):
        for row, task in enumerate(tasks):
            axis = axes[row][column]
            labels = race_labels(runs, model, task)
            metric = "reward" if task == "gsm8k" else "accuracy"
            for colour, label in zip(("C0", "C1", "C2", "C3"), labels):
                for index, run in enumerate(of(runs, "race", model, task, label)):
                    axis.plot([p["seconds"] for p in run["points"]], [p[metric] for p in run["points"]],
                              color=colour, alpha=0.7, label=label if index == 0 else None)
            axis.set(title=f"{model}, {task}", xlabel="training seconds", ylabel=f"held-out {metric}")
            if axis.has_data():
                axis.legend()
    figure.tight_layout()
    figure.savefig(out / "curves.png", dpi=100)
    plt.close(figure)


WITHDRAWN = ("**Withdrawn; replaced by the accuracy race ([../accuracy-race/](../accuracy-race/)).** Its target was "
             "GRPO's held-out *reward* (accuracy + 0.5 x format), which measured the answer format, not the skill: "
             "on the GSM8K-style task no run answered more than 3 of its 64 held-out problems right at any mark "
             "(0.047). On Gemma-3-270M GRPO at its chosen learning "
             "rate (1e-6) barely moved the weights, so its ratios divide by a GRPO that did nothing; the arithmetic "
             "task's held-out sums were mostly training sums (47 of 64). Kept as the record of what was run: no "
             "figure below is a finding.")


def markdown(runs: list[dict], results: dict, rule: dict | None = None) -> str:
    lines = ["# The race: ES against a tuned GRPO", "", WITHDRAWN, "",
             "Rebuilt by `python studies/drift_race.py render` from `runs.jsonl` (one line per finished run).", ""]
    if rule:
        before, candidate = ALWAYS_RACED
        lines += ["## ESConfig's defaults: the rule", "",
                  f"`{candidate}` replaces `{before}` if on every model it is no slower (`ratio`), drifts no more "
                  "(`kl_ratio`) and gains no less accuracy (`accuracy_ratio`), and the reverse; if they trade off, the "
                  "lower mean over the models of `ratio` x `kl_ratio` wins (fixed before any Gemma run).", "",
                  "| model | setting | ratio | kl_ratio | accuracy_ratio | ratio x kl_ratio |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for model, scores in rule["scores"].items():
            for label, s in scores.items():
                accuracy = "not raced yet" if s["accuracy_ratio"] is None else f"{s['accuracy_ratio']:.2f}"
                lines.append(f"| {model} | {label} | {s['ratio']:.2f} | {s['kl_ratio']:.3g} | {accuracy} | "
                             f"{s['product']:.3g} |")
        lines += ["", "Mean of ratio x kl_ratio: " + ", ".join(
            f"{label} {value:.4g}" for label, value in rule["mean_product"].items())
                  + "; geometric mean: " + ", ".join(
            f"{label} {value:.4g}" for label, value in rule["geometric_mean_product"].items())
                  + f". By the rule: **{rule['winner']}** ({rule['why']}); by the geometric mean: "
                  f"{rule['geometric_winner']}.", ""]
    for model, result in results.items():
        lines += [f"## {model}", ""]
        if result:
            ratio = "`ratio` n/a, `kl_ratio` n/a: " + result["why"] if result["ratio"] is None else (
                f"`ratio` {'at least ' if result['ratio_is_lower_bound'] else ''}{result['ratio']:.2f}, `kl_ratio` "
                f"{result['kl_ratio']:.2f}")
            accuracy = "" if "second_task" not in result else (
                f"; `accuracy_ratio` on {SECOND_TASK} (GRPO {result['second_task']['grpo']}, ES "
                f"{result['second_task']['es']}): " + (result["accuracy_why"] if result["accuracy_ratio"] is None
                                                       else f"{result['accuracy_ratio']:.2f}"))
            lines += [f"GSM8K-style: target {result['target_reward']:.3f} (the held-out reward of GRPO "
                      f"{result['grpo']} at the end of its budget, mean over seeds {result['seeds'][result['grpo']]}); "
                      f"ES: {result['es']}; {ratio}{accuracy}.", "",
                      "| run | seeds reaching the target | seconds to the target, per seed | off-task KL then | "
                      "seconds / GRPO's | KL / GRPO's |", "| --- | --- | --- | --- | --- | --- |"]
            for label, summary in result["methods"].items():
                seconds = ", ".join(f"{m['seconds']:.0f}" + ("" if m["reached"] else " (not reached)")
                                    for m in summary["moments"])
                ratios = (f"{'≥ ' if summary['ratio_is_lower_bound'] else ''}{summary['ratio']:.2f} | "
                          f"{summary['kl_ratio']:.2f}" if "ratio" in summary else "- | -")
                lines.append(f"| {label} | {summary['reached']} of {len(summary['moments'])} | {seconds} | "
                             f"{shown([m['kl'] for m in summary['moments']])} | {ratios} |")
            if "second_task" in result:
                lines += ["", f"{SECOND_TASK}: held-out accuracy gain at the end of the budget, per seed: " + "; ".join(
                    f"{label} {', '.join(f'{g:+.3f}' for g in gains)}"
                    for label, gains in result["second_task"]["accuracy_gain"].items())]
            lines.append("")
        for phase, task in itertools.product(("tune", "race"), ("gsm8k", SECOND_TASK)):
            rows = study_rows(runs, phase, model, task)
            if not rows:
                continue
            what = "tuning, seed 0, scored at the start and end" if phase == "tune" else "the race, scored at the marks"
            lines += [f"### {task}, {what}: every setting at the end of its budget (mean ± sd over seeds)", "",
                      "| run | seeds | mean training reward | held-out reward | accuracy | format | off-task KL | "
                      "update norm | iterations | s / iteration |", "| --- |" + " --- |" * 9]
            for row in rows:
                lines.append(f"| {row['label']} | {','.join(map(str, row['seeds']))} | "
                             + " | ".join(shown(row[k]) for k in ("mean_train_reward", "reward", "accuracy", "format",
                                                                  "kl"))
                             + f" | {shown(row['update_norm'], '.1f')} | {shown(row['iterations'], '.0f')} | "
                             f"{shown(row['seconds_per_iteration'], '.1f')} |")
            lines.append("")
        rows = diagnosis(runs, model)
        if rows:
            lines += ["### Signal or random walk: update norm and off-task KL after the same iterations, with the "
                      "task's reward and with random numbers (mean ± sd over seeds)", "",
                      "z-scored fitness gives every step about the same size whatever the reward: what separates a "
                      "signal from a random walk is how the steps add up over the iterations. A task / random ratio "
                      "near 1: the weights moved as far as random numbers move them.", "",
                      "| setting | iterations | seeds: task; random | update norm: task | random | task / random "
                      "| off-task KL: task | random | task / random |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for row in rows:
                cells = [row["label"], row["iterations"],
                         "; ".join(",".join(map(str, row[kind]["seeds"])) or "none" for kind in ("task", "random"))]
                for metric, digits in (("update_norm", ".1f"), ("kl", ".3f")):
                    cells += [shown(row[kind][metric], digits) if row[kind][metric] else "" for kind in
                              ("task", "random")]
                    cells.append(f"{row['task_over_random'][metric]:.2f}" if "task_over_random" in row else "")
                lines.append("| " + " | ".join(map(str, cells)) + " |")
            lines.append("")
    return "\n".join(lines)


def render(runs: list[dict], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    models = list(dict.fromkeys(r["model"] for r in runs))  # in the order they were first run
    results = {model: race(runs, model) for model in models}
    headline = ("ratio", "kl_ratio", "accuracy_ratio")
    summary = {model: {k: result.get(k) for k in headline} | result for model, result in results.items() if result}
    for model in models:
        if rows := diagnosis(runs, model):
            summary.setdefault(model, {})["diagnosis"] = rows
    rule = defaults_rule(results)
    if rule:
        summary["defaults_rule"] = rule
    (out / "result.json").write_text(json.dumps(summary, indent=1))
    (out / "report.md").write_text(markdown(runs, results, rule))
    plot(runs, results, out)
    print((out / "report.md").read_text())
    return summary
