"""Lightning ESStrategy: real multi-process runs launched by Lightning, and in-process checks on one device."""

import math
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist

from lightning_es import ESStrategy, PopulationError
from lightning_toy import Regression
from processes import run_command

SCRIPTS = Path(__file__).parent / "scripts"


def run_toy(tmp_path, name, *flags, check=True, timeout=None):
    out = tmp_path / f"{name}.pt"
    result = run_command([sys.executable, SCRIPTS / "lightning_toy_run.py", "--out", out, *flags], tmp_path,
                         timeout=timeout or (600 if check else 120), check=check)
    return torch.load(out) if check else result


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """10 epochs of 4 batches; the two-process run keeps a checkpoint after every step, and its process 1 starts from
    other weights (the strategy gives it process 0's)."""
    tmp = tmp_path_factory.mktemp("lightning-es")
    return tmp, {
        "one": run_toy(tmp, "one", "--devices", "1", "--epochs", "10"),
        "two": run_toy(tmp, "two", "--devices", "2", "--epochs", "10", "--ckpt_dir", tmp / "ckpt",
                       "--ckpt_every_n_steps", "1", "--perturb_on_rank", "1"),
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
@pytest.mark.parametrize("checkpoint", ["epoch=3-step=16", "epoch=1-step=6", "epoch=2-step=10"])
def test_resume_continues_exactly_at_an_epoch_end_and_mid_epoch(runs, checkpoint):
    """The end of the 4th epoch, and two batches into the 2nd and into the 3rd epoch."""
    tmp, runs = runs
    resumed = run_toy(tmp, f"resumed-{checkpoint}", "--devices", "2", "--epochs", "10",
                      "--resume", tmp / "ckpt" / f"{checkpoint}.ckpt")
    step = int(checkpoint.split("=")[-1])
    assert resumed["global_step"] == 40
    assert resumed["fitness"] == runs["two"]["fitness"][step:]  # the same batches, in the same order
    assert_same_weights(runs["two"]["weights"], resumed["weights"], atol=0)


@pytest.mark.slow
def test_the_default_low_rank_noise_gives_the_same_weights_on_two_processes_as_on_one(tmp_path):
    one = run_toy(tmp_path, "one-lowrank", "--devices", "1", "--epochs", "3", "--perturbation", "lowrank")
    two = run_toy(tmp_path, "two-lowrank", "--devices", "2", "--epochs", "3", "--perturbation", "lowrank")
    assert two["world_size"] == 2 and two["fitness"] == one["fitness"]
    assert_same_weights(one["weights"], two["weights"], atol=1e-6)


@pytest.mark.slow
def test_zero3_sharded_layout_matches_the_replicated_run(runs):
    tmp, runs = runs
    # two processes split each 16-row batch of the one-process run; the fitness is their mean
    sharded = run_toy(tmp, "sharded", "--devices", "2", "--epochs", "10", "--sharded", "--batch_size", "8")
    assert sharded["world_size"] == 2
    torch.testing.assert_close(torch.tensor(sharded["fitness"]), torch.tensor(runs["one"]["fitness"]), rtol=0, atol=1e-4)
    assert_same_weights(runs["one"]["weights"], sharded["weights"], atol=5e-4)


@pytest.mark.slow
def test_zero3_relative_noise_matches_the_replicated_run(tmp_path):
    """Relative scales from ZeRO-3 slices (whose padding DeepSpeed leaves uninitialised) equal the one-process ones."""
    one = run_toy(tmp_path, "one", "--devices", "1", "--epochs", "3", "--relative", "--lr", "0.02")
    sharded = run_toy(tmp_path, "sharded", "--devices", "2", "--epochs", "3", "--sharded", "--batch_size", "8",
                      "--relative", "--lr", "0.02")
    torch.testing.assert_close(torch.tensor(sharded["fitness"]), torch.tensor(one["fitness"]), rtol=0, atol=1e-4)
    assert_same_weights(one["weights"], sharded["weights"], atol=5e-4)


@pytest.mark.slow
def test_zero3_anchored_run_checkpoints_on_one_process_and_resumes_exactly(tmp_path):
    flags = ["--devices", "2", "--epochs", "4", "--sharded", "--batch_size", "8", "--anchor_decay", "0.5"]
    full = run_toy(tmp_path, "full", *flags, "--ckpt_dir", tmp_path / "ckpt", "--ckpt_every_n_steps", "1")
    on_rank_0, on_rank_1 = full["es_state_held"]
    assert on_rank_0["start"] == {"hidden.weight": (5, 4), "hidden.bias": (5,), "out.weight": (1, 5), "out.bias": (1,)}
    assert all(not tensors for tensors in on_rank_1.values())  # only process 0 gathers the checkpoint copy
    resumed = run_toy(tmp_path, "resumed", *flags, "--resume", tmp_path / "ckpt" / "epoch=1-step=6.ckpt")
    # a save or load gathers one module's parameters at a time (hidden: 25 elements), never the whole model's (31)
    assert full["largest_gather"] == resumed["largest_gather"] == 25
    assert resumed["fitness"] == full["fitness"][6:]
    assert_same_weights(full["weights"], resumed["weights"], atol=0)


@pytest.mark.slow
@pytest.mark.parametrize(("failure", "message"), [
    ("nan", r"ES step 0, population member 1 \(process 1\): ValueError: training_step returned a fitness of nan"),
    ("names", r"ES step 0: training_step logged 'only_on_one_rank' for some population members but not for members "
              r"\[0, 2, 4, 6\]"),
])
def test_a_failure_on_one_process_stops_both_with_the_same_error(tmp_path, failure, message):
    # were process 0 left waiting for process 1, the run would hang: run_command fails the test after `timeout`
    result = run_toy(tmp_path, "failing", "--devices", "2", "--fail_on_rank", "1", "--failure", failure, check=False,
                     timeout=120)
    assert result.returncode != 0
    reports = [(tmp_path / f"failing.pt.error-{rank}.txt").read_text() for rank in range(2)]
    assert reports[0] == reports[1], reports  # each process raised it itself, with the same message
    assert reports[0].startswith("PopulationError: ")
    assert __import__("re").search(message, reports[0]), reports[0]


@pytest.mark.slow
def test_zero3_generation_with_gathered_parameters_and_uneven_lengths_finishes(tmp_path):
    """Process 1 generates more tokens than process 0; generate must keep process 0 joining the parameter gathers
    of process 1's forwards (synced_gpus), or both wait for each other forever."""
    out = tmp_path / "lm.txt"
    run_command([sys.executable, SCRIPTS / "lightning_lm_zero3.py", "--out", out], tmp_path, timeout=120)
    step, fitness, zero3_still_on, kl, relative_norm, tied, whole = out.read_text().split()
    assert tied == whole == "True"  # a checkpoint of a tied model saved whole and loaded back, module by module
    assert step == "2" and 0.0 <= float(fitness) <= 1.0
    assert zero3_still_on == "False"
    # the drift callbacks under ZeRO-3: the KL over an uneven probe split (no process a forward short: no hang), the
    # parameter drift over the partitions (the model's parameters are empty placeholders there: it read 0 / 0)
    assert float(kl) > 0 and math.isfinite(float(relative_norm)) and float(relative_norm) > 0


# ---- one process, in the test process ------------------------------------------------------------------------


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
    _, steps = fit(Regression(), strategy=ESStrategy(population_size=6, sigma=0.05, learning_rate=0.01))
    for logged in steps:  # the module logs mse and returns -mse
        assert math.isclose(logged["train_mse"], -logged["es/fitness_mean"], rel_tol=1e-6)
        assert math.isclose(logged["train_mse/best"], -logged["es/fitness_max"], rel_tol=1e-6)
        assert logged["es/fitness_std"] > 0 and logged["es/update_norm"] > 0


def test_an_optimizer_consumes_the_es_gradient():
    """SGD(lr) on ES gradients is the in-place step with the same lr."""
    in_place, with_sgd = Regression(), Regression(optimizer=None)
    with_sgd.configure_optimizers = lambda: torch.optim.SGD(with_sgd.parameters(), lr=0.01)
    fit(in_place, strategy=ESStrategy(population_size=4, sigma=0.05, learning_rate=0.01, seed=5))
    fit(with_sgd, strategy=ESStrategy(population_size=4, sigma=0.05, learning_rate=123.0, seed=5))  # lr unused: SGD's applies
    for (name, a), b in zip(in_place.named_parameters(), with_sgd.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    assert all(p.grad is not None for p in with_sgd.parameters())


@pytest.mark.parametrize(
    "fitness, message",
    [
        (lambda error: None, "returned None"),
        (lambda error: {"loss": error}, "returned a dict"),
        (lambda error: torch.stack([error, error])[:, None], "shape \\(2, 1\\).*a scalar or one value per example"),
        (lambda error: error * math.nan, "fitness of nan"),
    ],
)
def test_bad_fitness_is_a_clear_error(fitness, message):
    with pytest.raises(PopulationError, match=rf"ES step 0, population member 0 \(process 0\): ValueError: .*{message}"):
        fit(Regression(fitness=fitness))


def test_a_name_logged_for_some_members_only_is_an_error():
    class Sometimes(Regression):
        calls = 0

        def training_step(self, batch, batch_idx):
            Sometimes.calls += 1
            if Sometimes.calls % 2:
                self.log("sometimes", 1.0)
            return super().training_step(batch, batch_idx)

    with pytest.raises(PopulationError, match=r"logged 'sometimes' for some population members but not for members "
                                              r"\[1, 3\]"):
        fit(Sometimes(), strategy=ESStrategy(population_size=4))


class Batches(pl.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(batch[0][0, 0].item())


def test_resume_from_a_checkpoint_saved_when_a_step_failed_replays_that_step(tmp_path):
    """OnExceptionCheckpoint saves while step 3 fails: the resumed run must score batch 3 again, not skip it."""
    class FailsAtStep3(Regression):
        def training_step(self, batch, batch_idx):
            if self.trainer.global_step == 3:
                raise RuntimeError("interrupted")
            return super().training_step(batch, batch_idx)

    def run(module, **kwargs):
        batches = Batches()
        trainer = pl.Trainer(strategy=ESStrategy(population_size=4, sigma=0.05, learning_rate=0.01, seed=1), accelerator="cpu",
                             devices=1, max_steps=6, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                             callbacks=[batches, pl.callbacks.OnExceptionCheckpoint(tmp_path)])
        trainer.fit(module, **kwargs)
        return batches.seen, module

    pl.seed_everything(0)
    full_batches, full = run(Regression())
    pl.seed_everything(0)
    with pytest.raises(PopulationError, match="interrupted"):
        run(FailsAtStep3())
    pl.seed_everything(0)
    resumed_batches, resumed = run(Regression(), ckpt_path=tmp_path / "on_exception.ckpt")
    assert resumed_batches == full_batches[3:]
    assert all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))


def test_a_loader_without_length_resumes_without_error(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            data = __import__("lightning_toy").regression_data()
            return iter(zip(data.tensors[0].split(16), data.tensors[1].split(16)))

    class Streaming(Regression):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(Stream(), batch_size=None)

    def run(**kwargs):
        trainer = pl.Trainer(strategy=ESStrategy(population_size=4), accelerator="cpu", devices=1, max_steps=3,
                             logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             default_root_dir=tmp_path, callbacks=[pl.callbacks.ModelCheckpoint(
                                 tmp_path, every_n_train_steps=1, save_top_k=-1)])
        trainer.fit(Streaming(), **kwargs)
        return trainer

    run()
    assert run(ckpt_path=tmp_path / "epoch=0-step=2.ckpt").global_step == 3


def test_options_that_assume_gradients_are_refused():
    with pytest.raises(ValueError, match="accumulate_grad_batches=2"):
        fit(Regression(), accumulate_grad_batches=2)
    with pytest.raises(ValueError, match="gradient_clip_val=1.0.*no optimizer"):
        fit(Regression(), gradient_clip_val=1.0)
    with pytest.raises(ValueError, match="anchor_decay=0.1.*returned an optimizer"):
        fit(Regression(optimizer="adam"), strategy=ESStrategy(es_anchor_decay=0.1))


def test_population_and_layout_checks():
    for population_size in (2, 6):
        with pytest.raises(ValueError, match=rf"population_size \({population_size}\) must be a multiple of the number "
                                             r"of processes \(4\)"):
            pl.Trainer(strategy=ESStrategy(population_size=population_size), accelerator="cpu", devices=4)
    with pytest.raises(ValueError, match="zero_optimization.stage=2.*needs stage 3"):
        ESStrategy(deepspeed_config={"zero_optimization": {"stage": 2}})
    with pytest.raises(FileNotFoundError, match="deepspeed_config"):
        ESStrategy(deepspeed_config="missing.json")
    with pytest.raises(ValueError, match="DeepSpeed config has 'optimizer'.*Remove 'optimizer'"):
        ESStrategy(deepspeed_config={"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}})


def train_descriptions(bar, **trainer_kwargs) -> list[str]:
    """The training bar's description after each epoch start and each step."""
    seen = []

    class Recorder(pl.Callback):  # after the bar in the callback list: reads what the bar has just set
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(bar.train_progress_bar.desc.rstrip(": "))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(bar.train_progress_bar.desc.rstrip(": "))

    trainer = pl.Trainer(strategy="es", accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[bar, Recorder()], **trainer_kwargs)
    trainer.fit(Regression())
    return seen


def test_progress_bar_counts_es_steps_against_max_steps():
    from lightning_es.lightning import ESProgressBar

    # 4 batches an epoch: 5 steps end one batch into the second epoch
    seen = train_descriptions(ESProgressBar(), max_steps=5)
    assert seen == ["ES step 0/5", "ES step 1/5", "ES step 2/5", "ES step 3/5", "ES step 4/5",
                    "ES step 4/5", "ES step 5/5"]
    assert train_descriptions(ESProgressBar(), max_epochs=1) == ["Epoch 0"] * 5  # no step bound: Lightning's
