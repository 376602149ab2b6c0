"""A tiny causal LM trained with strategy="es" in the sharded (ZeRO-3) layout, generating inside training_step.

Its MLP weights (32 x 4096) are above DeepSpeed's default stage3_param_persistence_threshold (1e5 elements), so every
forward gathers them from both processes; process k generates 2 + 4k tokens, as when one process's sequences reach
EOS before the other's. The drift callbacks measure every step, the KL on 3 probes one at a time (an uneven split
over 2 processes would leave one process a forward short). Writes <out> with the step reached, the last mean fitness,
whether transformers still believes ZeRO-3 is on after fit, and the last drift/kl and drift/relative_norm.
"""

import argparse
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leave import leave  # noqa: E402
from collective_guard import install as guard_collectives  # noqa: E402

guard_collectives()  # a collective the library calls on a host tensor fails here as under NCCL
from tiny import build_model, build_tokenizer  # noqa: E402

from lightning_es import ESStrategy  # noqa: E402
from lightning_es.lightning.callbacks import KLDriftCallback, ParameterDriftCallback  # noqa: E402
from lightning_es.lightning.strategy import ES_STATE_KEY  # noqa: E402


class GeneratingPolicy(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.tokenizer = build_tokenizer()
        self.model = build_model(self.tokenizer, intermediate_size=4096, tie=True)  # tied, as SmolLM2's

    def training_step(self, batch, batch_idx):
        new_tokens = 2 + 4 * self.global_rank
        output = self.model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=False,
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     pad_token_id=self.tokenizer.pad_token_id)
        return (output[:, batch.shape[1]:] < 150).float().mean()

    def configure_optimizers(self):
        return None

    def train_dataloader(self):
        prompts = torch.randint(3, len(self.tokenizer), (8, 5), generator=torch.Generator().manual_seed(0))
        return DataLoader(prompts, batch_size=2)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    pl.seed_everything(0)
    strategy = ESStrategy(population_size=4, sigma=0.01, learning_rate=1e-3, perturbation="full", process_group_backend="gloo",
                          deepspeed_config={"zero_optimization": {"stage": 3}})
    policy = GeneratingPolicy()
    drift = [KLDriftCallback(["the quick", "what is 12", "count the"], policy.tokenizer, every_n_steps=1,
                             estimator="exact", batch_size=1), ParameterDriftCallback(every_n_steps=1)]
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_steps=2, logger=False, callbacks=drift,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(policy)
    from transformers.integrations import is_deepspeed_zero3_enabled

    # a checkpoint's round trip, one module gathered at a time: the tied output layer is saved whole under both names
    # and loaded back (outside a gather, a ZeRO-3 parameter is an empty placeholder); every process reads process 0's
    # file, as Lightning's resume does
    checkpoint = {"state_dict": trainer.strategy.lightning_module_state_dict(),
                  ES_STATE_KEY: trainer.strategy.es.state_dict()}
    path = Path(args.out).with_suffix(".ckpt")
    if trainer.is_global_zero:
        torch.save(checkpoint, path)
    trainer.strategy.barrier()
    trainer.strategy.load_model_state_dict(torch.load(path, weights_only=False))
    saved = checkpoint["state_dict"]
    tied = trainer.is_global_zero and torch.equal(saved["model.lm_head.weight"], saved["model.model.embed_tokens.weight"])
    whole = trainer.is_global_zero and all(t.numel() > 0 for t in saved.values())

    if trainer.is_global_zero:  # after fit, models made in this process are plain ones again
        metrics = trainer.callback_metrics
        Path(args.out).write_text(f"{trainer.global_step} {float(metrics['es/fitness_mean'])} "
                                  f"{is_deepspeed_zero3_enabled()} {float(metrics['drift/kl'])} "
                                  f"{float(metrics['drift/relative_norm'])} {tied} {whole}")
    trainer.strategy.barrier()
    leave()


if __name__ == "__main__":
    main()
