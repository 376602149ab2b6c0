"""Arithmetic as a LightningModule trained with `Trainer(strategy="es")`.

    python recipes/lightning_es_arithmetic.py                 # embedded SmolLM2-135M-Instruct, CPU, one process
    python recipes/lightning_es_arithmetic.py --devices 2     # the population split over 2 processes (Lightning starts them)
    python recipes/lightning_es_arithmetic.py --zero3 --devices 2   # one model sharded over 2 processes (DeepSpeed ZeRO-3)
    python recipes/lightning_es_arithmetic.py --config my.yaml      # every field is also a YAML key / CLI flag

The problems are the library's generated `arithmetic` task (`lightning_es.tasks.generated`: "What is 143 - 58?"),
asked in the `one_line` style (the calculation, then `#### <number>`) as the accuracy race and the TRL main job ask
them: training problems from the train split drawn with the seed, held-out problems from the test split (the same for
every seed; the splits are disjoint by construction). SmolLM2-135M-Instruct answers about 6% of the test split
greedily, so accuracy has room to rise. The module's `training_step` returns the fitness of greedy completions: one
correctness value per problem (a 1-D tensor, whose mean is the fitness, and which the default `prompt_zscore`
shaping normalises per problem across the members). The answer format is logged, never rewarded. The strategy
perturbs the weights, calls `training_step` once per population member and updates in place. The ES knobs are the
library's defaults (`ESSettings`, the fields `ESStrategy` and `ESConfig` share, each a flag here): 16 members, rank-4
relative noise at 3% of each tensor's scale, a relative step, fitness normalised per problem; 8 problems per
iteration, as `ESConfig`. The library's drift callbacks log `drift/kl` (off-task KL to the start weights) and
`drift/update_norm` and the rest every `--drift_every` steps. Held-out accuracy and answer format
(`trainer.validate`) and the off-task KL are printed before and after training, as the TRL recipes print them, and
the share of iterations without signal (`es/no_signal`, read back from the CSV log). 60 iterations, as the TRL main
job: about the accuracy race's 1,500 training seconds on a 2-core CPU, where ES gained nothing in its first 600.
"""

import csv
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_es.engine import ESSettings
from lightning_es.unified import ESProgressBar, ESStrategy  # lightning.pytorch's; lightning_es.lightning: pytorch_lightning's
from lightning_es.unified.callbacks import KLDriftCallback, ParameterDriftCallback
from lightning_es.tasks import generated, gsm8k, probes, prompts_for
from lightning_es.tasks.evaluation import render_prompts
from lightning_es.tasks.models import resolve_model
from trl_ext.recipes import before_after_lines, no_signal_line, parse_recipe_args

TASK, STYLE = "arithmetic", "one_line"  # as studies/accuracy_race.py asks them (docs/reports/accuracy-race/tasks.md)

# The library's ES defaults (ESSettings) unchanged.
RECIPE_DEFAULTS = dict()
QUICK = dict(max_steps=2, population_size=4, batch_size=2, max_new_tokens=4, train_size=8, eval_size=4, drift_every=1)


@dataclass
class ArithmeticArguments:
    model_name_or_path: str | None = field(default=None,
                                           metadata={"help": "Default: the embedded SmolLM2-135M-Instruct."})
    devices: int = field(default=1, metadata={"help": "Processes (Lightning starts them); the population is split."})
    zero3: bool = field(default=False, metadata={"help": "Shard one model over the devices with DeepSpeed ZeRO-3."})
    max_steps: int = field(default=60, metadata={"help": "ES iterations."})
    # ESSettings has no prompts-per-iteration field: ESConfig reads TRL's per_device_train_batch_size (8 prompts by
    # default, with num_generations 1); here it is the DataLoader's batch size, with the same default
    batch_size: int = field(default=8, metadata={"help": "Problems per ES iteration (split over --zero3 devices)."})
    max_new_tokens: int = field(default=32, metadata={"help": "Greedy tokens per answer."})
    train_size: int = field(default=1000, metadata={"help": "Training problems (the train split, drawn with the seed)."})
    eval_size: int = field(default=200, metadata={"help": "Held-out problems (the test split) scored before and after."})
    drift_every: int = field(default=10, metadata={"help": "Steps between the drift callbacks' log entries."})
    seed: int = field(default=0, metadata={"help": "Seed of the training problems, the noise and Lightning."})
    output_dir: str = field(default="outputs/lightning_arithmetic", metadata={"help": "Checkpoints and CSV logs."})
    quick: bool = field(default=False, metadata={"help": "Smoke mode: a few tiny steps, for tests."})


