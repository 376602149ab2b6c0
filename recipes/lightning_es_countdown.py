"""Countdown as a LightningModule trained with `Trainer(strategy="es")`.

    python recipes/lightning_es_countdown.py                 # embedded SmolLM2-135M-Instruct, CPU, one process
    python recipes/lightning_es_countdown.py --devices 2     # the population split over 2 processes (Lightning starts them)
    python recipes/lightning_es_countdown.py --zero3 --devices 2   # one model sharded over 2 processes (DeepSpeed ZeRO-3)

The module's `training_step` returns a fitness (accuracy plus a weighted answer-format reward of greedy completions,
whose replies are started with `<answer>` so that a 135M model answers within a few tokens);
the strategy perturbs the weights, calls it once per population member and updates in place. Held-out reward is
measured with `trainer.validate` before and after training.
"""

import argparse

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_es import ESStrategy
from lightning_es.lightning import ESProgressBar
from lightning_es.tasks.evaluation import render_prompts
from lightning_es.tasks.models import resolve_model
from lightning_es.tasks import countdown

ANSWER_PREFILL = "<answer>"


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="Default: the embedded SmolLM2-135M-Instruct.")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--zero3", action="store_true", help="Shard one model over the devices with DeepSpeed ZeRO-3.")
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--population_size", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=1e-2)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--batch_size", type=int, default=2, help="Problems per ES iteration (split over --zero3 devices).")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--format_weight", type=float, default=0.5)
    parser.add_argument("--train_size", type=int, default=256)
    parser.add_argument("--eval_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/lightning_countdown")
    args = parser.parse_args()

    pl.seed_everything(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads() // args.devices))  # processes share the host's cores
    module = CountdownPolicy(resolve_model(args.model_name_or_path), args.max_new_tokens, args.format_weight,
                             args.batch_size // (args.devices if args.zero3 else 1), args.train_size, args.eval_size,
                             args.seed)
    strategy = ESStrategy(
        population_size=args.population_size, sigma=args.sigma, learning_rate=args.learning_rate,
        perturbation="full" if args.zero3 else "lowrank",  # the sharded layout runs full-rank noise only
        deepspeed_config={"zero_optimization": {"stage": 3}} if args.zero3 else None,
    )
    trainer = pl.Trainer(
        strategy=strategy, accelerator="auto", devices=args.devices, max_steps=args.max_steps, log_every_n_steps=1,
        default_root_dir=args.output_dir, logger=pl.loggers.CSVLogger(args.output_dir),
        callbacks=[pl.callbacks.ModelCheckpoint(every_n_train_steps=5), ESProgressBar()],  # "ES step 3/20"
    )
    before = trainer.validate(module, module.held_out(), verbose=False)[0]
    trainer.fit(module)
    after = trainer.validate(module, module.held_out(), verbose=False)[0]
    if trainer.is_global_zero:
        for key in ("val_accuracy", "val_answer_format", "val_reward"):
            print(f"Countdown {key} on {args.eval_size} held-out problems: before {before[key]:.3f}, after {after[key]:.3f}")


if __name__ == "__main__":
    main()
