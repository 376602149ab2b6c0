"""GRPO's ``beta`` under ESTrainer: each member's fitness pays beta times its per-token KL to the start weights; the
start weights are kept once, whatever asks for them; the first step says when the noise cannot separate the members
from the base model."""

import logging
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

import trl_ext.kl_penalty as kl_penalty_module
from lightning_es.drift.metrics import exact_token_kl
from lightning_es.engine import start as start_module
from tiny import build_model, build_tokenizer
from trl_ext import ESConfig, ESTrainer
from trl_ext.callbacks import KLDriftCallback, ParameterDriftCallback
from trl_ext.member_kl import CompletionBatch, completion_logits, row_kl_sums


def constant_reward(completions, **kwargs):
    return [1.0] * len(completions)


def token_rate(completion_ids, **kwargs):
    return [sum(ids) / (300.0 * max(1, len(ids))) for ids in completion_ids]


def args_for(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, population_size=4,
                    max_completion_length=6, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                    logging_steps=1, relative_sigma=0.2)
    return ESConfig(**{**settings, **overrides})


def recorded(monkeypatch):
    """Every call of the trainer's ``row_kl_sums``: (exact, per-row KL sums, token counts)."""
    calls = []

    def recording(member_logits, reference_logits, batch, exact, temperature):
        sums, tokens = row_kl_sums(member_logits, reference_logits, batch, exact, temperature)
        calls.append((exact, sums, tokens, temperature))
        return sums, tokens

    monkeypatch.setattr(kl_penalty_module, "row_kl_sums", recording)
    return calls


# ---- the per-token KL ----------------------------------------------------------------------------------------------


def test_completion_logits_predict_the_completion_tokens_of_left_padded_rows(tokenizer):
    model = build_model(tokenizer, init_range=0.2).eval()
    prompts, completions = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14, 15]]
    batch = CompletionBatch.build(prompts, completions, tokenizer.pad_token_id, torch.device("cpu"))
    logits = completion_logits(model, batch)
    assert logits.shape[:2] == (2, 4) and batch.mask.tolist() == [[False, False, True, True], [True, True, True, True]]
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        alone = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()
        predicting = alone[len(prompt) - 1: -1]  # the positions whose next token is a completion token
        torch.testing.assert_close(logits[row, -len(completion):], predicting, rtol=1e-4, atol=1e-4)
        assert batch.targets[row, -len(completion):].tolist() == completion


