"""The main-job study (``studies/main_job.py``): it reads the figures the recipes print, runs a recipe as a user does
(its exit status, wall time and peak memory), saves each run as it finishes and resumes, and sums the seeds up."""

import json
import sys
from pathlib import Path

import pytest

STUDIES = Path(__file__).resolve().parents[1] / "studies"
sys.path.insert(0, str(STUDIES))

import main_job  # noqa: E402
from main_job import printed_figures, summary  # noqa: E402

from trl_ext.recipes import before_after_lines, no_signal_line  # noqa: E402

pytestmark = pytest.mark.study


def printout(task="Generated word problems (one operation)", before=(0.105, 0.62, 0.0), after=(0.17, 0.985, 0.052)):
    names = ("accuracy", "answer format", "off-task KL")
    lines = before_after_lines(task, 200, dict(zip(names, before)), dict(zip(names, after)))
    return "\n".join(["{'loss': '0'}", *lines, no_signal_line(task, [0.0, 0.1, 0.05], 60)])


def test_the_figures_are_read_back_from_what_the_recipes_print():
    figures = printed_figures(printout())
    assert figures == {"task": "Generated word problems (one operation)", "problems": 200,
                       "accuracy": [pytest.approx(0.105), pytest.approx(0.17)],
                       "answer_format": [pytest.approx(0.62), pytest.approx(0.985)],
                       "off_task_kl": [0.0, 0.052], "no_signal": pytest.approx(0.05), "iterations": 60}


def test_a_negative_zero_kl_is_read():
    assert printed_figures(printout(before=(0.1, 0.5, -0.0)))["off_task_kl"][0] == 0.0


def test_a_printout_without_a_figure_is_refused_by_name():
    without_kl = "\n".join(line for line in printout().splitlines() if "off-task KL" not in line)
    with pytest.raises(ValueError, match="printed no off_task_kl line"):
        printed_figures(without_kl)


def record(seed, before, after, wall=500.0):
    return {"recipe": "trl", "seed": seed, "extra": [], "wall_seconds": wall, "peak_rss_bytes": 3e9,
            "model_cache_was_empty": False, "commit": "abc",
            **printed_figures(printout(before=(before, 0.6, 0.0), after=(after, 0.9, 0.05)))}


def test_the_gain_has_a_t_interval_over_the_seeds_and_the_time_target_is_checked_on_every_run():
    entry = summary([record(1, 0.10, 0.16), record(2, 0.10, 0.17), record(3, 0.11, 0.18, wall=700.0)])
    assert entry["gain"]["mean"] == pytest.approx((0.06 + 0.07 + 0.07) / 3)
    low, high = entry["gain"]["ci95"]
    assert 0 < low < entry["gain"]["mean"] < high and entry["gain"]["excludes_zero"]
    assert not entry["within_target"] and entry["wall_seconds"]["max"] == 700.0
    assert summary([record(1, 0.10, 0.16)])["gain"]["ci95"] is None
    assert summary([record(1, 0.10, 0.16), record(2, 0.10, 0.05)])["gain"]["excludes_zero"] is False


@pytest.mark.slow
def test_a_recipe_runs_as_a_user_runs_it_each_seed_saved_and_not_run_again(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    quick = ["--", "--quick", "--model_name_or_path", str(tiny_dir)]
    where = ["--report", str(tmp_path / "report"), "--outputs", str(tmp_path / "outputs")]
    results = main_job.main(["run", "--recipe", "lightning", "--seeds", "1", "2", *where, *quick])
    runs = [json.loads(line) for line in (tmp_path / "report" / "runs.jsonl").read_text().splitlines()]
    assert [(r["recipe"], r["seed"]) for r in runs] == [("lightning", 1), ("lightning", 2)]
    for r in runs:
        assert r["wall_seconds"] > 0 and r["peak_rss_bytes"] > 100e6  # a python with torch loaded
        assert r["problems"] == 4 and r["iterations"] == 2 and r["command"].startswith("python recipes/")
        assert (tmp_path / "outputs" / f"lightning-seed{r['seed']}" / "lightning_logs").is_dir()
        kept = (tmp_path / "outputs" / "logs" / f"lightning-seed{r['seed']}.out.log").read_text()
        assert "Arithmetic accuracy on 4 held-out problems" in kept
    entry = results["lightning " + " ".join(quick[1:])]
    assert entry["seeds"] == [1, 2] and entry["problems"] == 4
    assert json.loads((tmp_path / "report" / "result.json").read_text()) == results

    def again(*args):
        raise AssertionError("a saved seed was run again")

    monkeypatch.setattr(main_job, "run", again)
    main_job.main(["run", "--recipe", "lightning", "--seeds", "1", "2", *where, *quick])
    monkeypatch.undo()
    with pytest.raises(SystemExit, match=r"lightning seed 3 exited with [1-9][0-9]*; not saved"):
        main_job.main(["run", "--recipe", "lightning", "--seeds", "3", *where, "--", "--no_such_flag"])
    assert len((tmp_path / "report" / "runs.jsonl").read_text().splitlines()) == 2
    assert "no_such_flag" in (tmp_path / "outputs" / "logs" / "lightning-seed3.err.log").read_text()
