import logging
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import GRPOConfig

from swap import run_swapped
from tiny import build_model, build_tokenizer
from trl_ext import ESConfig, ESTrainer
from lightning_es.engine.scales import DEFAULT_RELATIVE_LEARNING_RATE, DEFAULT_RELATIVE_SIGMA
from lightning_es import PopulationError
from trl_ext.checkpoints import why_not_resumable
from trl_ext.grpo_fields import SwapWarning



def es_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        population_size=4,
        sigma=0.02,
        learning_rate=1e-3,
        max_completion_length=4,
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )
    settings.update(overrides)
    return ESConfig(**settings)


def token_rate(completion_ids, **kwargs):
    """Fraction of completion tokens from the lower half of the tiny vocabulary: dense, with a clear optimum."""
    return [sum(t < 150 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---- the one-line swap and GRPOConfig acceptance --------------------------------------------------------------


def test_one_line_swap_turns_a_grpo_script_into_an_es_run(tmp_path, tiny_dir, monkeypatch):
    namespace = run_swapped("grpo_style.py", tmp_path, monkeypatch, MODEL_DIR=str(tiny_dir),
                            OUTPUT_DIR=str(tmp_path / "es"))
    trainer = namespace["trainer"]
    assert isinstance(trainer, ESTrainer)
    logged = trainer.state.log_history[0]
    assert {"reward", "rewards/reward_length_match/mean", "es/update_norm", "es/fitness_std"} <= set(logged)
    assert trainer.state.global_step == 2
    original = AutoModelForCausalLM.from_pretrained(tiny_dir)
    moved = {n for (n, p), q in zip(trainer.model.named_parameters(), original.parameters()) if not torch.equal(p, q)}
    assert moved == {n for n, p in trainer.model.named_parameters() if p.requires_grad}  # as GRPO trains them all


def test_grpo_config_keeps_what_the_user_changed_and_takes_es_defaults(tmp_path, tiny_model, tokenizer,
                                                                        prompt_dataset):
    grpo = GRPOConfig(
        output_dir=str(tmp_path / "grpo"), learning_rate=3e-6, max_steps=3, seed=5, per_device_train_batch_size=4,
        num_generations=2, max_completion_length=3, report_to="none", bf16=False, use_cpu=True, logging_steps=7,
    )
    assert (grpo.lr_scheduler_type, grpo.disable_dropout, grpo.gradient_checkpointing) == ("linear", False, True)
    with pytest.warns(SwapWarning) as caught:
        trainer = ESTrainer(tiny_model, token_rate, args=grpo, train_dataset=prompt_dataset, processing_class=tokenizer)
    args = trainer.args
    assert isinstance(args, ESConfig)
    assert (args.output_dir, args.max_steps, args.seed, args.max_completion_length, args.logging_steps) == (
        grpo.output_dir, 3, 5, 3, 7,
    )
    # left at TRL's defaults: ES's defaults apply
    assert (args.lr_scheduler_type, args.disable_dropout, args.gradient_checkpointing) == ("constant", True, False)
    assert args.population_size == 16 and args.sigma is None
    assert (args.relative_sigma, args.relative_learning_rate) == (DEFAULT_RELATIVE_SIGMA, DEFAULT_RELATIVE_LEARNING_RATE)
    assert args.prompts_per_step == 2 and not args.greedy  # GRPO's batch of 4 completions: 2 prompts x 2 samples
    (swap,) = [str(w.message) for w in caught if issubclass(w.category, SwapWarning)]  # one block
    assert "learning_rate=3e-06 (tuned for Adam on true gradients) is not used: ES steps by its default learning_rate 0.0015" in swap
    assert "lr_scheduler_type: 'linear' -> 'constant'" in swap and "num_generations" not in swap  # kept: not listed


def test_a_default_grpo_config_gets_es_defaults_and_says_so_in_one_warning(tmp_path, tiny_model, tokenizer,
                                                                           prompt_dataset):
    grpo = GRPOConfig(output_dir=str(tmp_path / "grpo"), use_cpu=True)
    with pytest.warns(SwapWarning) as caught:
        args = ESTrainer(tiny_model, token_rate, args=grpo, train_dataset=prompt_dataset, processing_class=tokenizer).args
    defaults = ESConfig(output_dir=str(tmp_path / "es"), use_cpu=True)
    for name in ("learning_rate", "lr_scheduler_type", "num_generations", "disable_dropout", "gradient_checkpointing",
                 "population_size", "sigma", "perturbation", "logging_steps"):
        assert getattr(args, name) == getattr(defaults, name), name
    assert args.per_device_train_batch_size == 8  # always kept: with num_generations it sets the prompts per step
    assert args.greedy
    swap = [str(w.message) for w in caught if issubclass(w.category, SwapWarning)]
    assert len(swap) == 1  # every change in one block, visible without a logging handler
    assert "num_generations: 8 -> 1" in swap[0] and "learning_rate=1e-06 (tuned for Adam" in swap[0]
    assert "per_device_train_batch_size=8 with num_generations 1: 8 prompts per iteration" in swap[0]
    assert "GRPOTrainer: 1 prompt(s) x 8 sampled completions" in swap[0]
    grouped = GRPOConfig(output_dir=str(tmp_path / "grouped"), use_cpu=True, num_generations=4)
    args = ESTrainer(tiny_model, token_rate, args=grouped, train_dataset=prompt_dataset, processing_class=tokenizer).args
    assert (args.per_device_train_batch_size, args.num_generations, args.prompts_per_step) == (8, 4, 2)


def test_es_config_defaults_are_the_measured_ones():
    args = ESConfig(output_dir="unused", report_to="none", use_cpu=True)
    # docs/reports/accuracy-race/: tuned on validation accuracy (generated word problems, SmolLM2-135M-Instruct)
    assert (args.population_size, args.sigma, args.antithetic) == (16, None, True)
    # relative noise and step: the study's sigma 1e-2 and lr 1e-4 as fractions of SmolLM2's median weight RMS (0.19),
    # which keeps Gemma-3-270M's members coherent too (docs/reports/noise-scale/)
    assert (args.relative_sigma, args.relative_learning_rate) == (0.03, 1.5e-3)
    assert (args.perturbation, args.perturbation_rank) == ("lowrank", 4)
    assert args.per_device_train_batch_size == 8 and args.prompts_per_step == 8
    assert args.fitness_shaping == "prompt_zscore" and args.num_generations == 1 and args.greedy


def test_members_decode_greedily_by_default(tmp_path, tiny_model, tokenizer, prompt_dataset):
    trainer = ESTrainer(tiny_model, token_rate, args=es_args(tmp_path), train_dataset=prompt_dataset, processing_class=tokenizer)
    assert trainer.generation_config.do_sample is False
    sampled = es_args(tmp_path, num_generations=2)
    trainer = ESTrainer(tiny_model, token_rate, args=sampled, train_dataset=prompt_dataset, processing_class=tokenizer)
    assert trainer.generation_config.do_sample is True


# ---- reward functions are called as TRL calls them -------------------------------------------------------------


@pytest.mark.parametrize("perturbation", ["full", "lowrank"])
@pytest.mark.parametrize("dataset_fixture", ["prompt_dataset", "chat_dataset"])
def test_reward_functions_get_trl_arguments(tmp_path, tiny_model, tokenizer, dataset_fixture, perturbation, request):
    dataset = request.getfixturevalue(dataset_fixture)
    calls = []

    def recorder(prompts, completions, completion_ids, target, trainer_state, **kwargs):
        calls.append(dict(prompts=prompts, completions=completions, ids=completion_ids, target=target))
        return [float(len(ids)) for ids in completion_ids]

    args = es_args(tmp_path, max_steps=1, num_generations=2, perturbation=perturbation)
    ESTrainer(tiny_model, [recorder, token_rate], args=args, train_dataset=dataset, processing_class=tokenizer).train()
    # full-rank: one call per member; low-rank: one call for the population, each member's 4 rows after the other's
    members_per_call = 1 if perturbation == "full" else args.population_size
    assert len(calls) == args.population_size // members_per_call
    first = calls[0]
    assert len(first["prompts"]) == len(first["completions"]) == len(first["target"]) == 4 * members_per_call
    assert first["prompts"][0] == first["prompts"][1]  # num_generations copies of each prompt
    member_prompts = [c["prompts"][i:i + 4] for c in calls for i in range(0, len(c["prompts"]), 4)]
    assert len(member_prompts) == args.population_size
    assert all(member_prompts[0] == p for p in member_prompts)  # every member answers the same prompts
    if dataset_fixture == "chat_dataset":
        assert first["completions"][0][0]["role"] == "assistant"
    else:
        assert isinstance(first["completions"][0], str)


def test_reward_weights_and_none_rewards(tmp_path, tiny_model, tokenizer, prompt_dataset):
    def ones(completions, **kwargs):
        return [1.0] * len(completions)

    def sometimes_none(completions, **kwargs):
        return [None if i % 2 else 2.0 for i in range(len(completions))]

    args = es_args(tmp_path, max_steps=1, reward_weights=[1.0, 0.5])
    trainer = ESTrainer(tiny_model, [ones, sometimes_none], args=args, train_dataset=prompt_dataset, processing_class=tokenizer)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["rewards/sometimes_none/mean"] == 2.0
    assert logged["reward"] == pytest.approx((2.0 + 1.0) / 2)  # rows: 1 + 0.5 * 2, and 1 + nothing


# ---- bad input -------------------------------------------------------------------------------------------------


def broken(completions, **kwargs):
    raise KeyError("answer")


def too_few(completions, **kwargs):
    return [0.0]


def nan_reward(completions, **kwargs):
    return [math.nan] * len(completions)


def all_none(completions, **kwargs):
    return [None] * len(completions)


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        # the default low-rank population is scored in one batch, so errors name all its members
        (broken, r"ES step 0, population members \[0, 1, 2, 3\] \(process 0\): RewardFunctionError: reward function "
                 r"'broken' raised KeyError: 'answer'"),
        (too_few, r"ES step 0, population members \[0, 1, 2, 3\] .*'too_few' returned 1 rewards, expected 16"),
        (nan_reward, r"ES step 0, population members \[0, 1, 2, 3\] .*'nan_reward' returned NaN for completion 0"),
    ],
)
def test_bad_reward_functions_fail_with_their_name_and_step(tmp_path, tiny_model, tokenizer, prompt_dataset, reward, message):
    before = weights(tiny_model)
    trainer = ESTrainer(tiny_model, reward, args=es_args(tmp_path), train_dataset=prompt_dataset, processing_class=tokenizer)
    with pytest.raises(PopulationError, match=message):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())  # failure left weights intact


