"""The four ES-vs-GRPO findings recomputed from the accuracy race's saved runs (``studies/race_findings.py``): which
seeds it pairs, its verdicts on made-up figures, its random baselines, and, on a tiny model with saved updates, the
cosine, the barrier, the check of the line's ends against the runs' records, and resuming."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

STUDIES = Path(__file__).resolve().parents[1] / "studies"
sys.path.insert(0, str(STUDIES))

import race_findings  # noqa: E402
from race_findings import (  # noqa: E402
    KL_RESOLUTION, both_gained, larger_kl, larger_norm, moved, no_barrier, orthogonal, parity, raced_pairs,
    random_direction, saved_update, scaled_to,
)

from lightning_es.drift import update_norm, weights_restored  # noqa: E402

pytestmark = pytest.mark.study

MODEL, TASK = "m", "word_problems"


def race_run(method, seed, delta_path=None, end=None, norm=1.0, kl=0.01, start_test="0" * 12, end_test="0" * 12,
             task=TASK, phase="race", label=None):
    """A race run's record: scored at its start and end, on the whole test split (``*_test``) and on the marks'
    problems (``end``: the per-problem string at the end; the start's is all wrong)."""
    end = end or "0" * 8
    marks = [{"step": 0, "seconds": 0.0, "accuracy": 0.0, "correct": "0" * 8, "kl": 0.0, "update_norm": 0.0,
              "test_correct": start_test, "test_accuracy": start_test.count("1") / len(start_test)},
             {"step": 5, "seconds": 40.0, "accuracy": end.count("1") / len(end), "correct": end, "kl": kl,
              "update_norm": norm, "test_correct": end_test, "test_accuracy": end_test.count("1") / len(end_test)}]
    return {"model": MODEL, "task": task, "method": method, "label": label or f"{method}-x", "seed": seed,
            "phase": phase, "settings": {"learning_rate": 1e-3}, "budget_seconds": 40.0, "commit": "abc",
            "marks": marks, "weights_delta": str(delta_path) if delta_path else "none.safetensors"}


def geometry_of(seed, cosine=0.0, band=0.01, random_cosine=0.0, barrier=0.0, random_barrier=0.02, mismatch=0):
    return {"seed": seed, "cosine": cosine, "random_band": band, "weights": round((1.96 / band) ** 2),
            "random_cosine": random_cosine, "barrier": barrier, "random_barrier": random_barrier,
            "resolution": 0.005, "mismatch": mismatch}


# ---- pairing and verdicts, on made-up figures -----------------------------------------------------------------------


def test_runs_are_paired_by_seed_on_the_seeds_both_methods_raced():
    runs = [race_run("es", seed) for seed in (3, 1, 2)] + [race_run("grpo", seed) for seed in (2, 1)]
    runs += [race_run("es", 0, phase="tune"), race_run("grpo", 0, phase="tune")]  # tuning: never paired
    runs += [race_run("es", 1, task="arithmetic")]  # one method only: no pair
    pairs = raced_pairs(runs)
    assert list(pairs) == [(MODEL, TASK)]
    assert [r["seed"] for r in pairs[MODEL, TASK]["es"]] == [r["seed"] for r in pairs[MODEL, TASK]["grpo"]] == [1, 2]
    assert {r["method"] for r in pairs[MODEL, TASK]["grpo"]} == {"grpo"}


def test_the_findings_pair_the_runs_the_report_compares():
    # a transfer task is compared only beside its model's main task, and only under the main task's settings
    alone = [race_run(method, 1, task="arithmetic") for method in ("es", "grpo")]
    assert raced_pairs(alone) == {}
    runs = [race_run(method, 1, task=task) for method in ("es", "grpo") for task in (TASK, "arithmetic")]
    assert list(raced_pairs(runs)) == [(MODEL, TASK), (MODEL, "arithmetic")]
    runs[1]["settings"] = {"learning_rate": 3e-3}  # ES's arithmetic run: another setting under the same label
    with pytest.raises(ValueError, match="arithmetic raced es-x under other settings"):
        raced_pairs(runs)


def test_parity_holds_inside_the_band_fails_beyond_it_and_is_untested_across_it():
    assert parity([0.01, 0.0, -0.01])["verdict"] == "holds"
    beyond = parity([0.20, 0.25, 0.22])
    assert beyond["verdict"] == "does not hold" and "above" in beyond["why"]
    assert parity([-0.20, -0.25, -0.22])["verdict"] == "does not hold"
    wide = parity([0.1, -0.1, 0.0])
    assert wide["verdict"] == "untested" and "wider than" in wide["why"]
    edge = parity([0.03, 0.06, 0.05])  # [0.009, 0.083]: narrower than the band, across its upper edge
    assert edge["verdict"] == "untested" and "straddles" in edge["why"]
    assert parity([0.0])["verdict"] == "untested" and parity([0.0])["ci95"] is None


def test_both_gained_only_when_each_mean_gain_interval_is_above_zero():
    learned = both_gained([0.10, 0.12, 0.11], [0.05, 0.06, 0.07])
    assert learned["both"] and learned["gained"] == {"es": True, "grpo": True}
    flat = both_gained([0.10, 0.12, 0.11], [0.0, 0.05, -0.05])
    assert not flat["both"] and flat["gained"] == {"es": True, "grpo": False}
    assert not both_gained([0.1], [0.1])["both"]  # one seed: no interval, no claim


def test_larger_norm_and_kl_are_sign_tests_over_the_seeds():
    five = larger_norm([40.0, 50.0, 30.0, 20.0, 10.0], [1.0, 2.0, 1.0, 1.0, 1.0])
    assert five["verdict"] == "holds" and five["es_larger"] == 5 and five["ratios"][:2] == [40.0, 25.0]
    assert five["p_es_larger"] == 1 / 32
    assert larger_norm([40.0, 50.0], [1.0, 2.0])["verdict"] == "untested"  # two seeds of two cannot decide
    assert larger_norm([40.0, 50.0, 30.0, 20.0, 1.0], [1.0, 1.0, 1.0, 1.0, 2.0])["verdict"] == "untested"  # 4 of 5
    assert larger_norm([1.0] * 5, [2.0] * 5)["verdict"] == "does not hold"
    assert larger_norm([1.0], [0.0])["ratios"] == [None]  # GRPO did not move: no ratio (and no Infinity in JSON)
    assert larger_kl([0.1, 0.2, 0.3, 0.4, 0.5], [0.01] * 5)["verdict"] == "holds"
    assert larger_kl([0.01] * 5, [0.1] * 5)["verdict"] == "does not hold"
    # a seed the estimator cannot separate is left out of the test: five others still decide
    tied = larger_kl([0.1] * 5 + [0.02 + KL_RESOLUTION / 2], [0.01] * 5 + [0.02])
    assert tied["verdict"] == "holds" and tied["es_larger"] == 5 and tied["grpo_larger"] == 0
    assert larger_kl([0.1, 0.02 + KL_RESOLUTION / 2], [0.01, 0.02])["verdict"] == "untested"


def test_findings_2_to_4_are_untested_unless_both_methods_gained():
    def pairs(grpo_end):
        return {"es": [race_run("es", s, norm=50.0, kl=0.1, end_test="1" * (3 + s % 2) + "0" * (9 - s % 2))
                       for s in range(1, 6)],
                "grpo": [race_run("grpo", s, norm=1.0, kl=0.01, end_test=grpo_end(s)) for s in range(1, 6)]}

    learned = race_findings.findings(pairs(lambda s: "1" * (1 + s % 2) + "0" * (11 - s % 2)), {})
    assert learned["both_gained"]["both"] and learned["update_norm"]["verdict"] == "holds"
    assert learned["off_task_kl"]["verdict"] == "holds" and "measured" not in learned["off_task_kl"]
    flat = race_findings.findings(pairs(lambda s: "0" * 12), {})
    assert not flat["both_gained"]["both"]
    for name in ("update_norm", "off_task_kl"):
        assert flat[name]["verdict"] == "untested" and flat[name]["measured"] == "holds"
        assert "GRPO did not gain" in flat[name]["why"]


def test_orthogonal_when_every_cosine_is_within_the_random_band():
    assert orthogonal([geometry_of(1, cosine=0.005), geometry_of(2, cosine=-0.009)])["verdict"] == "holds"
    aligned = orthogonal([geometry_of(1, cosine=0.005), geometry_of(2, cosine=0.03)])
    assert aligned["verdict"] == "does not hold" and "seed 2 (5.9 sd)" in aligned["why"]
    assert orthogonal([geometry_of(1, cosine=math.nan)])["verdict"] == "untested"


def test_orthogonal_widens_the_random_band_for_the_seeds_together():
    # 2.2 sd on one of five seeds: beyond one seed's 95% (1.96 sd), within five seeds' together (2.58 sd)
    seeds = [geometry_of(seed, cosine=0.001) for seed in range(4)] + [geometry_of(4, cosine=0.01 * 2.2 / 1.96)]
    assert orthogonal(seeds)["verdict"] == "holds"
    assert orthogonal(seeds[:1] + seeds[4:])["verdict"] == "holds"  # two seeds: 2.24 sd
    assert orthogonal(seeds[4:])["verdict"] == "does not hold"  # one seed: 1.96 sd


def test_no_barrier_holds_only_where_the_random_line_shows_one():
    one_problem = 0.3 - 0.295  # a dip of one problem of 200 as a difference of accuracies: 0.005000000000000004
    assert no_barrier([geometry_of(1, barrier=one_problem), geometry_of(2)])["verdict"] == "holds"
    assert no_barrier([geometry_of(1, barrier=0.01), geometry_of(2)])["verdict"] == "does not hold"
    flat = no_barrier([geometry_of(1), geometry_of(2, random_barrier=0.0)])
    assert flat["verdict"] == "untested" and "seed 2" in flat["why"]
    moved_ends = no_barrier([geometry_of(1, mismatch=2), geometry_of(2)])
    assert moved_ends["verdict"] == "untested" and "seed 1" in moved_ends["why"]


# ---- the random baselines and the saved updates ---------------------------------------------------------------------


def small_update(model, seed, scale):
    generator = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(p.shape, generator=generator) for name, p in model.named_parameters()}


