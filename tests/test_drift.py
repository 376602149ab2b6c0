import math

import pytest
import torch

from lightning_es.drift import DriftProbe
from lightning_es.drift import (
    cosine_similarity,
    linear_connectivity,
    moved_fraction,
    parameter_delta,
    realised_fraction,
    snapshot,
    update_norm,
)
from lightning_es.drift import KLDrift, exact_token_kl, sampled_token_kl
from tiny import build_model, build_tokenizer


def test_kl_drift_equals_a_direct_float64_computation():
    generator = torch.Generator().manual_seed(0)
    current, reference = torch.randn(3, 5, 11, generator=generator), torch.randn(3, 5, 11, generator=generator)
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0
    metric = KLDrift()
    metric.update(exact_token_kl(current[:2], reference[:2]), mask[:2])
    metric.update(exact_token_kl(current[2:], reference[2:]), mask[2:])
    p, q = current.double().softmax(-1), reference.double().softmax(-1)
    per_token = (p * (p.log() - q.log())).sum(-1)
    expected = (per_token * mask).sum() / mask.sum()
    torch.testing.assert_close(metric.compute(), expected)
    assert (per_token >= 0).all()


def test_sampled_estimator_is_the_logprob_difference():
    current, reference = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert sampled_token_kl(current, reference).tolist() == [0.5, -1.0]


def test_kl_drift_without_tokens_is_an_error():
    with pytest.raises(ValueError, match="no token"):
        KLDrift().compute()


def test_update_geometry():
    delta = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}
    assert update_norm(delta) == 5.0
    assert cosine_similarity(delta, delta) == pytest.approx(1.0)
    assert cosine_similarity(delta, {k: -v for k, v in delta.items()}) == pytest.approx(-1.0)
    assert cosine_similarity({"a": torch.tensor([1.0, 0.0])}, {"a": torch.tensor([0.0, 2.0])}) == 0.0
    assert moved_fraction(delta) == pytest.approx(2 / 3)
    assert math.isnan(cosine_similarity(delta, {k: torch.zeros_like(v) for k, v in delta.items()}))
    with pytest.raises(ValueError, match="different parameter sets"):
        cosine_similarity(delta, {"a": delta["a"]})
    with pytest.raises(ValueError, match="has shape"):
        cosine_similarity(delta, {"a": delta["a"], "b": torch.zeros(2)})


def test_parameter_delta_from_a_snapshot():
    model = torch.nn.Linear(3, 2)
    start = snapshot(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    delta = parameter_delta(model, start)
    torch.testing.assert_close(delta["weight"], torch.ones(2, 3))
    assert torch.equal(delta["bias"], torch.zeros(2))


def test_linear_connectivity_recovers_a_known_barrier_and_restores_the_model():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.25)
    a, b = {"weight": torch.tensor([[-1.0]])}, {"weight": torch.tensor([[1.0]])}

    def accuracy(m):  # 1 - w^2: both endpoints 0, the midpoint 1: a "hill", no barrier for higher-is-better
        return 1.0 - float(m.weight) ** 2

    hill = linear_connectivity(model, a, b, accuracy, grid=[0, 0.25, 0.5, 0.75, 1])
    assert hill.values == pytest.approx([0.0, 0.75, 1.0, 0.75, 0.0]) and hill.barrier == 0.0
    loss = linear_connectivity(model, a, b, accuracy, grid=[0, 0.5, 1], higher_is_better=False)
    assert loss.barrier == pytest.approx(1.0)  # read as a loss, the same curve is a barrier of height 1
    assert float(model.weight) == 0.25
    with pytest.raises(ValueError, match="grid must contain 0 and 1"):
        linear_connectivity(model, a, b, accuracy, grid=[0.0, 0.5])
    with pytest.raises(ValueError, match="different parameter sets"):
        linear_connectivity(model, a, {"other": torch.zeros(1, 1)}, accuracy)


@pytest.mark.parametrize("estimator", ["sampled", "exact"])
def test_drift_probe_is_zero_at_the_start_and_grows_with_updates(estimator):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    probe = DriftProbe(model, tokenizer, ["the quick brown", "count the apples", "lazy dog"], estimator=estimator,
                       max_new_tokens=6)
    assert probe.measure(model).compute() == 0.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    drifts = []
    for scale in (0.02, 0.1):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(before[n] + scale * torch.randn_like(p, generator=None))
        drifts.append(float(probe.measure(model).compute()))
    assert 0 < drifts[0] < drifts[1]
    for n, p in model.named_parameters():  # the reference pass left the current weights in place
        assert not torch.equal(p, before[n])


