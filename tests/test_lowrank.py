import contextlib
import copy
import functools
import math

import pytest
import torch
from datasets import Dataset

from lightning_es import EvolutionStrategy, LowRankPerturbation, select_parameters
from tiny import build_gemma3, build_model, build_tokenizer
from trl_ext import ESConfig, ESTrainer


FAMILIES = {"qwen2": lambda t: build_model(t), "qwen2-tied": lambda t: build_model(t, tie=True),
            "gemma3": lambda t: build_gemma3(t)}


def explicitly_perturbed(model, es, member):
    """A copy of ``model`` whose every evolved parameter holds theta + sigma * sign * eps (dense noise)."""
    explicit = copy.deepcopy(model)
    weights = dict(explicit.named_parameters())
    with torch.no_grad():
        for name in es.params:
            weights[name].add_(es.sigma * member.sign * es.perturbation.dense_noise(member.seed, name))
    return explicit


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_hooked_forward_equals_explicitly_perturbed_weights(rank, family):
    """Every parameter (linear weights and biases, norm gains, embeddings, a tied output layer, Gemma's scaled
    embedding and offset norms) is perturbed by the hooks exactly as writing its noise into the weights would."""
    tokenizer = build_tokenizer()
    build = functools.partial(FAMILIES[family], tokenizer)
    model = build()
    es = EvolutionStrategy(LowRankPerturbation(model, select_parameters(model), sigma=0.05, rank=rank),
                           population_size=4, seed=3, learning_rate=5e-7)
    assert set(es.params) == {n for n, p in model.named_parameters() if p.requires_grad}
    members = es.members(0)
    inputs = torch.randint(0, len(tokenizer), (3, 7))
    with torch.no_grad(), es.perturbation.apply_population(members):
        first = model(inputs.repeat(len(members), 1)).logits
        batched = model(inputs.repeat(len(members), 1)).logits  # the norms' gains broadcast now (verified by the first)
    assert set(es.perturbation._broadcasts.values()) == {True}
    torch.testing.assert_close(batched, first, rtol=0, atol=0)
    for m, member in enumerate(members):
        with torch.no_grad():
            expected = explicitly_perturbed(model, es, member)(inputs).logits
        torch.testing.assert_close(batched[m * 3 : (m + 1) * 3], expected, rtol=1e-4, atol=5e-5)
    with torch.no_grad():  # hooks removed: the model is unperturbed again
        torch.testing.assert_close(model(inputs).logits, build()(inputs).logits)


def test_each_kind_of_parameter_changes_the_members_output():
    """Perturbing only the embeddings, only the norms or only the biases still separates the members."""
    tokenizer = build_tokenizer()
    inputs = torch.randint(0, len(tokenizer), (2, 5))
    for pattern in ("embed_tokens", "norm", r"\.bias$"):
        model = build_model(tokenizer, tie=True)
        es = EvolutionStrategy(LowRankPerturbation(model, select_parameters(model, [pattern]), sigma=0.05),
                               population_size=2, learning_rate=5e-7)
        with torch.no_grad(), es.perturbation.apply_population(es.members(0)):
            plus, minus = model(inputs.repeat(2, 1)).logits.chunk(2)
        assert not torch.allclose(plus, minus), pattern


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, True), (torch.bfloat16, False), (torch.float16, False)])
def test_hooks_follow_the_forward_precision(dtype, autocast):
    """Under bf16 autocast over fp32 weights, and with weights stored in bf16 or fp16, the population forward runs
    (no dtype clash in the hooks) and each member's logits match its explicitly perturbed weights to the precision
    of the forward."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, tie=True, dtype=dtype)
    es = EvolutionStrategy(LowRankPerturbation(model, select_parameters(model), sigma=0.05, rank=4),
                           population_size=2, seed=1, learning_rate=5e-7)
    members = es.members(0)
    inputs = torch.randint(0, len(tokenizer), (2, 6))
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.no_grad(), precision, es.perturbation.apply_population(members):
        batched = model(inputs.repeat(2, 1)).logits.float()
    for m, member in enumerate(members):
        with torch.no_grad(), precision:
            expected = explicitly_perturbed(model, es, member)(inputs).logits.float()
        assert torch.isfinite(batched).all()
        torch.testing.assert_close(batched[m * 2 : (m + 1) * 2], expected, rtol=0.05, atol=0.05)


def test_a_module_with_parameters_and_parameterised_children_is_refused_before_any_forward():
    class Gated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Parameter(torch.ones(4))
            self.inner = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.inner(x) * self.gate

    model = Gated()
    with pytest.raises(ValueError, match=r"cannot perturb gate: .*perturbation='full'"):
        LowRankPerturbation(model, select_parameters(model), sigma=0.1)


def test_lowrank_update_equals_the_dense_sum_of_the_factors():
    model = build_model(build_tokenizer())
    es = EvolutionStrategy(LowRankPerturbation(model, select_parameters(model), sigma=0.1, rank=3), population_size=6,
                           learning_rate=0.01, seed=9)
    before = {n: p.detach().clone() for n, p in es.params.items()}
    fitness = torch.tensor([0.3, 1.0, -2.0, 0.5, 0.0, 4.0])
    shaped = es.shaped(fitness)  # the default shaping without prompts: the z-score
    es.step(0, fitness)
    for name, p in es.params.items():
        dense = sum(shaped[m.index].item() * m.sign * es.perturbation.dense_noise(m.seed, name) for m in es.members(0))
        if p.dim() == 2:  # the factors' product, as the hooks apply it
            a, b = es.perturbation.factors(es.members(0)[0].seed, name, p)
            torch.testing.assert_close(es.perturbation.dense_noise(es.members(0)[0].seed, name), a @ b.T / math.sqrt(3))
        torch.testing.assert_close(p.detach() - before[name], 0.01 * dense / (6 * 0.1), rtol=1e-4, atol=1e-7)


def test_reward_rises_with_lowrank_noise_on_a_toy_task():
    torch.manual_seed(0)
    inputs = torch.randn(64, 8)
    labels = inputs @ torch.randn(8, 4)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False))
    es = EvolutionStrategy(LowRankPerturbation(model, select_parameters(model), sigma=0.05), population_size=20,
                           learning_rate=0.05 * 0.05, seed=0)

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
    es = EvolutionStrategy(LowRankPerturbation(model, select_parameters(model), sigma=1e-3), learning_rate=5e-7, population_size=32)
    assert es.master.copies == {}
    half = build_model(build_tokenizer(), dtype=torch.bfloat16)
    es = EvolutionStrategy(LowRankPerturbation(half, select_parameters(half), sigma=1e-3), learning_rate=5e-7, population_size=32)
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


class SummedGain(torch.nn.Module):
    """Broadcasting its members' gains would give a wrong answer without an error: the sum runs over every member."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        return x * self.gain.sum()