def test_the_random_direction_has_the_update_s_layout_and_is_scaled_to_its_norm(tiny_model):
    update = small_update(tiny_model, 0, 0.05)
    direction = random_direction(update, seed=3)
    assert {n: t.shape for n, t in direction.items()} == {n: t.shape for n, t in update.items()}
    assert all(torch.equal(direction[n], random_direction(update, seed=3)[n]) for n in update)  # seeded
    assert not torch.equal(direction["lm_head.weight"], random_direction(update, seed=4)["lm_head.weight"])
    assert update_norm(scaled_to(direction, update_norm(update))) == pytest.approx(update_norm(update), rel=1e-6)


def test_moved_adds_the_model_s_weights_to_the_update(tiny_model):
    update = small_update(tiny_model, 0, 0.05)
    expected = {name: p.detach() + update[name] for name, p in tiny_model.named_parameters()}
    ends = moved(tiny_model, {n: t.clone() for n, t in update.items()})
    assert all(torch.equal(ends[n], expected[n]) for n in expected)
    with pytest.raises(ValueError, match="different parameter sets"):
        moved(tiny_model, {n: t for n, t in update.items() if n != "lm_head.weight"})


def test_a_saved_update_whose_norm_is_not_the_run_s_is_refused(tmp_path, tiny_model):
    update = small_update(tiny_model, 0, 0.05)
    save_file(update, str(tmp_path / "u.safetensors"))
    run = race_run("es", 1, tmp_path / "u.safetensors", norm=update_norm(update))
    assert saved_update(run).keys() == update.keys()
    run["marks"][-1]["update_norm"] *= 1.01
    with pytest.raises(ValueError, match="another run's"):
        saved_update(run)


