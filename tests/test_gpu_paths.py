"""What a GPU user runs, caught on a CPU: the bugs of the GPU class (a GradScaler, NCCL's devices, ZeRO-3's gathers)
shown with the piece of the GPU setup a CPU can stand in for."""

import pytest
import torch
from datasets import Dataset

from conftest import PROMPTS
from tiny import build_model, build_tokenizer
from trl_ext import ESConfig, ESTrainer


def token_rate(completion_ids, **kwargs):
    return [sum(t < 150 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def fp16_trainer(tmp_path, scaler: bool, **settings) -> ESTrainer:
    tokenizer = build_tokenizer()
    args = ESConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, population_size=4,
                    max_completion_length=4, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                    seed=1, **settings)
    trainer = ESTrainer(build_model(tokenizer, init_range=0.2), token_rate, args=args,
                        train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    if scaler:  # what accelerate creates for fp16 mixed precision on a GPU (on a CPU it creates none)
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    return trainer


def test_an_fp16_run_with_a_grad_scaler_takes_its_steps_as_without_one(tmp_path):
    """With accelerate's GradScaler the Trainer's optimizer step failed at the first step ("Attempted step but _scale
    is None": no loss was scaled), and under es_optimizer='trainer' the scaler would divide the ES estimate by its
    scale."""
    for settings in ({}, {"es_optimizer": "trainer", "learning_rate": 1e-3, "optim": "sgd"}):
        runs = {}
        for scaler in (False, True):
            trainer = fp16_trainer(tmp_path / str(scaler), scaler, **settings)
            trainer.train()
            assert trainer.state.global_step == 2
            runs[scaler] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        start = build_model(build_tokenizer(), init_range=0.2).state_dict()
        assert any(not torch.equal(runs[True][n], start[n]) for n in runs[True]), settings
        for name in runs[False]:
            assert torch.equal(runs[True][name], runs[False][name]), (settings, name)


def test_the_drift_probe_leaves_the_callers_tokenizer_as_it_was(tmp_path):
    from lightning_es.drift import DriftProbe
    from lightning_es.tasks.probes import answered

    tokenizer = build_tokenizer()
    tokenizer.padding_side = "right"
    model = build_model(tokenizer)
    for estimator in ("sampled", "exact"):
        DriftProbe(model, tokenizer, PROMPTS[:3], estimator=estimator, max_new_tokens=2).measure(model)
        assert tokenizer.padding_side == "right"
    answered(model, tokenizer, PROMPTS[:2], max_new_tokens=2)
    assert tokenizer.padding_side == "right"


def test_under_nccl_the_collectives_run_on_this_processs_gpu(monkeypatch):
    """NCCL refuses host tensors: with the backend reported as "nccl" the helper picks the current CUDA device (gloo:
    the host), and moves a host tensor there for the call."""
    import torch.distributed as dist

    from lightning_es.engine import collectives

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collectives.group_device() == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.group_device() == torch.device("cuda", 3)
    seen = []
    monkeypatch.setattr(collectives, "group_device", lambda group=None: torch.device("meta"))
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, group=None: seen.append(tensor.device))
    with pytest.raises(NotImplementedError):  # a meta tensor cannot come back to the host: the call did run on it
        collectives.all_reduce(torch.ones(2))
    assert seen == [torch.device("meta")]


def test_a_replicated_process_other_than_the_first_keeps_no_host_copy_for_a_checkpoint(monkeypatch):
    """Only process 0 writes checkpoints: the others copied the fp32 master (4 bytes per parameter) to host memory
    at every save all the same."""
    import torch.distributed as dist

    from lightning_es import EvolutionStrategy, FullRankPerturbation

    weights = {"w": torch.nn.Parameter(torch.randn(4, 3, dtype=torch.bfloat16))}
    es = EvolutionStrategy(FullRankPerturbation(weights, 0.1), population_size=2, learning_rate=0.01)
    es.keep_start()
    assert set(es.state_dict()["master"]) == set(es.state_dict()["start"]) == {"w"}  # one process: process 0
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    state = es.state_dict()
    assert state["master"] == {} and state["start"] == {} and state["seed"] == es.population.seed


def trainer_optimizer_run(tmp_path, model, **settings) -> ESTrainer:
    tokenizer = build_tokenizer()
    args = ESConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, population_size=4,
                    max_completion_length=4, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                    logging_steps=1, bf16=False, es_optimizer="trainer", optim="sgd", learning_rate=1e-3, **settings)
    trainer = ESTrainer(model, token_rate, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                        processing_class=tokenizer)
    trainer.train()
    return trainer


