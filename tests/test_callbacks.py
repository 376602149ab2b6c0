import logging
import shutil
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from tiny import build_model, build_tokenizer
from trl_ext import ESConfig, ESTrainer
from lightning_es.drift import layer_type
from trl_ext.callbacks import REFERENCE_NAME, KLDriftCallback, ParameterDriftCallback
from trl_ext.checkpoints import ES_STATE_NAME

torch_save = torch.save

PROBES = ["the lazy dog", [{"role": "user", "content": "count the apples"}], "brown fox jumps"]


def token_rate(completion_ids, **kwargs):
    return [sum(t < 150 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def common(tmp_path):
    return dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, max_completion_length=4,
                report_to="none", bf16=False, use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1)


def language_model(pl, model, evolved: bool):
    """A LightningModule around a causal LM: trained by SGD on its loss, or evolved (strategy='es') on -loss."""

    class LanguageModel(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            loss = self.model(input_ids=batch, labels=batch).loss
            return -loss if evolved else loss  # ES maximises a fitness

        def configure_optimizers(self):
            return None if evolved else torch.optim.SGD(self.parameters(), lr=0.5)

    return LanguageModel()


def attach(trainer):
    trainer.add_callback(KLDriftCallback(trainer, PROBES, every_n_steps=1, estimator="sampled", max_new_tokens=4))
    trainer.add_callback(ParameterDriftCallback(trainer, every_n_steps=1))
    trainer.train()
    return [entry for entry in trainer.state.log_history if "drift/kl" in entry]


@pytest.mark.parametrize("perturbation", ["full", "lowrank"])
def test_drift_callbacks_log_through_es_trainer(tmp_path, tiny_model, tokenizer, prompt_dataset, perturbation):
    args = ESConfig(population_size=8, sigma=0.02, learning_rate=1e-3, perturbation=perturbation, **common(tmp_path))
    logs = attach(ESTrainer(tiny_model, token_rate, args=args, train_dataset=prompt_dataset, processing_class=tokenizer))
    assert len(logs) == 2
    assert logs[1]["drift/update_norm"] > logs[0]["drift/update_norm"] > 0
    assert logs[0]["drift/update_norm"] == pytest.approx(logs[0]["es/update_norm"], rel=1e-4)  # one step so far
    if perturbation == "full":
        assert logs[0]["drift/realised_fraction"] == pytest.approx(1.0, abs=1e-4)  # fp32 realises the whole step
    else:  # fp32 weights take the low-rank step directly: no master copy to compare with
        assert "drift/realised_fraction" not in logs[0]
    assert 0 < logs[0]["drift/moved_fraction"] <= 1 and "drift/norm/attention" in logs[0]
    assert all(entry["drift/kl"] == entry["drift/kl"] for entry in logs)  # not NaN


def test_parameter_drift_counts_the_evolved_weights_only(tmp_path, tiny_model, tokenizer, prompt_dataset):
    """es_params narrowed to attention: full-rank noise in fp32 moves every evolved weight, and the relative norm is
    to the evolved weights' start, as the ZeRO-3 slices count them (frozen weights diluted both before)."""
    args = ESConfig(population_size=4, sigma=0.02, learning_rate=1e-3, perturbation="full", es_params=[r"self_attn"],
                    **common(tmp_path))
    trainer = ESTrainer(tiny_model, token_rate, args=args, train_dataset=prompt_dataset, processing_class=tokenizer)
    trainer.add_callback(ParameterDriftCallback(trainer, every_n_steps=1))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "drift/update_norm" in entry]
    evolved = trainer.es.start.tensors
    assert 0 < len(evolved) < len(dict(tiny_model.named_parameters()))
    assert logs[-1]["drift/moved_fraction"] > 0.99
    start_norm = float(sum(t.double().pow(2).sum() for t in evolved.values()) ** 0.5)
    assert logs[-1]["drift/relative_norm"] == pytest.approx(logs[-1]["drift/update_norm"] / start_norm, rel=1e-5)


def test_drift_callbacks_log_through_grpo_trainer(tmp_path, tiny_model, tokenizer, prompt_dataset):
    args = GRPOConfig(num_generations=2, learning_rate=1e-2, **common(tmp_path))
    logs = attach(GRPOTrainer(tiny_model, token_rate, args=args, train_dataset=prompt_dataset, processing_class=tokenizer))
    assert len(logs) == 2
    assert logs[-1]["drift/update_norm"] > 0 and "drift/realised_fraction" not in logs[-1]


def test_layer_types():
    assert [layer_type(n) for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
                                    "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "x")] == [
        "attention", "mlp", "embedding", "norm", "lm_head", "other"]


def test_the_trl_and_lightning_drift_callbacks_take_the_same_arguments():
    """Same names, order, annotations and defaults, less what each framework needs to find the model: the TRL
    callbacks' leading ``trainer`` and the Lightning callbacks' keyword-only ``model_attribute``."""
    import inspect

    pytest.importorskip("pytorch_lightning")
    from lightning_es.lightning import callbacks as lightning

    def shared(callback, drop):
        return [p for p in inspect.signature(callback).parameters.values() if p.name != drop]

    for trl_callback, lightning_callback in [(KLDriftCallback, lightning.KLDriftCallback),
                                             (ParameterDriftCallback, lightning.ParameterDriftCallback)]:
        trl_params = list(inspect.signature(trl_callback).parameters.values())
        assert trl_params[0].name == "trainer"
        assert shared(trl_callback, "trainer") == shared(lightning_callback, "model_attribute")
        model_attribute = inspect.signature(lightning_callback).parameters["model_attribute"]
        assert model_attribute.kind is inspect.Parameter.KEYWORD_ONLY
    for callback in (KLDriftCallback, lightning.KLDriftCallback):
        assert inspect.signature(callback).parameters["estimator"].default == "exact"  # "sampled" can read negative


def test_trl_kl_drift_refuses_every_n_steps_in_the_tokenizer_place(tmp_path, tiny_model, tokenizer, prompt_dataset):
    trainer = ESTrainer(tiny_model, token_rate, args=ESConfig(population_size=4, **common(tmp_path)),
                        train_dataset=prompt_dataset, processing_class=tokenizer)
    with pytest.raises(TypeError, match="third argument is tokenizer.*every_n_steps=5 by name"):
        KLDriftCallback(trainer, PROBES, 5)
    assert KLDriftCallback(trainer, PROBES, tokenizer, every_n_steps=5).probe.estimator == "exact"


def test_lightning_drift_callbacks_log_the_same_names(tmp_path, tiny_model, tokenizer):
    pl = pytest.importorskip("pytorch_lightning")
    import torch

    from lightning_es.lightning.callbacks import KLDriftCallback as LightningKLDrift
    from lightning_es.lightning.callbacks import ParameterDriftCallback as LightningParameterDrift

    data = torch.utils.data.DataLoader(torch.randint(0, len(tokenizer), (8, 6)), batch_size=4)
    logged = []

    class Capture(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append({k: float(v) for k, v in trainer.logged_metrics.items()})

    callbacks = [LightningKLDrift(["the lazy dog", "count the apples"], tokenizer, every_n_steps=1),
                 LightningParameterDrift(every_n_steps=1, model_attribute="model"), Capture()]
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(language_model(pl, tiny_model, evolved=False), data)
    assert {"drift/kl", "drift/update_norm", "drift/relative_norm", "drift/moved_fraction",
            "drift/norm/attention"} <= set(logged[-1])
    assert logged[-1]["drift/update_norm"] > 0 and logged[-1]["drift/kl"] > 0


def test_lightning_kl_drift_measures_before_and_after_fit_with_the_module_tokenizer(tmp_path, tiny_model, tokenizer):
    pl = pytest.importorskip("pytorch_lightning")
    from lightning_es import ESStrategy
    from lightning_es.lightning.callbacks import KLDriftCallback as LightningKLDrift

    module = language_model(pl, tiny_model, evolved=True)
    module.tokenizer = tokenizer  # no tokenizer given: the module's; conversational probes use its chat template
    drift = LightningKLDrift(PROBES, every_n_steps=1)
    data = torch.utils.data.DataLoader(torch.randint(0, len(tokenizer), (8, 6)), batch_size=4)
    trainer = pl.Trainer(strategy=ESStrategy(population_size=4, relative_sigma=0.1, relative_learning_rate=0.05),
                         max_steps=2, accelerator="cpu", devices=1, callbacks=[drift], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    assert drift.measure(trainer, module) == 0.0  # before fit: the current weights are the start
    trainer.fit(module, data)
    assert drift.probe.reference is trainer.strategy.es.start  # fit measures from ES's copy of the start
    after = drift.measure(trainer, module)
    assert after > 0 and after == pytest.approx(float(trainer.callback_metrics["drift/kl"]), rel=1e-6)


# ---- drift is measured from the start of the run, across resumes ------------------------------------------------


def es_resumable_args(output_dir, max_steps=4):
    return ESConfig(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4, population_size=4,
                    sigma=0.02, learning_rate=1e-3, bf16=False, perturbation="full", use_cpu=True, report_to="none",
                    save_strategy="steps", save_steps=2, max_completion_length=8, disable_tqdm=True, logging_steps=1)


def train_es_with_drift(model, output_dir, tokenizer, dataset, resume=None, max_steps=4):
    trainer = ESTrainer(model, token_rate, args=es_resumable_args(output_dir, max_steps), train_dataset=dataset,
                        processing_class=tokenizer)
    trainer.add_callback(KLDriftCallback(trainer, PROBES, every_n_steps=1, estimator="sampled", max_new_tokens=4))
    trainer.add_callback(ParameterDriftCallback(trainer, every_n_steps=1))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, {entry["step"]: entry for entry in trainer.state.log_history if "drift/kl" in entry}


@pytest.fixture(scope="module")
def uninterrupted_es_run(tmp_path_factory):
    """4 ES steps from the tiny model, a checkpoint every 2 steps."""
    tokenizer = build_tokenizer()
    dataset = Dataset.from_dict({"prompt": ["the quick", "what is 12", "count the", "brown fox", "lazy dog", "is 42"]})
    output_dir = tmp_path_factory.mktemp("uninterrupted-es") / "out"
    _, logs = train_es_with_drift(build_model(tokenizer), output_dir, tokenizer, dataset)
    return output_dir, dataset, logs


def resume_copy(tmp_path, uninterrupted_dir, step=2):
    """A run folder holding only checkpoint-<step> of the uninterrupted run, as a run stopped there leaves it, and a
    model built from that checkpoint's weights (so that weights at construction are not the run's start)."""
    checkpoint = tmp_path / "out" / f"checkpoint-{step}"
    shutil.copytree(uninterrupted_dir / f"checkpoint-{step}", checkpoint)
    return checkpoint, AutoModelForCausalLM.from_pretrained(checkpoint)


@pytest.mark.slow
def test_es_trainer_drift_after_resume_is_measured_from_the_start_of_the_run(tmp_path, uninterrupted_es_run, tokenizer):
    uninterrupted_dir, dataset, full = uninterrupted_es_run
    checkpoint, model = resume_copy(tmp_path, uninterrupted_dir)
    _, resumed = train_es_with_drift(model, checkpoint.parent, tokenizer, dataset, resume=str(checkpoint))
    assert sorted(full) == [1, 2, 3, 4] and sorted(resumed) == [1, 2, 3, 4]  # 1 and 2: the checkpoint's log history
    for step in (3, 4):  # the steps replayed exactly, so the same weights: the same drift from the same start
        for name in ("drift/update_norm", "drift/relative_norm", "drift/kl"):
            assert resumed[step][name] == pytest.approx(full[step][name], rel=1e-6, abs=1e-9), (step, name)
    assert resumed[3]["drift/update_norm"] > resumed[3]["es/update_norm"] * 1.05  # 3 steps from the start, not 1
    # the resumed run passes the start on to its own checkpoints, in ES's state (the one copy ES keeps)
    saved = torch.load(checkpoint.parent / "checkpoint-4" / ES_STATE_NAME, weights_only=True)["start"]
    original = torch.load(uninterrupted_dir / "checkpoint-2" / ES_STATE_NAME, weights_only=True)["start"]
    assert saved.keys() == original.keys() and all(torch.equal(saved[n], original[n]) for n in saved)
    assert not (checkpoint.parent / "checkpoint-4" / REFERENCE_NAME).exists()  # no second copy on disk


@pytest.mark.slow
def test_es_trainer_resumed_without_a_saved_reference_warns_and_measures_from_the_resumed_weights(
        tmp_path, uninterrupted_es_run, tokenizer, caplog):
    uninterrupted_dir, dataset, _ = uninterrupted_es_run
    checkpoint, model = resume_copy(tmp_path, uninterrupted_dir)
    state = torch.load(checkpoint / ES_STATE_NAME, weights_only=True)
    del state["start"]  # as a run without the drift callbacks saved it
    torch.save(state, checkpoint / ES_STATE_NAME)
    with caplog.at_level(logging.WARNING, logger="trl_ext.callbacks"):
        _, resumed = train_es_with_drift(model, checkpoint.parent, tokenizer, dataset, resume=str(checkpoint),
                                         max_steps=3)
    warnings = [r.getMessage() for r in caplog.records if r.name == "trl_ext.callbacks"]
    assert len(warnings) == 2  # one from each callback
    assert all("holds no start weights" in w and "measured from the resumed weights" in w for w in warnings)
    # one step from the resumed weights: the drift is that step's update
    assert resumed[3]["drift/update_norm"] == pytest.approx(resumed[3]["es/update_norm"], rel=1e-4)


@pytest.mark.slow
def test_es_trainer_adopts_a_drift_reference_saved_before_es_kept_the_start(tmp_path, uninterrupted_es_run, tokenizer,
                                                                          caplog):
    """A checkpoint from before: the start weights in the callbacks' drift_reference.pt, none in es_state.pt. They
    become ES's one copy, and drift is measured from the run's start."""
    uninterrupted_dir, dataset, full = uninterrupted_es_run
    checkpoint, model = resume_copy(tmp_path, uninterrupted_dir)
    state = torch.load(checkpoint / ES_STATE_NAME, weights_only=True)
    torch.save(state.pop("start"), checkpoint / REFERENCE_NAME)
    torch.save(state, checkpoint / ES_STATE_NAME)
    with caplog.at_level(logging.WARNING, logger="trl_ext.callbacks"):
        trainer, resumed = train_es_with_drift(model, checkpoint.parent, tokenizer, dataset, resume=str(checkpoint))
    assert not [r for r in caplog.records if r.name == "trl_ext.callbacks"]
    assert trainer.es.start_restored
    for step in (3, 4):
        for name in ("drift/update_norm", "drift/kl"):
            assert resumed[step][name] == pytest.approx(full[step][name], rel=1e-6, abs=1e-9), (step, name)


def test_save_reference_writes_once_per_folder_on_the_saving_process_only(tmp_path, tiny_model, monkeypatch):
    trainer = SimpleNamespace(model=tiny_model, accelerator=SimpleNamespace(unwrap_model=lambda m: m),
                              args=SimpleNamespace(should_save=True, output_dir=str(tmp_path)))
    callback = ParameterDriftCallback(trainer, every_n_steps=1)
    state = SimpleNamespace(global_step=0)
    callback.on_train_begin(trainer.args, state, None)
    saves = []
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (saves.append(str(f)), torch_save(obj, f, *a, **k)))

    folder = tmp_path / "checkpoint-2"
    callback.save_reference(str(folder))  # as ESTrainer calls it, before trainer_state.json
    callback.on_save(trainer.args, SimpleNamespace(global_step=2), None)  # then transformers' on_save
    assert saves == [str(folder / REFERENCE_NAME) + ".tmp"]  # written to a temporary file, then renamed
    assert sorted(p.name for p in folder.iterdir()) == [REFERENCE_NAME]
    written = torch.load(folder / REFERENCE_NAME, weights_only=True)
    assert all(torch.equal(written[n], p) for n, p in tiny_model.named_parameters())

    trainer.args.should_save = False  # another process
    callback.save_reference(str(tmp_path / "checkpoint-4"))
    assert not (tmp_path / "checkpoint-4").exists()


def test_lightning_drift_after_resume_is_measured_from_the_start_of_the_run(tmp_path, tokenizer):
    pl = pytest.importorskip("pytorch_lightning")
    from lightning_es import ESStrategy
    from lightning_es.lightning.callbacks import KLDriftCallback as LightningKLDrift
    from lightning_es.lightning.callbacks import ParameterDriftCallback as LightningParameterDrift

    data = torch.utils.data.DataLoader(torch.randint(0, len(tokenizer), (16, 6), generator=torch.Generator().manual_seed(0)),
                                       batch_size=4)

    class Capture(pl.Callback):
        def __init__(self):
            self.logged = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.logged[trainer.global_step] = {k: float(v) for k, v in trainer.callback_metrics.items()}

    def fit(ckpt_path=None):
        pl.seed_everything(0)
        capture = Capture()
        callbacks = [LightningKLDrift(["the lazy dog", "count the apples"], tokenizer, every_n_steps=1,
                                      estimator="sampled", max_new_tokens=4),
                     LightningParameterDrift(every_n_steps=1, model_attribute="model"), capture,
                     pl.callbacks.ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)]
        trainer = pl.Trainer(strategy=ESStrategy(population_size=4, sigma=0.02, learning_rate=1e-3, seed=1), accelerator="cpu",
                             devices=1, max_steps=4, callbacks=callbacks, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(language_model(pl, build_model(tokenizer), evolved=True), data, ckpt_path=ckpt_path)
        return capture.logged

    full = fit()
    resumed = fit(ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt")
    assert sorted(full) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    for step in (3, 4):  # the steps replayed exactly, so the same weights: the same drift from the same start
        for name in ("drift/update_norm", "drift/relative_norm", "drift/kl"):
            assert resumed[step][name] == pytest.approx(full[step][name], rel=1e-6, abs=1e-9), (step, name)
    assert resumed[3]["drift/update_norm"] > resumed[3]["es/update_norm"] * 1.05  # 3 steps from the start, not 1


def test_lightning_resume_from_a_checkpoint_without_the_start_weights_warns(tmp_path, caplog):
    pl = pytest.importorskip("pytorch_lightning")
    from lightning_toy import Regression

    from lightning_es import ESStrategy
    from lightning_es.lightning.callbacks import ParameterDriftCallback as LightningParameterDrift

    def fit(callbacks, ckpt_path=None, max_steps=2):
        trainer = pl.Trainer(strategy=ESStrategy(population_size=4), accelerator="cpu", devices=1, max_steps=max_steps,
                             callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(Regression(), ckpt_path=ckpt_path)
        return trainer

    fit([])  # saved without the drift callback
    drift = LightningParameterDrift(every_n_steps=1)
    with caplog.at_level(logging.WARNING, logger="lightning_es.lightning.callbacks"):
        trainer = fit([drift], ckpt_path=next((tmp_path / "checkpoints").glob("*.ckpt")), max_steps=3)
    warnings = [r.getMessage() for r in caplog.records if r.name == "lightning_es.lightning.callbacks"]
    assert len(warnings) == 1 and "the strategy's checkpoint holds no start weights" in warnings[0]
    assert "measured from the resumed weights" in warnings[0]
    assert float(trainer.callback_metrics["drift/update_norm"]) == pytest.approx(
        float(trainer.callback_metrics["es/update_norm"]), rel=1e-4)  # one step from the resumed weights