def test_dataset_without_prompt_column(tmp_path, tiny_model, tokenizer):
    dataset = Dataset.from_dict({"question": ["a", "b"]})
    with pytest.raises(ValueError, match=r"train_dataset has no 'prompt' column .*'question'.*rename_column"):
        ESTrainer(tiny_model, token_rate, args=es_args(tmp_path), train_dataset=dataset, processing_class=tokenizer)


def test_es_params_selecting_nothing(tmp_path, tiny_model, tokenizer, prompt_dataset):
    args = es_args(tmp_path, es_params=["no_such_layer"])
    with pytest.raises(ValueError, match=r"es_params=\['no_such_layer'\] selects no parameter"):
        ESTrainer(tiny_model, token_rate, args=args, train_dataset=prompt_dataset, processing_class=tokenizer)


def test_es_params_narrow_what_the_lowrank_default_evolves(tmp_path, tiny_model, tokenizer, prompt_dataset):
    selection = [r"layers\.0\.(self_attn\.q_proj|input_layernorm)"]
    trainer = ESTrainer(tiny_model, token_rate, args=es_args(tmp_path, es_params=selection),
                        train_dataset=prompt_dataset, processing_class=tokenizer)
    assert sorted(trainer.es.params) == ["model.layers.0.input_layernorm.weight",
                                         "model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.q_proj.weight"]


