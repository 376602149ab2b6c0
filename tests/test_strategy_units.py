"""ESStrategy's relative units, evidence-weighted shaping, the one shared copy of the start weights, and resuming
relative noise: in the test process, on one CPU device, with tiny models."""

import math
import statistics
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader

import lightning_es.engine.start as start_module
from lightning_es import ESStrategy
from lightning_es.engine import EvolutionStrategy, build_perturbation, evidence_zscore
from lightning_es.engine.scales import DEFAULT_RELATIVE_LEARNING_RATE, DEFAULT_RELATIVE_SIGMA, VECTOR_FLOOR, relative_scales
from lightning_es.lightning.callbacks import KLDriftCallback, ParameterDriftCallback
from lightning_es.lightning.strategy import ES_STATE_KEY
from lightning_toy import Regression, regression_data
from processes import run_command
from tiny import build_model


class Metrics(pl.Callback):
    """Every step's callback metrics, and the module's weights after the step."""

    def __init__(self):
        self.steps, self.weights = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        self.weights.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def trainer_for(strategy, max_steps, callbacks=(), **kwargs):
    kwargs = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  limit_val_batches=0) | kwargs
    return pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=max_steps, callbacks=list(callbacks),
                      **kwargs)


def fit(module, strategy, max_steps=2, callbacks=(), ckpt_path=None, **kwargs):
    metrics = Metrics()
    trainer = trainer_for(strategy, max_steps, [metrics, *callbacks], **kwargs)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, metrics


