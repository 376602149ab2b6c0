import math
from types import SimpleNamespace

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
from lightning_es.drift import parameter_drift, sharded_parameter_drift, start_point
from lightning_es.engine import StartWeights
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


def test_parameter_drift_values():
    model = torch.nn.Sequential()
    model.add_module("self_attn", torch.nn.Linear(2, 1, bias=False))
    model.add_module("mlp", torch.nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model.self_attn.weight.copy_(torch.tensor([[3.0, 4.0]]))
        model.mlp.weight.fill_(2.0)
    start = {"self_attn.weight": torch.tensor([[0.0, 4.0]]), "mlp.weight": torch.tensor([[2.0]])}
    assert parameter_drift(model, start) == {
        "drift/update_norm": 3.0, "drift/relative_norm": 3.0 / math.sqrt(20.0), "drift/moved_fraction": 1 / 3,
        "drift/norm/attention": 3.0, "drift/norm/mlp": 0.0}
    only = parameter_drift(model, start, names=["mlp.weight"])  # the trained parameters only
    assert only["drift/update_norm"] == 0.0 and set(only) == {"drift/update_norm", "drift/relative_norm",
                                                               "drift/moved_fraction", "drift/norm/mlp"}
    with pytest.raises(ValueError, match="different parameter sets"):
        parameter_drift(model, {"mlp.weight": start["mlp.weight"]})


class Zero3Slices:
    """What the drift computation asks of ES's perturbation, as ZeRO-3 slices answer it: process ``rank`` of two
    holds the ``rank``-th piece of each flattened tensor, padded; ``total_squared_norm`` adds the other process's
    parts (``others``, in order) as the all-reduce would, or records this process's (``parts``)."""

    def __init__(self, shapes, rank, others=None):
        self.shapes, self.others, self.parts = shapes, others, []
        self.size = {name: -(-torch.Size(shape).numel() // 2) for name, shape in shapes.items()}
        self.start = {name: rank * size for name, size in self.size.items()}

    def slice_of(self, name, tensor):
        flat = torch.zeros(2 * self.size[name], dtype=tensor.dtype)
        flat[: tensor.numel()] = tensor.reshape(-1)
        return flat[self.start[name] : self.start[name] + self.size[name]].clone()

    def real(self, name, tensor):
        held = max(0, min(self.size[name], self.numel(name) - self.start[name]))
        return tensor.reshape(-1)[:held]

    def numel(self, name):
        return torch.Size(self.shapes[name]).numel()

    def total_squared_norm(self, local):
        if self.others is None:
            self.parts.append(local)
            return local
        return local + self.others.pop(0)


def test_sharded_parameter_drift_summed_over_the_processes_equals_the_whole_tensors_drift():
    """The one drift computation over ZeRO-3 slices (padding left out, each process's sums added over the processes
    through the perturbation) gives the values of the whole tensors, as replicated processes hold them."""
    shapes = {"self_attn_weight": (5, 3), "mlp_bias": (5,)}  # 15 and 5 elements: both padded over 2 processes
    torch.manual_seed(0)
    start = {name: torch.randn(shape).to(torch.bfloat16) for name, shape in shapes.items()}
    current = {name: (t.float() + 0.05 * torch.randn(t.shape)).to(torch.bfloat16) for name, t in start.items()}
    model = torch.nn.Module()
    for name, tensor in current.items():
        model.register_parameter(name, torch.nn.Parameter(tensor.clone()))
    expected = parameter_drift(model, start, threshold=1e-2)

    def process(rank, others=None):
        slices = Zero3Slices(shapes, rank, others)
        params = {name: torch.nn.Parameter(slices.slice_of(name, start[name])) for name in shapes}
        es = SimpleNamespace(params=params, perturbation=slices, start=StartWeights(params))
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(slices.slice_of(name, current[name]))
        return es

    one = process(1)
    sharded_parameter_drift(one, threshold=1e-2)
    drift = sharded_parameter_drift(process(0, one.perturbation.parts), threshold=1e-2)
    assert drift.keys() == expected.keys() == {"drift/update_norm", "drift/relative_norm", "drift/moved_fraction",
                                               "drift/norm/attention", "drift/norm/mlp"}
    assert 0 < drift["drift/moved_fraction"] == expected["drift/moved_fraction"] < 1
    for key, value in expected.items():
        assert drift[key] == pytest.approx(value, rel=1e-12), key


def start_point_of(model, es=None, step=0, saved=None):
    """``start_point`` as a drift callback calls it; returns (start, warnings, whether ``saved`` was read)."""
    warnings, reads = [], []

    def read():
        reads.append(True)
        return saved

    start = start_point(model, es, step, read, lambda weights: ("own", weights), warnings.append, "Drift",
                        es_lacks="ES's checkpoint lacks them", saved_lacks="the callback's checkpoint lacks them")
    return start, warnings, bool(reads)


def test_start_point_without_es_is_the_callbacks_own_copy_of_the_saved_or_the_current_weights():
    model = torch.nn.Linear(2, 1)
    saved = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    assert start_point_of(model) == (("own", None), [], True)
    assert start_point_of(model, step=4, saved=saved) == (("own", saved), [], True)
    start, warnings, _ = start_point_of(model, step=4)
    assert start == ("own", None) and warnings == [
        "Drift: the callback's checkpoint lacks them: drift is measured from the resumed weights, not from the weights "
        "the run started from."]


class KeepsStart:
    """What ``start_point`` asks of an ES engine: its one copy of the start weights, kept on demand."""

    def __init__(self, model):
        self.model, self.start, self.start_restored = model, None, False

    def keep_start(self):
        if self.start is None:
            self.start = StartWeights(dict(self.model.named_parameters()))
        return self.start


def test_start_point_with_es_is_its_kept_copy_which_adopts_a_callbacks_saved_start():
    model = torch.nn.Linear(2, 1)
    es = KeepsStart(model)
    saved = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
    start, warnings, _ = start_point_of(model, es, step=4, saved=saved)  # saved before ES kept the start weights
    assert start is es.start and warnings == [] and es.start_restored
    assert all(torch.equal(t, torch.full_like(t, 7.0)) for t in start.tensors.values())
    assert start_point_of(model, es, step=6, saved=saved) == (es.start, [], False)  # restored: nothing more to read

    fresh = KeepsStart(model)
    assert start_point_of(model, fresh) == (fresh.start, [], True)  # a new run: no warning
    start, warnings, _ = start_point_of(model, fresh, step=4)
    assert start is fresh.start and not fresh.start_restored and warnings == [
        "Drift: ES's checkpoint lacks them: drift is measured from the resumed weights, not from the weights the run "
        "started from."]


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