# ---- on a tiny model: the cosine, the barrier, the line's ends, resuming ---------------------------------------------


@pytest.fixture
def tiny_race(tiny_dir, tmp_path, monkeypatch):
    """Two seeds of both methods on a tiny model, with saved updates and end marks scored as the race scores them.
    Seed 2's GRPO update is ES's: every point of the line is the same model."""
    import accuracy_race
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_es.tasks import gsm8k
    from lightning_es.tasks.text import completion_text

    monkeypatch.setattr(accuracy_race, "resolve_model", lambda name: str(tiny_dir))
    monkeypatch.setattr(accuracy_race, "TEST_SIZE", 12)
    monkeypatch.setattr(accuracy_race, "MARK_PROBLEMS", 8)
    monkeypatch.setattr(accuracy_race, "MAX_NEW_TOKENS", 4)
    # a tiny model answers nothing right: a reward that follows its answers (their length), so accuracy moves
    monkeypatch.setattr(gsm8k, "correctness_reward",
                        lambda completions, answer, **kwargs: [float(len(completion_text(c)) % 2) for c in completions])
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir, padding_side="left")
    problems = race_findings.marks_problems(tokenizer, TASK)

    def scored(update):
        with weights_restored(model) as params, torch.no_grad():
            for name, p in params.items():
                p.add_(update[name])
            return accuracy_race.score(model, tokenizer, problems)["correct"]

    updates = {(1, "es"): small_update(model, 1, 0.05), (1, "grpo"): small_update(model, 2, 0.02),
               (2, "es"): small_update(model, 3, 0.05)}
    updates[2, "grpo"] = {n: t.clone() for n, t in updates[2, "es"].items()}
    runs = []
    for (seed, method), update in updates.items():
        path = tmp_path / f"{method}-seed{seed}.safetensors"
        save_file(update, str(path))
        runs.append(race_run(method, seed, path, end=scored(update), norm=update_norm(update),
                             kl=0.1 if method == "es" else 0.01, end_test=("1" if method == "es" else "0") * 12))
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in runs))
    base = accuracy_race.score(model, tokenizer, problems)["correct"]
    return {"runs": path, "out": tmp_path / "report", "updates": updates, "base": base,
            "ends": {(r["seed"], r["method"]): r["marks"][-1]["correct"] for r in runs}}