def weights(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# ---- 1. constructor: one unit or the other, within range -----------------------------------------------------------


def config_error(**fields) -> str:
    """ESConfig's refusal of the same fields: the settings are defined once, so the messages are the same."""
    from trl_ext import ESConfig

    with pytest.raises(ValueError) as error:
        ESConfig(output_dir="unused", use_cpu=True, **fields)
    return str(error.value)


@pytest.mark.parametrize("absolute", [{"sigma": 1e-3}, {"sigma": 1e-3, "learning_rate": 1e-3}])
def test_relative_sigma_with_an_absolute_sigma_is_refused_naming_both(absolute):
    name = next(iter(absolute))
    with pytest.raises(ValueError, match=rf"{name}={absolute[name]} .*relative_sigma") as error:
        ESStrategy(relative_sigma=0.05, **absolute)
    assert str(error.value) == config_error(relative_sigma=0.05, **absolute)


def test_learning_rate_beside_relative_sigma_is_the_relative_step():
    assert ESStrategy(relative_sigma=0.05, learning_rate=1e-3).settings.step_size() == 1e-3


def test_knobs_named_as_before_they_took_esconfigs_names_are_refused_naming_the_new_ones():
    with pytest.raises(TypeError, match=r"lr= is learning_rate=, rank= is perturbation_rank="):
        ESStrategy(lr=1e-3, rank=2)
    strategy = ESStrategy(sigma=1e-2, learning_rate=1e-3, perturbation="lowrank", perturbation_rank=2,
                          es_anchor_decay=0.5)
    assert (strategy.settings.learning_rate, strategy.settings.perturbation_rank) == (1e-3, 2)
    assert strategy.settings.es_anchor_decay == 0.5


def test_relative_learning_rate_alone_takes_the_default_relative_sigma_as_esconfig_does():
    strategy = ESStrategy(relative_learning_rate=1e-3)
    assert (strategy.settings.relative_sigma, strategy.settings.step_size()) == (DEFAULT_RELATIVE_SIGMA, 1e-3)
    with pytest.raises(ValueError, match="relative_learning_rate") as error:  # next to an absolute sigma
        ESStrategy(sigma=1e-3, relative_learning_rate=1e-3)
    assert str(error.value) == config_error(sigma=1e-3, relative_learning_rate=1e-3)


@pytest.mark.parametrize("relative_sigma", [0.9, 0.0, -0.05, math.nan])
def test_relative_sigma_out_of_range_is_refused_naming_it(relative_sigma):
    with pytest.raises(ValueError, match=r"relative_sigma must be in \(0, 0\.5\]"):
        ESStrategy(relative_sigma=relative_sigma)


@pytest.mark.parametrize("relative_learning_rate", [0.03, 1.0, -1e-3, math.inf, math.nan])
def test_a_relative_learning_rate_too_large_or_not_a_rate_is_refused_naming_it(relative_learning_rate):
    # 0.03 / 0.05 = 0.6 > 0.5: the step would replace the weights
    with pytest.raises(ValueError, match=rf"relative_learning_rate(=| must).*{relative_learning_rate}"):
        ESStrategy(relative_sigma=0.05, relative_learning_rate=relative_learning_rate)


def test_units_in_range_are_accepted_and_the_defaults_are_esconfigs():
    from lightning_es.engine import ESSettings
    from trl_ext import ESConfig

    strategy, config = ESStrategy(), ESConfig(output_dir="unused", use_cpu=True)
    for name in ESSettings.field_names():
        assert getattr(strategy.settings, name) == getattr(config, name), name
    assert strategy.settings.relative_noise and strategy.settings.step_size() == DEFAULT_RELATIVE_LEARNING_RATE
    edge = ESStrategy(relative_sigma=0.5, relative_learning_rate=0.25)  # both limits themselves are allowed
    assert (edge.settings.noise_sigma, edge.settings.step_size()) == (0.5, 0.25)
    absolute = ESStrategy(sigma=1e-3, learning_rate=5e-7)
    assert not absolute.settings.relative_noise and (absolute.settings.noise_sigma, absolute.settings.step_size()) == (
        1e-3, 5e-7)


# ---- 2. relative noise means the same on a rescaled model ---------------------------------------------------------


def small_net(c: float = 1.0, seed: int = 0) -> nn.Sequential:
    """Linear + LayerNorm + Linear, all parameters times ``c``: matrices, a gain vector with entries below the floor
    (a tenth of its RMS), and an all-zero bias (LayerNorm's), which takes the matrices' median RMS."""
    generator = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name != "1.bias":
                p.copy_(torch.randn(p.shape, generator=generator) * 0.4)
        net[1].weight[0] = 1e-4  # far below a tenth of the vector's RMS
        for p in net.parameters():
            p.mul_(c)
    return net


def test_relative_scales_of_matrices_vectors_and_zero_tensors():
    net = small_net()
    perturbation = build_perturbation("full", dict(net.named_parameters()), 0.05)
    scales = relative_scales(perturbation)
    matrix_rms = {n: float(p.detach().double().pow(2).mean().sqrt()) for n, p in net.named_parameters() if p.dim() == 2}
    for name, rms in matrix_rms.items():
        assert scales[name].dim() == 0 and float(scales[name]) == pytest.approx(rms, rel=1e-6)
    gain = net[1].weight.detach()
    floor = VECTOR_FLOOR * float(gain.double().pow(2).mean().sqrt())
    torch.testing.assert_close(scales["1.weight"], gain.abs().clamp(min=floor))
    assert float(scales["1.weight"][0]) == pytest.approx(floor, rel=1e-6)  # the tiny entry took the floor
    assert float(scales["1.weight"][1]) == pytest.approx(abs(float(gain[1])), rel=1e-6)  # the others their size
    bias = scales["1.bias"]  # all zeros: the median RMS of the evolved matrices
    assert bias.dim() == 0 and float(bias) == pytest.approx(statistics.median(matrix_rms.values()), rel=1e-6)
    # the two linear biases are non-zero vectors: per entry
    assert scales["0.bias"].shape == (6,) and scales["2.bias"].shape == (3,)


def test_an_all_zero_model_has_no_scale_and_says_so():
    net = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    with pytest.raises(ValueError, match="no scale to be relative to"):
        build_perturbation("full", dict(net.named_parameters()), 0.05, relative=True)


@pytest.mark.parametrize("kind", ["full", "lowrank"])
def test_engine_update_on_a_rescaled_model_is_the_rescaled_update(kind):
    """Same member fitness on W and on c W: relative noise and step give update(c W) = c update(W), and member
    weights (full) or a layer's member output (low-rank) c times the original's; absolute noise does not."""
    c = 10.0
    fitness = torch.tensor([0.3, -1.0, 2.0, 0.5, -0.7, 1.1])
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(5))

    def run(net, relative):
        params = dict(net.named_parameters())
        sigma = 0.05 if relative else 0.02
        perturbation = build_perturbation(kind, params, sigma, model=net, rank=2, relative=relative)
        es = EvolutionStrategy(perturbation, population_size=6, learning_rate=0.01, seed=3)
        member = es.members(0)[1]
        with torch.no_grad(), es.perturbed(member):
            member_weights = weights(net)
            member_output = net[0](x)
        before = weights(net)
        es.step(0, fitness)
        update = {n: p.detach() - before[n] for n, p in net.named_parameters()}
        return perturbation.scales, member_weights, member_output, update

    scales, member_weights, member_output, update = run(small_net(), relative=True)
    scales_c, member_weights_c, member_output_c, update_c = run(small_net(c), relative=True)
    assert scales.keys() == update.keys() == {"0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"}
    for name in update:
        torch.testing.assert_close(scales_c[name], c * scales[name], rtol=1e-6, atol=0, msg=name)
        assert update[name].abs().max() > 0, name  # every tensor, vectors and the zero bias too, moved
        # the updates are read off float32 weights (after - before): rounding of up to an ulp of c W, ~1e-7 * c
        torch.testing.assert_close(update_c[name], c * update[name], rtol=1e-4, atol=2e-6, msg=name)
    torch.testing.assert_close(member_output_c, c * member_output, rtol=1e-4, atol=1e-6)
    if kind == "full":
        for name in member_weights:
            torch.testing.assert_close(member_weights_c[name], c * member_weights[name], rtol=1e-5, atol=1e-7,
                                       msg=name)

    # control: absolute noise is the same size on both, so the steps are not c times each other
    *_, absolute = run(small_net(), relative=False)
    *_, absolute_c = run(small_net(c), relative=False)
    assert not torch.allclose(absolute_c["0.weight"], c * absolute["0.weight"], rtol=1e-2)