def test_vector_modules_are_exact_whether_or_not_their_parameters_broadcast():
    """Norms and other modules get each member's vectors: broadcast in one call where that was shown to equal the
    exact per-member evaluation (an RMS-style gain), per member otherwise (a sum over the gain, LayerNorm)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), SummedGain(), torch.nn.LayerNorm(4))
    es = EvolutionStrategy(LowRankPerturbation(model, select_parameters(model), sigma=0.1), population_size=4, seed=2, learning_rate=5e-7)
    members = es.members(0)
    inputs = torch.randn(3, 4)
    with torch.no_grad():
        expected = [explicitly_perturbed(model, es, member)(inputs) for member in members]
    with torch.no_grad(), es.perturbation.apply_population(members):
        for _ in range(2):  # the first call decides how each module is evaluated, the second uses that
            torch.testing.assert_close(model(inputs.repeat(4, 1)), torch.cat(expected), rtol=1e-5, atol=1e-6)
    assert {key[0]: broadcasts for key, broadcasts in es.perturbation._broadcasts.items()} == {model[1]: False,
                                                                                                model[2]: False}


class FloatScaledEmbedding(torch.nn.Embedding):
    """An embedding that scales its lookup by a Python float (BART's, BioGPT's)."""

    def __init__(self):
        super().__init__(10, 4)
        self.embed_scale = 2.0

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


class KeywordNorm(torch.nn.Module):
    """A gain called with a keyword argument, as some models call their norms."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, hidden_states):
        return hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = FloatScaledEmbedding()
        self.norm = KeywordNorm()
        self.head = torch.nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(self.norm(hidden_states=self.embed(ids)))


def test_float_embed_scale_and_keyword_arguments_are_perturbed_exactly():
    torch.manual_seed(0)
    model = Model()
    es = EvolutionStrategy(LowRankPerturbation(model, select_parameters(model), sigma=0.1, rank=2), population_size=4, learning_rate=5e-7)
    members = es.members(0)
    ids = torch.randint(0, 10, (3, 5))
    with torch.no_grad():
        expected = [explicitly_perturbed(model, es, member)(ids) for member in members]
    with torch.no_grad(), es.perturbation.apply_population(members):
        for _ in range(2):
            torch.testing.assert_close(model(ids.repeat(4, 1)), torch.cat(expected), rtol=1e-5, atol=1e-6)


