"""Countdown as a LightningModule trained with `Trainer(strategy="es")`.

    python recipes/lightning_es_countdown.py                 # embedded SmolLM2-135M-Instruct, CPU, one process
    python recipes/lightning_es_countdown.py --devices 2     # the population split over 2 processes (Lightning starts them)
    python recipes/lightning_es_countdown.py --zero3 --devices 2   # one model sharded over 2 processes (DeepSpeed ZeRO-3)
    python recipes/lightning_es_countdown.py --config my.yaml      # every field is also a YAML key / CLI flag

The module's `training_step` returns a fitness (accuracy plus a weighted answer-format reward of greedy completions,
whose replies are started with `<answer>` so that a 135M model answers within a few tokens); the strategy perturbs the
weights, calls it once per population member and updates in place. The ES knobs are the library's (`ESSettings`,
the fields `ESStrategy` and `ESConfig` share, each a flag here): relative noise, 3% of each tensor's scale, and a
relative step. The library's drift callbacks log `drift/kl` (off-task KL to the start weights) and `drift/update_norm`
and the rest every `--drift_every` steps. Held-out accuracy and answer format (`trainer.validate`) and the off-task
KL are printed before and after training, as the TRL recipes print them.
"""

import dataclasses
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_es.engine import ESSettings
from lightning_es.unified import ESProgressBar, ESStrategy  # lightning.pytorch's; lightning_es.lightning: pytorch_lightning's
from lightning_es.unified.callbacks import KLDriftCallback, ParameterDriftCallback
from lightning_es.tasks import countdown, probes
from lightning_es.tasks.evaluation import render_prompts
from lightning_es.tasks.models import resolve_model
from trl_ext.recipes import parse_recipe_args

ANSWER_PREFILL = "<answer>"

# Over the library's ES defaults (ESSettings): 8 members, not 16, so that 20 steps fit in about 10 minutes on a
# 2-core CPU (the budget of this recipe's earlier absolute-noise default, sigma 1e-2).
RECIPE_DEFAULTS = dict(population_size=8)
QUICK = dict(max_steps=2, population_size=4, batch_size=2, max_new_tokens=4, train_size=8, eval_size=4, drift_every=1)


@dataclass
class CountdownArguments:
    model_name_or_path: str | None = field(default=None,
                                           metadata={"help": "Default: the embedded SmolLM2-135M-Instruct."})
    devices: int = field(default=1, metadata={"help": "Processes (Lightning starts them); the population is split."})
    zero3: bool = field(default=False, metadata={"help": "Shard one model over the devices with DeepSpeed ZeRO-3."})
    max_steps: int = field(default=20, metadata={"help": "ES iterations."})
    batch_size: int = field(default=2, metadata={"help": "Problems per ES iteration (split over --zero3 devices)."})
    max_new_tokens: int = field(default=24, metadata={"help": "Greedy tokens per answer."})
    format_weight: float = field(default=0.5, metadata={"help": "Weight of the answer-format reward in the fitness."})
    train_size: int = field(default=256, metadata={"help": "Training problems generated from the seed."})
    eval_size: int = field(default=32, metadata={"help": "Held-out problems scored before and after training."})
    drift_every: int = field(default=10, metadata={"help": "Steps between the drift callbacks' log entries."})
    seed: int = field(default=0, metadata={"help": "Seed of the problems, the noise and Lightning."})
    output_dir: str = field(default="outputs/lightning_countdown", metadata={"help": "Checkpoints and CSV logs."})
    quick: bool = field(default=False, metadata={"help": "Smoke mode: a few tiny steps, for tests."})


