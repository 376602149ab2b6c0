"""Noise and step relative to each tensor's scale, evidence-scaled fitness shaping, and the one copy of the start
weights: the engine's parts, and ESConfig's fields for them."""

import copy

import pytest
import torch
from torch import nn

from lightning_es import EvolutionStrategy, StartWeights, build_perturbation, evidence_zscore, select_parameters, zscore
from lightning_es.engine.scales import DEFAULT_RELATIVE_SIGMA, VECTOR_FLOOR, relative_scales
from trl_ext import ESConfig


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def es_over(model, kind="full", shaping="zscore", relative=True, sigma=0.05, lr=0.01, **kwargs):
    perturbation = build_perturbation(kind, select_parameters(model), sigma, model=model, rank=2, relative=relative)
    return EvolutionStrategy(perturbation, population_size=6, learning_rate=lr, fitness_shaping=shaping, seed=3, **kwargs)


# ---- the scales ----------------------------------------------------------------------------------------------------


def test_scales_are_a_matrix_rms_each_vector_entry_and_a_floor_where_there_is_no_scale():
    model = small_net()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([2.0, 1e-4, -3.0, 0.5, 1.0]))  # a gain with an entry near zero
        model[1].bias.zero_()  # a bias at zero: no scale of its own
    scales = relative_scales(build_perturbation("full", select_parameters(model), 0.05))
    first_rms = float(model[0].weight.detach().pow(2).mean().sqrt())
    last_rms = float(model[2].weight.detach().pow(2).mean().sqrt())
    assert scales["0.weight"].dim() == 0 and float(scales["0.weight"]) == pytest.approx(first_rms)
    gain = model[1].weight.detach()
    floor = VECTOR_FLOOR * float(gain.pow(2).mean().sqrt())
    torch.testing.assert_close(scales["1.weight"], gain.abs().clamp(min=floor))
    assert float(scales["1.weight"][1]) == pytest.approx(floor)  # floored, not 1e-4
    # the bias takes the median RMS of the evolved matrices (of two, their mean)
    assert float(scales["1.bias"]) == pytest.approx((first_rms + last_rms) / 2)


def test_a_model_of_zeros_has_no_relative_scale():
    model = nn.Linear(3, 2)
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    with pytest.raises(ValueError, match="relative_sigma has no scale to be relative to.*Set an absolute sigma"):
        build_perturbation("full", select_parameters(model), 0.05, relative=True)


@pytest.mark.parametrize("kind", ["full", "lowrank"])
def test_relative_noise_and_step_scale_with_the_weights(kind):
    """The same relative_sigma perturbs (and steps) c * W by exactly c times what it does to W: it means the same on a
    model whatever the size of its weights, where an absolute sigma does not."""
    c = 8.0
    model, scaled = small_net(), small_net()
    with torch.no_grad():
        for p in scaled.parameters():
            p.mul_(c)
    a, b = es_over(model, kind), es_over(scaled, kind)
    member = a.members(0)[0]
    x = torch.randn(4, 6)
    with torch.no_grad():
        plain, plain_scaled = model[0](x), scaled[0](x)
        with a.perturbation.apply_population([member]) if kind == "lowrank" else a.perturbed(member):
            moved = model[0](x) - plain
        with b.perturbation.apply_population([member]) if kind == "lowrank" else b.perturbed(member):
            moved_scaled = scaled[0](x) - plain_scaled
    torch.testing.assert_close(moved_scaled, c * moved, rtol=1e-4, atol=1e-5)  # first layer: W x + b terms scale by c
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    before_scaled = {n: p.detach().clone() for n, p in scaled.named_parameters()}
    fitness = torch.tensor([0.3, 0.1, 0.9, 0.2, 0.5, 0.4])
    a.step(0, fitness), b.step(0, fitness)
    for name, p in model.named_parameters():
        step, step_scaled = p.detach() - before[name], scaled.get_parameter(name).detach() - before_scaled[name]
        assert step.abs().max() > 0
        torch.testing.assert_close(step_scaled, c * step, rtol=1e-4, atol=1e-6)


def test_absolute_noise_does_not_scale_with_the_weights():
    model, scaled = small_net(), small_net()
    with torch.no_grad():
        for p in scaled.parameters():
            p.mul_(8.0)
    a, b = es_over(model, relative=False), es_over(scaled, relative=False)
    member = a.members(0)[0]
    noise = {}
    for name, es in (("a", a), ("b", b)):
        with es.perturbed(member):
            noise[name] = es.params["0.weight"].detach() - es.master["0.weight"]
    torch.testing.assert_close(noise["a"], noise["b"])  # the same noise on weights 8 times larger