@pytest.mark.parametrize("estimator", ["sampled", "exact"])
def test_drift_probe_measures_each_prompt_on_its_own(estimator):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    prompts = ["the quick brown", "count the apples and the pears", "lazy dog"]
    probe = DriftProbe(model, tokenizer, prompts, estimator=estimator, max_new_tokens=6, batch_size=3)
    singles = [DriftProbe(model, tokenizer, [prompt], estimator=estimator, max_new_tokens=6) for prompt in prompts]
    assert probe.measure_each(model) == [0.0, 0.0, 0.0]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    each = probe.measure_each(model, step=3)
    alone = [float(single.measure(model, step=3).compute()) for single in singles]
    if estimator == "exact":  # teacher-forced: a prompt reads as it does alone, left padding in its batch or not
        assert each == pytest.approx(alone, rel=1e-4)
    assert len(set(each)) == 3 and all(value != 0 for value in each)


def test_drift_probe_measures_another_model_only_from_its_start_values():
    tokenizer = build_tokenizer()
    base = build_model(tokenizer)
    start = {n: p.detach().clone() for n, p in base.named_parameters()}
    trained = build_model(tokenizer)
    trained.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    probe = DriftProbe(base, tokenizer, ["the quick brown", "lazy dog"], estimator="exact")
    # the reference pass would swap the start weights into base, not trained: a KL of 0 that looks like a measurement
    with pytest.raises(ValueError, match="belong to the model it was built with.*set_reference"):
        probe.measure_each(trained)
    probe.set_reference(trained, weights=start)
    own = DriftProbe(base, tokenizer, ["the quick brown", "lazy dog"], estimator="exact")
    with torch.no_grad():
        for p, q in zip(base.parameters(), trained.parameters()):
            p.copy_(q)
    assert probe.measure_each(trained) == pytest.approx(own.measure_each(base), rel=1e-5)
    assert all(value > 0 for value in probe.measure_each(trained))


def test_drift_probe_refuses_parameters_made_trainable_after_its_reference():
    """A probe built before adapters are added or layers unfrozen would run those at their trained values in the
    reference pass: the KL of what they learned would read 0."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    head = [n for n, _ in model.named_parameters()][-1]
    for name, p in model.named_parameters():
        p.requires_grad_(name != head)
    probe = DriftProbe(model, tokenizer, ["the quick brown", "lazy dog"], estimator="exact")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.get_parameter(head).requires_grad_(True)
    with torch.no_grad():
        model.get_parameter(head).add_(0.5 * torch.randn_like(model.get_parameter(head)))
    with pytest.raises(ValueError, match=rf"{head}\) were not trainable.*set_reference"):
        probe.measure_each(model)
    probe.set_reference(model, weights=start)
    assert all(value > 0 for value in probe.measure_each(model))


def test_realised_fraction_measures_what_half_precision_keeps():
    start = {"w": torch.ones(1000)}  # bf16 spacing just above 1.0 is 2**-7
    assert realised_fraction(start, {"w": torch.full((1000,), 2.0**-6)}) == pytest.approx(1.0)
    assert realised_fraction(start, {"w": torch.full((1000,), 1e-4)}) == 0.0  # rounded away entirely
    assert realised_fraction(start, {"w": torch.full((1000,), 1e-4)}, dtype=torch.float32) == pytest.approx(1.0, abs=1e-3)
    mixed = torch.cat([torch.full((500,), 2.0**-6), torch.full((500,), 1e-4)])
    expected = 500 * 2.0**-12 / (500 * 2.0**-12 + 500 * 1e-8)
    assert realised_fraction(start, {"w": mixed}) == pytest.approx(expected)
    off_grid = {"w": 1 + torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 2.0**-7}  # fp32 values
    assert realised_fraction(off_grid, {"w": torch.full((1000,), 1e-4)}) == 0.0  # stored in bf16 first: still lost
    with pytest.raises(ValueError, match="different parameter sets"):
        realised_fraction(start, {"v": torch.zeros(1000)})


def test_drift_probe_bad_input():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    with pytest.raises(ValueError, match="prompts is empty"):
        DriftProbe(model, tokenizer, [])
    with pytest.raises(ValueError, match="context is 256"):
        DriftProbe(model, tokenizer, ["word " * 300])
