"""Both integrations give the weights they gave before the shared core (issue 33), full-rank and low-rank.

Every ES setting is given explicitly, so that a default made equal across the integrations does not count here. The
recorded values (``data/weights_before_core.json``) were written by ``python tests/test_equal_weights.py --record`` on
commit b85e11b, before the settings, the loop and the scores moved into the engine; ``trainer-lowrank`` (the run with
``beta``) was recorded again (``--record trainer-lowrank``) when ``beta``'s penalty moved after the fitness shaping,
a change of meaning the CHANGELOG states. Each run is fingerprinted by what
it changed in every tensor: the sum and norm of the change, and its projection on a fixed random direction (which a
change of direction, e.g. another member's noise, moves).
"""

import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
RECORDED = HERE / "data" / "weights_before_core.json"


def fingerprint(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    generator = torch.Generator().manual_seed(1234)
    prints = {}
    for name in sorted(start):
        delta = (end[name].double() - start[name].double()).flatten()
        direction = torch.randn(delta.numel(), generator=generator, dtype=torch.float64)
        prints[name] = [float(delta.sum()), float(delta.norm()), float(delta @ direction)]
    return prints


def trainer_run(perturbation: str, tmp: Path) -> dict[str, list[float]]:
    from datasets import Dataset

    from conftest import PROMPTS
    from tiny import build_model, build_tokenizer
    from trl_ext import ESConfig, ESTrainer

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, init_range=0.2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}

    def token_rate(completion_ids, **kwargs):
        return [sum(t < 150 for t in ids) / max(1, len(ids)) for ids in completion_ids]

    if perturbation == "full":
        units = dict(sigma=0.02, learning_rate=1e-3, fitness_shaping="zscore", beta=0.0)
    else:
        units = dict(relative_sigma=0.05, relative_learning_rate=2e-3, fitness_shaping="evidence_zscore", beta=0.05)
    args = ESConfig(
        output_dir=str(tmp / f"trainer-{perturbation}"), max_steps=3, per_device_train_batch_size=4,
        num_generations=1, population_size=6, antithetic=True, perturbation=perturbation, perturbation_rank=2,
        es_optimizer="sgd", es_anchor_decay=0.0, es_greedy=True, es_max_generation_rows=512, max_completion_length=4,
        seed=3, report_to="none", bf16=False, use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1,
        lr_scheduler_type="constant", **units,
    )
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    trainer = ESTrainer(model, token_rate, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return fingerprint(start, {n: p.detach() for n, p in trainer.model.named_parameters()})


def strategy_run(perturbation: str, tmp: Path) -> dict[str, list[float]]:
    import pytorch_lightning as pl

    from lightning_es import ESStrategy
    from lightning_toy import Regression

    pl.seed_everything(0)
    module = Regression(batch_size=16)
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    if perturbation == "full":
        units = dict(sigma=0.05, learning_rate=0.02, fitness_shaping="zscore")
    else:
        units = dict(relative_sigma=0.05, relative_learning_rate=0.01, fitness_shaping="centered_rank")
    strategy = ESStrategy(population_size=8, antithetic=True, perturbation=perturbation, perturbation_rank=2,
                          es_params=None, es_anchor_decay=0.0, seed=5, **units)
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=6, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp / f"strategy-{perturbation}"))
    trainer.fit(module)
    return fingerprint(start, {n: p.detach() for n, p in module.named_parameters()})


RUNS = {"trainer-full": (trainer_run, "full"), "trainer-lowrank": (trainer_run, "lowrank"),
        "strategy-full": (strategy_run, "full"), "strategy-lowrank": (strategy_run, "lowrank")}


@pytest.mark.parametrize("run", sorted(RUNS))
def test_the_same_settings_give_the_weights_recorded_before_the_shared_core(run, tmp_path):
    recorded = json.loads(RECORDED.read_text())[run]
    function, perturbation = RUNS[run]
    measured = function(perturbation, tmp_path)
    assert measured.keys() == recorded.keys()
    moved = sum(values[1] ** 2 for values in recorded.values()) ** 0.5
    assert moved > 0  # the recorded run trained: a fingerprint of no change would match anything that does nothing
    for name, values in recorded.items():
        for got, expected in zip(measured[name], values, strict=True):
            assert abs(got - expected) <= 1e-6 * moved + 1e-9, (name, measured[name], values)


if __name__ == "__main__" and sys.argv[1:2] == ["--record"]:  # --record [run ...]: those runs only, else all
    import tempfile

    chosen = sys.argv[2:] or sorted(RUNS)
    with tempfile.TemporaryDirectory() as tmp:
        prints = {name: RUNS[name][0](RUNS[name][1], Path(tmp)) for name in chosen}
    RECORDED.parent.mkdir(exist_ok=True)
    kept = json.loads(RECORDED.read_text()) if RECORDED.exists() else {}
    RECORDED.write_text(json.dumps({**kept, **prints}, indent=1, sort_keys=True) + "\n")
    print({name: round(sum(v[1] ** 2 for v in p.values()) ** 0.5, 6) for name, p in prints.items()})
