"""Train the toy regression module with strategy="es"; run as a plain script (Lightning launches the processes)."""

import argparse
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_toy import Regression  # noqa: E402

from lightning_es import ESStrategy  # noqa: E402


class FitnessHistory(pl.Callback):
    def __init__(self):
        self.fitness = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.fitness.append(float(trainer.callback_metrics["es/fitness_mean"]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--sharded", action="store_true")
    parser.add_argument("--optimizer", default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--ckpt_dir", default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--lr", type=float, default=0.005)
    args = parser.parse_args()

    pl.seed_everything(0)
    strategy = ESStrategy(
        population_size=8, sigma=0.05, lr=args.lr, seed=3, process_group_backend="gloo",
        deepspeed_config={"zero_optimization": {"stage": 3}} if args.sharded else None,
    )
    history = FitnessHistory()
    callbacks = [history]
    if args.ckpt_dir:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=args.ckpt_dir, every_n_epochs=1, save_top_k=-1))
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=args.devices, max_epochs=args.epochs, callbacks=callbacks,
        logger=False, enable_checkpointing=bool(args.ckpt_dir), enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=1,
    )
    module = Regression(optimizer=args.optimizer, batch_size=args.batch_size)
    trainer.fit(module, ckpt_path=args.resume)
    weights = trainer.strategy.lightning_module_state_dict()
    if trainer.is_global_zero:
        torch.save({"weights": weights, "fitness": history.fitness, "world_size": trainer.world_size,
                    "val_mse": float(trainer.callback_metrics["val_mse"]),
                    "global_step": trainer.global_step}, args.out)
    trainer.strategy.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
