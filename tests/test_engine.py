import math

import pytest
import torch

from lightning_es import (
    EvolutionStrategy,
    FullRankPerturbation,
    GaussianNoise,
    Population,
    centered_rank,
    select_parameters,
    zscore,
)
from tiny import build_model, build_tokenizer


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def flat_delta(model, before):
    return torch.cat([(p.detach().double() - before[n].double()).flatten() for n, p in model.named_parameters()])


# ---- noise ----------------------------------------------------------------------------------------------------


def test_noise_is_reproducible_from_the_seed():
    noise = GaussianNoise()
    a = noise.sample(123, "layer.weight", torch.Size([64, 64]), "cpu")
    b = noise.sample(123, "layer.weight", torch.Size([64, 64]), "cpu")
    c = noise.sample(124, "layer.weight", torch.Size([64, 64]), "cpu")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.dtype == torch.float32


def test_noise_is_independent_across_tensors_of_the_same_shape():
    noise = GaussianNoise()
    shape = torch.Size([128, 128])
    first = noise.sample(7, "model.layers.0.mlp.up_proj.weight", shape, "cpu").flatten().double()
    second = noise.sample(7, "model.layers.1.mlp.up_proj.weight", shape, "cpu").flatten().double()
    correlation = torch.corrcoef(torch.stack([first, second]))[0, 1]
    assert abs(correlation) < 4 / math.sqrt(first.numel())  # 4 standard errors of an uncorrelated pair
    assert abs(first.mean()) < 0.05 and abs(first.std() - 1) < 0.05


def full_rank_es(params, sigma=1e-3, **kwargs):
    kwargs = {"population_size": 32, "learning_rate": 5e-7, **kwargs}
    return EvolutionStrategy(FullRankPerturbation(params, sigma), **kwargs)


# ---- population and shaping -----------------------------------------------------------------------------------


def test_antithetic_members_share_seeds_with_opposite_signs_and_depend_on_the_step():
    population = Population(6, antithetic=True, seed=3)
    members = population.members(step=0)
    assert [m.sign for m in members] == [1, -1] * 3
    assert all(members[2 * k].seed == members[2 * k + 1].seed for k in range(3))
    assert len({m.seed for m in members}) == 3
    assert {m.seed for m in population.members(step=1)}.isdisjoint({m.seed for m in members})


@pytest.mark.parametrize(
    ("size", "antithetic", "message"), [(1, False, "at least 2"), (5, True, "even with antithetic")]
)
def test_population_size_is_validated(size, antithetic, message):
    with pytest.raises(ValueError, match=message):
        Population(size, antithetic=antithetic)


def test_zscore_and_centered_rank():
    fitness = torch.tensor([3.0, 1.0, 2.0, 10.0])
    shaped = zscore(fitness)
    assert shaped.mean().abs() < 1e-12 and (shaped.std(unbiased=False) - 1).abs() < 1e-12
    assert torch.equal(zscore(torch.ones(4)), torch.zeros(4, dtype=torch.float64))
    ranks = centered_rank(fitness)
    assert ranks.tolist() == pytest.approx([1 / 6, -0.5, -1 / 6, 0.5])
    tied = centered_rank(torch.tensor([1.0, 1.0, 0.0, 2.0]))
    assert tied[0] == tied[1] and tied.sum().abs() < 1e-12


# ---- bit-exact restore and precision -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_perturb_and_restore_is_bit_exact(dtype):
    model = build_model(build_tokenizer(), dtype=dtype)
    before = snapshot(model)
    es = full_rank_es(select_parameters(model), population_size=8, sigma=1e-2, seed=0)
    for member in es.members(step=0):
        with es.perturbed(member):
            changed = sum(not torch.equal(p, before[n]) for n, p in model.named_parameters())
            assert changed == len(before)  # every tensor was really perturbed
    for name, p in model.named_parameters():
        assert p.dtype == dtype
        assert torch.equal(p, before[name]), name


