"""The accuracy race's report (``studies/accuracy_race_report.py``) on made-up runs with known answers: its intervals,
when a run reaches the target, the KL at matched accuracy, which seeds it pairs, and what render writes."""

import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

STUDIES = Path(__file__).resolve().parents[1] / "studies"
sys.path.insert(0, str(STUDIES))

from accuracy_race_report import (  # noqa: E402
    bootstrap_interval, comparison, kl_at_matched_accuracy, paired, raced, render, result, t_quantile, time_to_target,
)

pytestmark = pytest.mark.study

MODEL = "m"
PNG = b"\x89PNG\r\n\x1a\n"


def run(method, seed, accuracy=(0.1, 0.1), kl=None, seconds=None, start="0" * 10, end="0" * 10,
        task="word_problems", phase="race", label=None, budget=40.0, model=MODEL):
    """A run scored at ``seconds`` (every 10 s by default) with ``accuracy`` on the marks' problems and ``kl``; in the
    race its start and end carry the per-problem strings ``start`` and ``end`` of the whole test split."""
    seconds = seconds or [10.0 * i for i in range(len(accuracy))]
    kl = kl or [0.01 * i for i in range(len(accuracy))]
    marks = [{"step": 3 * i, "seconds": s, "cpu_seconds": 2 * s, "accuracy": a, "format": 1.0,
              "correct": "1" * round(10 * a) + "0" * (10 - round(10 * a)), "formatted": "1" * 10, "kl": k,
              "update_norm": 0.5 * i} for i, (s, a, k) in enumerate(zip(seconds, accuracy, kl))]
    if phase == "race":
        for point, correct in ((marks[0], start), (marks[-1], end)):
            point.update(test_accuracy=correct.count("1") / len(correct), test_format=1.0, test_correct=correct)
    return {"model": model, "task": task, "method": method, "label": label or f"{method}-x", "seed": seed,
            "phase": phase, "settings": {"learning_rate": 1e-3 if method == "es" else 1e-5}, "budget_seconds": budget,
            "commit": "abc", "marks": marks}


def ones(count, size=10, offset=0):
    return "".join("1" if offset <= i < offset + count else "0" for i in range(size))


def pairs_of(runs):
    return paired(runs, MODEL, "word_problems", "es-x", "grpo-x")


def test_the_t_quantile_matches_its_closed_forms():
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-12)
    assert t_quantile(0.975, 2) == pytest.approx(0.95 * math.sqrt(2 / (4 * 0.975 * 0.025)), rel=1e-12)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.959964, abs=1e-3)  # the normal's, nearly


def test_the_difference_of_gains_has_a_paired_t_interval_with_n_minus_1_degrees_of_freedom():
    # ES gains 0.3, 0.4, 0.8 on the test split, GRPO 0.1 each: differences 0.2, 0.3, 0.7
    runs = [run("es", seed, end=ones(count)) for seed, count in ((1, 3), (2, 4), (3, 8))]
    runs += [run("grpo", seed, end=ones(1)) for seed in (1, 2, 3)]
    entry = comparison(pairs_of(runs))
    differences = [0.2, 0.3, 0.7]
    mean, sd = sum(differences) / 3, math.sqrt(sum((d - 0.4) ** 2 for d in differences) / 2)
    half = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025)) * sd / math.sqrt(3)  # t(0.975, 2 dof) in closed form
    assert entry["difference"]["mean"] == pytest.approx(mean)
    assert entry["difference"]["ci95"] == pytest.approx([mean - half, mean + half])
    assert entry["es"]["accuracy_start"] == 0 and entry["es"]["accuracy_end"] == pytest.approx(0.5)
    assert entry["grpo"]["accuracy_end"] == pytest.approx(0.1) and entry["test_problems"] == 10


def test_one_seed_has_no_t_interval_but_a_bootstrap_over_its_problems():
    entry = comparison(pairs_of([run("es", 1, end=ones(5)), run("grpo", 1, end=ones(2))]))
    assert entry["difference"]["ci95"] is None
    low, high = entry["difference"]["bootstrap95"]
    assert low < 0.3 < high