class Normalised(pl.LightningModule):
    """Computes with its parameters divided by ``c``: the same function, and fitness, for every ``c``."""

    def __init__(self, c: float = 1.0):
        super().__init__()
        self.net = small_net(c)
        self.c = c

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = functional_call(self.net, {n: p / self.c for n, p in self.net.named_parameters()}, (x,))
        return -nn.functional.mse_loss(out[:, :1], y)

    def configure_optimizers(self):
        return None

    def train_dataloader(self):
        return DataLoader(regression_data(), batch_size=16)


def test_lightning_relative_noise_trains_a_rescaled_model_identically_rescaled():
    """c = 4, a power of two: rescaling is exact in floating point, so the members' fitness must be bit-identical
    and the whole trajectory exactly c times the original's."""
    c = 4.0

    def run(module, **units):
        _, metrics = fit(module, ESStrategy(population_size=4, seed=7, perturbation="full", **units), max_steps=3)
        return module, metrics

    original, metrics = run(Normalised(), relative_sigma=0.05, relative_learning_rate=0.02)
    scaled, metrics_c = run(Normalised(c), relative_sigma=0.05, relative_learning_rate=0.02)
    fitness = [s["es/fitness_mean"] for s in metrics.steps]
    assert fitness == [s["es/fitness_mean"] for s in metrics_c.steps]
    assert [s["es/fitness_std"] for s in metrics.steps] == [s["es/fitness_std"] for s in metrics_c.steps]
    start = weights(Normalised())
    for step, (after, after_c) in enumerate(zip(metrics.weights, metrics_c.weights)):
        for name in after:
            assert not torch.equal(after[name], start[name]), (step, name)
            assert torch.equal(after_c[name], c * after[name]), (step, name)
    assert original.trainer.strategy.es.sigma == scaled.trainer.strategy.es.sigma == 0.05

    # control: absolute units see the scaled model's noise as c times smaller, so the steps are not c times
    _, absolute = run(Normalised(), sigma=0.02, learning_rate=1e-3)
    _, absolute_c = run(Normalised(c), sigma=0.02, learning_rate=1e-3)
    assert [s["es/fitness_mean"] for s in absolute.steps][1:] != [s["es/fitness_mean"] for s in absolute_c.steps][1:]
    assert not torch.allclose(absolute_c.weights[0]["net.0.weight"] - c * start["net.0.weight"],
                              c * (absolute.weights[0]["net.0.weight"] - start["net.0.weight"]), rtol=1e-2)


# ---- 3. evidence_zscore reads one fitness per example ------------------------------------------------------------