def arithmetic_splits(train_size: int, eval_size: int, seed: int):
    """(training, held-out) prompt datasets: the train split drawn with ``seed``, and the first ``eval_size`` problems
    of the test split (drawn with seed 0 whatever ``seed``, so every run is scored on the same problems)."""
    return (generated.dataset(TASK, "train", train_size, seed=seed, style=STYLE),
            generated.dataset(TASK, "test", eval_size, seed=0, style=STYLE))


class ArithmeticPolicy(pl.LightningModule):
    def __init__(self, model: str, max_new_tokens: int, batch_size: int, train_size: int, eval_size: int, seed: int):
        super().__init__()
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left", truncation_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        train, held_out = arithmetic_splits(train_size, eval_size, seed)
        shown = gsm8k.demonstrations(STYLE)  # asked of a model without a chat template only (prompts_for)
        self.train_problems = list(prompts_for(self.tokenizer, train, shown))
        self.eval_problems = list(prompts_for(self.tokenizer, held_out, shown))

    def completions(self, rows: list[dict]) -> list[str]:
        """Greedy completions of the rows' prompts, tokenized as the TRL recipes' evaluation does (greedy_scores)."""
        prompts = [row["prompt"] for row in rows]
        text = render_prompts(self.tokenizer, prompts)
        # a chat template writes the special tokens itself; a plain-text prompt (no chat template) gets them here
        specials = isinstance(prompts[0], str)
        inputs = self.tokenizer(text, return_tensors="pt", padding=True, add_special_tokens=specials).to(self.device)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, temperature=None,
                                     top_p=None, top_k=None, pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    def rewards(self, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per problem: whether the final number is right, and whether it is marked with `####` as asked."""
        completions = self.completions(rows)
        accuracy = gsm8k.correctness_reward(completions, answer=[row["answer"] for row in rows])
        answer_format = gsm8k.format_reward(completions)
        return torch.tensor(accuracy), torch.tensor(answer_format)

    def training_step(self, batch, batch_idx):
        accuracy, answer_format = self.rewards(batch)
        self.log_dict({"accuracy": float(accuracy.mean()), "answer_format": float(answer_format.mean())},
                      prog_bar=True, batch_size=len(batch))
        return accuracy  # the fitness, higher is better: one value per problem, correctness only

    def validation_step(self, batch, batch_idx):
        accuracy, answer_format = self.rewards(batch)
        self.log_dict({"val_accuracy": float(accuracy.mean()), "val_answer_format": float(answer_format.mean())},
                      batch_size=len(batch), sync_dist=True)

    def configure_optimizers(self):
        return None  # ES updates the weights in place; return an optimizer to have it consume the ES gradient

    def train_dataloader(self):
        return DataLoader(self.train_problems, batch_size=self.batch_size, shuffle=True, collate_fn=list)

    def held_out(self):
        return DataLoader(self.eval_problems, batch_size=16, collate_fn=list)


def main(args: ArithmeticArguments, settings: ESSettings):
    pl.seed_everything(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads() // args.devices))  # processes share the host's cores
    module = ArithmeticPolicy(resolve_model(args.model_name_or_path), args.max_new_tokens,
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

    def scores() -> dict:
        logged = trainer.validate(module, module.held_out(), verbose=False)[0]
        return {"accuracy": logged["val_accuracy"], "answer format": logged["val_answer_format"],
                "off-task KL": kl_drift.measure(trainer, module)}

    before = scores()  # off-task KL 0: the start weights are the current ones
    trainer.fit(module)
    after = scores()
    if trainer.is_global_zero:
        print("\n".join(before_after_lines("Arithmetic", args.eval_size, before, after)))
        with (Path(trainer.logger.log_dir) / "metrics.csv").open() as log:
            no_signal = [float(row["es/no_signal"]) for row in csv.DictReader(log) if row.get("es/no_signal")]
        print(no_signal_line("Arithmetic", no_signal, len(no_signal)))
    return before, after


if __name__ == "__main__":
    main(*parse_recipe_args((ArithmeticArguments, ESSettings), RECIPE_DEFAULTS, QUICK))
