"""``Trainer(strategy="es")`` from both Lightning packages, and ``ESStrategy(mode="min")``.

Lightning ships its trainer as ``lightning.pytorch`` (``import lightning as L``) and as ``pytorch_lightning``: each
Trainer accepts strategies and callbacks built on its own package's classes only. ``lightning_es.lightning`` is built
on ``pytorch_lightning``; ``lightning_es.unified`` is the same source built on ``lightning.pytorch``. Lightning has no
entry point for external strategies: the string ``"es"`` is known to a package's registry once its build is imported.
"""

import importlib
import inspect
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

# (the package whose Trainer runs, the lightning_es build registering "es" with it)
PACKAGES = [("lightning.pytorch", "lightning_es.unified"), ("pytorch_lightning", "lightning_es.lightning")]
TARGET = torch.tensor([[1.0, -2.0], [0.5, 1.5]])


def quadratic_module(pl, returns: str = "loss"):
    """A LightningModule of package ``pl`` whose training_step returns ``|W^T - TARGET|^2`` (``returns="loss"``) or
    its negation (``"fitness"``), and logs the loss as ``quadratic``."""

    class Quadratic(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2, bias=False)
            with torch.no_grad():
                self.layer.weight.fill_(0.25)

        def loss(self) -> torch.Tensor:  # through the layer's forward, where low-rank noise applies
            return ((self.layer(torch.eye(2)) - TARGET) ** 2).sum()

        def training_step(self, batch, batch_idx):
            loss = self.loss()
            self.log("quadratic", loss)
            return loss if returns == "loss" else -loss

        def configure_optimizers(self):
            return None

        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.zeros(64, 1)), batch_size=1)

    return Quadratic()


def trainer_of(pl, max_steps=2, callbacks=(), **kwargs):
    options = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    return pl.Trainer(callbacks=list(callbacks), **{**options, **kwargs})