def test_a_checkpoint_keeps_the_scales_of_the_start_and_refuses_other_units():
    model = small_net()
    es = es_over(model)
    es.step(0, torch.tensor([0.3, 0.1, 0.9, 0.2, 0.5, 0.4]))
    state = copy.deepcopy(es.state_dict())
    assert set(state["scales"]["per_tensor"]) == {"0.weight", "1.bias", "2.weight"}  # the bias at zero: the floor
    assert set(state["scales"]["per_entry"]) == {"0.bias", "1.weight", "2.bias"}
    resumed = es_over(model)  # built on the moved weights: its own scales differ
    assert not torch.equal(resumed.perturbation.scales["0.weight"], es.perturbation.scales["0.weight"])
    resumed.load_state_dict(state)
    for name, scale in es.perturbation.scales.items():
        assert torch.equal(resumed.perturbation.scales[name], scale), name
    with pytest.raises(ValueError, match="trained with noise relative to each tensor's scale.*this run uses absolute "
                                         "noise.*resume with relative_sigma and relative_learning_rate"):
        es_over(model, relative=False).load_state_dict(state)


def test_a_checkpoint_in_absolute_units_names_the_fields_that_resume_it():
    model = small_net()
    state = es_over(model, relative=False).state_dict()  # as every checkpoint before relative units
    with pytest.raises(ValueError, match=r"trained with absolute noise \('full'\).*resume with sigma and "
                                         r"learning_rate set as it was trained \(ESConfig's defaults then: sigma=1e-2"):
        es_over(model).load_state_dict(state)


# ---- evidence-scaled shaping ---------------------------------------------------------------------------------------


def test_evidence_zscore_steps_as_far_as_the_evidence_goes():
    consistent = torch.zeros(8, 2, dtype=torch.float64)
    consistent[3] = 0.5  # better on every prompt
    torch.testing.assert_close(evidence_zscore(consistent.mean(1), consistent), zscore(consistent.mean(1)))
    lucky = torch.zeros(8, 2, dtype=torch.float64)
    lucky[3, 0] = 0.5  # one lucky answer on one of two prompts
    assert torch.all(evidence_zscore(lucky.mean(1), lucky) == 0)
    assert zscore(lucky.mean(1)).abs().max() > 2  # which z-score makes a full-size step
    single = torch.rand(8, 1, dtype=torch.float64)  # one prompt: no estimate of chance, the plain z-score
    torch.testing.assert_close(evidence_zscore(single.mean(1), single), zscore(single.mean(1)))


def test_a_reward_of_random_numbers_moves_evidence_zscore_much_less_than_zscore():
    generator = torch.Generator().manual_seed(0)
    norms = {}
    for shaping in ("zscore", "evidence_zscore"):
        model = small_net()
        es = es_over(model, shaping=shaping)
        norms[shaping] = []
        for step in range(30):
            per_prompt = torch.rand(6, 2, generator=generator, dtype=torch.float64)
            norms[shaping].append(es.step(step, per_prompt.mean(1), per_prompt=per_prompt).update_norm)
    assert sum(norms["evidence_zscore"]) < 0.5 * sum(norms["zscore"])


def test_evidence_zscore_needs_the_rewards_per_prompt():
    es = es_over(small_net(), shaping="evidence_zscore")
    with pytest.raises(ValueError, match="weighs the evidence per prompt: pass per_prompt"):
        es.step(0, torch.rand(6))


# ---- one copy of the start weights -------------------------------------------------------------------------------


def test_start_weights_swap_in_and_out_bit_exactly_in_the_weights_dtype():
    model = small_net().to(torch.bfloat16)
    es = es_over(model, es_anchor_decay=1.0)
    start = es.start
    assert es.keep_start() is start  # one copy, whoever asks
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in start.tensors.values())
    es.step(0, torch.tensor([0.3, 0.1, 0.9, 0.2, 0.5, 0.4]))
    current = {n: p.detach().clone() for n, p in model.named_parameters()}
    saved = {n: t.clone() for n, t in start.tensors.items()}
    with start.swapped_in():
        assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters())
        assert not all(torch.equal(p, current[n]) for n, p in model.named_parameters())
    assert all(torch.equal(p, current[n]) for n, p in model.named_parameters())
    assert all(torch.equal(t, saved[n]) for n, t in start.tensors.items())
    values = start.of_model(model)
    assert values.keys() == current.keys() and torch.equal(values["0.weight"], start.tensors["0.weight"])


