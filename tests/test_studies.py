"""Tests of the one-off studies under studies/, not of the library (marked ``study``; CI still runs them).

The drift race (``studies/drift_race.py``): its report's arithmetic, on made-up runs: what it chooses, when a run
reaches the target, what it counts; the ES-vs-GRPO comparison (``studies/compare_es_grpo.py``): its saved seeds and its
report.
"""

import json
import math
import runpy
import sys
from pathlib import Path

import pytest

STUDIES = Path(__file__).resolve().parents[1] / "studies"
sys.path.insert(0, str(STUDIES))

from drift_race_report import (  # noqa: E402
    at_seconds, chosen, defaults_rule, moment, race, render, steadiest, study_rows,
)

pytestmark = pytest.mark.study

MODEL = "m"


def run(label, seed, rewards, kls, task="gsm8k", train_reward=0.5, accuracy=None, mark=10.0, budget=40.0,
        phase="race"):
    points = [{"step": i, "seconds": i * mark, "reward": r, "kl": k, "accuracy": (accuracy or [0.0] * len(rewards))[i],
               "format": r, "update_norm": float(i)} for i, (r, k) in enumerate(zip(rewards, kls))]
    return {"model": MODEL, "task": task, "label": label, "method": "grpo" if label.startswith("grpo") else "es",
            "seed": seed, "phase": phase, "reward_kind": "task", "budget_seconds": budget, "points": points,
            "train_reward": [[1, train_reward]]}


def test_choice_is_by_training_reward_not_by_held_out_reward():
    runs = [run("grpo-lr1e-4", 0, [0, 0.9], [0, 0.1], train_reward=0.2, phase="tune"),
            run("grpo-lr1e-5", 0, [0, 0.1], [0, 0.1], train_reward=0.3, phase="tune"),
            run("grpo-lr1e-4", 0, [0, 0.9], [0, 0.1], train_reward=0.9)]  # the race's runs do not choose
    assert chosen(runs, MODEL, "gsm8k", "grpo") == "grpo-lr1e-5"


def test_the_steadiest_es_is_the_least_moved_of_those_that_learned():
    def es(label, late_reward, norm):
        tuned = run(label, 0, [0, 0.5], [0, 0.1], phase="tune")
        tuned["train_reward"] = [[1, 0.0], [2, 0.0], [3, late_reward]]
        tuned["points"][-1]["update_norm"] = norm
        return tuned

    runs = [es("fast", 0.5, 100.0), es("steady", 0.45, 60.0), es("stuck", 0.1, 5.0), es("wild", 0.5, 300.0)]
    assert steadiest(runs, MODEL, "gsm8k") == "steady"  # 0.45 >= 0.8 x 0.5; "stuck" moved least but never learned


def test_moment_interpolates_between_marks_and_reads_the_kl_there():
    reached = moment(run("es-x", 0, [0.0, 0.2, 0.6], [0.0, 0.4, 1.2]), target=0.4)
    assert reached["reached"] and reached["seconds"] == pytest.approx(15.0)
    assert reached["kl"] == pytest.approx(0.8)
    assert at_seconds(run("es-x", 0, [0, 1], [0, 2])["points"], 99.0, "kl") == 2


def test_a_run_that_never_reaches_the_target_counts_as_its_budget_with_its_kl_there():
    never = moment(run("es-x", 0, [0.0, 0.1, 0.2], [0.0, 0.3, 0.5], budget=20.0), target=0.4)
    assert not never["reached"]
    assert never["seconds"] == 20.0 and never["kl"] == 0.5


def test_what_a_run_does_past_its_budget_does_not_count():
    # the last step ended at 30 s, past the 20 s budget, and crossed the target only there
    late = run("es-x", 0, [0.0, 0.2, 0.6, 1.0], [0.0, 0.2, 0.4, 0.6], budget=20.0)
    assert not moment(late, target=0.8)["reached"]
    assert moment(late, target=0.8)["seconds"] == 20.0
    (row,) = study_rows([late], "race", MODEL, "gsm8k")
    assert row["reward"] == [0.6] and row["kl"] == [0.4]
    (row,) = study_rows([{**late, "phase": "tune"}], "tune", MODEL, "gsm8k")  # scored at its start and end only
    assert row["reward"] == [1.0]