def test_restore_happens_even_when_the_evaluation_raises():
    model = build_model(build_tokenizer())
    before = snapshot(model)
    es = full_rank_es(select_parameters(model), population_size=2, sigma=0.1)
    with pytest.raises(RuntimeError), es.perturbed(es.members(0)[0]):
        raise RuntimeError("reward failed")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_naive_bf16_perturb_and_restore_would_drift():
    """Why the master copy exists: adding then subtracting noise in bf16 does not give the weights back."""
    weights = torch.randn(10_000).bfloat16() * 0.02
    noise = torch.randn(10_000) * 1e-3
    restored = ((weights.float() + noise).bfloat16().float() - noise).bfloat16()
    assert not torch.equal(restored, weights)


def run_steps(model, fitness_per_step, **kwargs):
    es = full_rank_es(select_parameters(model), **kwargs)
    for step, fitness in enumerate(fitness_per_step):
        es.step(step, fitness)
    return es


def test_bf16_update_matches_the_fp32_update_after_20_steps():
    tokenizer = build_tokenizer()
    reference = build_model(tokenizer).bfloat16().float()  # both start from bf16-representable weights
    half = build_model(tokenizer).bfloat16()
    start32, start16 = snapshot(reference), snapshot(half)
    generator = torch.Generator().manual_seed(0)
    fitness = [torch.rand(32, generator=generator) for _ in range(20)]
    settings = dict(population_size=32, sigma=1e-3, learning_rate=5e-7, seed=11)
    run_steps(reference, fitness, **settings)
    run_steps(half, fitness, **settings)
    intended, realised = flat_delta(reference, start32), flat_delta(half, start16)
    cosine = torch.nn.functional.cosine_similarity(intended, realised, dim=0)
    assert cosine >= 0.99
    assert abs(realised.norm() / intended.norm() - 1) <= 0.05


# ---- the update rule -----------------------------------------------------------------------------------------


def test_estimate_on_a_quadratic_points_along_the_true_gradient():
    target = torch.linspace(-1, 1, 20)
    theta = torch.nn.Parameter(torch.zeros(20))
    es = full_rank_es({"theta": theta}, population_size=1000, sigma=1e-2, learning_rate=0.0, seed=1)
    fitness = torch.empty(es.population_size)
    for member in es.members(0):
        with es.perturbed(member):
            fitness[member.index] = -((theta.detach() - target) ** 2).sum()
    (_, estimate), = es.gradients(0, fitness)
    true_gradient = -2 * (theta.detach() - target)
    assert torch.nn.functional.cosine_similarity(estimate, true_gradient, dim=0) > 0.9


def test_plain_update_is_lr_times_the_openai_es_estimate():
    theta = torch.nn.Parameter(torch.zeros(50))
    es = full_rank_es({"theta": theta}, population_size=4, sigma=0.1, learning_rate=0.3, antithetic=False, seed=2)
    fitness = torch.tensor([1.0, 2.0, 3.0, 6.0])
    shaped = zscore(fitness)
    expected = sum(
        shaped[m.index] * es.perturbation.noise.sample(m.seed, "theta", theta.shape, "cpu").double() for m in es.members(0)
    ) / (4 * 0.1)
    stats = es.step(0, fitness)
    assert torch.allclose(theta.detach().double(), 0.3 * expected, atol=1e-6)
    assert stats.update_norm == pytest.approx(float((0.3 * expected).norm()), rel=1e-5)


def test_reference_step_alpha_over_n_equals_lr_times_g():
    """The ES-at-scale step alpha/N * sum f_i eps_i (alpha=5e-4, sigma=1e-3, N=30) is our default learning_rate=5e-7."""
    theta = torch.nn.Parameter(torch.zeros(100))
    es = full_rank_es({"theta": theta}, population_size=30, sigma=1e-3, learning_rate=5e-7, antithetic=False, seed=4)
    fitness = torch.randn(30, generator=torch.Generator().manual_seed(0))
    shaped = zscore(fitness)
    reference_step = 5e-4 / 30 * sum(
        shaped[m.index] * es.perturbation.noise.sample(m.seed, "theta", theta.shape, "cpu").double() for m in es.members(0)
    )
    es.step(0, fitness)
    assert torch.allclose(theta.detach().double(), reference_step, rtol=1e-4, atol=1e-12)