def test_exact_kl_and_trls_k3_estimate_follow_their_formulas():
    generator = torch.Generator().manual_seed(0)
    member, reference = torch.randn(3, 4, 7, generator=generator), torch.randn(3, 4, 7, generator=generator)
    batch = CompletionBatch(input_ids=torch.zeros(3, 6, dtype=torch.long), attention_mask=torch.ones(3, 6),
                            targets=torch.randint(0, 7, (3, 4), generator=generator),
                            mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool))
    sums, tokens = row_kl_sums(member, reference, batch, exact=True)
    expected = (exact_token_kl(member, reference) * batch.mask).sum(-1)
    torch.testing.assert_close(sums, expected.double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(tokens, torch.tensor([3.0, 4.0, 1.0], dtype=torch.float64))
    sums, _ = row_kl_sums(member, reference, batch, exact=False)
    log_p = torch.log_softmax(member.double(), -1).gather(-1, batch.targets[..., None]).squeeze(-1)
    log_q = torch.log_softmax(reference.double(), -1).gather(-1, batch.targets[..., None]).squeeze(-1)
    k3 = torch.exp(log_q - log_p) - (log_q - log_p) - 1  # TRL's per_token_kl
    torch.testing.assert_close(sums, (k3 * batch.mask).sum(-1), rtol=1e-5, atol=1e-6)  # log-probs in fp32, as TRL


# ---- beta in the fitness -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampled", [False, True])
def test_a_member_that_drifts_more_scores_lower(tmp_path, tokenizer, prompt_dataset, monkeypatch, sampled):
    """With a constant reward every prompt is tied, and the shaped fitness is -beta * (KL - mean KL), as GRPO's KL term
    beside advantages that are all zero: the member furthest from the start weights scores lowest, by beta times its
    KL, whatever the rewards' scale. Greedy members get the exact KL, sampled ones TRL's k3; ``kl`` is logged as TRL
    logs it."""
    calls = recorded(monkeypatch)
    generations = dict(num_generations=2, per_device_train_batch_size=4) if sampled else {}
    args = args_for(tmp_path, beta=0.5, **generations)
    trainer = ESTrainer(build_model(tokenizer, init_range=0.2), constant_reward, args=args,
                        train_dataset=prompt_dataset, processing_class=tokenizer)
    seen = []
    step = trainer.es.step
    trainer.es.step = lambda s, fitness, **kwargs: seen.append((fitness.clone(), kwargs)) or step(s, fitness, **kwargs)
    trainer.train()
    assert [exact for exact, *_ in calls] == [not sampled] * 2
    for (exact, sums, tokens, _), (fitness, kwargs) in zip(calls, seen):
        members = args.population_size
        kl = sums.view(members, -1).sum(1) / tokens.view(members, -1).sum(1)
        assert (kl > 0).all()
        torch.testing.assert_close(fitness, torch.ones_like(fitness))  # the reward alone
        torch.testing.assert_close(kwargs["penalty"], 0.5 * kl)
        shaped = trainer.es.shaped(fitness, kwargs["scored"], kwargs["per_prompt"], kwargs["penalty"])
        torch.testing.assert_close(shaped, -0.5 * (kl - kl.mean()).double())
        assert int(shaped.argmin()) == int(kl.argmax())
    logged = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    expected = [float(sums.sum() / tokens.sum()) for _, sums, tokens, _ in calls]
    assert logged == pytest.approx(expected, rel=1e-6)


def test_sampled_members_are_scored_at_their_sampling_temperature(tmp_path, tokenizer, prompt_dataset, monkeypatch):
    calls = recorded(monkeypatch)
    args = args_for(tmp_path, beta=0.1, max_steps=1, num_generations=2, per_device_train_batch_size=4, temperature=0.7)
    ESTrainer(build_model(tokenizer), token_rate, args=args, train_dataset=prompt_dataset,
              processing_class=tokenizer).train()
    assert [(exact, temperature) for exact, _, _, temperature in calls] == [(False, 0.7)]


def test_the_kl_in_chunks_equals_the_kl_in_one_pass(tmp_path, tokenizer, prompt_dataset, monkeypatch):
    """Rows are taken in chunks that bound the logits held at once (per member, or parts of a member's rows)."""
    import trl_ext.member_kl as member_kl

    results = {}
    for name, budget in (("one pass", member_kl.LOGITS_BYTES), ("chunks", 1)):
        monkeypatch.setattr(member_kl, "LOGITS_BYTES", budget)
        calls = recorded(monkeypatch)
        args = args_for(tmp_path / name, beta=0.3, max_steps=2, per_device_train_batch_size=3, bf16=False)  # bf16 rounds
        # differently for other batch shapes
        ESTrainer(build_model(tokenizer, init_range=0.2), token_rate, args=args, train_dataset=prompt_dataset,
                  processing_class=tokenizer).train()
        results[name] = calls
    assert len(results["one pass"]) == 2 and len(results["chunks"]) == 2 * 4 * 3  # steps x members x rows
    for step in range(2):
        whole = results["one pass"][step][1]
        parts = torch.cat([sums for _, sums, _, _ in results["chunks"][12 * step:12 * (step + 1)]])
        torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-7)


def test_completions_masked_out_of_the_fitness_leave_the_kl_too(tmp_path, tokenizer, prompt_dataset, monkeypatch):
    """As in GRPO's loss: with mask_truncated_completions, truncated completions count neither in the reward nor in
    the KL; the step ES takes is logged as ``learning_rate``; ``loss`` is beta times the KL."""
    calls = recorded(monkeypatch)
    args = args_for(tmp_path, beta=0.1, max_steps=1, mask_truncated_completions=True, max_completion_length=3)
    trainer = ESTrainer(build_model(tokenizer, init_range=0.2), token_rate, args=args, train_dataset=prompt_dataset,
                        processing_class=tokenizer)
    trainer.train()
    (_, sums, tokens, _), = calls
    logged = trainer.state.log_history[0]
    truncated = logged["completions/clipped_ratio"]
    assert 0 < truncated < 1  # some completions ended within 3 tokens, others were cut
    assert logged["kl"] != pytest.approx(float(sums.sum() / tokens.sum()))  # the cut ones left the KL
    # the step in the units of the noise (relative): the value that, passed as learning_rate, runs the same step
    assert logged["learning_rate"] == args.relative_learning_rate == args.learning_rate
    assert logged["loss"] == pytest.approx(0.1 * logged["kl"], rel=1e-5)  # GRPO's loss at its on-policy step


