"""Train the toy regression module with strategy="es"; run as a plain script (Lightning launches the processes).

With --fail_on_rank K, process K alone returns a NaN fitness (--failure nan) or logs an extra name (--failure names);
every process writes the error it raised to <out>.error-<rank>.txt. With --perturb_on_rank K, process K starts from
other weights (the strategy must start every process from process 0's).
"""

import argparse
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leave import leave  # noqa: E402
from collective_guard import install as guard_collectives  # noqa: E402

guard_collectives()  # a collective the library calls on a host tensor fails here as under NCCL
from lightning_toy import Regression  # noqa: E402

from lightning_es import ESStrategy  # noqa: E402


class FitnessHistory(pl.Callback):
    def __init__(self):
        self.fitness = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.fitness.append(float(trainer.callback_metrics["es/fitness_mean"]))


class ErrorReport(pl.Callback):
    def __init__(self, out: str):
        self.out = out

    def on_exception(self, trainer, pl_module, exception):
        Path(f"{self.out}.error-{trainer.global_rank}.txt").write_text(f"{type(exception).__name__}: {exception}")


class FailingOnOneRank(Regression):
    def __init__(self, rank: int, failure: str, **kwargs):
        super().__init__(**kwargs)
        self.failing_rank, self.failure = rank, failure

    def training_step(self, batch, batch_idx):
        fitness = super().training_step(batch, batch_idx)
        if self.global_rank != self.failing_rank:
            return fitness
        if self.failure == "names":
            self.log("only_on_one_rank", 1.0)
            return fitness
        return fitness * float("nan")


def record_gathers() -> list[int]:
    """The element counts of every ``GatheredParameters`` (the checkpoint saves and loads), as they happen."""
    import deepspeed

    counts, gathered = [0], deepspeed.zero.GatheredParameters

    def recording(params, *args, **kwargs):
        counts.append(sum(getattr(p, "ds_numel", p.numel()) for p in params))
        return gathered(params, *args, **kwargs)

    deepspeed.zero.GatheredParameters = recording
    return counts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--sharded", action="store_true")
    parser.add_argument("--perturbation", default="full", help="'lowrank': ESStrategy's default")
    parser.add_argument("--optimizer", default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--ckpt_dir", default=None)
    parser.add_argument("--ckpt_every_n_steps", type=int, default=0, help="0: a checkpoint at the end of every epoch")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--anchor_decay", type=float, default=0.0)
    parser.add_argument("--fail_on_rank", type=int, default=-1)
    parser.add_argument("--failure", choices=["nan", "names"], default="nan")
    parser.add_argument("--perturb_on_rank", type=int, default=-1, help="start this process from other weights")
    parser.add_argument("--relative", action="store_true", help="relative_sigma 0.05 and relative_learning_rate --lr")
    args = parser.parse_args()

    pl.seed_everything(0)
    units = (dict(relative_sigma=0.05, relative_learning_rate=args.lr) if args.relative
             else dict(sigma=0.05, learning_rate=args.lr))
    strategy = ESStrategy(
        population_size=8, **units, seed=3, perturbation=args.perturbation, process_group_backend="gloo",
        es_anchor_decay=args.anchor_decay,
        deepspeed_config={"zero_optimization": {"stage": 3}} if args.sharded else None,
    )
    history = FitnessHistory()
    callbacks = [history, ErrorReport(args.out)]
    if args.ckpt_dir:
        every = dict(every_n_train_steps=args.ckpt_every_n_steps) if args.ckpt_every_n_steps else dict(every_n_epochs=1)
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=args.ckpt_dir, save_top_k=-1, **every))
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=args.devices, max_epochs=args.epochs, callbacks=callbacks,
        logger=False, enable_checkpointing=bool(args.ckpt_dir), enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=1,
    )
    options = dict(optimizer=args.optimizer, batch_size=args.batch_size)
    if args.fail_on_rank >= 0:
        module = FailingOnOneRank(args.fail_on_rank, args.failure, **options)
    else:
        module = Regression(**options)
    if trainer.global_rank == args.perturb_on_rank:
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
    largest_gather = record_gathers() if args.sharded else [0]
    trainer.fit(module, ckpt_path=args.resume)
    weights = trainer.strategy.lightning_module_state_dict()
    es_state = trainer.strategy.es.state_dict()  # a collective when sharded
    held = {key: {name: tuple(t.shape) for name, t in value.items()} for key, value in es_state.items()
            if isinstance(value, dict) and all(isinstance(t, torch.Tensor) for t in value.values())}
    everyone = [None] * trainer.world_size
    if dist.is_initialized():
        dist.all_gather_object(everyone, held)
    else:
        everyone = [held]
    if trainer.is_global_zero:
        torch.save({"weights": weights, "fitness": history.fitness, "world_size": trainer.world_size,
                    "val_mse": float(trainer.callback_metrics["val_mse"]), "global_step": trainer.global_step,
                    "es_state_held": everyone, "largest_gather": max(largest_gather)}, args.out)
    trainer.strategy.barrier()
    leave()


if __name__ == "__main__":
    main()
