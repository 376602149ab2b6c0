"""The one-line swap keeps a GRPO script's meaning: every GRPOConfig field keeps it, gets an ES meaning, or is warned
about or refused by name (docs/grpo_fields.md); the reward-function contract holds as under GRPOTrainer."""

import asyncio
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments
from trl import GRPOConfig

from lightning_es import PopulationError
from lightning_es.engine.shaping import zscore
from swap import run_swapped
from tiny import build_model, build_tokenizer
from trl_ext import ESConfig, ESTrainer
from trl_ext.grpo_fields import FIELDS, OPTIMIZER, REFUSED, WARNED, SwapWarning, audit_table

DOCS = Path(__file__).parents[1] / "docs" / "grpo_fields.md"


def es_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, population_size=4,
                    sigma=0.02, learning_rate=1e-3, max_completion_length=4, report_to="none", bf16=False,
                    use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1)
    return ESConfig(**{**settings, **overrides})


def token_rate(completion_ids, **kwargs):
    return [sum(t < 150 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def train(tmp_path, reward_funcs, dataset, **overrides):
    tokenizer = build_tokenizer()
    trainer = ESTrainer(build_model(tokenizer), reward_funcs, args=es_args(tmp_path, **overrides),
                        train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return trainer


PROMPTS = Dataset.from_dict({"prompt": ["the quick", "what is 12", "count the", "brown fox"],
                             "target": ["a", "b", "c", "d"]})


# ---- the audit itself --------------------------------------------------------------------------------------------


def test_every_grpo_field_is_audited_and_the_docs_show_the_audit():
    import trl

    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    grpo_only = {f.name for f in dataclasses.fields(GRPOConfig) if f.init} - trainer_fields
    assert grpo_only <= set(FIELDS), sorted(grpo_only - set(FIELDS))
    assert set(FIELDS) <= {f.name for f in dataclasses.fields(GRPOConfig)}
    if not trl.__version__.startswith("1.16."):  # the table's defaults are TRL 1.16's (pad_to_multiple_of differs)
        pytest.skip(f"docs/grpo_fields.md shows TRL 1.16's defaults; TRL {trl.__version__} is installed")
    assert DOCS.read_text().endswith(audit_table(ESConfig))


@pytest.mark.parametrize("name", [n for n, row in FIELDS.items() if row.meaning is WARNED
                                  and n not in ("generation_batch_size", "steps_per_generation")])
def test_warned_fields_warn_by_name_when_set(tmp_path, name):
    default = ESConfig.__dataclass_fields__[name].default
    strings = {"loss_type": "grpo", "importance_sampling_level": "sequence", "scale_rewards": "batch"}
    if isinstance(default, bool):
        chosen = not default
    elif isinstance(default, int | float):
        chosen = default + 2
    else:
        chosen = strings.get(name, 0.5)
    with pytest.warns(SwapWarning) as warned:
        try:
            es_args(tmp_path, **{name: chosen})
        except ValueError:
            pass  # a value another check refuses; the warning was given first
    assert f"{name}={chosen!r}" in str(warned[0].message)


def test_generation_batching_fields_warn(tmp_path):
    with pytest.warns(SwapWarning, match="steps_per_generation=4"):
        args = es_args(tmp_path, steps_per_generation=4)
    assert args.steps_per_generation == 1


def test_a_grpo_configs_generation_batch_is_named_as_the_user_set_it():
    """GRPOConfig derives steps_per_generation from generation_batch_size: the swap's warning names the one set."""
    from trl_ext.config import to_es_config

    grpo = GRPOConfig(output_dir="unused", use_cpu=True, per_device_train_batch_size=8, generation_batch_size=16)
    with pytest.warns(SwapWarning) as caught:
        args = to_es_config(grpo)
    (swap,) = [str(w.message) for w in caught if issubclass(w.category, SwapWarning)]
    assert "generation_batch_size=16 (steps_per_generation=2) ignored" in swap
    assert "\n  - steps_per_generation=2 ignored" not in swap  # not as if the user had set it
    assert args.steps_per_generation == 1 and args.generation_batch_size == 8


@pytest.mark.parametrize(("name", "value"), [
    ("sync_ref_model", True), ("use_transformers_continuous_batching", True),
    ("auto_find_batch_size", True),
])
def test_refused_fields_are_errors_that_name_them(tmp_path, name, value):
    assert FIELDS[name].meaning is REFUSED
    with pytest.raises(ValueError, match=rf"ESTrainer does not support {name}={value!r}"):
        es_args(tmp_path, **{name: value})


def test_beta_keeps_the_start_weights_instead_of_a_reference_model(tmp_path, tiny_dir, monkeypatch):
    """GRPO loads a second model as beta's reference; ES keeps one copy of the start weights instead (host memory)."""
    import trl.trainer.grpo_trainer as grpo

    built = []
    create = grpo.create_model_from_path
    monkeypatch.setattr(grpo, "create_model_from_path", lambda *a, **k: built.append(a) or create(*a, **k))
    grpo_args = GRPOConfig(output_dir=str(tmp_path), beta=0.04, use_cpu=True, report_to="none")
    trainer = ESTrainer(str(tiny_dir), token_rate, args=grpo_args, train_dataset=PROMPTS)
    assert len(built) == 1  # the policy only
    assert trainer.beta == trainer.args.beta == 0.04 and trainer.ref_model is None
    assert trainer.es.start is not None and trainer.es.start.nbytes == sum(
        p.numel() * p.element_size() for p in trainer.es.params.values())
    with pytest.raises(ValueError, match=r"beta must be non-negative, got -0.1.*fitness = shaped reward - beta \* KL"):
        es_args(tmp_path, beta=-0.1)


@pytest.mark.parametrize("optimizer", ["sgd", "trainer"])
def test_optimizer_fields_keep_their_meaning_with_the_trainers_optimizer(tmp_path, recwarn, optimizer):
    assert FIELDS["weight_decay"].meaning is OPTIMIZER
    trainer = train(tmp_path, token_rate, PROMPTS, es_optimizer=optimizer, weight_decay=0.1, max_steps=1)
    warned = any("weight_decay=0.1 is ignored: es_optimizer='sgd'" in str(w.message) for w in recwarn)
    assert warned == (optimizer == "sgd")
    if optimizer == "trainer":
        assert 0.1 in {group["weight_decay"] for group in trainer.optimizer.param_groups}


# ---- batch arithmetic, evaluation and decoding -------------------------------------------------------------------


def test_a_batch_that_does_not_divide_into_prompts_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"per_device_train_batch_size \(12\) must be a multiple of num_generations "
                                         r"\(8\).*4 rows would be dropped.*per_device_train_batch_size=8 or 16"):
        es_args(tmp_path, per_device_train_batch_size=12, num_generations=8)


@pytest.mark.parametrize("num_generations", [1, 3])
def test_evaluation_with_an_odd_eval_batch(tmp_path, num_generations):
    tokenizer = build_tokenizer()
    args = es_args(tmp_path, num_generations=num_generations, per_device_train_batch_size=num_generations,
                   eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=3)
    trainer = ESTrainer(build_model(tokenizer), token_rate, args=args, train_dataset=PROMPTS, eval_dataset=PROMPTS,
                        processing_class=tokenizer)
    trainer.train()
    evaluated = [h for h in trainer.state.log_history if "eval_reward" in h]
    assert len(evaluated) == 2 and all(0.0 <= h["eval_reward"] <= 1.0 for h in evaluated)


@pytest.mark.parametrize(("settings", "greedy"), [
    ({}, True),
    ({"temperature": 0.7}, False),
    ({"generation_kwargs": {"top_p": 0.9}}, False),
    ({"generation_kwargs": {"min_new_tokens": 2}}, True),
    ({"num_generations": 2}, False),
    ({"num_generations": 2, "es_greedy": True}, True),
])
def test_members_decode_greedily_only_when_no_sampling_was_asked_for(tmp_path, settings, greedy):
    tokenizer = build_tokenizer()
    trainer = ESTrainer(build_model(tokenizer), token_rate, args=es_args(tmp_path, **settings), train_dataset=PROMPTS,
                        processing_class=tokenizer)
    assert trainer.generation_config.do_sample is not greedy
    if settings.get("temperature"):
        assert trainer.generation_config.temperature == settings["temperature"]


# ---- ES meanings ----------------------------------------------------------------------------------------------


def test_normalize_then_sum_standardizes_each_function_over_the_population(tmp_path, caplog):
    def big(completion_ids, **kwargs):
        return [1000.0 * len(ids) for ids in completion_ids]

    def small(completion_ids, **kwargs):
        return [sum(t < 150 for t in ids) for ids in completion_ids]

    tokenizer = build_tokenizer()
    for aggregation in ("sum_then_normalize", "normalize_then_sum"):
        trainer = ESTrainer(build_model(tokenizer), [big, small], args=es_args(
            tmp_path, multi_objective_aggregation=aggregation, max_steps=1), train_dataset=PROMPTS,
            processing_class=tokenizer)
        seen = []
        step = trainer.es.step
        trainer.es.step = lambda s, fitness, lr=None, **kw: seen.append((fitness.clone(), kw)) or step(s, fitness, lr,
                                                                                                  **kw)
        trainer.train()
        fitness, passed = seen[0]
        if aggregation == "normalize_then_sum":
            # two z-scored functions summed with weight 1: mean 0, and not the scale of `big`
            assert abs(float(fitness.mean())) < 1e-9 and float(fitness.abs().max()) < 10
            # the default shaping reads prompts: the sum is shaped as a z-score instead, and the user is told
            assert "multi_objective_aggregation='normalize_then_sum' with 2 reward functions" in caplog.text
            assert passed["per_prompt"].shape == (4, 0)
            torch.testing.assert_close(trainer.es.shaped(fitness, **passed), zscore(fitness))
        else:
            assert float(fitness.mean()) > 100  # dominated by `big`


def test_truncated_completions_leave_the_fitness_when_masked(tmp_path):
    def lengths(completion_ids, **kwargs):
        return [float(len(ids)) for ids in completion_ids]

    # max_completion_length 1 and a tiny random model: every completion is cut; masked, no member has a fitness, and
    # the run goes on without moving (as GRPO's masked completions carry no advantage)
    masked = train(tmp_path, lengths, PROMPTS, mask_truncated_completions=True, max_completion_length=1)
    assert masked.state.global_step == 2
    assert [h["es/unscored_members"] for h in masked.state.log_history if "es/unscored_members" in h] == [4, 4]
    trainer = train(tmp_path, lengths, PROMPTS, mask_truncated_completions=False, max_completion_length=1)
    assert trainer.state.global_step == 2
    assert [h["es/unscored_members"] for h in trainer.state.log_history if "es/unscored_members" in h] == [0, 0]


@pytest.mark.parametrize("perturbation", ["full", "lowrank"])
def test_update_norm_is_the_applied_step_with_the_trainers_optimizer(tmp_path, perturbation):
    tokenizer = build_tokenizer()
    # 8 members: with 4, both mirrored pairs of the low-rank run's first step happen to tie (g = 0)
    trainer = ESTrainer(build_model(tokenizer), token_rate, args=es_args(
        tmp_path, es_optimizer="trainer", max_steps=1, learning_rate=1e-3, max_grad_norm=0.0, population_size=8,
        perturbation=perturbation), train_dataset=PROMPTS, processing_class=tokenizer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = math.sqrt(sum(float((p.detach() - before[n]).double().pow(2).sum()) for n, p in trainer.model.named_parameters()))
    logged = trainer.state.log_history[0]["es/update_norm"]
    assert moved > 0 and logged == pytest.approx(moved, rel=1e-5)


# ---- the reward-function contract ------------------------------------------------------------------------------


def test_reward_functions_report_back_through_log_metric_and_log_extra(tmp_path):
    def reporting(completion_ids, log_metric, log_extra, **kwargs):
        log_metric("mean_length", sum(len(ids) for ids in completion_ids) / len(completion_ids))
        log_extra("length", [len(ids) for ids in completion_ids])
        return [float(len(ids)) for ids in completion_ids]

    trainer = train(tmp_path, reporting, PROMPTS, log_completions=True, num_completions_to_print=1)
    logged = trainer.state.log_history[0]
    assert logged["mean_length"] == pytest.approx(logged["completions/mean_length"])
    table = pd.read_parquet(tmp_path / "out" / "completions" / "completions_00001.parquet")
    assert table["length"].tolist() == table["reporting"].astype(int).tolist()


def test_log_completions_writes_every_members_rows(tmp_path):
    trainer = train(tmp_path, token_rate, PROMPTS, log_completions=True, num_completions_to_print=2)
    tables = sorted((tmp_path / "out" / "completions").glob("*.parquet"))
    assert len(tables) == 2
    table = pd.read_parquet(tables[-1])
    population, rows = trainer.args.population_size, trainer.args.per_device_train_batch_size
    assert len(table) == population * rows
    assert {"step", "prompt", "completion", "token_rate", "advantage", "member"} <= set(table.columns)
    assert sorted(table["member"].unique()) == list(range(population))
    advantage = table.groupby("member")["advantage"].first()
    assert abs(advantage.mean()) < 1e-9 and advantage.std() > 0  # z-scored member fitness


def test_async_reward_functions_and_reward_models(tmp_path):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    async def async_rate(completion_ids, **kwargs):
        await asyncio.sleep(0)
        return token_rate(completion_ids)

    tokenizer = build_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    reward_model = Qwen2ForSequenceClassification(config)
    reward_model.config._name_or_path = "org/tiny-reward"  # TRL names a reward model by its path, as if loaded
    trainer = ESTrainer(build_model(tokenizer), [async_rate, reward_model], args=es_args(tmp_path, max_steps=1),
                        train_dataset=PROMPTS, processing_class=tokenizer, reward_processing_classes=[None, tokenizer])
    trainer.train()
    logged = trainer.state.log_history[0]
    assert 0.0 <= logged["rewards/async_rate/mean"] <= 1.0
    assert math.isfinite(logged["rewards/tiny-reward/mean"])
    assert logged["rewards/tiny-reward/std"] > 0  # members' completions scored apart


@pytest.mark.parametrize("nan", [float("nan"), np.float32("nan"), np.float64("nan"), torch.tensor(float("nan"))])
def test_a_nan_reward_of_any_number_type_is_an_error(tmp_path, nan):
    with pytest.raises(PopulationError, match="'nan_of_some_type' returned NaN for completion 0"):
        def nan_of_some_type(completions, **kwargs):
            return [nan] * len(completions)

        train(tmp_path, nan_of_some_type, PROMPTS)


# ---- a GRPO script that sets many fields, swapped in one line ----------------------------------------------------


def run_many_fields(tmp_path, tiny_dir, monkeypatch, **extra_fields):
    return run_swapped("grpo_many_fields.py", tmp_path, monkeypatch, MODEL_DIR=str(tiny_dir),
                            OUTPUT_DIR=str(tmp_path / "out"), EXTRA_FIELDS=json.dumps(extra_fields))


def test_a_grpo_script_with_many_fields_keeps_their_meaning(tmp_path, tiny_dir, monkeypatch):
    with pytest.warns(SwapWarning) as caught:
        namespace = run_many_fields(tmp_path, tiny_dir, monkeypatch)
    trainer, calls, args = namespace["trainer"], namespace["calls"], namespace["trainer"].args
    history = trainer.state.log_history
    train_logs = [h for h in history if "es/fitness_mean" in h]
    # output_dir, max_steps, save_strategy/save_steps: two checkpoints, with the ES state
    assert trainer.state.global_step == 4
    assert all((tmp_path / "out" / f"checkpoint-{s}" / "es_state.pt").exists() for s in (2, 4))
    # per_device_train_batch_size 4 with num_generations 2: every member answers 2 prompts twice (the default low-rank
    # population: one call for all members, their rows one member after another)
    train_calls = [c for c in calls if len(c["prompts"]) == 4 * args.population_size]
    assert len(train_calls) == 4
    assert all(c["prompts"] == c["prompts"][:4] * args.population_size for c in train_calls)
    assert all(c["prompts"][0] == c["prompts"][1] and c["prompts"][2] == c["prompts"][3] for c in train_calls)
    # shuffle_dataset=False: the prompts in dataset order; dataset columns reach the reward function
    assert train_calls[0]["prompts"][:4:2] == ["the quick", "count the"] and train_calls[0]["target"][:4:2] == ["0", "1"]
    # max_completion_length 5; temperature 0.9, top_k 50, repetition_penalty 1.1: sampled members
    assert max(len(ids) for c in calls for ids in c["completion_ids"]) <= 5
    generation = trainer.generation_config
    assert generation.do_sample and (generation.temperature, generation.top_k, generation.repetition_penalty) == (
        0.9, 50, 1.1)
    # seed; logging_steps 1
    assert args.seed == 7 and len(train_logs) == 4
    # lr_scheduler_type cosine with warmup_steps 1: the ES step warms up, then decays
    rates = [h["learning_rate"] for h in train_logs]
    assert rates[0] < rates[1] and rates[1] > rates[2] > rates[3]
    # reward_weights [1, 2]: the logged reward is the weighted sum
    first = train_logs[0]
    assert first["reward"] == pytest.approx(first["rewards/reward_length/mean"]
                                            + 2 * first["rewards/reward_low_tokens/mean"], rel=1e-6)
    # async reward function; log_metric from the reward function
    assert "rewards/reward_low_tokens/mean" in first and "length_seen" in first
    # log_completions, num_completions_to_print, log_extra: tables with every member's rows and the extra column
    table = pd.read_parquet(tmp_path / "out" / "completions" / "completions_00004.parquet")
    assert len(table) == args.population_size * 4 and "target_echo" in table.columns
    # eval_strategy steps 2, per_device_eval_batch_size 3, num_generations_eval 3: the unperturbed policy's reward
    evaluated = [h for h in history if "eval_reward" in h]
    assert [h["step"] for h in evaluated] == [2, 4]
    assert all(len(c["prompts"]) == 3 and len(set(c["prompts"])) == 1 for c in calls if len(c["prompts"]) == 3)
    # multi_objective_aggregation normalize_then_sum: its ES meaning (tested on its own)
    assert args.multi_objective_aggregation == "normalize_then_sum"
    # loss_type, num_iterations, epsilon, scale_rewards: no ES counterpart, each named in the one warning of the swap
    swap = [w for w in caught if issubclass(w.category, SwapWarning)]
    assert len(swap) == 1, [str(w.message) for w in swap]
    for warned in ("loss_type='grpo'", "num_iterations=2", "epsilon=0.3", "scale_rewards='batch'"):
        assert f"\n  - {warned} ignored" in str(swap[0].message), warned


def test_the_same_script_with_beta_trains_with_its_kl_penalty(tmp_path, tiny_dir, monkeypatch):
    trainer = run_many_fields(tmp_path, tiny_dir, monkeypatch, beta=0.04)["trainer"]
    train_logs = [h for h in trainer.state.log_history if "es/fitness_mean" in h]
    assert len(train_logs) == 4 and all(h["kl"] >= 0 for h in train_logs)  # sampled members: TRL's k3 estimate
    assert any(h["kl"] > 0 for h in train_logs[1:])  # moved away from the start