def test_reward_rises_on_a_problem_with_a_clear_optimum():
    torch.manual_seed(0)
    inputs = torch.randn(64, 8)
    labels = inputs @ torch.randn(8, 1)
    model = torch.nn.Linear(8, 1)
    es = full_rank_es(select_parameters(model), population_size=20, sigma=0.05, learning_rate=0.05 * 0.05, seed=0)

    def reward():
        with torch.no_grad():
            return -torch.nn.functional.mse_loss(model(inputs), labels).item()

    start = reward()
    for step in range(100):
        fitness = torch.empty(20)
        for member in es.members(step):
            with es.perturbed(member):
                fitness[member.index] = reward()
        es.step(step, fitness)
    assert reward() > start / 20  # the error fell by more than 20x


def test_write_gradients_hands_minus_g_to_a_torch_optimizer():
    theta = torch.nn.Parameter(torch.zeros(30))
    es = full_rank_es({"theta": theta}, population_size=6, sigma=0.1, learning_rate=0.2, seed=5)
    fitness = torch.arange(6.0)
    (_, g), = es.gradients(0, fitness)
    optimizer = torch.optim.SGD([theta], lr=0.2)
    es.write_gradients(0, fitness)
    optimizer.step()
    es.master.sync_from_model()
    assert torch.allclose(theta.detach(), 0.2 * g)
    assert torch.equal(es.master["theta"], theta.detach())


@pytest.mark.parametrize(("value", "message"), [(float("nan"), "not finite"), (float("inf"), "not finite")])
def test_non_finite_fitness_is_rejected(value, message):
    es = full_rank_es({"theta": torch.nn.Parameter(torch.zeros(3))}, population_size=4)
    with pytest.raises(ValueError, match=message):
        es.step(0, torch.tensor([0.0, 1.0, value, 2.0]))


def test_bad_hyperparameters_name_the_argument():
    params = {"theta": torch.nn.Parameter(torch.zeros(3))}
    with pytest.raises(ValueError, match="sigma"):
        full_rank_es(params, sigma=0.0)
    with pytest.raises(ValueError, match="fitness_shaping"):
        full_rank_es(params, fitness_shaping="softmax")
    with pytest.raises(ValueError, match="population_size"):
        full_rank_es(params, population_size=7)


# ---- parameter selection -------------------------------------------------------------------------------------


def test_parameter_selection_by_name_filter_and_lora():
    peft = pytest.importorskip("peft")
    model = build_model(build_tokenizer())
    attention = select_parameters(model, [r"self_attn\.(q|v)_proj\.weight"])
    assert len(attention) == 4 and all("self_attn" in n for n in attention)
    with pytest.raises(ValueError, match="es_params='nothing_matches'"):
        select_parameters(model, "nothing_matches")
    lora_model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainable = select_parameters(lora_model)
    assert trainable and all("lora_" in n for n in trainable)
    assert set(select_parameters(lora_model, "lora")) == set(trainable)
    assert len(select_parameters(lora_model, "all")) > len(trainable)


def test_anchored_weight_decay_pulls_towards_the_start():
    start = torch.linspace(-1, 1, 40)
    fitness = [torch.randn(8, generator=torch.Generator().manual_seed(s)) for s in range(5)]
    plain, anchored = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    settings = dict(population_size=8, sigma=0.1, learning_rate=0.05, seed=1)
    es_plain = full_rank_es({"theta": plain}, **settings)
    es_anchored = full_rank_es({"theta": anchored}, es_anchor_decay=2.0, **settings)
    for step, f in enumerate(fitness):
        before = anchored.detach().clone()
        es_anchored.step(step, f)
        (_, g), = es_anchored.gradients(step, f)
        expected = start + (1 - 0.05 * 2.0) * (before + 0.05 * g - start)
        torch.testing.assert_close(anchored.detach(), expected)
        es_plain.step(step, f)
    assert (anchored - start).norm() < (plain - start).norm()
    with pytest.raises(ValueError, match="anchor_decay"):
        full_rank_es({"theta": plain}, es_anchor_decay=-1.0)


