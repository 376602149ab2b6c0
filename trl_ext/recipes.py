"""Argument parsing for the recipes: TRL's `TrlParser` with recipe defaults and a `--quick` smoke mode."""

import os
import statistics

import torch
from trl import TrlParser

DRIFT_EVERY = 10  # steps between the main jobs' drift/kl log entries


def parse_recipe_args(dataclass_types, defaults: dict, quick: dict, argv=None):
    """Parse CLI flags and `--config` YAML over `defaults`; with `--quick`, over `defaults | quick`.

    Defaults naming a field that none of the dataclasses has (an ES field under `GRPOConfig`) are skipped, so
    that ES and GRPO recipes can share one table.
    """
    parser = TrlParser(dataclass_types)
    known = {action.dest for action in parser._actions}
    parser.set_defaults(**{k: v for k, v in defaults.items() if k in known})
    parsed = parser.parse_args_and_config(argv)
    if getattr(parsed[0], "quick", False):  # parse again so that derived fields see the smoke-mode values
        parser.set_defaults(**{k: v for k, v in quick.items() if k in known})
        parsed = parser.parse_args_and_config(argv)
    return parsed


def use_all_cpu_cores() -> None:
    """Give each local process an equal share of the CPU's logical cores.

    `accelerate launch` sets OMP_NUM_THREADS=1 on a host where it counts one physical core, which halves generation
    speed on a 2-vCPU machine. No effect when a GPU is visible.
    """
    if torch.cuda.is_available():
        return
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // processes))


def before_after_lines(task: str, problems: int, before: dict, after: dict) -> list[str]:
    """What the recipes print of their held-out scores ({name: share}) and ``"off-task KL"`` before and after."""
    from lightning_es.tasks import probes

    return [f"{task} off-task KL to the base model ({len(probes.OFF_TASK_PROMPTS)} probe prompts, exact, nats per "
            f"token): before {before[name]:.3f}, after {after[name]:.3f}" if name == "off-task KL" else
            f"{task} {name} on {problems} held-out problems: before {before[name]:.1%}, after {after[name]:.1%}"
            for name in before]


def no_signal_line(task: str, shares: list[float], iterations: int) -> str:
    """What the recipes print of ``es/no_signal``: its logged values (each the share over its logging window)."""
    return (f"{task} iterations without signal (es/no_signal: every member tied, no step): "
            f"{statistics.fmean(shares):.1%} of {iterations}")


def train_and_report(trainer, eval_dataset, rewards: dict, task: str) -> tuple[dict, dict]:
    """Score greedy completions of ``eval_dataset`` and the off-task KL to the base model before and after
    ``trainer.train()``, save, and print both; for ES, the share of iterations without signal too.

    The KL is the library's drift callback (``KLDriftCallback``, exact estimator, also logged as ``drift/kl`` every
    ``DRIFT_EVERY`` steps) on the off-task probe prompts, each followed by the base model's greedy answer."""
    from lightning_es.tasks import probes
    from lightning_es.tasks.evaluation import greedy_scores

    from .callbacks import KLDriftCallback

    def scores():
        return greedy_scores(trainer.model, trainer.processing_class, eval_dataset, rewards,
                             max_new_tokens=trainer.args.max_completion_length, accelerator=trainer.accelerator)

    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    model = trainer.accelerator.unwrap_model(trainer.model)
    drift = KLDriftCallback(trainer, probes.answered(model, tokenizer), every_n_steps=DRIFT_EVERY, estimator="exact")
    trainer.add_callback(drift)

    def off_task_kl() -> float:
        return float(drift.probe.measure(trainer.accelerator.unwrap_model(trainer.model)).compute())

    before = scores() | {"off-task KL": off_task_kl()}
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    after = scores() | {"off-task KL": off_task_kl()}
    trainer.save_model(trainer.args.output_dir)
    if trainer.accelerator.is_main_process:
        print("\n".join(before_after_lines(task, len(eval_dataset), before, after)))
        no_signal = [entry["es/no_signal"] for entry in trainer.state.log_history if "es/no_signal" in entry]
        if no_signal:
            print(no_signal_line(task, no_signal, trainer.state.global_step))
    return before, after