def differences_by_problem(es_counts, grpo_counts, grpo_offset, size=200):
    """Per seed, ES's gain minus GRPO's on each of ``size`` problems (none right at the start)."""
    return np.array([[int(a) - int(b) for a, b in zip(ones(e, size), ones(g, size, grpo_offset))]
                     for e, g in zip(es_counts, grpo_counts)])


def test_the_bootstrap_interval_holds_the_mean_and_narrows_when_the_problems_agree():
    # the same mean difference (0.1) per seed: GRPO's learned problems among ES's (they agree), or apart from them
    agreeing = differences_by_problem([40, 44, 36], [20, 24, 16], grpo_offset=0)
    apart = differences_by_problem([40, 44, 36], [20, 24, 16], grpo_offset=100)
    for differences in (agreeing, apart):
        low, high = bootstrap_interval(differences)
        assert low < differences.mean() < high
    assert np.ptp(bootstrap_interval(agreeing)) < 0.8 * np.ptp(bootstrap_interval(apart))


def test_the_bootstrap_resamples_the_seeds_too():
    # every problem agrees within a seed, the seeds differ: an interval over problems alone would be a point
    differences = np.array([[1] * 50, [0] * 50, [-1] * 50])
    low, high = bootstrap_interval(differences)
    assert low < -0.3 and high > 0.3


def test_the_bootstrap_is_reproducible():
    differences = differences_by_problem([40, 44, 36], [20, 24, 16], grpo_offset=30)
    assert bootstrap_interval(differences) == bootstrap_interval(differences)
    # the percentiles of 10,000 replicates barely move with the seed: those of 100 do, if the draws depend on it
    assert bootstrap_interval(differences, replicates=100) != bootstrap_interval(differences, replicates=100, seed=1)


def test_time_to_target_is_interpolated_between_marks_and_a_run_that_never_reaches_counts_as_its_budget():
    # GRPO gains 0.5 on every seed: target 0.1 + 0.8 x 0.5 = 0.5
    grpo = [(0.1, 0.3, 0.6), (0.1, 0.35, 0.6), (0.1, 0.6, 0.6)]  # reach 0.5 at 16.67, 16 and 8 s
    es = [(0.1, 0.2, 0.3), (0.1, 0.3, 0.7), (0.1, 0.9, 0.9)]  # never (the budget, 40 s), 15 and 5 s
    runs = [run("grpo", seed, accuracy) for seed, accuracy in enumerate(grpo)]
    runs += [run("es", seed, accuracy) for seed, accuracy in enumerate(es)]
    timing = time_to_target(pairs_of(runs))
    assert timing["target"] == pytest.approx(0.5)
    assert (timing["es_reached"], timing["grpo_reached"]) == (2, 3)
    assert timing["es_median"] == pytest.approx(15) and timing["grpo_median"] == pytest.approx(16)
    assert timing["ratio"] == pytest.approx(15 / 16)
    # the last mark falls at the first step end past the budget: a crossing there is read at the budget
    late = [run("es", seed, accuracy, budget=18.0) for seed, accuracy in enumerate(es)]
    timing = time_to_target(pairs_of(runs[:3] + late))
    assert timing["es_reached"] == 2 and timing["es_median"] == pytest.approx(15)
    last = [run("es", 0, (0.1, 0.2, 0.5), budget=18.0)]  # reaches 0.5 at its last mark, 20 s: past the budget
    assert time_to_target(pairs_of(runs[:1] + last)) | {"target": None} == {
        "target": None, "es_reached": 1, "grpo_reached": 1, "es_median": 18.0,
        "grpo_median": pytest.approx(50 / 3), "ratio": pytest.approx(18 / (50 / 3))}


def test_no_target_when_grpo_gained_nothing():
    runs = [run("grpo", 0, (0.3, 0.4, 0.3)), run("es", 0, (0.3, 0.5, 0.6))]
    timing = time_to_target(pairs_of(runs))
    assert timing["target"] is None and timing["ratio"] is None and "GRPO" in timing["why"]