def test_ratios_of_the_race(tmp_path):
    tuning = [run("grpo-lr1e-4", 0, [0, 0], [0, 0], train_reward=0.6, phase="tune", task=task)
              for task in ("gsm8k", "arithmetic")]
    tuning += [run("grpo-lr1e-6", 0, [0, 0], [0, 0], train_reward=0.0, phase="tune"),
               run("es-fast", 0, [0, 0], [0, 0], train_reward=0.9, phase="tune"),
               run("es-fast", 0, [0, 0], [0, 0], train_reward=0.9, phase="tune", task="arithmetic"),
               run("es-before", 0, [0, 0], [0, 0], train_reward=0.1, phase="tune")]
    runs = tuning + [
        # GRPO: final rewards 0.5 and 0.7 -> target 0.6, reached at 10 s and 20 s (mean 15), KL then 0.2 and 0.4
        run("grpo-lr1e-4", 0, [0.0, 0.6, 0.5], [0.0, 0.2, 0.3]),
        run("grpo-lr1e-4", 1, [0.0, 0.3, 0.6, 0.7], [0.0, 0.2, 0.4, 0.5]),
        # ES: seed 0 reaches 0.6 at 30 s (KL 0.9), seed 1 never (budget 40 s, final KL 0.6)
        run("es-fast", 0, [0.0, 0.2, 0.4, 0.6], [0.0, 0.1, 0.5, 0.9]),
        run("es-fast", 1, [0.0, 0.1, 0.2], [0.0, 0.3, 0.6]),
        run("es-before", 0, [0.0, 0.1], [0.0, 0.1]),
        # second task: accuracy gains ES 0.2, GRPO 0.4
        run("grpo-lr1e-4", 0, [0, 0], [0, 0], task="arithmetic", accuracy=[0.1, 0.5]),
        run("es-fast", 0, [0, 0], [0, 0], task="arithmetic", accuracy=[0.1, 0.3]),
    ]
    result = race(runs, MODEL)
    assert (result["grpo"], result["es"]) == ("grpo-lr1e-4", "es-fast")
    assert result["target_reward"] == pytest.approx(0.6)
    assert result["ratio"] == pytest.approx(((30 + 40) / 2) / ((10 + 20) / 2))
    assert result["kl_ratio"] == pytest.approx(((0.9 + 0.6) / 2) / ((0.2 + 0.4) / 2))
    assert result["accuracy_ratio"] == pytest.approx(0.2 / 0.4)
    assert result["methods"]["es-before"]["moments"][0]["reached"] is False
    assert result["ratio_is_lower_bound"] and result["methods"]["es-fast"]["reached"] == 1

    summary = render(runs, tmp_path)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved[MODEL]["ratio"] == pytest.approx(summary[MODEL]["ratio"])
    assert (tmp_path / "reward_vs_kl.png").stat().st_size > 0
    assert "es-before" in (tmp_path / "report.md").read_text()


def raced(scores):
    """A race result of ``{label: (ratio, kl_ratio, accuracy_ratio)}``, as ``race`` returns it."""
    return {"methods": {label: {"ratio": r, "kl_ratio": k} for label, (r, k, _) in scores.items()},
            "second_task": {"accuracy_ratio": {label: a for label, (_, _, a) in scores.items()}}}