def flat(update):
    return torch.cat([update[name].flatten().double() for name in sorted(update)])


@pytest.mark.slow
def test_the_geometry_of_saved_updates_beside_its_random_baselines(tiny_race):
    entries = race_findings.main(["--runs", str(tiny_race["runs"]), "--out", str(tiny_race["out"]), "--points", "3"])
    entry = entries[f"{MODEL}/{TASK}"]
    assert entry["seeds"] == entry["geometry_seeds"] == [1, 2]
    first, second = entry["geometry"][1], entry["geometry"][2]
    es, grpo = flat(tiny_race["updates"][1, "es"]), flat(tiny_race["updates"][1, "grpo"])
    assert first["cosine"] == pytest.approx(float(es @ grpo / (es.norm() * grpo.norm())), abs=1e-12)
    assert first["weights"] == es.numel() and first["random_band"] == pytest.approx(1.96 / math.sqrt(es.numel()))
    assert abs(first["random_cosine"]) < 4 / math.sqrt(es.numel())  # 4 sd of two random directions' cosine
    assert second["cosine"] == pytest.approx(1.0)
    # the line's ends are the runs' models: their answers are the ones the runs recorded, problem by problem
    assert first["mismatch"] == second["mismatch"] == 0
    assert first["line"]["ends"] == [tiny_race["ends"][1, "es"], tiny_race["ends"][1, "grpo"]]
    # the update changes the accuracy: a line that missed an end (the base model at t = 0) would not be flat
    assert tiny_race["base"].count("1") != tiny_race["ends"][2, "es"].count("1")
    assert len(set(second["line"]["accuracy"])) == 1 and second["barrier"] == 0  # one model all along
    for line in (first["line"], first["random_line"]):
        ends = line["accuracy"][0], line["accuracy"][-1]
        assert line["t"] == [0.0, 0.5, 1.0]
        assert line["barrier"] == pytest.approx(max(0.0, (ends[0] + ends[1]) / 2 - line["accuracy"][1]))
    assert first["random_line"]["accuracy"][-1] == first["line"]["accuracy"][-1]  # both lines end at GRPO's model
    assert first["resolution"] == 1 / 8
    # GRPO gained nothing here: findings 2-4 are untested, what they measured kept beside
    assert entry["off_task_kl"]["es_larger"] == 2 and entry["off_task_kl"]["verdict"] == "untested"
    assert entry["update_norm"]["es_larger"] == 1 and entry["update_norm"]["verdict"] == "untested"  # seed 2: 1x
    assert entry["orthogonal_no_barrier"]["verdict"] == "untested"
    assert entry["orthogonal_no_barrier"]["measured"] == "does not hold"
    assert entry["parity"]["verdict"] == "does not hold"  # ES gained all 12 test problems on both seeds, GRPO none
    assert entry["orthogonal_no_barrier"]["orthogonal"]["verdict"] == "does not hold"  # seed 2: the same update
    saved = json.loads((tiny_race["out"] / "findings.json").read_text())[f"{MODEL}/{TASK}"]
    assert saved["geometry"]["1"]["cosine"] == first["cosine"]
    report = (tiny_race["out"] / "findings.md").read_text()
    assert "## m, word_problems" in report and "1. **Accuracy parity" in report and "4. **Near-orthogonal" in report
    assert report.count("| ES -> GRPO |") == 2 and "reproduced" in report