def test_matched_accuracy_is_the_highest_every_run_reached_and_its_kl_is_read_at_the_first_crossing():
    runs = [run("es", 1, (0.1, 0.3, 0.5), kl=[0, 0.2, 0.4]),  # reaches 0.4 half way: KL 0.3
            run("es", 2, (0.1, 0.4, 0.2), kl=[0, 0.5, 0.6]),  # reaches 0.4 at a mark (then loses it): KL 0.5
            run("grpo", 1, (0.1, 0.6, 0.6), kl=[0, 0.1, 0.2]),  # 0.6 of the way: KL 0.06
            run("grpo", 2, (0.1, 0.2, 0.45), kl=[0, 0.01, 0.02])]  # 0.8 of the way: KL 0.018
    matched = kl_at_matched_accuracy(pairs_of(runs))
    assert matched["accuracy"] == 0.4
    assert matched["es"] == pytest.approx(0.4) and matched["grpo"] == pytest.approx(0.039)
    assert matched["ratio"] == pytest.approx(0.4 / 0.039)


def test_the_kl_ratio_is_unbounded_when_grpo_does_not_drift_and_absent_when_a_run_never_rose():
    runs = [run("es", 1, (0.1, 0.5), kl=[0, 0.2]), run("grpo", 1, (0.1, 0.5), kl=[0, 0.0])]
    assert kl_at_matched_accuracy(pairs_of(runs))["ratio"] == "unbounded"
    flat = [run("es", 1, (0.1, 0.5)), run("grpo", 1, (0.1, 0.1))]
    matched = kl_at_matched_accuracy(pairs_of(flat))
    assert matched["accuracy"] is None and matched["ratio"] is None and matched["why"]


def test_a_seed_one_method_ran_alone_is_left_out_of_the_pairing():
    runs = [run("es", seed, end=ones(3)) for seed in (1, 2)] + [run("es", 3, end=ones(10))]
    runs += [run("grpo", seed, end=ones(1)) for seed in (1, 2, 4)]
    entry = comparison(pairs_of(runs))
    assert entry["es"]["seeds"] == entry["grpo"]["seeds"] == [1, 2]
    assert entry["difference"]["mean"] == pytest.approx(0.2)


def test_two_raced_settings_of_a_method_must_be_named():
    runs = [run("es", 1, end=ones(3)), run("es", 1, end=ones(6), label="es-y"), run("grpo", 1, end=ones(1))]
    with pytest.raises(ValueError, match="es-x.*es-y"):
        result(raced(runs))
    chosen = result(raced(runs, labels={MODEL: {"es": "es-y"}}))[MODEL]
    assert chosen["es"]["label"] == "es-y" and chosen["difference"]["mean"] == pytest.approx(0.5)


def test_a_label_whose_race_runs_differ_in_settings_is_not_paired():
    # es-defaults resolves ESConfig's defaults when a run is made: a changed default is not the same setting
    changed = run("es", 2, end=ones(3))
    changed["settings"] = {"learning_rate": 3e-3}
    runs = [run("es", 1, end=ones(3)), changed] + [run("grpo", seed, end=ones(1)) for seed in (1, 2)]
    with pytest.raises(ValueError, match="es-x: its race runs differ in settings"):
        pairs_of(runs)
    other_budget = [run("es", 1, end=ones(3)), run("es", 2, end=ones(3), budget=80.0), run("grpo", 1)]
    with pytest.raises(ValueError, match="differ in budget_seconds"):
        pairs_of(other_budget)


def test_the_transfer_task_is_compared_with_the_main_task_s_settings_and_its_own_overlap(tmp_path):
    runs = race_and_tuning() + [run("es", 1, end=ones(9), task="arithmetic", label="es-other")]
    entry = render(runs, tmp_path, overlap={"word_problems": 0, "arithmetic": 2})[MODEL]
    assert entry["transfer"]["es"]["label"] == "es-x" and entry["transfer"]["grpo"]["label"] == "grpo-x"
    assert entry["overlap"] == 0 and entry["transfer"]["overlap"] == 2
    for moved_default in (r for r in runs if (r["task"], r["label"]) == ("arithmetic", "es-x")):
        moved_default["settings"] = {"learning_rate": 3e-3}
    with pytest.raises(ValueError, match="arithmetic raced es-x under other settings"):
        render(runs, tmp_path)