def test_the_defaults_rule_takes_a_setting_better_on_every_count_and_else_the_lower_mean_product():
    better = {"a": raced({"es-before": (1.0, 2.0, 0.5), "es-pop16": (1.0, 1.0, 0.5)}),
              "b": raced({"es-before": (2.0, 9.0, 0.1), "es-pop16": (1.5, 9.0, 0.2)})}
    assert defaults_rule(better)["winner"] == "es-pop16" and defaults_rule(better)["why"] == "no worse on every count"
    # pop16 slower on "a" but drifting far less there; faster on "b" but drifting more: products 3 v 1.2, 10 v 20
    trade = {"a": raced({"es-before": (1.0, 3.0, 0.5), "es-pop16": (1.2, 1.0, 0.9)}),
             "b": raced({"es-before": (1.0, 10.0, 0.5), "es-pop16": (0.5, 40.0, 0.9)})}
    rule = defaults_rule(trade)
    assert rule["mean_product"] == pytest.approx({"es-before": 6.5, "es-pop16": 10.6})
    assert rule["winner"] == "es-before" and rule["why"].startswith("trade-off")
    assert rule["geometric_winner"] == "es-pop16"  # sqrt(1.2 x 20) < sqrt(3 x 10)
    # a setting not yet raced on a model: no verdict
    assert defaults_rule({"a": raced({"es-before": (1.0, 3.0, 0.5)}), "b": trade["b"]}) is None
    # accuracy not raced yet on "b": it can only decide a setting no worse in speed and drift, and here none is
    unraced = {"a": trade["a"], "b": {**trade["b"], "second_task": {}}}
    assert defaults_rule(unraced)["winner"] == "es-before"
    assert defaults_rule({"a": better["a"], "b": {**better["b"], "second_task": {}}}) is None


def test_a_grpo_that_learned_nothing_gives_no_ratio_and_says_why(tmp_path):
    runs = [run("grpo-lr1e-6", 0, [0.1, 0.1], [0, 0.01], phase="tune"),
            run("es-x", 0, [0.1, 0.3], [0, 0.2], phase="tune"),
            run("grpo-lr1e-6", 1, [0.1, 0.1], [0, 0.01]), run("es-x", 1, [0.1, 0.3], [0, 0.2])]
    for task in ("arithmetic",):
        runs += [run("grpo-lr1e-6", 0, [0, 0], [0, 0], phase="tune", task=task),
                 run("es-x", 0, [0, 0], [0, 0], phase="tune", task=task),
                 run("grpo-lr1e-6", 1, [0, 0], [0, 0], task=task, accuracy=[0.2, 0.1]),
                 run("es-x", 1, [0, 0], [0, 0], task=task, accuracy=[0.2, 0.3])]
    result = render(runs, tmp_path)[MODEL]
    assert result["ratio"] is None and "base model" in result["why"]
    assert result["accuracy_ratio"] is None and "-0.100" in result["accuracy_why"]
    assert json.loads((tmp_path / "result.json").read_text())[MODEL]["ratio"] is None


def test_render_with_only_tuning_runs_reports_the_study_and_no_ratio(tmp_path):
    runs = [run("grpo-lr1e-4", 0, [0, 0.5], [0, 0.1], phase="tune"), run("es-x", 0, [0, 0.4], [0, 0.2], phase="tune")]
    assert render(runs, tmp_path) == {}
    assert "es-x" in (tmp_path / "report.md").read_text()


def test_the_diagnosis_divides_the_task_reward_run_by_the_random_one_and_is_saved(tmp_path):
    def diagnosed(seed, kind, norm, kl):
        diagnose = run("es-x", seed, [0, 0], [0, kl], phase="diagnose")
        diagnose["points"][-1]["update_norm"] = norm
        return diagnose | {"reward_kind": kind}

    runs = [diagnosed(1, "task", 90.0, 0.3), diagnosed(2, "task", 110.0, 0.5), diagnosed(1, "random", 200.0, 0.8)]
    render(runs, tmp_path)
    (row,) = json.loads((tmp_path / "result.json").read_text())[MODEL]["diagnosis"]
    assert row["task"]["seeds"] == [1, 2] and row["random"]["seeds"] == [1]
    assert row["task_over_random"] == pytest.approx({"update_norm": 0.5, "kl": 0.5})
    assert "| es-x | 1 | 1,2; 1 | 100.0 ± 14.1 | 200.0 | 0.50 | 0.400 ± 0.141 | 0.800 | 0.50 |" in (
        tmp_path / "report.md").read_text()