def test_members_without_a_scored_completion_sit_out_the_step(tmp_path, tiny_model, tokenizer, prompt_dataset, caplog):
    """As GRPO gives unscorable completions no advantage and goes on: members whose every completion got None take
    no part in the update (which is the ES step of the others alone), a warning names them, and their number is
    logged."""
    population = 4

    def half_none(completion_ids, **kwargs):  # the batched population: rows grouped by member, in member order
        share = len(completion_ids) // population
        return [None if i < 2 * share else float(sum(ids)) for i, ids in enumerate(completion_ids)]

    # the z-score of the two members' mean rewards, whose step is written out below
    args = es_args(tmp_path, max_steps=1, population_size=population, fitness_shaping="zscore")
    trainer = ESTrainer(tiny_model, half_none, args=args, train_dataset=prompt_dataset, processing_class=tokenizer)
    seen = []
    step = trainer.es.step
    trainer.es.step = lambda s, fitness, lr=None, scored=None, **kwargs: seen.append((fitness, scored)) or step(
        s, fitness, lr, scored, **kwargs)
    before = weights(trainer.model)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    fitness, scored = seen[0]
    assert scored.tolist() == [False, False, True, True]
    assert "population members [0, 1] have no scored completion" in caplog.text
    assert trainer.state.log_history[0]["es/unscored_members"] == 2
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert moved  # the step went on, from members 2 and 3
    # the update is the ES step of members 2 and 3 alone: their (shared, antithetic) noise scaled by
    # (z_2 - z_3) / (2 sigma), with z the z-scores of the two, i.e. +-1
    name = moved[0]
    member = trainer.es.members(0)[2]
    noise = trainer.es.perturbation.dense_noise(member.seed, name)
    expected = args.learning_rate * (2.0 if fitness[2] > fitness[3] else -2.0) / (2 * args.sigma) * noise
    torch.testing.assert_close(trainer.model.get_parameter(name).detach() - before[name], expected, rtol=1e-4,
                               atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(population_size=1), "population_size must be at least 2"),
        (dict(population_size=7), "population_size must be even when antithetic=True"),
        (dict(sigma=0.0), "sigma must be positive"),
        (dict(sigma=-1e-3), "sigma must be positive"),
        (dict(fitness_shaping="softmax"), "fitness_shaping must be one of"),
        (dict(es_optimizer="adam"), "es_optimizer must be one of"),
    ],
)
def test_bad_es_config_values(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        es_args(tmp_path, **overrides)


def test_odd_population_without_antithetic_is_fine(tmp_path):
    assert es_args(tmp_path, population_size=7, antithetic=False).population_size == 7


# ---- training behaviour ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reward_rises_over_steps(tmp_path, tiny_model, tokenizer):
    dataset = Dataset.from_dict({"prompt": ["the quick", "what is 12", "count the", "brown fox"]})
    args = es_args(tmp_path, max_steps=20, population_size=16, max_completion_length=6)
    trainer = ESTrainer(tiny_model, token_rate, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2


def test_lora_adapters_evolve_and_the_base_stays(tmp_path, tiny_model, tokenizer, prompt_dataset):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = ESTrainer(tiny_model, token_rate, args=es_args(tmp_path), train_dataset=prompt_dataset,
                        processing_class=tokenizer, peft_config=config)
    before = weights(trainer.model)
    trainer.train()
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]) != ("lora_" in name), name