def test_the_report_names_the_tuning_run_of_each_raced_setting(tmp_path):
    runs = race_and_tuning()
    assert runs[1]["label"] == "es-b"
    runs[1]["settings"] = {"learning_rate": 3e-3}  # es-b tuned another setting; es-a ran what the race ran as es-x
    render(runs, tmp_path)
    assert ("ES's settings: tuned as `es-a` (tune, 40 s: validation 0.100 -> 0.300); GRPO's: tuned as `grpo-a`"
            in (tmp_path / "report.md").read_text())


def no_nan(constant):
    raise ValueError(f"{constant} in result.json")


def race_and_tuning():
    runs = [run(method, 0, (0.1, 0.3), phase="tune", label=f"{method}-{name}")
            for method in ("es", "grpo") for name in ("a", "b")]
    for task in ("word_problems", "arithmetic"):
        runs += [run("es", seed, (0.1, 0.2, 0.4, 0.5), end=ones(3 + seed), task=task) for seed in (1, 2, 3)]
        runs += [run("grpo", seed, (0.1, 0.3, 0.4, 0.4), end=ones(2), task=task) for seed in (1, 2, 3)]
    return runs + [run("es", 7, (0.1, 0.2), end=ones(1))]  # no GRPO run of seed 7


def test_render_writes_the_result_its_plots_and_every_run(tmp_path):
    runs = race_and_tuning()
    returned = render(runs, tmp_path)
    saved = json.loads((tmp_path / "result.json").read_text(), parse_constant=no_nan)
    assert saved == returned and list(saved) == [MODEL]
    entry = saved[MODEL]
    fields = {"task", "test_problems", "overlap", "es", "grpo", "difference", "time_to_target",
              "kl_at_matched_accuracy"}
    assert set(entry) == fields | {"transfer"} and set(entry["transfer"]) == fields
    assert (entry["task"], entry["transfer"]["task"]) == ("word_problems", "arithmetic")
    assert entry["overlap"] == 0 and entry["test_problems"] == 10
    for task_entry in (entry, entry["transfer"]):
        for method in ("es", "grpo"):
            assert set(task_entry[method]) == {"label", "settings", "seeds", "accuracy_start", "accuracy_end"}
            assert task_entry[method]["seeds"] == [1, 2, 3]
        assert set(task_entry["difference"]) == {"mean", "ci95", "bootstrap95"}
        assert set(task_entry["time_to_target"]) == {"target", "es_reached", "grpo_reached", "es_median",
                                                     "grpo_median", "ratio"}
        assert set(task_entry["kl_at_matched_accuracy"]) == {"accuracy", "es", "grpo", "ratio"}
    assert entry["difference"]["mean"] == pytest.approx(statistics.mean([0.2, 0.3, 0.4]))
    for task in ("word_problems", "arithmetic"):
        assert (tmp_path / f"{MODEL}-{task}.png").read_bytes().startswith(PNG)
    report = (tmp_path / "report.md").read_text()
    for race_run in (r for r in runs if r["phase"] == "race"):
        row = f"| {MODEL} | {race_run['task']} | {race_run['method']} | {race_run['label']} | {race_run['seed']} |"
        assert row in report
    assert f"]({MODEL}-arithmetic.png)" in report
    assert "| m | word_problems | tune | es | es-b | learning_rate=0.001 |" in report  # the tuning table


def test_render_with_only_tuning_runs_writes_the_tuning_table(tmp_path):
    runs = [r for r in race_and_tuning() if r["phase"] == "tune"]
    runs.append(run("es", 0, (0.1, 0.2, 0.4), phase="horizon", label="es-long", budget=90.0))
    assert render(runs, tmp_path) == {}
    report = (tmp_path / "report.md").read_text()
    assert "No race has run yet" in report
    assert "| m | word_problems | tune | grpo | grpo-a | learning_rate=1e-05 | 40 | 3 | 0.100 -> 0.300 | 0.01 | 0.50 |" in report
    assert "| m | word_problems | horizon | es | es-long | learning_rate=0.001 | 90 | 6 | 0.100 -> 0.200 -> 0.400 |" in report
    assert not list(tmp_path.glob("*.png"))