def test_the_race_waits_for_its_tuning_and_a_changed_setting_refuses_old_runs():
    import drift_race

    tuned = [run(label, 0, [0, 0.1], [0, 0.1], phase="tune") for label in drift_race.tuning_labels()[:-1]]
    with pytest.raises(SystemExit, match="tune m on gsm8k first"):
        drift_race.planned("race", MODEL, "gsm8k", tuned, None)
    planned = drift_race.planned("race", MODEL, "gsm8k", tuned, [r["label"] for r in tuned])
    assert {seed for _, _, seed, _ in planned} == set(drift_race.SEEDS)
    assert drift_race.TUNING_SEED not in drift_race.SEEDS
    saved = {**run("es-before", 0, [0], [0], phase="tune"), "model": drift_race.MODELS[0],
             "settings": drift_race.label_settings("es-before")[1], "budget_seconds": 1.0,
             "eval_seed": drift_race.EVAL_SEED}
    with pytest.raises(SystemExit, match="es-before"):
        drift_race.check_unchanged([saved])
    drift_race.check_unchanged([{**saved, "budget_seconds": drift_race.BUDGETS[saved["model"]]}])


@pytest.mark.parametrize("task_name", ["gsm8k", "arithmetic", "countdown"])
def test_a_base_model_is_shown_answered_problems_of_the_task_it_is_asked(tokenizer, task_name):
    """Shown GSM8K's word problems before sums, Gemma-3-270M copied their answers: each task's demonstrations are
    questions of that task, as its prompts ask them, answered in full by its own rewards."""
    from learning import demonstrations, task

    from lightning_es.tasks import prompts_for

    def instruction(text):  # what the task asks after the question: its last line, or Countdown's later sentences
        return text.split("\n")[-1] if "\n" in text else text.split(". ", 1)[1]

    _, held_out, rewards = task(task_name, train_size=4, eval_size=4)
    question = held_out[0]["prompt"][0]["content"]
    shown = demonstrations(task_name)
    assert len(shown) == 2
    for asked, answer in shown:
        assert instruction(asked) == instruction(question)
        if task_name == "arithmetic":
            assert asked.split(": ")[0] == question.split(": ")[0]
            problem = asked.split(": ")[1].split(" =")[0]
            extra = {"answer": [str(eval(problem))]}  # noqa: S307 - digits and one operator, written above
        elif task_name == "countdown":
            extra = {"numbers": [[int(n) for n in asked.split("[")[1].split("]")[0].split(",")]],
                     "target": [int(asked.split("equals ")[1].split(".")[0])]}
        else:
            continue  # GSM8K's answers are checked in test_tasks
        assert [reward([answer], **extra) for reward in rewards.values()] == [[1.0], [1.0]]
    tokenizer.chat_template = None
    prompt = prompts_for(tokenizer, held_out, shown)["prompt"][0]
    assert prompt.count("Question: ") == 3 and prompt.endswith(f"Question: {question}\nAnswer:")


# studies/compare_es_grpo.py


