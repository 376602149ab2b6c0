"""Every key either integration logs is explained in docs/logged_metrics.md, and the keys that read like GRPO's mean
what the docs say: no grad_norm without a gradient, loss not a copy of the reward, the step in the noise's units, and
the no-signal figures."""

import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from transformers import TrainerCallback

from lightning_es import ESStrategy
from lightning_es.engine.evaluation import PopulationScores
from lightning_es.engine.iteration import Iteration
from lightning_toy import Regression
from trl_ext import ESConfig, ESTrainer

DOCS = Path(__file__).resolve().parents[1] / "docs" / "logged_metrics.md"


def documented() -> list[re.Pattern]:
    """The keys in the first column of the docs' tables, ``<name>`` standing for any name and ``...`` for any tail."""
    patterns = []
    for cell in re.findall(r"^\| ((?:`[^`]+`(?:, )?)+) \|", DOCS.read_text(), flags=re.M):
        for key in re.findall(r"`([^`]+)`", cell):
            pattern = re.escape(key).replace(r"\.\.\.", ".+")
            pattern = re.sub(r"<[a-z]+>", "[^/]+", pattern.replace(r"\<", "<").replace(r"\>", ">"))
            patterns.append(re.compile(pattern + "$"))
    return patterns


def undocumented(keys) -> list[str]:
    patterns = documented()
    return sorted(k for k in keys if not any(p.match(k) for p in patterns))


def length_reward(completion_ids, log_metric=None, **kwargs):
    if log_metric is not None:
        log_metric("mean_ids", sum(map(len, completion_ids)) / len(completion_ids))
    return [len(ids) / 8 for ids in completion_ids]


@pytest.mark.parametrize("es_optimizer", ["sgd", "trainer"])
def test_every_key_estrainer_logs_is_documented_and_means_what_it_says(tmp_path, tiny_model, tokenizer,
                                                                          prompt_dataset, es_optimizer):
    seen = []

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    args = ESConfig(output_dir=str(tmp_path), max_steps=2, population_size=4, per_device_train_batch_size=2,
                    max_completion_length=4, beta=0.1, logging_steps=1, report_to="none", use_cpu=True,
                    save_strategy="no", es_optimizer=es_optimizer, per_device_eval_batch_size=4,
                    **({"learning_rate": 1e-3} if es_optimizer == "sgd" else {"learning_rate": 1e-4, "optim": "sgd"}))
    trainer = ESTrainer(tiny_model, length_reward, args=args, train_dataset=prompt_dataset,
                        eval_dataset=prompt_dataset.select(range(4)), processing_class=tokenizer,
                        callbacks=[Recorder()])
    trainer.train()
    trainer.evaluate()
    keys = {key for logs in seen for key in logs}
    assert undocumented(keys) == []
    steps = [logs for logs in seen if "es/fitness_mean" in logs]
    assert len(steps) == 2
    for logs in steps:
        assert logs["loss"] == pytest.approx(0.1 * logs["kl"], rel=1e-4, abs=1e-8)  # not minus the reward
        assert logs["learning_rate"] == args.learning_rate  # the step in the units the user set it in
        assert "es/relative_sigma" in logs and "es/sigma" not in logs
        assert 0.0 <= logs["es/frac_prompts_tied"] <= 1.0 and logs["es/no_signal"] in (0.0, 1.0)
        assert logs["es/grad_estimate_norm"] > 0
        assert ("grad_norm" in logs) == (es_optimizer == "trainer")  # only where a .grad exists


class Tied(Regression):
    """One fitness per example; the first half of the examples scores the same for every member."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        error = (self.out(torch.tanh(self.hidden(x))) - y).pow(2).flatten()
        half = error.numel() // 2
        return -torch.cat([torch.zeros(half), error[half:]])


class Recorder(pl.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_every_key_esstrategy_logs_is_documented_and_the_tied_share_is_counted():
    recorder = Recorder()
    trainer = pl.Trainer(strategy=ESStrategy(population_size=4, seed=1), accelerator="cpu", devices=1, max_steps=2,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(Tied())
    assert undocumented({k for step in recorder.steps for k in step}) == []
    for logged in recorder.steps:
        assert logged["es/frac_prompts_tied"] == 0.5  # the zeroed half of the 16 examples
        assert logged["es/no_signal"] == 0.0 and logged["es/relative_sigma"] == pytest.approx(0.03)
        assert logged["es/learning_rate"] == pytest.approx(ESStrategy().settings.learning_rate)


def test_no_signal_and_tied_prompts_when_every_member_scores_the_same():
    """A step without signal (every member tied on every prompt) reads es/no_signal 1 and es/frac_prompts_tied 1."""
    from lightning_es.engine import EvolutionStrategy, FullRankPerturbation
    from lightning_es.engine.settings import ESSettings
    from lightning_es.engine.step_metrics import step_metrics

    es = EvolutionStrategy(FullRankPerturbation({"w": torch.zeros(3)}, 0.1), population_size=4, learning_rate=0.1)
    ones, zeros = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    scores = PopulationScores(fitness_sum=ones, weight=ones, prompt_sums={"a": ones, "b": zeros},
                              prompt_counts={"a": ones, "b": ones}, extra={})
    iteration = Iteration(scores, scores.fitness, scores.per_prompt, None)
    metrics = step_metrics(iteration, es, ESSettings(), None)
    assert metrics["es/no_signal"] == 1.0 and metrics["es/frac_prompts_tied"] == 1.0
