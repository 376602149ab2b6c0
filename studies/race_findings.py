"""The four published findings of ES against GRPO, recomputed from the accuracy race's saved runs: no retraining.

    python studies/race_findings.py [--runs docs/reports/accuracy-race/runs.jsonl] [--out docs/reports/accuracy-race]
                                    [--points 5] [--seeds 1 2]

For the runs the race's report compares (``accuracy_race_report.raced``: each model's main task under its raced
settings, and the transfer task under the same), over the seeds both methods ran (paired by seed), from
``runs.jsonl`` and the final weight change each race run saved (``weights_delta``):

1. accuracy parity: ES's gain in test accuracy (whole test split, end of the budget minus start) minus GRPO's, with
   its paired t-interval, against a parity band of +-``PARITY_BAND``; and whether both methods gained at all;
2. larger update norm for ES: the ratio of the L2 norms of the two updates at the end of the budget, per seed (a
   sign test over the seeds);
3. larger off-task KL for ES: the exact KL to the base model at the end of the budget, per seed (a sign test);
4. near-orthogonal updates with no barrier: the cosine between the two saved updates beside the cosine two random
   directions of as many weights have (~N(0, 1/d)) and a sampled one, ES's update against a random Gaussian direction;
   the accuracy barrier along the straight line between the two trained models (greedy, on the marks' problems)
   beside the barrier along the line from GRPO's model to the base moved by a random step of ES's length.

Findings 2-4 are about updates that learned: where not both methods gained measurably, they are reported "untested"
with their figures beside. A seed whose saved updates are absent (``outputs/`` is not in the repository) is left
unmeasured, and said so.

The line's models are scored greedily on the first ``MARK_PROBLEMS`` test problems, as the race scored its marks, so
its end points must reproduce the runs' last marks (checked, per problem). That scoring is the costly part (two
lines of ``--points`` models per seed): each seed's is saved into ``findings.json`` as soon as it is measured, and a
seed already measured on the same saved updates and grid is not measured again, so a run cut short resumes.
Writes ``findings.json`` and ``findings.md`` into ``--out``.
"""

import argparse
import json
import math
import os
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import accuracy_race
from accuracy_race_report import KL_RESOLUTION, METHODS, raced, t_interval, whole_split_gain
from lightning_es.drift import cosine_similarity, linear_connectivity, update_norm
from lightning_es.drift.geometry import check_same_parameters
from trl_ext.recipes import use_all_cpu_cores

ROOT = Path(__file__).resolve().parents[1]  # the race saves its updates' paths relative to the repository
PARITY_BAND = 0.05  # of test accuracy: a gap within it counts as parity
Z_95 = 1.96  # two random unit directions in d dimensions have a cosine of about N(0, 1/d)
NORM_TOLERANCE = 1e-4  # relative: a saved update whose norm is not the run's last recorded one is another run's
SIGN_TEST_LEVEL = 0.05  # one-sided: five seeds of five agreeing (p = 1/32) are the fewest that can decide


# ---- the paired runs ------------------------------------------------------------------------------------------------


def raced_pairs(runs: list[dict]) -> dict[tuple[str, str], dict[str, list[dict]]]:
    """{(model, task): {method: race runs}} on the seeds both methods ran: the pairs the race's report compares."""
    return raced(runs, accuracy_race.RACE_LABELS)


def run_figures(es: dict, grpo: dict) -> dict:
    """A seed's figures read from its two runs' records."""
    end = {method: run["marks"][-1] for method, run in zip(METHODS, (es, grpo))}
    return {"gain_es": whole_split_gain(es), "gain_grpo": whole_split_gain(grpo),
            "norm_es": end["es"]["update_norm"], "norm_grpo": end["grpo"]["update_norm"],
            "kl_es": end["es"]["kl"], "kl_grpo": end["grpo"]["kl"]}


# ---- the verdicts, from the figures ---------------------------------------------------------------------------------