def test_gpt2_conv1d_layers_are_perturbed_as_linear_layers_and_shared_positions_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer()

    def build():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=None, eos_token_id=None)).eval()

    model = build()
    params = select_parameters(model, [r"^(?!transformer\.wpe\.)"])  # positions are shared by the batch: see below
    es = EvolutionStrategy(LowRankPerturbation(model, params, sigma=0.05, rank=2), population_size=2, seed=4, learning_rate=5e-7)
    inputs = torch.randint(0, len(tokenizer), (2, 6))
    with torch.no_grad(), es.perturbation.apply_population(es.members(0)):
        batched = model(inputs.repeat(2, 1)).logits
    for m, member in enumerate(es.members(0)):
        with torch.no_grad():
            expected = explicitly_perturbed(model, es, member)(inputs).logits
        torch.testing.assert_close(batched[m * 2 : (m + 1) * 2], expected, rtol=1e-4, atol=5e-5)
    es = EvolutionStrategy(LowRankPerturbation(model, select_parameters(model), sigma=0.05), population_size=2, learning_rate=5e-7)
    with pytest.raises(RuntimeError, match=r"cannot perturb transformer\.wpe\.weight: .*ids shared by the whole batch"):
        with torch.no_grad(), es.perturbation.apply_population(es.members(0)):
            model(inputs.repeat(2, 1))


class Router(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return x + self.bias, x.argmax(-1)


class Experts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Parameter(torch.randn(2, 4, 4))

    def forward(self, x):
        return x @ self.up[0]


def test_parameters_low_rank_hooks_cannot_perturb_are_refused_by_name():
    holder = torch.nn.Module()
    holder.table = torch.nn.ParameterDict({"a": torch.nn.Parameter(torch.ones(3))})
    with pytest.raises(ValueError, match=r"cannot perturb table\.a: .*no forward of its own.*perturbation='full'"):
        LowRankPerturbation(holder, select_parameters(holder), sigma=0.1)
    experts = Experts()
    with pytest.raises(ValueError, match=r"cannot perturb up: .*a matrix.*perturbation='full'"):
        LowRankPerturbation(experts, select_parameters(experts), sigma=0.1)
    router = Router()
    es = EvolutionStrategy(LowRankPerturbation(router, select_parameters(router), sigma=0.1), population_size=2, learning_rate=5e-7)
    with pytest.raises(RuntimeError, match=r"cannot perturb bias: its Router returns a tuple"):
        with torch.no_grad(), es.perturbation.apply_population(es.members(0)):
            router(torch.randn(4, 4))


def test_layers_reading_one_input_project_it_together_and_every_population_computes_alike():
    """q, k, v (and o, which reads another input) and gate, up are grouped by the model's structure: the grouped
    products equal per-layer ones within rounding, and a population computes bit for bit the same whether it is a
    process's first or comes after others (a resumed run's first step as the uninterrupted run's)."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    inputs = torch.randint(0, len(tokenizer), (3, 7))

    def strategy(grouped=True):
        es = EvolutionStrategy(LowRankPerturbation(model, select_parameters(model), sigma=0.05, rank=2),
                               population_size=4, seed=3, learning_rate=5e-7)
        if not grouped:
            es.perturbation._groups.groups, es.perturbation._groups.of_key = [], {}
        return es

    def logits(es, step):
        with torch.no_grad(), es.perturbation.apply_population(es.members(step)):
            return model(inputs.repeat(4, 1)).logits

    es = strategy()
    groups = [sorted(key.split(".")[-2] for key in keys) for _, keys in es.perturbation._groups.groups]
    assert sorted(groups) == sorted([["k_proj", "o_proj", "q_proj", "v_proj"], ["gate_proj", "up_proj"]] * 2)
    first = logits(es, 0)
    logits(es, 1)
    assert torch.equal(logits(es, 0), first)
    # each group's product is computed once per layer; o, on its own input, projects onto its own 2 columns only
    widths = []
    bmm = torch.bmm
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "bmm", lambda x, factors: widths.append(factors.shape[-1]) or bmm(x, factors))
        logits(es, 0)
    layers = model.config.num_hidden_layers
    assert (widths.count(4 * 2), widths.count(2 * 2)) == (layers, layers)
    es.perturbation.close()
    alone = strategy(grouped=False)
    torch.testing.assert_close(logits(alone, 0), first, rtol=1e-5, atol=1e-6)
    alone.perturbation.close()


def test_a_tied_output_layer_beside_a_linear_of_the_same_width_is_perturbed_exactly():
    """A tied output layer grouped with a same-width sibling read a factor buffer the embedding's lookup never fills
    (KeyError '<weight>#B'): a weight an embedding also looks up keeps its own factors."""

    class TiedBesideSibling(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight
            self.other = torch.nn.Linear(4, 10)

        def forward(self, x):
            hidden = self.embed(x)
            return self.head(hidden) + self.other(hidden)

    model = TiedBesideSibling()
    es = EvolutionStrategy(LowRankPerturbation(model, select_parameters(model), sigma=0.1, rank=2),
                           population_size=4, learning_rate=5e-7, seed=1)
    members = es.members(0)
    inputs = torch.randint(0, 10, (2, 3))
    with torch.no_grad(), es.perturbation.apply_population(members):
        batched = model(inputs.repeat(len(members), 1))
    for m, member in enumerate(members):
        with torch.no_grad():
            expected = explicitly_perturbed(model, es, member)(inputs)
        torch.testing.assert_close(batched[m * 2:(m + 1) * 2], expected, rtol=1e-4, atol=5e-5)
