"""The ES settings are defined once (``lightning_es.engine.ESSettings``): both integrations take every knob under one
name with one default, and the README's table and docs/grpo_fields.md show every one of them."""

import dataclasses
import re
from pathlib import Path

import pytest

from lightning_es import ESStrategy
from lightning_es.engine import ESSettings
from trl_ext import ESConfig
from trl_ext.grpo_fields import default, settings_table

ROOT = Path(__file__).parents[1]
TRL_ONLY = ("es_greedy", "es_optimizer", "es_max_generation_rows")  # decoding, the Trainer's optimizer, generate rows


def config(**fields) -> ESConfig:
    return ESConfig(output_dir="unused", use_cpu=True, **fields)


def readme_table() -> dict[str, str]:
    """The README's table of ESConfig fields: name -> default column."""
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \|", ROOT.joinpath("README.md").read_text(), flags=re.M)
    return {name: value.strip() for name, value in rows}


def test_esconfig_holds_every_setting_with_the_settings_default_and_help():
    config_fields = {f.name: f for f in dataclasses.fields(ESConfig)}
    for field in dataclasses.fields(ESSettings):
        assert field.name in config_fields, field.name
        assert default(ESConfig, field.name) == default(ESSettings, field.name), field.name
        assert config_fields[field.name].metadata["help"] == field.metadata["help"], field.name


def test_esstrategy_takes_every_setting_by_its_name_and_resolves_it_as_esconfig_does():
    plain_strategy, plain_config = ESStrategy(), config()
    for name in ESSettings.field_names():
        assert getattr(plain_strategy.settings, name) == getattr(plain_config, name), name
    chosen = dict(population_size=6, sigma=0.02, learning_rate=1e-3, antithetic=False, fitness_shaping="centered_rank",
                  perturbation="full", perturbation_rank=2, es_params=["mlp"], es_anchor_decay=0.5,
                  es_master_device="cpu", es_start_device="cpu")
    assert set(chosen) | {"relative_sigma", "relative_learning_rate"} == set(ESSettings.field_names())
    strategy, same = ESStrategy(**chosen), config(**chosen)
    for name in ESSettings.field_names():
        assert getattr(strategy.settings, name) == getattr(same, name), name
    from_object = ESStrategy(settings=ESSettings(**chosen))
    assert from_object.settings == strategy.settings
    with pytest.raises(TypeError, match="got settings and the knobs \\['population_size'\\]"):
        ESStrategy(settings=ESSettings(), population_size=4)


@pytest.mark.parametrize("fields, match", [
    (dict(population_size=5), "population_size must be even when antithetic=True, got 5"),
    (dict(perturbation="sparse"), "perturbation must be one of"),
    (dict(perturbation_rank=0), "perturbation_rank must be at least 1"),
    (dict(fitness_shaping="rank"), "fitness_shaping must be one of"),
    (dict(es_anchor_decay=-1.0), "es_anchor_decay must be non-negative"),
    (dict(es_start_device="gpu0"), "es_start_device='gpu0' is not a device"),
    (dict(relative_sigma=0.9), "relative_sigma must be in"),
])
def test_both_integrations_refuse_a_bad_setting_with_the_same_message(fields, match):
    with pytest.raises(ValueError, match=match) as from_strategy:
        ESStrategy(**fields)
    with pytest.raises(ValueError, match=match) as from_config:
        config(**fields)
    assert str(from_strategy.value) == str(from_config.value)


def test_the_readme_table_and_the_field_docs_show_every_setting():
    table = readme_table()
    for name in [*ESSettings.field_names(), *TRL_ONLY]:
        assert name in table, f"README's ESConfig table lacks {name}"
        value = default(ESConfig, name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert float(table[name]) == value, (name, table[name], value)
    assert settings_table() in ROOT.joinpath("docs", "grpo_fields.md").read_text()


def test_the_default_low_rank_noise_refuses_a_module_it_cannot_hook_naming_the_fix():
    """ESStrategy's default became ESConfig's low-rank noise: a convolution (a matrix outside a linear layer) would
    need a dense copy per member, so it is refused at setup, naming perturbation='full' and es_params."""
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    class Convolutional(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(1, 2, 3)

        def training_step(self, batch, batch_idx):
            return -self.conv(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return None

        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(4, 1, 8)), batch_size=2)

    trainer = pl.Trainer(strategy="es", accelerator="cpu", devices=1, max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"perturbation='lowrank' cannot perturb conv.weight.*Use perturbation='full'"):
        trainer.fit(Convolutional())
    full = pl.Trainer(strategy=ESStrategy(perturbation="full"), accelerator="cpu", devices=1, max_steps=1,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    full.fit(Convolutional())
    assert full.global_step == 1


def test_esstrategy_refuses_what_it_cannot_take_by_name():
    with pytest.raises(TypeError, match=r"first argument is settings.*ESStrategy\(population_size=32\)"):
        ESStrategy(8)
    with pytest.raises(TypeError, match=r"\['es_optimizer', 'num_generations'\]: these are ESConfig's"):
        ESStrategy(es_optimizer="trainer", num_generations=2)
    unset = ESStrategy(learning_rate=None, sigma=None)  # None is unset, as an argparse default passes it
    assert unset.settings == ESStrategy().settings
    with pytest.raises(ValueError, match="ESConfig takes a shaping's name"):
        config(fitness_shaping=lambda fitness: fitness)


def test_a_checkpoint_resumes_only_with_the_population_it_was_trained_with():
    import torch

    from lightning_es import EvolutionStrategy, FullRankPerturbation

    def es(size):
        return EvolutionStrategy(FullRankPerturbation({"w": torch.nn.Parameter(torch.zeros(3))}, 0.1),
                                 population_size=size, learning_rate=0.01)

    es(16).load_state_dict(es(16).state_dict())
    with pytest.raises(ValueError, match="trained with population_size=32, this run has 16"):
        es(16).load_state_dict(es(32).state_dict())


def test_esconfigs_renamed_helpers_keep_their_old_names_for_one_release_with_a_future_warning():
    args = config(sigma=0.02, learning_rate=1e-3, es_params=["all"])
    with pytest.warns(FutureWarning, match="es_sigma is renamed noise_sigma"):
        assert args.es_sigma == args.noise_sigma == 0.02
    with pytest.warns(FutureWarning, match=r"es_learning_rate\(\) is renamed step_size\(\)"):
        assert args.es_learning_rate(5e-4) == args.step_size(5e-4) == 5e-4
    with pytest.warns(FutureWarning, match="es_param_spec is renamed param_spec"):
        assert args.es_param_spec == args.param_spec == "all"