def parity(differences: list[float]) -> dict:
    """Holds when the paired interval of ES's gain minus GRPO's lies inside the band, does not hold when it lies
    wholly beyond one of its edges, and is untested otherwise: the seeds cannot tell."""
    bounds = t_interval(differences)
    if bounds is None:
        return {"verdict": "untested", "ci95": None, "why": "one seed: no interval"}
    low, high = bounds
    if -PARITY_BAND <= low and high <= PARITY_BAND:
        return {"verdict": "holds", "ci95": bounds, "why": f"the interval lies inside the +-{PARITY_BAND} parity band"}
    if low > PARITY_BAND or high < -PARITY_BAND:
        return {"verdict": "does not hold", "ci95": bounds,
                "why": f"the interval lies wholly {'above' if low > PARITY_BAND else 'below'} the +-{PARITY_BAND} "
                       "parity band"}
    reason = (f"is wider than the +-{PARITY_BAND} parity band" if high - low > 2 * PARITY_BAND
              else f"straddles an edge of the +-{PARITY_BAND} parity band")
    return {"verdict": "untested", "ci95": bounds, "why": f"the interval {interval_text(bounds)} {reason}"}


def both_gained(gains_es: list[float], gains_grpo: list[float]) -> dict:
    """Whether each method's mean gain is above zero by its t-interval: the geometry findings mean most where both
    updates learned something."""
    bounds = {"es": t_interval(gains_es), "grpo": t_interval(gains_grpo)}
    gained = {method: None if b is None else b[0] > 0 for method, b in bounds.items()}
    return {"both": all(gained.values()), "gained": gained, "ci95": bounds,
            "means": {"es": statistics.fmean(gains_es), "grpo": statistics.fmean(gains_grpo)}}


def sign_test(larger: int, smaller: int) -> dict:
    """Holds when ES is the larger on significantly many of the seeds that differ (one-sided binomial sign test at
    ``SIGN_TEST_LEVEL``), does not hold when GRPO is, untested otherwise (too few seeds, or no clear side)."""
    seeds = larger + smaller

    def at_least(k: int) -> float:  # P(X >= k), X ~ Binomial(seeds, 1/2)
        return sum(math.comb(seeds, i) for i in range(k, seeds + 1)) / 2 ** seeds

    p_larger, p_smaller = at_least(larger), at_least(smaller)
    verdict = ("holds" if p_larger < SIGN_TEST_LEVEL else "does not hold" if p_smaller < SIGN_TEST_LEVEL
               else "untested")
    return {"verdict": verdict, "p_es_larger": p_larger, "p_grpo_larger": p_smaller}


def larger_norm(norms_es: list[float], norms_grpo: list[float]) -> dict:
    ratios = [e / g if g else None for e, g in zip(norms_es, norms_grpo)]  # None: GRPO did not move
    larger = sum(e > g for e, g in zip(norms_es, norms_grpo))
    smaller = sum(e < g for e, g in zip(norms_es, norms_grpo))
    return {**sign_test(larger, smaller), "es_larger": larger, "grpo_larger": smaller, "seeds": len(ratios),
            "ratios": ratios}


def larger_kl(kls_es: list[float], kls_grpo: list[float]) -> dict:
    """A sign test over the seeds where the two KLs differ by more than the exact estimator resolves."""
    differences = [e - g for e, g in zip(kls_es, kls_grpo)]
    larger = sum(d >= KL_RESOLUTION for d in differences)
    smaller = sum(d <= -KL_RESOLUTION for d in differences)
    return {**sign_test(larger, smaller), "es_larger": larger, "grpo_larger": smaller, "seeds": len(differences),
            "median_es": statistics.median(kls_es), "median_grpo": statistics.median(kls_grpo)}


def if_both_learned(finding: dict, gained: dict) -> dict:
    """``finding`` as measured, "untested" where not both methods gained measurably (its verdict kept as
    ``measured``): the findings compare updates that learned the task."""
    if gained["both"] or finding["verdict"] == "untested":
        return finding
    unsure = " and ".join(m.upper() for m in METHODS if not gained["gained"][m])
    return {**finding, "verdict": "untested", "measured": finding["verdict"],
            "why": f"{unsure} did not gain measurably (the 95% interval of each mean gain must lie above 0; one seed "
                   "gives no interval)"}


