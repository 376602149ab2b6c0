import math

import pytest
import torch
from datasets import Dataset

from lightning_es import EvolutionStrategy, LowRankPerturbation, select_parameters
from lightning_es.engine.perturbations import hookable_linear_weights
from tiny import build_model, build_tokenizer
from trl_ext import ESConfig, ESTrainer


@pytest.mark.parametrize("rank", [1, 2])  # rank 1 adds an outer product, higher ranks a matrix product
def test_hooked_forward_equals_explicitly_perturbed_weights(rank):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    es = EvolutionStrategy(LowRankPerturbation(model, select_parameters(model), sigma=0.05, rank=rank),
                           population_size=4, seed=3)
    members = es.members(0)
    inputs = torch.randint(0, len(tokenizer), (3, 7))
    with torch.no_grad(), es.perturbation.apply_population(members):
        batched = model(inputs.repeat(len(members), 1)).logits
    for m, member in enumerate(members):
        explicit = build_model(tokenizer)
        explicit.load_state_dict(model.state_dict())
        weights = dict(explicit.named_parameters())
        with torch.no_grad():
            for name in es.params:
                a, b = es.perturbation.factors(member.seed, name, weights[name])
                weights[name].add_(es.sigma * member.sign * (a @ b.T) / math.sqrt(rank))
            expected = explicit(inputs).logits
        torch.testing.assert_close(batched[m * 3 : (m + 1) * 3], expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # hooks removed: the model is unperturbed again
        torch.testing.assert_close(model(inputs).logits, build_model(tokenizer)(inputs).logits)


def test_lowrank_evolves_linear_weights_and_leaves_tied_or_other_weights():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    layers = hookable_linear_weights(model, select_parameters(model))
    assert layers and all(name.endswith("weight") and "embed" not in name and "norm" not in name for name in layers)
    assert "lm_head.weight" in layers  # untied here
    model.lm_head.weight = model.model.embed_tokens.weight
    assert "lm_head.weight" not in hookable_linear_weights(model, dict(model.named_parameters()))


def test_lowrank_update_equals_the_dense_sum_of_the_factors():
    model = build_model(build_tokenizer())
    es = EvolutionStrategy(LowRankPerturbation(model, select_parameters(model), sigma=0.1, rank=3), population_size=6,
                           lr=0.01, seed=9)
    before = {n: p.detach().clone() for n, p in es.params.items()}
    fitness = torch.tensor([0.3, 1.0, -2.0, 0.5, 0.0, 4.0])
    shaped = es.shape_fitness(fitness)
    es.step(0, fitness)
    for name, p in es.params.items():
        dense = sum(
            shaped[m.index].item() * m.sign
            * (lambda ab: ab[0] @ ab[1].T)(es.perturbation.factors(m.seed, name, p)) / math.sqrt(3)
            for m in es.members(0)
        )
        torch.testing.assert_close(p.detach() - before[name], 0.01 * dense / (6 * 0.1), rtol=1e-4, atol=1e-7)


def test_reward_rises_with_lowrank_noise_on_a_toy_task():
    torch.manual_seed(0)
    inputs = torch.randn(64, 8)
    labels = inputs @ torch.randn(8, 4)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False))
    es = EvolutionStrategy(LowRankPerturbation(model, select_parameters(model), sigma=0.05), population_size=20,
                           lr=0.05 * 0.05, seed=0)

    def errors(batch_outputs, count):
        return [-torch.nn.functional.mse_loss(o, labels).item() for o in batch_outputs.chunk(count)]

    with torch.no_grad():
        start = -torch.nn.functional.mse_loss(model(inputs), labels).item()
    for step in range(150):
        members = es.members(step)
        with torch.no_grad(), es.perturbation.apply_population(members):
            fitness = torch.tensor(errors(model(inputs.repeat(len(members), 1)), len(members)))
        es.step(step, fitness)
    with torch.no_grad():
        end = -torch.nn.functional.mse_loss(model(inputs), labels).item()
    assert end > start / 10


def test_lowrank_bf16_model_keeps_an_fp32_master_and_fp32_needs_none():
    model = build_model(build_tokenizer())
    es = EvolutionStrategy(LowRankPerturbation(model, select_parameters(model), sigma=1e-3))
    assert es.master.copies == {}
    half = build_model(build_tokenizer(), dtype=torch.bfloat16)
    es = EvolutionStrategy(LowRankPerturbation(half, select_parameters(half), sigma=1e-3))
    assert set(es.master.copies) == set(es.params)


@pytest.mark.slow
def test_es_trainer_with_batched_lowrank_population(tmp_path):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    dataset = Dataset.from_dict({"prompt": ["the quick", "what is 12", "count the", "brown fox"]})
    calls = []

    def token_rate(completion_ids, **kwargs):
        calls.append(len(completion_ids))
        return [sum(t < 150 for t in ids) / max(1, len(ids)) for ids in completion_ids]

    args = ESConfig(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=4, population_size=16,
                    sigma=0.02, learning_rate=1e-3, max_completion_length=6, report_to="none", bf16=False,
                    use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1, perturbation="lowrank")
    trainer = ESTrainer(model, token_rate, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    assert calls[0] == 16 * 4  # the whole population in one call
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15