def test_the_trainers_optimizer_steps_on_the_unclipped_estimate_unless_clipping_is_asked_for(tmp_path):
    """TrainingArguments' max_grad_norm=1.0 clipped the ES estimate (its norm grows with the parameter count over
    sigma) before the optimizer's step: under SGD every step shrank by that factor. ESConfig's default is 0."""
    assert ESConfig(output_dir="unused", use_cpu=True).max_grad_norm == 0.0
    norms = {}
    for clip in (None, 1.0):
        settings = {} if clip is None else {"max_grad_norm": clip}
        trainer = trainer_optimizer_run(tmp_path / str(clip), build_model(build_tokenizer(), init_range=0.2), **settings)
        norms[clip] = next(log["es/update_norm"] for log in trainer.state.log_history if "es/update_norm" in log)
    assert norms[1.0] <= 1e-3 * 1.0 * 1.001  # lr times the clipped norm
    assert norms[None] > 10 * norms[1.0]


def test_an_optimizer_stepping_bf16_weights_is_refused_naming_both_ways_out(tmp_path):
    """A torch optimizer steps the weights themselves: in bf16 ES's steps, mostly smaller than the weights' rounding,
    were lost (the master copy was re-synced from the rounded weights every step)."""
    model = build_model(build_tokenizer(), dtype=torch.bfloat16, init_range=0.2)
    with pytest.raises(ValueError, match=r"es_optimizer='trainer'.*stored as bfloat16.*Keep the weights in fp32.*"
                                         r"es_optimizer='sgd'"):
        trainer_optimizer_run(tmp_path, model)


def test_under_zero3_the_kl_logits_are_chunked_and_every_process_runs_as_many_passes(tmp_path, monkeypatch):
    """Sharded, the KL passes took every row at once (two fp32 tensors of rows x tokens x vocabulary, gigabytes at a
    real vocabulary). Now they are chunked as replicated, and a process with fewer chunks than another runs stand-in
    passes, since each pass gathers the parameters the others wait for."""
    import trl_ext.kl_penalty as kl_penalty
    import trl_ext.member_kl as member_kl

    tokenizer = build_tokenizer()
    args = ESConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, population_size=2, max_completion_length=4,
                    report_to="none", use_cpu=True, bf16=False, beta=0.1, perturbation="full")
    trainer = ESTrainer(build_model(tokenizer, init_range=0.2), token_rate, args=args,
                        train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    members = trainer.es.members(1)[:1]
    with trainer._member_weights(members):
        group = trainer._score([{"prompt": p} for p in PROMPTS[:4]])
    whole = trainer._completion_kl(members, group, step=1)
    passes = []
    logits = kl_penalty.completion_logits
    monkeypatch.setattr(kl_penalty, "completion_logits", lambda model, batch: passes.append(
        batch.input_ids.shape[0]) or logits(model, batch))
    monkeypatch.setattr(member_kl, "LOGITS_BYTES", 1)  # one row per pass

    class TwoProcesses:  # this process has 4 chunks, the other 6
        def gather(self, value):
            return [value, value + 2]

    trainer.sharded, trainer.processes = True, TwoProcesses()
    chunked = trainer._completion_kl(members, group, step=1)
    assert passes == [1] * 12  # 6 passes, member and reference: at most one row of logits at a time
    for got, expected in zip(chunked, whole, strict=True):
        torch.testing.assert_close(got, expected)


def test_the_parameter_drift_callback_copies_only_what_it_reads(tmp_path):
    """Before each measured step it copied every parameter, frozen ones included, to fp32 host memory (a frozen 7B
    base under PEFT: 28 GB), though the realised fraction reads the evolved tensors with a master copy only."""
    from trl_ext.callbacks import ParameterDriftCallback

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, dtype=torch.bfloat16, init_range=0.2)
    for name, p in model.named_parameters():
        p.requires_grad_("mlp" in name)  # a frozen base around evolved MLPs
    args = ESConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, population_size=2,
                    max_completion_length=4, report_to="none", use_cpu=True, bf16=False, save_strategy="no",
                    disable_tqdm=True, logging_steps=1)
    trainer = ESTrainer(model, token_rate, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                        processing_class=tokenizer)
    callback = ParameterDriftCallback(trainer, every_n_steps=1)
    copied = []
    measure = callback._realised_fraction
    callback._realised_fraction = lambda before, master: copied.append(set(before)) or measure(before, master)
    trainer.add_callback(callback)
    trainer.train()
    evolved = {n for n, p in model.named_parameters() if p.requires_grad}
    assert copied == [evolved] and len(evolved) < len(list(model.parameters()))
    assert 0 < next(log["drift/realised_fraction"] for log in trainer.state.log_history if "drift/realised_fraction" in log)