def test_compare_es_grpo_keeps_saved_seeds_through_a_kill_and_refuses_unrecorded_ones(tmp_path, monkeypatch):
    study = runpy.run_path(str(STUDIES / "compare_es_grpo.py"))
    path, now = tmp_path / "metrics.json", {"arguments": {"steps": 20}}
    study["save_runs"](path, {"settings": now, "before": {}, "runs": {0: {"accuracy": 0.5}}})
    write_text = Path.write_text

    def killed_halfway(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        study["save_runs"](path, {"settings": now, "before": {}, "runs": {0: {"accuracy": 0.5}, 1: {"accuracy": 0.6}}})
    assert study["saved_runs"](path, now) == {0: {"accuracy": 0.5}}
    write_text(path, json.dumps({"before": {}, "runs": {"0": {}}}))  # as the recipe wrote it before it kept settings
    with pytest.raises(SystemExit, match="earlier version of this recipe.*--report_dir"):
        study["saved_runs"](path, now)


@pytest.mark.slow
def test_compare_es_grpo_writes_a_report(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = tmp_path / "report"
    command = ["compare", "--quick", "--model_name_or_path", str(tiny_dir), "--report_dir", str(report)]
    # a run cut short after seed 0: the full run reads seed 0 back and runs seed 1 only
    monkeypatch.setattr(sys, "argv", command + ["--seeds", "0"])
    runpy.run_path(str(STUDIES / "compare_es_grpo.py"), run_name="__main__")
    first = json.loads((report / "metrics.json").read_text())
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", command)
    runpy.run_path(str(STUDIES / "compare_es_grpo.py"), run_name="__main__")
    assert f"seed 0: already in {report / 'metrics.json'}" in capsys.readouterr().out
    text = (report / "report.md").read_text()
    assert text.startswith(f"# ES vs GRPO on gsm8k, {tiny_dir}: 2 iterations each, seeds 0, 1")
    # the quick mode sets the population and the prompts; the noise is ESConfig's
    assert "ES: 4 members, 2 prompts per iteration, lowrank noise (rank 4)" in text
    assert "| off-task KL, exact (mean over probes) |" in text and "cosine(ES update, GRPO update)" in text
    against = "(GRPO at AdamW lr 0.0001): "  # each finding says which GRPO it was measured against
    for finding in ("1. Accuracy parity ", "2. Larger update norm for ES ", "3. Larger off-task KL for ES ",
                    "4. Near-orthogonal updates with no barrier on the linear path "):
        assert finding + against in text
    for image in ("reward.png", "kl_drift.png", "kl_probes.png", "interpolation.png"):
        assert (report / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((report / "metrics.json").read_text())
    assert list(metrics["runs"]) == ["0", "1"]  # the quick mode's two seeds
    assert metrics["runs"]["0"] == first["runs"]["0"]  # read back, not run again
    monkeypatch.setattr(sys, "argv", command + ["--steps", "3"])  # seeds of 2 iterations are no seeds of 3
    with pytest.raises(SystemExit, match="holds seeds run with other settings.*--report_dir"):
        runpy.run_path(str(STUDIES / "compare_es_grpo.py"), run_name="__main__")
    for run in metrics["runs"].values():
        assert run["interpolation"]["alphas"] == [0.0, 0.5, 1.0]
        for method in ("es", "grpo"):
            assert len(run[method]["kl_exact"]) == len(run[method]["kl_sampled"]) == 3  # one reading per probe
            assert min(run[method]["kl_exact"]) >= 0  # the exact KL is never negative
            # measured against the base's weights, not the trained model against itself
            assert (max(run[method]["kl_exact"]) > 0) == (run[method]["update_norm"] > 0)
            kept, norm = run[method]["bf16_kept_update"], run[method]["update_norm"]
            assert math.isnan(kept) if norm == 0 else 0 <= kept <= 1.01  # NaN: nothing moved, nothing to keep


# ---- the task table (studies/task_table.py) ---------------------------------------------------------------------


def test_task_table_renders_each_saved_measurement_with_its_interval(tmp_path):
    import task_table

    saved = {"m/sums/test/final_answer/24": {"model": "m", "task": "sums", "split": "test", "problems": 500,
                                             "style": "final_answer", "max_new_tokens": 24, "accuracy": 0.2,
                                             "correct": "1" * 100 + "0" * 400, "seconds": 1.0}}
    (tmp_path / "tasks.json").write_text(json.dumps(saved))
    table = task_table.render(tmp_path)
    assert "| m | sums | final_answer, 24 | test | 500 | 0.200 | [0.165, 0.235] |" in table
    assert (tmp_path / "tasks.md").read_text().endswith(table)


# ---- the accuracy race (studies/accuracy_race.py) ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("label", ["es-pop8", "grpo-lr1e-4"])
def test_an_accuracy_race_run_scores_the_whole_test_split_at_its_ends_and_its_head_at_the_marks(
        tiny_dir, tmp_path, monkeypatch, label):
    import accuracy_race

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(accuracy_race, "resolve_model", lambda name: str(tiny_dir))
    monkeypatch.setattr(accuracy_race, "TEST_SIZE", 12)
    monkeypatch.setattr(accuracy_race, "MARK_PROBLEMS", 8)
    monkeypatch.setattr(accuracy_race, "TRAIN_SIZE", 16)
    monkeypatch.setattr(accuracy_race, "MAX_NEW_TOKENS", 4)
    monkeypatch.setattr(accuracy_race, "COMMON", {**accuracy_race.COMMON, "max_completion_length": 4})
    small = dict(per_device_train_batch_size=4) | (dict(num_generations=2) if label.startswith("grpo") else {})
    monkeypatch.setitem(accuracy_race.ES_LABELS if label.startswith("es") else accuracy_race.GRPO_LABELS, label,
                        {**(accuracy_race.ES_LABELS | accuracy_race.GRPO_LABELS)[label], **small})
    monkeypatch.setitem(accuracy_race.BUDGETS, "m", 1e-9)  # one step, then the budget is spent
    monkeypatch.setitem(accuracy_race.MARKS, "m", (1e-12,))
    # a tiny model answers nothing right: a reward it can earn (by the length of its answer) so that the weights move
    from lightning_es.tasks import gsm8k
    from lightning_es.tasks.text import completion_text
    monkeypatch.setattr(gsm8k, "correctness_reward",
                        lambda completions, answer, **kwargs: [float(len(completion_text(c)) % 2) for c in completions])
    run = accuracy_race.train("m", "word_problems", label, 1, "race", None, tmp_path)
    start, end = run["marks"][0], run["marks"][-1]
    assert [p["step"] for p in run["marks"]] == [0, 1]  # the budget ends the run before its mark is scored
    for point in (start, end):
        assert len(point["test_correct"]) == 12 and point["correct"] == point["test_correct"][:8]
        assert point["accuracy"] == point["correct"].count("1") / 8
    assert start["kl"] == 0 and start["update_norm"] == 0
    assert end["update_norm"] > 0 and end["kl"] > 0
    assert run["method"] == label.split("-")[0] and run["commit"]
    from safetensors.torch import load_file
    delta = load_file(run["weights_delta"])
    assert math.isclose(sum(float(t.double().square().sum()) for t in delta.values()) ** 0.5, end["update_norm"],
                        rel_tol=1e-4)
    tuned = accuracy_race.train("m", "word_problems", label, 0, "tune", None, tmp_path)
    assert len(tuned["marks"][0]["correct"]) == accuracy_race.VALIDATION_SIZE and "test_correct" not in tuned["marks"][0]
    monkeypatch.setattr(accuracy_race, "HORIZON_BUDGET", 1e-9)
    horizon = accuracy_race.train("m", "word_problems", label, 0, "horizon", tuned["marks"][0], tmp_path)
    assert horizon["budget_seconds"] == 1e-9 and horizon["marks"][0]["correct"] == tuned["marks"][0]["correct"]


def test_the_race_counts_test_problems_met_in_training_and_finds_none(monkeypatch):
    import accuracy_race

    runs = [{"phase": "race", "task": "word_problems", "seed": seed} for seed in (1, 2)]
    monkeypatch.setattr(accuracy_race, "TRAIN_SIZE", 300)
    assert accuracy_race.overlap(runs) == {"word_problems": 0}
    problems = accuracy_race.generated.problems
    leaked = problems("word_problems", "test", 3, seed=0)  # three test problems put into seed 2's training draw
    monkeypatch.setattr(accuracy_race.generated, "problems", lambda task, split, size, seed=0: (
        problems(task, split, size, seed) + (leaked if (split, seed) == ("train", 2) else [])))
    keys = {(tuple(sorted(p["numbers"])), p["answer"]) for p in leaked}
    # the three, and any other test problem asking the same numbers and answer in other words
    same = [p for p in problems("word_problems", "test", accuracy_race.TEST_SIZE, seed=0)
            if (tuple(sorted(p["numbers"])), p["answer"]) in keys]
    assert len(same) >= 3 and accuracy_race.overlap(runs) == {"word_problems": len(same)}


def test_the_race_runs_only_the_settings_chosen_for_the_model(tmp_path, monkeypatch):
    import accuracy_race

    monkeypatch.setitem(accuracy_race.RACE_LABELS, accuracy_race.MODELS[0], {"es": "es-base", "grpo": "grpo-lr1e-5"})
    monkeypatch.setattr(accuracy_race, "train", lambda *args, **kwargs: pytest.fail("a label not chosen was trained"))
    monkeypatch.setattr(sys, "argv", ["accuracy_race.py", "race", "--labels", "es-base", "es-pop8", "--seeds", "1",
                                      "--runs", str(tmp_path / "runs.jsonl")])
    with pytest.raises(SystemExit, match="races .*'es-base'.*RACE_LABELS.*not \\['es-pop8'\\]"):
        accuracy_race.main()
