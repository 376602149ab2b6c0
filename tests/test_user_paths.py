"""The configurations a user runs first, each trained for two ES steps as a user would run it: the library's defaults
with nothing else set, a plain GRPOConfig through the swap, every precision, tied and untied embeddings, PEFT LoRA,
``use_vllm=True``, gradient accumulation, evaluation during training, two epochs with a short last batch, two
processes, and the Lightning strategy under each precision plugin.

Each asserts that every trainable parameter evolved (a GRPO run trains them all), read from the fp32 truth (the master
copy, for weights stored below fp32, whose single steps may round away), and that every logged value is finite.
"""

import math
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from datasets import Dataset
from peft import LoraConfig
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset
from trl import GRPOConfig

import lightning_es.lightning  # noqa: F401 - registers strategy="es"
from lightning_es import ESStrategy
from processes import run_command
from tiny import build_gemma3, build_model, build_tokenizer
from trl_ext import ESConfig, ESTrainer

PROMPTS = ["the quick brown", "what is 12", "count the apples", "brown fox", "lazy dog", "is 42", "jumps over",
           "apples and"]
# what a user sets in a first script: where to write, how long, how long the answers; nothing about ES or precision
SHORT = dict(max_steps=2, max_completion_length=8, report_to="none", save_strategy="no", use_cpu=True,
             disable_tqdm=True, logging_steps=1)


def mean_token_id(completion_ids, **kwargs):
    """Differs between members whose weights differ, so every step moves the weights."""
    return [sum(ids) / max(len(ids), 1) / 300 for ids in completion_ids]


def fp32_truth(es, name: str) -> torch.Tensor:
    return es.master.value(name).detach().cpu().clone()


def assert_finite_logs(history: list[dict]) -> None:
    for entry in history:
        for key, value in entry.items():
            if isinstance(value, (int, float)):
                assert math.isfinite(value), (key, value, entry)


def train_es(tmp_path, args, dtype=torch.float32, tie=True, peft=False, eval_dataset=None, prompts=PROMPTS,
             family="qwen2"):
    tokenizer = build_tokenizer()
    if family == "gemma3":
        model = build_gemma3(tokenizer, dtype=dtype, init_range=0.2)
    else:
        model = build_model(tokenizer, tie=tie, dtype=dtype, init_range=0.2)
    trainer = ESTrainer(model, mean_token_id, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
                        eval_dataset=eval_dataset, processing_class=tokenizer,
                        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if peft else None)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(trainer.es.params) == trainable  # what a GRPO run would train, ES evolves
    before = {name: fp32_truth(trainer.es, name) for name in trainable}
    trainer.train()
    frozen = [name for name in trainable if torch.equal(before[name], fp32_truth(trainer.es, name))]
    assert not frozen, f"{len(frozen)} of {len(trainable)} trainable parameters never changed: {frozen[:4]}"
    assert_finite_logs(trainer.state.log_history)
    return trainer


def out(tmp_path) -> str:
    return str(tmp_path / "out")


@pytest.mark.parametrize("make_args", [
    pytest.param(lambda o: ESConfig(output_dir=o, **SHORT), id="library-defaults"),  # bf16=True, low-rank noise
    pytest.param(lambda o: GRPOConfig(output_dir=o, **SHORT), id="plain-grpo-config"),  # 1 prompt x 8 sampled
    pytest.param(lambda o: ESConfig(output_dir=o, **SHORT, bf16=False), id="fp32-no-autocast"),
    pytest.param(lambda o: ESConfig(output_dir=o, **SHORT, perturbation="full"), id="full-rank-bf16-autocast"),
    pytest.param(lambda o: GRPOConfig(output_dir=o, **SHORT, use_vllm=True), id="grpo-config-use-vllm"),
    pytest.param(lambda o: ESConfig(output_dir=o, **SHORT, gradient_accumulation_steps=4), id="gradient-accumulation"),
    pytest.param(lambda o: ESConfig(output_dir=o, **SHORT, es_optimizer="trainer"), id="trainer-optimizer"),
])
def test_trl_configuration_trains_every_parameter(tmp_path, make_args):
    train_es(tmp_path, make_args(out(tmp_path)))


class WeightCasts(TorchDispatchMode):
    """Counts the casts of one tensor to bf16 (autocast's, or anyone's)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.pointer, self.count = weight.data_ptr(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16
                and args[0].data_ptr() == self.pointer):
            self.count += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("perturbation", ["lowrank", "full"])
def test_bf16_autocast_casts_each_weight_once_per_generate_call(tmp_path, perturbation):
    """TRL's bf16=True over fp32 weights: a trainable weight is cast to bf16 once per generate call, not at each of
    its decoding steps; full-rank members, whose weights differ, each cast their own."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, init_range=0.2)
    args = ESConfig(output_dir=out(tmp_path), **{**SHORT, "max_steps": 1}, perturbation=perturbation,
                    generation_kwargs={"min_new_tokens": 8})
    trainer = ESTrainer(model, mean_token_id, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                        processing_class=tokenizer)
    weight = model.model.layers[0].mlp.down_proj.weight
    casts, generate = [], trainer._generate

    def counted(prompts):
        with WeightCasts(weight) as counter:
            result = generate(prompts)
        casts.append(counter.count)
        return result

    trainer._generate = counted
    trainer.train()
    assert casts and casts == [1] * len(casts), casts