def readme_gpu_commands() -> dict[str, list[str]]:
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    commands = re.findall(r"^accelerate launch --config_file (recipes/configs/\S+\.yaml) recipes/es_gsm8k\.py (.*)$",
                          readme, flags=re.M)
    return {config: flags.split() for config, flags in commands}


def test_the_readmes_gpu_commands_run_with_each_shipped_config_as_far_as_a_cpu_can_tell(monkeypatch):
    """Each shipped GPU config has its README command; its flags parse as the recipe parses them, its population
    splits over the config's processes, and the sharded config gets the perturbation ZeRO-3 runs."""
    import runpy
    from pathlib import Path

    import yaml
    from transformers import HfArgumentParser

    from lightning_es import Population, Processes

    root = Path(__file__).parents[1]
    commands = readme_gpu_commands()
    assert set(commands) == {f"recipes/configs/{name}.yaml" for name in ("multi_gpu", "deepspeed_zero3")}
    recipe = runpy.run_path(str(root / "recipes" / "es_gsm8k.py"))
    for config_file, flags in commands.items():
        config = yaml.safe_load((root / config_file).read_text())
        parser = HfArgumentParser((recipe["GSM8KArguments"], ESConfig, recipe["ModelConfig"]))
        _, args, _ = parser.parse_args_into_dataclasses(["--output_dir", "unused", "--use_cpu", "true", *flags])
        sharded = config["distributed_type"] == "DEEPSPEED"
        if sharded:
            args.check_sharded()
        population = Population(args.population_size, args.antithetic)
        Processes(world_size=config["num_processes"], sharded=sharded).rounds(population.members(0), batched=False)


def test_estrainer_refuses_a_deepspeed_scheduler_or_optimizer_section_by_name():
    """accelerate's DeepSpeed scheduler advances only inside engine.step(), which ES never calls: a warm-up from 0
    froze the ES step. ESStrategy refused such sections; ESTrainer now runs the same check."""
    from types import SimpleNamespace

    from trl_ext.runtime_checks import RuntimeChecks

    config = {"zero_optimization": {"stage": 3}, "scheduler": {"type": "WarmupLR"}}
    trainer = SimpleNamespace(
        is_deepspeed_enabled=True,
        accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config))),
        args=ESConfig(output_dir="unused", use_cpu=True, perturbation="full"))
    with pytest.raises(ValueError, match=r"DeepSpeed config has 'scheduler'.*Remove 'scheduler'"):
        RuntimeChecks._check_deepspeed(trainer)
    del config["scheduler"]
    assert RuntimeChecks._check_deepspeed(trainer) is True