def test_beta_measures_from_the_start_not_from_the_current_weights(tmp_path, tokenizer, prompt_dataset, monkeypatch):
    """After the first update, the KL of a member is to the start weights: with sigma's noise all but off (members are
    the current weights), it is the drift of the current weights from the start, which the step made non-zero."""
    calls = recorded(monkeypatch)
    args = args_for(tmp_path, beta=0.1, max_steps=3, relative_sigma=1e-6, relative_learning_rate=5e-7)
    trainer = ESTrainer(build_model(tokenizer, init_range=0.2), token_rate, args=args, train_dataset=prompt_dataset,
                        processing_class=tokenizer)
    trainer.train()
    first, *later = [float(sums.sum() / tokens.sum()) for _, sums, tokens, _ in calls]
    assert first < 1e-6  # members are a hair from the start
    assert all(kl > 0 for kl in later)  # measured against the start, which the weights moved from


def test_one_copy_of_the_start_weights_whatever_options_are_on(tmp_path, tokenizer, prompt_dataset, monkeypatch):
    made = []
    init = start_module.StartWeights.__init__
    monkeypatch.setattr(start_module.StartWeights, "__init__", lambda self, *a, **k: made.append(self) or init(self, *a, **k))
    args = args_for(tmp_path, beta=0.1, es_anchor_decay=1.0)
    trainer = ESTrainer(build_model(tokenizer), token_rate, args=args, train_dataset=prompt_dataset,
                        processing_class=tokenizer)
    kl_drift = KLDriftCallback(trainer, ["the lazy dog", "count the"], every_n_steps=1)
    parameter_drift = ParameterDriftCallback(trainer, every_n_steps=1)
    trainer.add_callback(kl_drift), trainer.add_callback(parameter_drift)
    trainer.train()
    assert len(made) == 1
    assert trainer.es.start is made[0] is kl_drift.probe.reference is parameter_drift.start
    assert all(t.device.type == "cpu" for t in trainer.es.start.tensors.values())  # es_start_device: host memory
    history = [h for h in trainer.state.log_history if "drift/kl" in h]
    assert history and all(h["drift/update_norm"] > 0 for h in history)


def test_resume_with_beta_continues_exactly_from_the_runs_start(tmp_path, tokenizer, prompt_dataset):
    """The checkpoint carries the start weights (beta's reference) and the relative scales: a run resumed from a model
    loaded from the checkpoint itself continues exactly as the uninterrupted run."""
    def run(output_dir, resume=None, model=None):
        args = args_for(tmp_path, output_dir=str(output_dir), beta=0.2, max_steps=4, save_strategy="steps",
                        save_steps=1, num_generations=2, per_device_train_batch_size=4)
        trainer = ESTrainer(model or build_model(tokenizer), token_rate, args=args, train_dataset=prompt_dataset,
                            processing_class=tokenizer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-2"
    resumed = run(tmp_path / "resumed", resume=str(checkpoint), model=AutoModelForCausalLM.from_pretrained(checkpoint))
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    kl = [[h["kl"] for h in t.state.log_history if "kl" in h] for t in (full, resumed)]
    assert kl[1][2:] == kl[0][2:]


# ---- the first step checks that the noise separates the members -----------------------------------------------------


def test_noise_too_small_to_separate_the_members_is_warned(tmp_path, tokenizer, prompt_dataset, caplog):
    args = args_for(tmp_path, max_steps=1, relative_sigma=1e-9, relative_learning_rate=1e-10)
    trainer = ESTrainer(build_model(tokenizer, init_range=0.2), token_rate, args=args, train_dataset=prompt_dataset,
                        processing_class=tokenizer)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "all 4 population members gave the same completions" in caplog.text
    assert "relative_sigma=1e-09 is too small" in caplog.text


def test_noise_that_destroys_every_member_is_warned(tmp_path, tokenizer, prompt_dataset, caplog):
    args = args_for(tmp_path, max_steps=1, relative_sigma=0.5, max_completion_length=12)
    trainer = ESTrainer(build_model(tokenizer, init_range=0.2), token_rate, args=args, train_dataset=prompt_dataset,
                        processing_class=tokenizer)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "every population member is at least" in caplog.text and "relative_sigma=0.5 is too large" in caplog.text


def test_default_noise_neither_warning(tmp_path, tokenizer, prompt_dataset, caplog):
    args = ESConfig(output_dir=str(tmp_path), max_steps=1, max_completion_length=6, report_to="none", use_cpu=True,
                    save_strategy="no", disable_tqdm=True)
    trainer = ESTrainer(build_model(tokenizer, init_range=0.2), token_rate, args=args, train_dataset=prompt_dataset,
                        processing_class=tokenizer)
    with caplog.at_level(logging.WARNING, logger="trl_ext.trainer"):
        trainer.train()
    assert "ES step 0" not in caplog.text