class CountdownPolicy(pl.LightningModule):
    def __init__(self, model: str, max_new_tokens: int, format_weight: float, batch_size: int, train_size: int,
                 eval_size: int, seed: int):
        super().__init__()
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_new_tokens = max_new_tokens
        self.format_weight = format_weight
        self.batch_size = batch_size
        self.train_problems = countdown.generate(train_size, seed=seed)
        self.eval_problems = countdown.generate(eval_size, seed=seed + 1_000_003)

    def rewards(self, rows: list[dict]) -> tuple[float, float]:
        """Mean accuracy and answer-format rate of greedy completions."""
        # the reply starts with the answer tag, so a small model writes the expression at once instead of musing
        text = [prompt + ANSWER_PREFILL for prompt in render_prompts(self.tokenizer, [row["prompt"] for row in rows])]
        inputs = self.tokenizer(text, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, temperature=None,
                                     top_p=None, top_k=None, pad_token_id=self.tokenizer.pad_token_id)
        completions = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        completions = [ANSWER_PREFILL + completion for completion in completions]
        columns = {"numbers": [row["numbers"] for row in rows], "target": [row["target"] for row in rows]}
        accuracy = countdown.correctness_reward(completions, **columns)
        answer_format = countdown.format_reward(completions)
        return sum(accuracy) / len(rows), sum(answer_format) / len(rows)

    def training_step(self, batch, batch_idx):
        accuracy, answer_format = self.rewards(batch)
        self.log_dict({"accuracy": accuracy, "answer_format": answer_format}, prog_bar=True, batch_size=len(batch))
        return accuracy + self.format_weight * answer_format  # the fitness: higher is better

    def validation_step(self, batch, batch_idx):
        accuracy, answer_format = self.rewards(batch)
        self.log_dict({"val_accuracy": accuracy, "val_answer_format": answer_format,
                       "val_reward": accuracy + self.format_weight * answer_format}, batch_size=len(batch), sync_dist=True)

    def configure_optimizers(self):
        return None  # ES updates the weights in place; return an optimizer to have it consume the ES gradient

    def train_dataloader(self):
        return DataLoader(self.train_problems, batch_size=self.batch_size, shuffle=True, collate_fn=list)

    def held_out(self):
        return DataLoader(self.eval_problems, batch_size=16, collate_fn=list)


def main(args: CountdownArguments, settings: ESSettings):
    pl.seed_everything(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads() // args.devices))  # processes share the host's cores
    module = CountdownPolicy(resolve_model(args.model_name_or_path), args.max_new_tokens, args.format_weight,
                             args.batch_size // (args.devices if args.zero3 else 1), args.train_size, args.eval_size,
                             args.seed)
    if args.zero3 and settings.perturbation == "lowrank":
        settings = dataclasses.replace(settings, perturbation="full")  # the sharded layout runs full-rank noise only
    strategy = ESStrategy(settings, deepspeed_config={"zero_optimization": {"stage": 3}} if args.zero3 else None)

    # off-task drift: the probe prompts, each followed by the base model's greedy answer (exact KL, as the TRL recipes)
    kl_drift = KLDriftCallback(probes.answered(module.model, module.tokenizer), every_n_steps=args.drift_every)
    callbacks = [kl_drift, ParameterDriftCallback(every_n_steps=args.drift_every, model_attribute="model"),
                 pl.callbacks.ModelCheckpoint(every_n_train_steps=5), ESProgressBar()]  # "ES step 3/20"
    trainer = pl.Trainer(
        strategy=strategy, accelerator="auto", devices=args.devices, max_steps=args.max_steps, log_every_n_steps=1,
        default_root_dir=args.output_dir, logger=pl.loggers.CSVLogger(args.output_dir), callbacks=callbacks,
    )
    before = trainer.validate(module, module.held_out(), verbose=False)[0]
    before["off-task KL"] = kl_drift.measure(trainer, module)  # 0: the start weights are the current ones
    trainer.fit(module)
    after = trainer.validate(module, module.held_out(), verbose=False)[0]
    after["off-task KL"] = kl_drift.measure(trainer, module)
    if trainer.is_global_zero:
        for key, name in (("val_accuracy", "accuracy"), ("val_answer_format", "answer format")):
            print(f"Countdown {name} on {args.eval_size} held-out problems: before {before[key]:.1%}, "
                  f"after {after[key]:.1%}")
        print(f"Countdown off-task KL to the base model ({len(probes.OFF_TASK_PROMPTS)} probe prompts, exact, nats per "
              f"token): before {before['off-task KL']:.3f}, after {after['off-task KL']:.3f}")
    return before, after


if __name__ == "__main__":
    main(*parse_recipe_args((CountdownArguments, ESSettings), RECIPE_DEFAULTS, QUICK))