def test_a_checkpoint_continues_only_under_the_noise_it_was_trained_with():
    from lightning_es.engine.perturbations import LowRankPerturbation

    model = build_model(build_tokenizer())
    params = dict(model.named_parameters())

    def strategy(perturbation):
        return EvolutionStrategy(perturbation, population_size=4, learning_rate=1e-3, seed=3)

    full = strategy(FullRankPerturbation(params, sigma=0.01))
    lowrank = strategy(LowRankPerturbation(model, params, sigma=0.01, rank=1))
    kind = "lowrank(rank=1, every parameter)"
    assert full.state_dict()["noise"] == "full" and lowrank.state_dict()["noise"] == kind
    with pytest.raises(ValueError, match=r"trained with 'full' noise, this run uses 'lowrank\(rank=1, every parameter\)'"):
        lowrank.load_state_dict(full.state_dict())
    with pytest.raises(ValueError, match=r"trained with 'lowrank\(rank=1, every parameter\)' noise, this run uses "
                                         r"'lowrank\(rank=2, every parameter\)'"):
        strategy(LowRankPerturbation(model, params, sigma=0.01, rank=2)).load_state_dict(lowrank.state_dict())
    # a checkpoint from when low-rank noise evolved the linear weights only: refused, saying so
    with pytest.raises(ValueError, match=r"'lowrank\(rank=1\)' noise \(low-rank noise then evolved nn.Linear weights "
                                         r"only, not every parameter\)"):
        lowrank.load_state_dict({**lowrank.state_dict(), "noise": "lowrank(rank=1)"})
    lowrank.load_state_dict(lowrank.state_dict())  # the same noise continues
    with pytest.warns(UserWarning, match="does not record its noise .* changed from 'full' to 'lowrank'"):
        lowrank.load_state_dict({"seed": full.state_dict()["seed"]})  # a checkpoint written before it was recorded


def test_quantized_weights_are_refused_by_name_before_training():
    model = torch.nn.Linear(4, 4)
    model.register_parameter("packed", torch.nn.Parameter(torch.zeros(8, dtype=torch.uint8), requires_grad=False))
    with pytest.raises(ValueError, match=r"packed is stored as torch.uint8 .*float32, bfloat16, float16.*es_params='lora'"):
        select_parameters(model, "all")
    assert set(select_parameters(model)) == {"weight", "bias"}  # the trainable ones evolve


def test_renamed_engine_arguments_keep_their_old_names_for_one_release_with_a_future_warning():
    """``lr``, ``anchor_decay`` and ``start_device`` took ``ESSettings``' names; the old ones still give the same run."""
    fitness = torch.randn(4, generator=torch.Generator().manual_seed(0))
    old_theta, new_theta = torch.nn.Parameter(torch.linspace(-1, 1, 10)), torch.nn.Parameter(torch.linspace(-1, 1, 10))
    with pytest.warns(FutureWarning) as caught:
        old = EvolutionStrategy(FullRankPerturbation({"theta": old_theta}, 0.1), population_size=4, lr=0.05,
                                anchor_decay=0.5, start_device="cpu", seed=1)
    messages = " ".join(str(w.message) for w in caught)
    for before, after in (("lr", "learning_rate"), ("anchor_decay", "es_anchor_decay"),
                          ("start_device", "es_start_device")):
        assert f"EvolutionStrategy({before}=...) is renamed {after}=" in messages
    new = EvolutionStrategy(FullRankPerturbation({"theta": new_theta}, 0.1), population_size=4, learning_rate=0.05,
                            es_anchor_decay=0.5, es_start_device="cpu", seed=1)
    old.step(0, fitness)
    new.step(0, fitness)
    assert torch.equal(old_theta, new_theta) and not torch.equal(new_theta, torch.linspace(-1, 1, 10))
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['sigma_typo'\\]"):
        EvolutionStrategy(FullRankPerturbation({"theta": new_theta}, 0.1), learning_rate=0.05, sigma_typo=1)


def test_the_engine_asks_for_its_step_in_the_perturbations_units():
    with pytest.raises(TypeError, match="needs learning_rate"):
        EvolutionStrategy(FullRankPerturbation({"theta": torch.nn.Parameter(torch.zeros(3))}, 0.1))