def test_callbacks_logging_evaluate_and_save_model(tmp_path, tiny_model, tokenizer, prompt_dataset):
    seen = []

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    args = es_args(tmp_path, per_device_eval_batch_size=4)
    trainer = ESTrainer(tiny_model, token_rate, args=args, train_dataset=prompt_dataset, eval_dataset=prompt_dataset,
                        processing_class=tokenizer, callbacks=[Recorder()])
    trainer.train()
    assert [log["learning_rate"] for log in seen if "es/fitness_mean" in log] == [1e-3, 1e-3]  # absolute units
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_reward"] <= 1.0 and "eval_rewards/token_rate/mean" in metrics
    assert metrics["eval_loss"] == pytest.approx(-metrics["eval_reward"])
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert all(torch.equal(p, q) for p, q in zip(reloaded.parameters(), trainer.model.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_from_checkpoint_continues_exactly(tmp_path, tokenizer, prompt_dataset, dtype):
    def run(output_dir, resume=None):
        model = build_model(tokenizer, dtype=dtype)
        args = es_args(tmp_path, output_dir=str(output_dir), max_steps=4, save_strategy="steps", save_steps=2,
                       num_generations=2, per_device_train_batch_size=2)  # sampled decoding: RNG must resume too
        trainer = ESTrainer(model, token_rate, args=args, train_dataset=prompt_dataset, processing_class=tokenizer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    uninterrupted = run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / "es_state.pt").exists()
    resumed = run(tmp_path / "b", resume=str(checkpoint))
    for (name, p), q in zip(uninterrupted.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    if dtype == torch.bfloat16:
        for name, master in uninterrupted.es.master.copies.items():
            assert torch.equal(master, resumed.es.master.copies[name])
    rewards = lambda t: [h["reward"] for h in t.state.log_history if "reward" in h]  # noqa: E731
    assert rewards(resumed)[2:] == rewards(uninterrupted)[2:]  # steps 3 and 4 replayed exactly


def test_a_scheduler_saved_with_another_base_rate_resumes_with_the_settings_step(tmp_path, tokenizer, prompt_dataset):
    """0.1.0's checkpoints hold a scheduler (and optimizer) at its default learning_rate 1e-4, which relative noise
    never used as its step: the resumed step is the settings' step times the schedule's factor, as before."""
    def run(output_dir, resume=None):
        args = ESConfig(output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=2, population_size=4,
                        max_completion_length=4, report_to="none", use_cpu=True, save_strategy="steps", save_steps=1,
                        logging_steps=1, disable_tqdm=True)
        trainer = ESTrainer(build_model(tokenizer), token_rate, args=args, train_dataset=prompt_dataset,
                            processing_class=tokenizer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    uninterrupted = run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-1"
    scheduler = torch.load(checkpoint / "scheduler.pt", weights_only=False)
    scheduler["base_lrs"] = scheduler["_last_lr"] = [1e-4] * len(scheduler["base_lrs"])
    torch.save(scheduler, checkpoint / "scheduler.pt")
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    for group in optimizer["param_groups"]:
        group["lr"] = group["initial_lr"] = 1e-4
    torch.save(optimizer, checkpoint / "optimizer.pt")
    resumed = run(tmp_path / "b", resume=str(checkpoint))
    assert [h["learning_rate"] for h in resumed.state.log_history if h.get("step") == 2 and "loss" in h] == [1.5e-3]
    for (name, p), q in zip(uninterrupted.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name


def test_resume_refuses_a_checkpoint_without_es_state(tmp_path, tiny_model, tokenizer, prompt_dataset):
    args = es_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    ESTrainer(tiny_model, token_rate, args=args, train_dataset=prompt_dataset, processing_class=tokenizer).train()
    checkpoint = Path(args.output_dir) / "checkpoint-1"
    (checkpoint / "es_state.pt").unlink()
    trainer = ESTrainer(build_model(tokenizer), token_rate, args=args, train_dataset=prompt_dataset, processing_class=tokenizer)
    with pytest.raises(FileNotFoundError, match="has no es_state.pt"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


# ---- checkpoints and resume: any epoch, any step, any crash -----------------------------------------------------

FIVE_PROMPTS = ["the quick", "what is 12", "count the", "brown fox", "lazy dog"]


def train_recording(output_dir, resume=None, model=None, **overrides):
    """Up to 8 steps over 5 prompts, 2 a step (3 steps an epoch, the last one short), sampled decoding, a checkpoint
    after every step. Returns the trainer and the prompts scored at each step."""
    tokenizer = build_tokenizer()
    seen = {}

    def token_rate_recording(prompts, completion_ids, trainer_state, **kwargs):
        seen.setdefault(trainer_state.global_step, set()).update(prompts)
        return token_rate(completion_ids)

    settings = dict(max_steps=8, per_device_train_batch_size=4, num_generations=2, save_strategy="steps", save_steps=1)
    args = es_args(Path(output_dir), output_dir=str(output_dir), **{**settings, **overrides})
    trainer = ESTrainer(model if model is not None else build_model(tokenizer), token_rate_recording, args=args,
                        train_dataset=Dataset.from_dict({"prompt": FIVE_PROMPTS}), processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, {step: sorted(prompts) for step, prompts in seen.items()}


def assert_same_weights(a, b):
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train_recording(tmp_path_factory.mktemp("uninterrupted") / "out")


@pytest.mark.slow
# one step into the second epoch, one into the third, and the last checkpoint (two into the third: nothing is left)
@pytest.mark.parametrize("checkpoint", [4, 7, 8])
def test_resume_mid_epoch_in_later_epochs_replays_prompts_and_weights(tmp_path, uninterrupted, checkpoint):
    full, full_prompts = uninterrupted
    resumed, prompts = train_recording(tmp_path / "out", resume=f"{full.args.output_dir}/checkpoint-{checkpoint}")
    assert prompts == {step: p for step, p in full_prompts.items() if step >= checkpoint}
    assert_same_weights(full, resumed)


def fail_es_state_save(monkeypatch, checkpoint: str, error: OSError) -> None:
    """From now on, writing es_state.pt into ``checkpoint`` raises ``error``."""
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if checkpoint in str(f) and "es_state" in str(f):
            raise error
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)


def test_a_crash_while_saving_the_es_state_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """save_total_limit=1: the older checkpoint may only go once the newer one can be resumed."""
    fail_es_state_save(monkeypatch, "checkpoint-2", OSError("disk full"))
    with pytest.raises(PopulationError, match=r"saving es_state.pt \(process 0\): OSError: disk full"):
        train_recording(tmp_path / "crashed", max_steps=3, save_total_limit=1)
    monkeypatch.undo()  # saves work again
    checkpoint = tmp_path / "crashed" / "checkpoint-1"
    assert (checkpoint / "es_state.pt").exists()
    resumed, _ = train_recording(tmp_path / "resumed", resume=str(checkpoint), max_steps=3)
    assert_same_weights(train_recording(tmp_path / "full", max_steps=3)[0], resumed)


def test_a_checkpoint_holds_the_es_state_before_it_is_pushed(tmp_path, prompt_dataset, tokenizer):
    args = es_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    trainer = ESTrainer(build_model(tokenizer), token_rate, args=args, train_dataset=prompt_dataset, processing_class=tokenizer)
    pushed = []
    trainer._push_from_checkpoint = lambda folder: pushed.append(sorted(p.name for p in Path(folder).iterdir()))
    trainer.args.push_to_hub = True  # after __init__, which would create a hub repository
    trainer.train()
    assert len(pushed) == 2 and all("es_state.pt" in files and "trainer_state.json" in files for files in pushed)


def test_resume_true_skips_a_checkpoint_whose_save_was_cut_short(tmp_path):
    full, _ = train_recording(tmp_path / "out", max_steps=3)
    state = tmp_path / "out" / "checkpoint-3" / "trainer_state.json"
    state.write_text(state.read_text()[:40])  # killed while writing the last file of checkpoint-3
    with pytest.raises(FileNotFoundError, match=r"checkpoint-3 cannot be resumed: its trainer_state.json is missing or "
                                                r"incomplete .*newest complete checkpoint beside it is .*checkpoint-2"):
        train_recording(tmp_path / "other", resume=str(state.parent), max_steps=3)
    resumed, prompts = train_recording(tmp_path / "out", resume=True, max_steps=3)
    assert list(prompts) == [2]  # resumed from checkpoint-2, the newest complete one
    assert_same_weights(full, resumed)


def test_anchored_decay_resumes_towards_the_anchor_of_the_run(tmp_path):
    """The anchor (the run's starting weights) is in the checkpoint: resuming from a model loaded from the checkpoint
    pulls towards the run's start, not towards the checkpoint."""
    full, _ = train_recording(tmp_path / "full", max_steps=4, es_anchor_decay=50.0)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    resumed, _ = train_recording(tmp_path / "resumed", resume=str(checkpoint), max_steps=4, es_anchor_decay=50.0,
                                 model=AutoModelForCausalLM.from_pretrained(checkpoint))
    assert_same_weights(full, resumed)


@pytest.mark.parametrize("setting", ["fsdp_argument", "accelerate_fsdp_config"])
def test_fsdp_is_refused(tmp_path, monkeypatch, setting):
    overrides = {}
    if setting == "fsdp_argument":
        overrides["fsdp"] = "full_shard"
    else:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch --use_fsdp sets
    with pytest.raises(ValueError, match="ESTrainer does not run under FSDP.*DeepSpeed ZeRO-3"):
        es_args(tmp_path, **overrides)


def test_anchor_decay_with_the_trainers_optimizer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="es_anchor_decay=0.1 pulls the in-place ES step.*es_optimizer='trainer'"):
        es_args(tmp_path, es_anchor_decay=0.1, es_optimizer="trainer")


def test_a_save_over_an_older_checkpoint_is_incomplete_until_it_ends(tmp_path, monkeypatch):
    """A run resumed from checkpoint-2 saves checkpoint-3 again, over the complete one of the first run: killed in the
    middle, that folder must not pass for complete (its new weights beside the old trainer_state.json)."""
    train_recording(tmp_path / "out", max_steps=4)
    fail_es_state_save(monkeypatch, "checkpoint-3", OSError("killed"))
    with pytest.raises(PopulationError, match="OSError: killed"):
        train_recording(tmp_path / "out", resume=str(tmp_path / "out" / "checkpoint-2"), max_steps=4)
    assert "trainer_state.json is missing" in why_not_resumable(str(tmp_path / "out" / "checkpoint-3"))


def test_save_only_model_warns_that_checkpoints_cannot_resume(tmp_path):
    with pytest.warns(SwapWarning, match=r"save_only_model=True.*cannot resume"):
        es_args(tmp_path, save_only_model=True)


@pytest.mark.parametrize("es_optimizer", ["sgd", "trainer"])
def test_grad_norm_is_left_out_without_a_gradient(tmp_path, tiny_model, tokenizer, prompt_dataset, es_optimizer):
    """transformers leaves grad_norm out when there is none: under the in-place step there is no loss gradient, and
    the ES estimate's norm (which grows with the parameter count over sigma) is es/grad_estimate_norm; with the
    Trainer's optimizer grad_norm is the norm of the .grad it steps on, -g."""
    args = es_args(tmp_path, max_steps=1, es_optimizer=es_optimizer, max_grad_norm=0.0, learning_rate=1e-3)
    trainer = ESTrainer(tiny_model, token_rate, args=args, train_dataset=prompt_dataset, processing_class=tokenizer)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["es/grad_estimate_norm"] > 0
    if es_optimizer == "sgd":  # the applied step is lr * g
        assert "grad_norm" not in logged
        assert logged["es/update_norm"] == pytest.approx(1e-3 * logged["es/grad_estimate_norm"], rel=1e-4)
    else:
        assert logged["grad_norm"] == pytest.approx(logged["es/grad_estimate_norm"], rel=1e-4)