def orthogonal(geometries: list[dict]) -> dict:
    """Holds when every seed's cosine is within what two random directions of as many weights give: 95% for the
    seeds together (Bonferroni), so that random directions on five seeds are not called aligned one time in four."""
    cosines = [g["cosine"] for g in geometries]
    if any(math.isnan(c) for c in cosines):
        return {"verdict": "untested", "why": "an update did not move: no direction to compare"}
    widened = statistics.NormalDist().inv_cdf(1 - 0.025 / len(geometries)) / Z_95
    beyond = [g["seed"] for g in geometries if abs(g["cosine"]) >= g["random_band"] * widened]
    if not beyond:
        return {"verdict": "holds", "why": "as orthogonal as two random directions on every seed"}
    return {"verdict": "does not hold",
            "why": "more aligned than two random directions on seed " + ", ".join(
                f"{g['seed']} ({abs(g['cosine']) * math.sqrt(g['weights']):.1f} sd)" for g in geometries
                if g["seed"] in beyond)}


def beyond_one_problem(barrier: float, resolution: float) -> bool:
    """A barrier of exactly one problem is computed as a difference of accuracies: it may come out a rounding above."""
    return barrier > resolution * (1 + 1e-9)


def no_barrier(geometries: list[dict]) -> dict:
    """Holds when no seed's line dips by more than one problem while the line to a random step of ES's length does on
    every seed (else the measurement does not tell ES's update from a random one: untested); does not hold when a
    seed's line dips by more. Untested as well when the line's end points are not the runs' models as scored."""
    resolution = geometries[0]["resolution"]
    astray = [g["seed"] for g in geometries if g["mismatch"] > 1]
    if astray:
        return {"verdict": "untested", "why": f"on seed {', '.join(map(str, astray))} the line's end points answer "
                                              "more than one problem otherwise than the runs' last marks recorded"}
    dipped = [g["seed"] for g in geometries if beyond_one_problem(g["barrier"], resolution)]
    if dipped:
        return {"verdict": "does not hold", "why": f"a barrier beyond one problem ({resolution:.3f}) on seed "
                                                   f"{', '.join(map(str, dipped))}"}
    flat_baseline = [g["seed"] for g in geometries if not beyond_one_problem(g["random_barrier"], resolution)]
    if flat_baseline:
        return {"verdict": "untested",
                "why": f"no barrier beyond one problem ({resolution:.3f}), but none either on the line to a random "
                       f"step of ES's length on seed {', '.join(map(str, flat_baseline))}: there the measurement does "
                       "not tell ES's update from a random one"}
    return {"verdict": "holds", "why": f"no barrier beyond one problem ({resolution:.3f}) on any seed, where the line "
                                       "to a random step of ES's length dips beyond it on every seed"}


def combined(*parts: dict) -> str:
    verdicts = [part["verdict"] for part in parts]
    if "does not hold" in verdicts:
        return "does not hold"
    return "holds" if all(v == "holds" for v in verdicts) else "untested"


# ---- the geometry, from the saved updates ---------------------------------------------------------------------------


def saved_update(run: dict) -> dict[str, torch.Tensor]:
    """A run's final weights minus the base's; refused if its norm is not the one the run recorded at its end."""
    delta = load_file(str(ROOT / run["weights_delta"]))
    norm, recorded = update_norm(delta), run["marks"][-1]["update_norm"]
    if not math.isclose(norm, recorded, rel_tol=NORM_TOLERANCE, abs_tol=1e-12):
        raise ValueError(f"{run['weights_delta']} has norm {norm:.6g}, but the {run['label']} run of seed "
                         f"{run['seed']} recorded {recorded:.6g} at its end: the file is another run's.")
    return delta


