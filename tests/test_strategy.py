"""Lightning ESStrategy: real multi-process runs launched by Lightning, and in-process checks on one device."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist

from lightning_es import ESStrategy, PopulationError
from lightning_toy import Regression

SCRIPT = Path(__file__).parent / "scripts" / "lightning_toy_run.py"


def run_toy(tmp_path, name, *flags):
    out = tmp_path / f"{name}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *flags], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(out)


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lightning-es")
    return tmp, {
        "one": run_toy(tmp, "one", "--devices", "1", "--epochs", "10"),
        "two": run_toy(tmp, "two", "--devices", "2", "--epochs", "10", "--ckpt_dir", str(tmp / "ckpt")),
    }


@pytest.mark.slow
def test_two_processes_raise_fitness_and_match_one_process(runs):
    _, runs = runs
    one, two = runs["one"], runs["two"]
    assert (one["world_size"], two["world_size"], two["global_step"]) == (1, 2, 40)
    first_epoch, last_epoch = sum(two["fitness"][:4]) / 4, sum(two["fitness"][-4:]) / 4  # same 64 rows each epoch
    assert last_epoch > first_epoch + 0.1, (first_epoch, last_epoch)
    assert two["fitness"] == one["fitness"]
    assert_same_weights(one["weights"], two["weights"], atol=1e-6)


@pytest.mark.slow
def test_resume_from_model_checkpoint_continues_exactly(runs):
    tmp, runs = runs
    resumed = run_toy(tmp, "resumed", "--devices", "2", "--epochs", "10",
                      "--resume", str(tmp / "ckpt" / "epoch=3-step=16.ckpt"))
    assert resumed["global_step"] == 40
    assert resumed["fitness"] == runs["two"]["fitness"][16:]
    assert_same_weights(runs["two"]["weights"], resumed["weights"], atol=0)


@pytest.mark.slow
def test_zero3_sharded_layout_matches_the_replicated_run(runs):
    tmp, runs = runs
    # two processes split each 16-row batch of the one-process run; the fitness is their mean
    sharded = run_toy(tmp, "sharded", "--devices", "2", "--epochs", "10", "--sharded", "--batch_size", "8")
    assert sharded["world_size"] == 2
    torch.testing.assert_close(torch.tensor(sharded["fitness"]), torch.tensor(runs["one"]["fitness"]), rtol=0, atol=1e-4)
    assert_same_weights(runs["one"]["weights"], sharded["weights"], atol=5e-4)


# ---- one process, in the test process ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_process_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


class Metrics(pl.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fit(module, strategy="es", max_steps=4, **trainer_kwargs):
    metrics = Metrics()
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[metrics], **trainer_kwargs)
    trainer.fit(module)
    return trainer, metrics.steps


def test_strategy_name_es_is_registered_and_trains():
    module = Regression()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer, steps = fit(module)
    assert isinstance(trainer.strategy, ESStrategy)
    assert trainer.global_step == 4 and len(steps) == 4
    assert all(not torch.equal(before[n], p) for n, p in module.named_parameters())
    assert all(p.grad is None for p in module.parameters())  # the in-place update allocates no gradients


def test_self_log_gives_population_mean_and_best():
    _, steps = fit(Regression(), strategy=ESStrategy(population_size=6, sigma=0.05, lr=0.01))
    for logged in steps:  # the module logs mse and returns -mse
        assert math.isclose(logged["train_mse"], -logged["es/fitness_mean"], rel_tol=1e-6)
        assert math.isclose(logged["train_mse/best"], -logged["es/fitness_max"], rel_tol=1e-6)
        assert logged["es/fitness_std"] > 0 and logged["es/update_norm"] > 0


def test_an_optimizer_consumes_the_es_gradient():
    """SGD(lr) on ES gradients is the in-place step with the same lr."""
    in_place, with_sgd = Regression(), Regression(optimizer=None)
    with_sgd.configure_optimizers = lambda: torch.optim.SGD(with_sgd.parameters(), lr=0.01)
    fit(in_place, strategy=ESStrategy(population_size=4, sigma=0.05, lr=0.01, seed=5))
    fit(with_sgd, strategy=ESStrategy(population_size=4, sigma=0.05, lr=123.0, seed=5))  # lr unused: SGD's applies
    for (name, a), b in zip(in_place.named_parameters(), with_sgd.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    assert all(p.grad is not None for p in with_sgd.parameters())


@pytest.mark.parametrize(
    "fitness, message",
    [
        (lambda error: None, "returned None"),
        (lambda error: {"loss": error}, "returned a dict"),
        (lambda error: torch.stack([error, error]), "shape \\(2,\\)"),
        (lambda error: error * math.nan, "fitness of nan"),
    ],
)
def test_bad_fitness_is_a_clear_error(fitness, message):
    with pytest.raises(PopulationError, match=rf"ES step 0, population member 0 \(process 0\): ValueError: .*{message}"):
        fit(Regression(fitness=fitness))


def test_options_that_assume_gradients_are_refused():
    with pytest.raises(ValueError, match="accumulate_grad_batches=2"):
        fit(Regression(), accumulate_grad_batches=2)
    with pytest.raises(ValueError, match="gradient_clip_val=1.0.*no optimizer"):
        fit(Regression(), gradient_clip_val=1.0)


def test_population_and_layout_checks():
    with pytest.raises(ValueError, match="smaller than the 4 process groups"):
        pl.Trainer(strategy=ESStrategy(population_size=2), accelerator="cpu", devices=4)
    with pytest.raises(ValueError, match="does not split evenly over 4"):
        pl.Trainer(strategy=ESStrategy(population_size=6), accelerator="cpu", devices=4)
    with pytest.raises(ValueError, match="zero_optimization.stage=2.*needs stage 3"):
        ESStrategy(deepspeed_config={"zero_optimization": {"stage": 2}})
    with pytest.raises(FileNotFoundError, match="deepspeed_config"):
        ESStrategy(deepspeed_config="missing.json")