class PerExample(Regression):
    """Returns each example's negative squared error, and records every member's values."""

    def __init__(self, batch_size: int = 16):
        super().__init__(batch_size=batch_size)
        self.calls = []

    def train_dataloader(self):  # fixed order: the test replays the batches
        return DataLoader(regression_data(), batch_size=self.batch_size)

    def training_step(self, batch, batch_idx):
        x, y = batch
        per_example = -(self.out(torch.tanh(self.hidden(x))) - y).pow(2).squeeze(-1)
        self.calls.append((self.trainer.global_step, per_example.detach().double().clone()))
        return per_example


def test_evidence_zscore_with_a_scalar_fitness_is_a_clear_error():
    with pytest.raises(ValueError, match="weighs the evidence per example.*returned a scalar"):
        fit(Regression(), ESStrategy(population_size=4, sigma=0.05, learning_rate=0.01, fitness_shaping="evidence_zscore"))
    with pytest.raises(ValueError, match="weighs the evidence per example.*returned one example"):
        fit(PerExample(batch_size=1), ESStrategy(population_size=4, sigma=0.05, learning_rate=0.01,
                                                 fitness_shaping="evidence_zscore"))


def test_default_shaping_takes_a_scalar_fitness_as_the_zscore():
    # prompt_zscore (the default) reads examples when there are some; a scalar training_step is its one-prompt case,
    # the z-score of the members' fitness: the same weights as fitness_shaping="zscore"
    runs = {}
    for shaping in (None, "zscore"):
        pl.seed_everything(0, verbose=False)  # the same shuffled batches in both runs
        module = Regression()
        extra = {} if shaping is None else dict(fitness_shaping=shaping)
        fit(module, ESStrategy(population_size=4, sigma=0.05, learning_rate=0.01, seed=3, perturbation="full", **extra),
            max_steps=2)
        runs[shaping] = weights(module)
    assert ESStrategy().settings.fitness_shaping == "prompt_zscore"
    start = weights(Regression())
    assert any(not torch.equal(p, start[n]) for n, p in runs[None].items())
    for name, p in runs[None].items():
        torch.testing.assert_close(p, runs["zscore"][name], rtol=0, atol=0, msg=name)


def test_evidence_zscore_trains_on_per_example_fitness_and_logs_its_mean():
    module = PerExample()
    start = weights(module)
    trainer, metrics = fit(module, ESStrategy(population_size=4, sigma=0.05, learning_rate=0.01, seed=2, perturbation="full",
                                              fitness_shaping="evidence_zscore"), max_steps=3)
    assert trainer.global_step == 3
    assert any(not torch.equal(p, start[n]) for n, p in module.named_parameters())
    for step, logged in enumerate(metrics.steps):
        members = [values for s, values in module.calls if s == step]
        assert len(members) == 4 and all(v.shape == (16,) for v in members)
        member_means = torch.stack([v.mean() for v in members])
        assert logged["es/fitness_mean"] == pytest.approx(float(member_means.mean()), rel=1e-6)  # logged as float32
        assert logged["es/fitness_max"] == pytest.approx(float(member_means.max()), rel=1e-6)  # logged as float32

    # the first step is the engine's evidence-weighted step on the members' per-example table
    table = torch.stack([values for s, values in module.calls if s == 0])
    replay = PerExample()
    params = dict(replay.named_parameters())
    es = EvolutionStrategy(build_perturbation("full", params, 0.05), population_size=4, learning_rate=0.01, seed=2,
                           fitness_shaping="evidence_zscore")
    stats = es.step(0, table.mean(dim=1), per_prompt=table)
    for name, p in params.items():
        torch.testing.assert_close(metrics.weights[0][name], p.detach(), rtol=0, atol=1e-7, msg=name)
    assert metrics.steps[0]["es/update_norm"] == pytest.approx(stats.update_norm, rel=1e-5)
    shaped = evidence_zscore(table.mean(dim=1), table)
    assert 0 < float(shaped.abs().max())  # the evidence was strong enough to move the weights
    # members better on a few examples only: the evidence factor (at most one) shrinks plain zscore's step
    zscore_step = EvolutionStrategy(build_perturbation("full", dict(PerExample().named_parameters()), 0.05),
                                    population_size=4, learning_rate=0.01, seed=2).step(0, table.mean(dim=1))
    assert stats.update_norm < zscore_step.update_norm