def test_without_an_option_that_needs_it_no_copy_is_kept():
    es = es_over(small_net())
    assert es.start is None and "start" not in es.state_dict()


def test_start_weights_name_what_is_missing():
    model = small_net()
    with pytest.raises(KeyError, match="lack 1 evolved tensors"):
        StartWeights(dict(model.named_parameters()), {n: p for n, p in model.named_parameters() if n != "2.bias"})


# ---- ESConfig's fields ---------------------------------------------------------------------------------------------


def config(**fields):
    return ESConfig(output_dir="unused", report_to="none", use_cpu=True, **fields)


def test_relative_units_are_the_default_and_absolute_ones_are_kept_for_scripts_that_set_them():
    default = config()
    assert default.relative_noise and default.noise_sigma == DEFAULT_RELATIVE_SIGMA == default.relative_sigma
    assert default.step_size(default.learning_rate) == default.relative_learning_rate
    # a schedule scales the relative step as it scales learning_rate
    assert default.step_size(default.learning_rate / 4) == pytest.approx(default.relative_learning_rate / 4)
    absolute = config(sigma=1e-3, learning_rate=5e-7)
    assert not absolute.relative_noise and (absolute.noise_sigma, absolute.step_size(5e-7)) == (1e-3, 5e-7)
    assert absolute.relative_sigma is None and absolute.relative_learning_rate is None


def test_learning_rate_is_the_step_in_the_units_of_the_noise_whatever_its_value():
    """Units follow from which noise field is set, never from a value (learning_rate alone once switched to absolute
    units with sigma 1e-2, except at exactly its default): without sigma, learning_rate is the relative step, so a
    logged step copied into learning_rate runs the same step."""
    for value in (1e-2, 1.5e-3, 1e-4, 1e-5):
        args = config(learning_rate=value)
        assert args.relative_noise and args.relative_sigma == DEFAULT_RELATIVE_SIGMA
        assert args.relative_learning_rate == value == args.step_size(value)
    assert config(relative_learning_rate=1e-3).step_size() == 1e-3  # the explicit name, the same step
    with pytest.raises(ValueError, match=r"learning_rate=0.002 and relative_learning_rate=0.001 are two values of one"):
        config(learning_rate=2e-3, relative_learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"learning_rate=0.1 with relative_sigma=0.03 moves each tensor"):
        config(learning_rate=0.1)
    with pytest.raises(ValueError, match=r"sigma=0.001 makes the noise absolute.*set learning_rate with it"):
        config(sigma=1e-3)  # the default step is a relative one
    absolute = config(sigma=1e-2, learning_rate=1e-2)
    assert not absolute.relative_noise and absolute.step_size() == 1e-2


@pytest.mark.parametrize(("fields", "message"), [
    (dict(relative_sigma=0.9), r"relative_sigma must be in \(0, 0.5\], got 0.9"),
    (dict(relative_sigma=0.0), r"relative_sigma must be in \(0, 0.5\], got 0.0"),
    (dict(relative_learning_rate=0.1), r"relative_learning_rate=0.1 with relative_sigma=0.03 moves each tensor by 3.3"),
    (dict(relative_learning_rate=-1.0), "relative_learning_rate must be a non-negative finite number"),
    (dict(sigma=1e-3, relative_sigma=0.05), r"sigma=0.001 .* and relative_sigma=0.05 .* set one of the two units"),
    (dict(es_optimizer="trainer", relative_learning_rate=1e-3), "with es_optimizer='trainer' the Trainer's optimizer"),
    (dict(beta=-0.5), r"beta must be non-negative, got -0.5"),
    (dict(fitness_shaping="evidence_zscore", per_device_train_batch_size=1),
     r"evidence_zscore.*needs at least 2 prompts per step.*Set per_device_train_batch_size=2"),
    (dict(es_start_device="gpu0"), r"es_start_device='gpu0' is not a device"),
])
def test_bad_noise_and_step_units_are_errors_that_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        config(**fields)


def test_the_trainers_optimizer_keeps_learning_rate_as_its_own_step_under_relative_noise():
    args = config(es_optimizer="trainer", learning_rate=1e-5)
    assert args.relative_noise and args.relative_learning_rate is None and args.step_size(1e-5) == 1e-5
