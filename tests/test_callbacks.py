import pytest
from trl import GRPOConfig, GRPOTrainer

from trl_ext import ESConfig, ESTrainer
from lightning_es.drift import layer_type
from trl_ext.callbacks import KLDriftCallback, ParameterDriftCallback

PROBES = ["the lazy dog", [{"role": "user", "content": "count the apples"}], "brown fox jumps"]


def token_rate(completion_ids, **kwargs):
    return [sum(t < 150 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def common(tmp_path):
    return dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, max_completion_length=4,
                report_to="none", bf16=False, use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1)


def attach(trainer):
    trainer.add_callback(KLDriftCallback(trainer, PROBES, every_n_steps=1, max_new_tokens=4))
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


def test_drift_callbacks_log_through_grpo_trainer(tmp_path, tiny_model, tokenizer, prompt_dataset):
    args = GRPOConfig(num_generations=2, learning_rate=1e-2, **common(tmp_path))
    logs = attach(GRPOTrainer(tiny_model, token_rate, args=args, train_dataset=prompt_dataset, processing_class=tokenizer))
    assert len(logs) == 2
    assert logs[-1]["drift/update_norm"] > 0 and "drift/realised_fraction" not in logs[-1]


def test_layer_types():
    assert [layer_type(n) for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
                                    "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "x")] == [
        "attention", "mlp", "embedding", "norm", "lm_head", "other"]


def test_lightning_drift_callbacks_log_the_same_names(tmp_path, tiny_model, tokenizer):
    pl = pytest.importorskip("pytorch_lightning")
    import torch

    from lightning_es.lightning.callbacks import KLDriftCallback as LightningKLDrift
    from lightning_es.lightning.callbacks import ParameterDriftCallback as LightningParameterDrift

    class LanguageModel(pl.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    data = torch.utils.data.DataLoader(torch.randint(0, len(tokenizer), (8, 6)), batch_size=4)
    logged = []

    class Capture(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append({k: float(v) for k, v in trainer.logged_metrics.items()})

    callbacks = [LightningKLDrift(["the lazy dog", "count the apples"], tokenizer, every_n_steps=1, max_new_tokens=4),
                 LightningParameterDrift(every_n_steps=1, model_attribute="model"), Capture()]
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(LanguageModel(tiny_model), data)
    assert {"drift/kl", "drift/update_norm", "drift/relative_norm", "drift/moved_fraction",
            "drift/norm/attention"} <= set(logged[-1])
    assert logged[-1]["drift/update_norm"] > 0 and logged[-1]["drift/kl"] > 0