# ---- 4. one copy of the start weights, shared by ES and both drift callbacks ---------------------------------------


class LanguageModel(pl.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return -self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return None


@pytest.mark.parametrize("anchor_decay", [0.5, 0.0])
def test_es_and_both_drift_callbacks_share_one_start_copy(tmp_path, tokenizer, monkeypatch, anchor_decay):
    constructed = []
    original_init = start_module.StartWeights.__init__

    def counting_init(self, *args, **kwargs):
        constructed.append(self)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(start_module.StartWeights, "__init__", counting_init)
    model = build_model(tokenizer)
    initial = {f"model.{n}": p.detach().clone() for n, p in model.named_parameters()}
    data = DataLoader(torch.randint(0, len(tokenizer), (8, 6), generator=torch.Generator().manual_seed(0)),
                      batch_size=4)
    kl = KLDriftCallback(["the lazy dog", "count the apples"], tokenizer, every_n_steps=1, estimator="exact")
    drift = ParameterDriftCallback(every_n_steps=1, model_attribute="model")
    checkpoints = pl.callbacks.ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    metrics = Metrics()
    trainer = trainer_for(ESStrategy(population_size=4, sigma=0.02, learning_rate=1e-3, seed=1, es_anchor_decay=anchor_decay), 2,
                          [kl, drift, checkpoints, metrics], enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(LanguageModel(model), data)

    es = trainer.strategy.es
    assert es.start is not None
    assert es.start is kl.probe.reference is drift.start
    assert len(constructed) == 1 and constructed[0] is es.start
    # measured from the start: the weights moved, so both drifts are positive (exact KL is never negative)
    assert metrics.steps[-1]["drift/update_norm"] > 0 and metrics.steps[-1]["drift/kl"] > 0
    # the one copy still holds the start, bit for bit, after the probes swapped it in and out
    assert set(es.start.tensors) == set(initial)
    assert all(torch.equal(es.start.tensors[n], initial[n]) for n in initial)
    assert any(not torch.equal(p, initial[f"model.{n}"]) for n, p in model.named_parameters())

    assert kl.state_dict() == {} and drift.state_dict() == {}  # the strategy's checkpoint carries the start
    path = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    saved = checkpoint[ES_STATE_KEY]["start"]
    assert set(saved) == set(initial) and all(torch.equal(saved[n], initial[n]) for n in initial)
    assert all("start_weights" not in state for state in checkpoint.get("callbacks", {}).values())

    # resumed into a model built with other weights: still one copy, the saved start, shared by all three
    constructed.clear()
    kl = KLDriftCallback(["the lazy dog", "count the apples"], tokenizer, every_n_steps=1, estimator="exact")
    drift = ParameterDriftCallback(every_n_steps=1, model_attribute="model")
    trainer = trainer_for(ESStrategy(population_size=4, sigma=0.02, learning_rate=1e-3, seed=1, es_anchor_decay=anchor_decay), 3,
                          [kl, drift], default_root_dir=tmp_path)
    trainer.fit(LanguageModel(build_model(tokenizer, seed=1)), data, ckpt_path=path)
    es = trainer.strategy.es
    assert trainer.global_step == 3 and es.start_restored
    assert es.start is kl.probe.reference is drift.start
    assert len(constructed) == 1 and constructed[0] is es.start
    assert all(torch.equal(es.start.tensors[n], initial[n]) for n in initial)


# ---- 5. resuming relative noise continues exactly, with the saved scales ------------------------------------------


@pytest.mark.parametrize("perturbation", ["full", "lowrank"])
def test_resumed_relative_run_reuses_the_saved_scales_and_matches_exactly(tmp_path, perturbation):
    def strategy(**units):
        units = units or dict(relative_sigma=0.05, relative_learning_rate=0.02)
        return ESStrategy(population_size=4, seed=3, perturbation=perturbation, perturbation_rank=2, **units)

    def run(module, ckpt_path=None, max_steps=4, **units):
        pl.seed_everything(0)
        folder = tmp_path / ("ckpt" if ckpt_path is None else f"resumed-{len(list(tmp_path.glob('resumed-*')))}")
        checkpoints = pl.callbacks.ModelCheckpoint(folder, every_n_train_steps=2, save_top_k=-1)
        trainer, _ = fit(module, strategy(**units), max_steps=max_steps, callbacks=[checkpoints],
                         ckpt_path=ckpt_path, enable_checkpointing=True, default_root_dir=tmp_path)
        return trainer

    def elsewhere():
        """A module built with other weights than the run's start: scales taken from it would differ."""
        module = Regression()
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(3.0)
        return module

    full_module = Regression()
    full = run(full_module)
    scales = {n: s.clone() for n, s in full.strategy.es.perturbation.scales.items()}
    assert scales.keys() == dict(full_module.named_parameters()).keys()
    path = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    state = torch.load(path, weights_only=False)[ES_STATE_KEY]
    assert "relative" in state["noise"]
    saved = {name: torch.as_tensor(value) for group in state["scales"].values() for name, value in group.items()}
    assert saved.keys() == scales.keys()  # every evolved tensor's scale, whatever the grouping
    for name, value in saved.items():
        assert value.shape == scales[name].shape, name  # a number for a matrix, one per entry for a vector
        assert torch.equal(value.to(scales[name].dtype), scales[name]), name

    resumed_module = elsewhere()
    resumed = run(resumed_module, ckpt_path=path)
    assert resumed.global_step == 4
    resumed_scales = resumed.strategy.es.perturbation.scales
    assert resumed_scales.keys() == scales.keys()
    assert all(torch.equal(resumed_scales[n], scales[n]) for n in scales)
    for (name, a), b in zip(full_module.named_parameters(), resumed_module.parameters()):
        assert torch.equal(a, b), name

    # control: without the saved scales, those of the module as built are used and the run goes elsewhere
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint[ES_STATE_KEY]["scales"]
    torch.save(checkpoint, tmp_path / "no-scales.ckpt")
    unscaled_module = elsewhere()
    run(unscaled_module, ckpt_path=tmp_path / "no-scales.ckpt")
    assert any(not torch.equal(a, b) for a, b in zip(full_module.parameters(), unscaled_module.parameters()))

    # a relative-noise checkpoint is not continued with absolute noise
    with pytest.raises(ValueError, match="relative to each tensor's scale"):
        run(Regression(), ckpt_path=path, sigma=0.05, learning_rate=0.02)


# ---- evidence_zscore over two processes (replicated layout) -------------------------------------------------------

TWO_PROCESS_SCRIPT = '''
import sys
sys.path.insert(0, {tests!r})
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from test_strategy_units import PerExample
from lightning_es import ESStrategy


class Save(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero:
            torch.save({{"per_prompt": trainer.strategy._iteration.per_prompt,
                        "weights": {{n: p.detach().clone() for n, p in pl_module.named_parameters()}}}}, sys.argv[1])


trainer = pl.Trainer(strategy=ESStrategy(population_size=4, sigma=0.05, learning_rate=0.01, seed=2, perturbation="full", process_group_backend="gloo",
                                         fitness_shaping="evidence_zscore"),
                     accelerator="cpu", devices=2, max_steps=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[Save()])
trainer.fit(PerExample())
if dist.is_initialized():
    dist.destroy_process_group()
'''


@pytest.mark.slow
def test_evidence_zscore_on_two_processes_weighs_the_same_evidence_as_on_one(tmp_path):
    script, out = tmp_path / "evidence_two.py", tmp_path / "two.pt"
    script.write_text(TWO_PROCESS_SCRIPT.format(tests=str(Path(__file__).parent)))
    run_command([sys.executable, script, out], tmp_path, timeout=300)
    two = torch.load(out, weights_only=False)
    one = PerExample()
    _, metrics = fit(one, ESStrategy(population_size=4, sigma=0.05, learning_rate=0.01, seed=2, perturbation="full",
                                     fitness_shaping="evidence_zscore"), max_steps=1)
    # every member was scored on the same 16 examples: a complete (members x 16) table, and the one-process step
    assert not two["per_prompt"].isnan().any(), two["per_prompt"].isnan().sum(dim=1).tolist()
    for name, value in metrics.weights[0].items():
        torch.testing.assert_close(two["weights"][name], value, rtol=0, atol=1e-6, msg=name)