def random_direction(layout: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Standard Gaussian tensors of ``layout``'s names and shapes, drawn in name order from ``seed``: a rerun draws
    the same direction."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(layout[name].shape, generator=generator) for name in sorted(layout)}


def scaled_to(direction: dict[str, torch.Tensor], norm: float) -> dict[str, torch.Tensor]:
    """``direction`` scaled in place to the L2 norm ``norm``."""
    factor = norm / update_norm(direction)
    for tensor in direction.values():
        tensor.mul_(factor)
    return direction


def moved(model, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's weights plus ``delta``, written into ``delta`` (a model's worth of memory each line end saves)."""
    check_same_parameters(dict(model.named_parameters()), delta, "the base model", "a saved update")
    for name, parameter in model.named_parameters():
        delta[name].add_(parameter.detach().to(torch.float32))
    return delta


def accuracy_along(model, tokenizer, problems, start: dict, end: dict, grid: list[float]) -> dict:
    """Greedy accuracy at each point of the straight line from ``start`` to ``end``, its barrier, and the per-problem
    answers at its two ends."""
    scores = []

    def accuracy(at) -> float:
        scores.append(accuracy_race.score(at, tokenizer, problems))
        return scores[-1]["accuracy"]

    line = linear_connectivity(model, start, end, accuracy, grid)
    return {"t": line.alphas, "accuracy": line.values, "barrier": line.barrier,
            "ends": [scores[0]["correct"], scores[-1]["correct"]]}


def differing(a: str, b: str) -> int:
    """Problems answered right in one per-problem string and not in the other."""
    return sum(x != y for x, y in zip(a, b, strict=True))


def geometry(model, tokenizer, problems, es: dict, grpo: dict, grid: list[float]) -> dict:
    """A seed's cosine and barriers, each beside its random baseline. ``model`` holds the base weights (kept)."""
    updates = {"es": saved_update(es), "grpo": saved_update(grpo)}
    weights = sum(t.numel() for t in updates["es"].values())
    es_norm = update_norm(updates["es"])
    direction = random_direction(updates["es"], es["seed"])
    cosine, random_cosine = (cosine_similarity(updates["es"], other) for other in (updates["grpo"], direction))
    random_step = moved(model, scaled_to(direction, es_norm))
    ends = {method: moved(model, update) for method, update in updates.items()}  # the updates are spent here
    line = accuracy_along(model, tokenizer, problems, ends["es"], ends["grpo"], grid)
    baseline = accuracy_along(model, tokenizer, problems, random_step, ends["grpo"], grid)
    recorded = [es["marks"][-1]["correct"], grpo["marks"][-1]["correct"]]
    return {"seed": es["seed"], "updates": update_paths(es, grpo), "weights": weights,
            "cosine": cosine, "random_band": Z_95 / math.sqrt(weights), "random_cosine": random_cosine,
            "resolution": 1 / len(problems), "line": line, "barrier": line["barrier"], "random_line": baseline,
            "random_barrier": baseline["barrier"],
            "mismatch": sum(differing(a, b) for a, b in zip(line["ends"], recorded))}


def base_model(model_name: str):
    """The base model as the race's trainers loaded it (TRL's default dtype, float32), and its tokenizer."""
    path = accuracy_race.resolve_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", truncation_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tokenizer


def marks_problems(tokenizer, task: str):
    """The test problems the race scored at its marks, asked as it asked them."""
    return accuracy_race.held_out(tokenizer, task, "race").select(range(accuracy_race.MARK_PROBLEMS))


# ---- the findings ---------------------------------------------------------------------------------------------------


def findings(pair: dict[str, list[dict]], geometries: dict[int, dict]) -> dict:
    """The four findings of one model and task; the fourth over the seeds whose geometry has been measured."""
    seeds = [run["seed"] for run in pair["es"]]
    figures = {seed: run_figures(e, g) for seed, e, g in zip(seeds, pair["es"], pair["grpo"])}
    column = lambda name: [figures[seed][name] for seed in seeds]  # noqa: E731
    measured = [geometries[seed] for seed in seeds if seed in geometries]
    gained = both_gained(column("gain_es"), column("gain_grpo"))
    result = {"seeds": seeds, "per_seed": figures,
              "parity": parity([e - g for e, g in zip(column("gain_es"), column("gain_grpo"))]),
              "both_gained": gained,
              "update_norm": if_both_learned(larger_norm(column("norm_es"), column("norm_grpo")), gained),
              "off_task_kl": if_both_learned(larger_kl(column("kl_es"), column("kl_grpo")), gained),
              "geometry_seeds": [g["seed"] for g in measured]}
    if measured:
        parts = {"orthogonal": orthogonal(measured), "no_barrier": no_barrier(measured)}
        result["orthogonal_no_barrier"] = if_both_learned({"verdict": combined(*parts.values()), **parts}, gained)
    return result


def interval_text(bounds: list[float] | None) -> str:
    return "n/a (one seed)" if bounds is None else f"[{bounds[0]:+.3f}, {bounds[1]:+.3f}]"


def seeds_text(seeds) -> str:
    return ", ".join(map(str, seeds))


def in_words(entry: dict, geometries: dict[int, dict]) -> list[str]:
    """The verdicts as sentences, with the figures they rest on."""
    figures, seeds = entry["per_seed"], entry["seeds"]
    gained, fit = entry["both_gained"], entry["parity"]
    differences = [figures[s]["gain_es"] - figures[s]["gain_grpo"] for s in seeds]
    lines = [f"1. **Accuracy parity (ES's test-accuracy gain within +-{PARITY_BAND} of GRPO's): {fit['verdict']}** "
             f"({fit['why']}). Gain over the whole test split, mean of {len(seeds)} seeds: ES "
             f"{gained['means']['es']:+.3f} {interval_text(gained['ci95']['es'])}, GRPO {gained['means']['grpo']:+.3f} "
             f"{interval_text(gained['ci95']['grpo'])}; ES - GRPO {statistics.fmean(differences):+.3f}, 95% paired "
             f"t-interval {interval_text(fit['ci95'])}."]
    if gained["both"]:
        lines.append("   Both methods gained: each mean gain's 95% interval lies above 0.")
    else:
        unsure = [m.upper() for m in METHODS if not gained["gained"][m]]
        lines.append(f"   Not both methods gained measurably ({' and '.join(unsure)}: the 95% interval of the mean "
                     "gain reaches 0, or there is none): findings 2-4 compare updates that did not both learn, so "
                     "they are untested; their figures follow (what they would say: \"measured\").")
    norm = entry["update_norm"]
    moved_ratios = [r for r in norm["ratios"] if r is not None]
    span = f"{min(moved_ratios):.3g}-{max(moved_ratios):.3g}x" if moved_ratios else "n/a (GRPO did not move)"
    lines.append(f"2. **Larger update norm for ES: {norm['verdict']}{measured_text(norm)}.** ES's L2 norm the larger "
                 f"on {norm['es_larger']} of {norm['seeds']} seeds, GRPO's on {norm['grpo_larger']} (sign test p = "
                 f"{norm['p_es_larger']:.3g}); ES / GRPO {span} (ES median "
                 f"{statistics.median(figures[s]['norm_es'] for s in seeds):.4g}, GRPO "
                 f"{statistics.median(figures[s]['norm_grpo'] for s in seeds):.4g}).")
    kl = entry["off_task_kl"]
    lines.append(f"3. **Larger off-task KL for ES: {kl['verdict']}{measured_text(kl)}.** Exact KL to the base model at "
                 f"the end of the budget: ES the larger on {kl['es_larger']} of {kl['seeds']} seeds (sign test p = "
                 f"{kl['p_es_larger']:.3g}), GRPO on {kl['grpo_larger']} (by "
                 f"at least {KL_RESOLUTION:g}); median ES {kl['median_es']:.4g}, GRPO {kl['median_grpo']:.4g}; per "
                 "seed " + ", ".join(f"{s}: {figures[s]['kl_es']:.4g} / {figures[s]['kl_grpo']:.4g}" for s in seeds)
                 + ".")
    lines.append(geometry_words(entry, geometries))
    return lines


def measured_text(finding: dict) -> str:
    return f" (measured: {finding['measured']})" if "measured" in finding else ""


def listed(geometries: list[dict], name: str, form: str) -> str:
    return ", ".join(format(g[name], form) for g in geometries)


def geometry_words(entry: dict, geometries: dict[int, dict]) -> str:
    if "orthogonal_no_barrier" not in entry:
        return "4. **Near-orthogonal updates with no barrier: not measured yet** (`--seeds`)."
    finding, measured = entry["orthogonal_no_barrier"], [geometries[s] for s in entry["geometry_seeds"]]
    angle, barrier = finding["orthogonal"], finding["no_barrier"]
    coverage = ("" if len(measured) == len(entry["seeds"]) else
                f" Measured on seeds {seeds_text(entry['geometry_seeds'])} of the {len(entry['seeds'])} paired.")
    return (f"4. **Near-orthogonal updates with no barrier: {finding['verdict']}{measured_text(finding)}.**{coverage} "
            "Orthogonality "
            f"{angle['verdict']}: {angle['why']}. Cosine of the two updates per seed "
            f"{listed(measured, 'cosine', '.2g')}; two random directions of d = {measured[0]['weights']:,} weights: "
            f"0 +- {measured[0]['random_band']:.2g} (95%); ES's update against a random Gaussian direction: "
            f"{listed(measured, 'random_cosine', '.2g')}. "
            f"No barrier {barrier['verdict']}: {barrier['why']}. Barrier in accuracy per seed on the line ES-GRPO "
            f"{listed(measured, 'barrier', '.3f')}, on the line from a random step of ES's length to GRPO "
            f"{listed(measured, 'random_barrier', '.3f')}. The line's ends against the runs' last marks: "
            f"{sum(g['mismatch'] for g in measured)} problems answered otherwise.")


FIGURE_COLUMNS = ("seed", "test gain ES", "test gain GRPO", "ES - GRPO", "update norm ES", "update norm GRPO",
                  "ES / GRPO", "KL ES", "KL GRPO", "cosine ES, GRPO", "random band (95%)", "cosine ES, random",
                  "barrier ES-GRPO", "barrier random-GRPO", "resolution (one problem)", "line ends vs the runs")


def figures_table(entry: dict, geometries: dict[int, dict]) -> list[str]:
    """Every paired seed's figures, each geometry figure beside its random baseline."""
    lines = ["| " + " | ".join(FIGURE_COLUMNS) + " |", "|" + " --- |" * len(FIGURE_COLUMNS)]
    for seed, ratio in zip(entry["seeds"], entry["update_norm"]["ratios"]):
        f = entry["per_seed"][seed]
        row = [str(seed), f"{f['gain_es']:+.3f}", f"{f['gain_grpo']:+.3f}", f"{f['gain_es'] - f['gain_grpo']:+.3f}",
               f"{f['norm_es']:.4g}", f"{f['norm_grpo']:.4g}", "n/a" if ratio is None else f"{ratio:.3g}x",
               f"{f['kl_es']:.4g}", f"{f['kl_grpo']:.4g}"]
        g = geometries.get(seed)
        if g is None:
            row += ["not measured"] * 7
        else:
            row += [f"{g['cosine']:.2g}", f"+-{g['random_band']:.2g}", f"{g['random_cosine']:.2g}",
                    f"{g['barrier']:.3f}", f"{g['random_barrier']:.3f}", f"{g['resolution']:.3f}",
                    "reproduced" if g["mismatch"] == 0 else f"{g['mismatch']} problems differ"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def lines_table(entry: dict, geometries: dict[int, dict]) -> list[str]:
    """Accuracy along each measured line (t = 0: ES's model, or the random step; t = 1: GRPO's), each on its own grid
    (a seed measured again with other ``--points`` has another)."""
    measured = [geometries[s] for s in entry["geometry_seeds"]]
    if not measured:
        return []
    lines = ["| seed | line | accuracy at t | barrier |", "| --- | --- | --- | --- |"]
    for g in measured:
        for name, line in (("ES -> GRPO", g["line"]), ("random step -> GRPO", g["random_line"])):
            along = ", ".join(f"{t:g}: {a:.3f}" for t, a in zip(line["t"], line["accuracy"]))
            lines.append(f"| {g['seed']} | {name} | {along} | {line['barrier']:.3f} |")
    return lines


def markdown(entries: dict[str, dict], geometries: dict[str, dict[int, dict]], commits: list[str]) -> str:
    lines = ["# The four published findings of ES against GRPO, from the accuracy race", "",
             "Rebuilt by `python studies/race_findings.py` from `runs.jsonl` and the weight change each race run saved "
             "at the end of its budget, without training anything again"
             + (f" (the runs were made at commit {', '.join(commits)})" if commits else "") + ". Findings 1-3 read "
             "the runs' records; finding 4 loads the base model, measures the cosine between the two saved updates "
             "and scores greedily, on the test problems the race scored at its marks, the models along the straight "
             "line between the two trained models. Each geometry figure stands beside its random baseline: the "
             "cosine two random directions of as many weights have, and the line from GRPO's model to the base "
             "moved by a random Gaussian step of ES's length.", ""]
    if not entries:
        lines += ["No model and task has race runs of both methods on a common seed yet.", ""]
    for key, entry in entries.items():
        lines += [f"## {entry['model']}, {entry['task']}", "",
                  f"ES `{entry['es_label']}` against GRPO `{entry['grpo_label']}`, paired seeds "
                  f"{seeds_text(entry['seeds'])}.", "", *in_words(entry, geometries[key]), "",
                  *figures_table(entry, geometries[key]), "", *lines_table(entry, geometries[key]), ""]
    return "\n".join(lines)


# ---- saving and resuming --------------------------------------------------------------------------------------------


def saved_geometries(path: Path) -> dict[str, dict[int, dict]]:
    """The seeds' geometry already measured, per "model/task"."""
    if not path.exists():
        return {}
    return {key: {int(seed): g for seed, g in entry.get("geometry", {}).items()}
            for key, entry in json.loads(path.read_text()).items()}


def update_paths(es: dict, grpo: dict) -> list[str]:
    return [es["weights_delta"], grpo["weights_delta"]]


def write(out: Path, pairs: dict, geometries: dict[str, dict[int, dict]]) -> dict:
    """findings.json and findings.md from the runs and the geometry measured so far; the JSON is written beside and
    moved over the last, so a run killed while writing keeps the seeds it had saved."""
    entries = {}
    for (model, task), pair in pairs.items():
        key = f"{model}/{task}"
        entries[key] = {"model": model, "task": task, "es_label": pair["es"][0]["label"],
                        "grpo_label": pair["grpo"][0]["label"],
                        **findings(pair, geometries[key]), "geometry": geometries[key]}
    commits = sorted({r["commit"] for pair in pairs.values() for method in METHODS for r in pair[method]})
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "findings.json.partial"
    partial.write_text(json.dumps(entries, indent=1) + "\n")
    os.replace(partial, out / "findings.json")
    (out / "findings.md").write_text(markdown(entries, geometries, commits))
    return entries


def measure(pairs: dict, out: Path, seeds: list[int] | None, points: int) -> dict:
    """Measures the geometry of the chosen seeds (default all) not measured yet on this grid, saving after each."""
    grid = [i / (points - 1) for i in range(points)]
    saved, geometries = saved_geometries(out / "findings.json"), {}
    for (model_name, task), pair in pairs.items():
        key = f"{model_name}/{task}"
        runs = {es["seed"]: (es, grpo) for es, grpo in zip(pair["es"], pair["grpo"])}
        # a saved measurement stands for the updates it was made on: a seed raced again is measured again
        done = geometries[key] = {seed: g for seed, g in saved.get(key, {}).items()
                                  if seed in runs and g["updates"] == update_paths(*runs[seed])}
        todo = [seed for seed in runs if (seeds is None or seed in seeds)
                and (seed not in done or done[seed]["line"]["t"] != grid)]
        absent = [seed for seed in todo if not all((ROOT / path).exists() for path in update_paths(*runs[seed]))]
        if absent:
            print(f"{key}: seeds {seeds_text(absent)} not measured: their saved updates are absent here "
                  "(made on another machine?)", flush=True)
        todo = [seed for seed in todo if seed not in absent]
        if not todo:
            continue
        model, tokenizer = base_model(model_name)
        problems = marks_problems(tokenizer, task)
        for seed in todo:
            done[seed] = geometry(model, tokenizer, problems, *runs[seed], grid)
            write(out, pairs, geometries)
            print(f"{key} seed {seed}: cosine {done[seed]['cosine']:.3g}, barrier {done[seed]['barrier']:.3f} "
                  f"(random step: {done[seed]['random_barrier']:.3f})", flush=True)
    return write(out, pairs, geometries)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("docs/reports/accuracy-race/runs.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("docs/reports/accuracy-race"))
    parser.add_argument("--points", type=int, default=5, help="Models on each line, its two ends included.")
    parser.add_argument("--seeds", nargs="*", type=int, default=None,
                        help="The seeds whose geometry to measure now (default: every paired seed).")
    args = parser.parse_args(argv)
    if args.points < 2:
        parser.error("--points must be at least 2: the line's two ends.")
    entries = measure(raced_pairs(accuracy_race.load_runs(args.runs)), args.out, args.seeds, args.points)
    print(f"wrote {args.out / 'findings.md'} and findings.json ({len(entries)} model and task pairs)")
    return entries


if __name__ == "__main__":
    use_all_cpu_cores()  # the race's thread count: the same sums in the same order, the same greedy answers
    main()