def test_import_lightning_as_L_trains_with_strategy_es():
    import lightning as L

    import lightning_es.unified  # registers "es" with lightning.pytorch (Lightning has no entry point for strategies)

    module = quadratic_module(L)
    before = module.layer.weight.detach().clone()
    trainer = L.Trainer(strategy="es", accelerator="cpu", devices=1, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    assert isinstance(trainer.strategy, lightning_es.unified.ESStrategy)
    assert isinstance(trainer.strategy, L.pytorch.strategies.Strategy)
    assert trainer.global_step == 2
    assert not torch.equal(before, module.layer.weight)


@pytest.mark.parametrize("package, build", PACKAGES)
def test_each_package_registers_es_and_es_zero3_and_trains(package, build):
    pl, es = importlib.import_module(package), importlib.import_module(build)
    registry = importlib.import_module(f"{package}.strategies").StrategyRegistry
    assert registry["es"]["strategy"] is es.ESStrategy
    assert registry["es_zero3"]["strategy"] is es.ESStrategy
    module = quadratic_module(pl)
    before = module.layer.weight.detach().clone()
    trainer = trainer_of(pl, strategy="es")
    trainer.fit(module)
    assert type(trainer.strategy) is es.ESStrategy and trainer.global_step == 2
    assert not torch.equal(before, module.layer.weight)
    assert module.layer.weight.grad is None


@pytest.mark.parametrize("package, build", PACKAGES)
def test_each_package_trainer_takes_the_callbacks_progress_bar_and_checkpoint_io(package, build, tmp_path):
    pl = importlib.import_module(package)
    es = importlib.import_module(build)
    callbacks = importlib.import_module(f"{build}.callbacks")
    assert issubclass(callbacks.KLDriftCallback, pl.Callback)
    assert isinstance(es.AtomicCheckpointIO(), importlib.import_module(f"{package}.plugins.io").CheckpointIO)
    logged = []

    class Capture(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append(dict(trainer.callback_metrics))

    bar = es.ESProgressBar()
    trainer = trainer_of(pl, strategy=es.ESStrategy(population_size=4), enable_progress_bar=True,
                         callbacks=[bar, callbacks.ParameterDriftCallback(every_n_steps=1), Capture()])
    trainer.fit(quadratic_module(pl))
    assert trainer.progress_bar_callback is bar
    assert bar.train_progress_bar.desc.startswith("ES step 2/2")
    assert len(logged) == 2 and all(float(step["drift/update_norm"]) > 0 for step in logged)
    trainer.save_checkpoint(tmp_path / "last.ckpt")  # through AtomicCheckpointIO
    assert (tmp_path / "last.ckpt").is_file() and not (tmp_path / "last.ckpt.partial").exists()


def quadratic_after(pl, es, mode, returns, steps=8):
    module = quadratic_module(pl, returns)
    metrics = []

    class Capture(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    start = float(module.loss().detach())
    strategy = es.ESStrategy(population_size=8, sigma=0.05, learning_rate=0.05, mode=mode)
    trainer_of(pl, max_steps=steps, strategy=strategy, callbacks=[Capture()]).fit(module)
    return start, float(module.loss().detach()), metrics


@pytest.mark.parametrize("package, build", PACKAGES)
def test_mode_min_lowers_a_returned_loss_and_mode_max_raises_it(package, build):
    pl, es = importlib.import_module(package), importlib.import_module(build)
    start, after_min, metrics = quadratic_after(pl, es, "min", returns="loss")
    assert after_min < 0.8 * start
    # es/fitness_* are of the fitness ES maximises: the negated loss
    for step in metrics:
        assert step["es/fitness_mean"] == pytest.approx(-step["quadratic"], rel=1e-5)
        assert step["es/fitness_max"] == pytest.approx(-step["quadratic/best"], rel=1e-5)
    start, after_max, _ = quadratic_after(pl, es, "max", returns="loss")  # the default: the loss is maximised
    assert after_max > 1.2 * start
    _, after_fitness, _ = quadratic_after(pl, es, "max", returns="fitness")
    assert after_fitness == pytest.approx(after_min)  # returning -loss under "max" is the same run as loss under "min"


@pytest.mark.parametrize("build", ["lightning_es.unified", "lightning_es.lightning"])
def test_mode_is_max_or_min(build):
    es = importlib.import_module(build)
    assert es.ESStrategy().mode == "max"
    with pytest.raises(ValueError, match=r"mode='minimize'.*mode is 'max'.*or 'min'"):
        es.ESStrategy(mode="minimize")


def test_the_two_builds_share_one_source_and_the_same_names():
    import lightning.pytorch
    import pytorch_lightning

    import lightning_es
    import lightning_es.lightning as classic
    import lightning_es.unified as unified

    assert unified.__all__ == classic.__all__
    for name in classic.__all__:
        mine, theirs = getattr(unified, name), getattr(classic, name)
        assert mine is not theirs and inspect.getsourcefile(mine) == inspect.getsourcefile(theirs)
    assert issubclass(unified.ESStrategy, lightning.pytorch.strategies.DDPStrategy)
    assert not issubclass(unified.ESStrategy, pytorch_lightning.strategies.Strategy)
    assert lightning_es.ESStrategy is classic.ESStrategy  # the top-level name stays pytorch_lightning's


def test_the_unified_build_imports_neither_pytorch_lightning_nor_lightning_fabric():
    code = ("import sys, lightning as L, lightning_es.unified as u; "
            "L.Trainer(strategy='es', accelerator='cpu', devices=1, logger=False); "
            "print(sorted(m for m in ('pytorch_lightning', 'lightning_fabric', 'lightning_es.lightning') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_checkpoint_records_its_mode_and_resuming_under_the_other_is_refused(tmp_path):
    import pytorch_lightning as pl

    import lightning_es.lightning as es

    module = quadratic_module(pl)
    trainer_of(pl, max_steps=1, strategy=es.ESStrategy(population_size=4, mode="min"),
               default_root_dir=tmp_path).fit(module)
    checkpoint = tmp_path / "min.ckpt"
    module.trainer.save_checkpoint(checkpoint)
    with pytest.raises(ValueError, match=r"trained with ESStrategy\(mode='min'\), this run has mode='max'"):
        trainer_of(pl, max_steps=2, strategy=es.ESStrategy(population_size=4, mode="max")).fit(
            quadratic_module(pl), ckpt_path=str(checkpoint))
    resumed = quadratic_module(pl)
    trainer_of(pl, max_steps=2, strategy=es.ESStrategy(population_size=4, mode="min")).fit(
        resumed, ckpt_path=str(checkpoint))
    assert resumed.trainer.global_step == 2