@pytest.mark.parametrize("perturbation", ["lowrank", "full"])
@pytest.mark.parametrize("dtype,bf16", [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, False)],
                         ids=["bf16-weights-autocast", "bf16-weights", "fp16-weights"])
def test_weights_stored_below_fp32_evolve_in_their_fp32_master(tmp_path, dtype, bf16, perturbation):
    trainer = train_es(tmp_path, ESConfig(output_dir=out(tmp_path), **SHORT, bf16=bf16, perturbation=perturbation),
                       dtype=dtype)
    assert all(p.dtype == dtype for p in trainer.model.parameters())


@pytest.mark.parametrize("perturbation", ["lowrank", "full"])
def test_untied_embeddings_and_output_layer_both_evolve(tmp_path, perturbation):
    trainer = train_es(tmp_path, ESConfig(output_dir=out(tmp_path), **SHORT, perturbation=perturbation), tie=False)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(trainer.es.params)


@pytest.mark.parametrize("bf16", [True, False])
def test_a_model_of_another_family_trains_every_parameter(tmp_path, bf16):
    """Gemma-3: scaled and tied embeddings, norm gains stored as offsets from one, sliding-window attention."""
    train_es(tmp_path, ESConfig(output_dir=out(tmp_path), **SHORT, bf16=bf16), family="gemma3")


def test_peft_lora_adapters_evolve(tmp_path):
    trainer = train_es(tmp_path, ESConfig(output_dir=out(tmp_path), **SHORT), peft=True)
    assert trainer.es.params and all("lora_" in name for name in trainer.es.params)


def test_evaluation_during_training(tmp_path):
    evaluation = Dataset.from_dict({"prompt": PROMPTS[:4]})
    trainer = train_es(tmp_path, ESConfig(output_dir=out(tmp_path), **SHORT, eval_strategy="steps", eval_steps=1,
                                          per_device_eval_batch_size=2), eval_dataset=evaluation)
    assert len([h for h in trainer.state.log_history if "eval_reward" in h]) == 2  # after each of the two steps


def test_two_epochs_with_a_short_last_batch(tmp_path):
    args = ESConfig(output_dir=out(tmp_path), **{**SHORT, "max_steps": -1}, num_train_epochs=2)
    batch = args.per_device_train_batch_size  # the default prompts per step
    prompts = [f"{prompt} {i}" for i, prompt in enumerate(PROMPTS * 3)][:2 * batch + 1]  # batch, batch, 1 per epoch
    trainer = train_es(tmp_path, args, prompts=prompts)
    assert trainer.state.global_step == 6


@pytest.mark.slow
def test_two_processes_with_the_library_defaults(tmp_path):
    script = Path(__file__).parent / "scripts" / "user_path_two_processes.py"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--dynamo_backend", "no", "--main_process_port", 29531]
    result = run_command([*launch, script, tmp_path / "out"], tmp_path)
    assert result.stdout.count("every trainable parameter evolved") == 2, result.stdout[-2000:]


# ---- Lightning -------------------------------------------------------------------------------------------------


class TinyLM(pl.LightningModule):
    """A causal LM whose fitness is the negative next-token loss on its batch."""

    def __init__(self, tie: bool = True):
        super().__init__()
        self.model = build_model(build_tokenizer(), tie=tie, init_range=0.2)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        logits = self.model(ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        self.log("nll", loss)
        return -loss

    def configure_optimizers(self):
        return None

    def train_dataloader(self):
        ids = torch.randint(0, self.model.config.vocab_size, (8, 6), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(ids), batch_size=4)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("strategy", [
    pytest.param(lambda: "es", id="strategy-defaults"),
    pytest.param(lambda: ESStrategy(population_size=4, sigma=0.05, learning_rate=0.01, perturbation="lowrank"), id="lowrank"),
])
def test_lightning_precision_trains_every_parameter(tmp_path, precision, strategy):
    module = TinyLM()
    trainer = pl.Trainer(strategy=strategy(), accelerator="cpu", devices=1, max_steps=2, precision=precision,
                         logger=pl.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    captured = {}

    class Before(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            es = trainer.strategy.es
            captured.update({name: fp32_truth(es, name) for name in es.params})

    trainer.callbacks.append(Before())
    trainer.fit(module)
    es = trainer.strategy.es
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(es.params) == trainable
    frozen = [name for name in trainable if torch.equal(captured[name], fp32_truth(es, name))]
    assert not frozen, f"{len(frozen)} of {len(trainable)} trainable parameters never changed: {frozen[:4]}"
    if precision == "bf16-true":
        assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    logged = {k: float(v) for k, v in trainer.logged_metrics.items()}
    assert {"nll", "es/fitness_mean", "es/update_norm"} <= set(logged)
    assert_finite_logs([logged])