@pytest.mark.slow
def test_a_cut_run_resumes_measuring_only_the_seeds_not_saved(tiny_race, monkeypatch):
    command = ["--runs", str(tiny_race["runs"]), "--out", str(tiny_race["out"]), "--points", "3"]
    measured = []
    measure = race_findings.geometry

    def counted(model, tokenizer, problems, es, grpo, grid):
        measured.append(es["seed"])
        return measure(model, tokenizer, problems, es, grpo, grid)

    monkeypatch.setattr(race_findings, "geometry", counted)
    entries = race_findings.main(command + ["--seeds", "1"])
    assert measured == [1] and entries[f"{MODEL}/{TASK}"]["geometry_seeds"] == [1]
    assert "Measured on seeds 1 of the 2 paired" in (tiny_race["out"] / "findings.md").read_text()
    race_findings.main(command)
    assert measured == [1, 2]  # seed 1 read back
    race_findings.main(command)
    assert measured == [1, 2]
    race_findings.main(command[:-1] + ["5", "--seeds", "2"])  # another grid: seed 2 measured again, on it
    assert measured == [1, 2, 2]
    saved = json.loads((tiny_race["out"] / "findings.json").read_text())[f"{MODEL}/{TASK}"]["geometry"]
    assert len(saved["2"]["line"]["t"]) == 5 and len(saved["1"]["line"]["t"]) == 3
    # seed 1's ES raced again (its update saved elsewhere): its saved geometry is another run's, measured again
    runs = [json.loads(line) for line in tiny_race["runs"].read_text().splitlines()]
    again = next(r for r in runs if (r["seed"], r["method"]) == (1, "es"))
    moved_to = Path(again["weights_delta"]).with_name("es-seed1-again.safetensors")
    moved_to.write_bytes(Path(again["weights_delta"]).read_bytes())
    again["weights_delta"] = str(moved_to)
    tiny_race["runs"].write_text("".join(json.dumps(r) + "\n" for r in runs))
    race_findings.main(command[:-1] + ["5"])  # seed 2 stands, on this grid
    assert measured == [1, 2, 2, 1]


@pytest.mark.slow
def test_a_seed_whose_saved_updates_are_absent_is_left_unmeasured(tiny_race, capsys):
    runs = [json.loads(line) for line in tiny_race["runs"].read_text().splitlines()]
    Path(next(r for r in runs if (r["seed"], r["method"]) == (2, "grpo"))["weights_delta"]).unlink()
    entries = race_findings.main(["--runs", str(tiny_race["runs"]), "--out", str(tiny_race["out"]), "--points", "2"])
    assert entries[f"{MODEL}/{TASK}"]["seeds"] == [1, 2] and entries[f"{MODEL}/{TASK}"]["geometry_seeds"] == [1]
    assert "seeds 2 not measured: their saved updates are absent" in capsys.readouterr().out
