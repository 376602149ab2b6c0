"""Train the tiny model with ESTrainer and save what the tests compare; run it alone or under accelerate launch.

    train_tiny.py --out RESULT.pt --output_dir DIR [--prompts_per_process 2] [--num_generations 2] [--dataset_size 6]
                  [--max_steps 3] [--save_steps N] [--resume CHECKPOINT] [--fail_on_process K] [--anchor_decay L]
                  [--bf16_weights]

RESULT.pt holds the final weights, logged rewards and update norms, the prompts scored at each step, the process
count and the type of the model the Trainer trained. With --fail_on_process K, the reward function raises on process
K only; every process writes the error it raised to DIR/error-<rank>.txt before exiting. With --perturb_on_process
K, process K starts from other weights than the others (ESTrainer must start every process from process 0's).
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leave import leave  # noqa: E402
from collective_guard import install as guard_collectives  # noqa: E402

guard_collectives()  # a collective the library calls on a host tensor fails here as under NCCL
from tiny import build_model, build_tokenizer  # noqa: E402

from trl_ext import ESConfig, ESTrainer  # noqa: E402
from trl_ext.callbacks import KLDriftCallback, ParameterDriftCallback  # noqa: E402

PROMPTS = ["the quick", "what is 12", "count the", "brown fox", "lazy dog", "is 42", "jumps over", "apples and"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--prompts_per_process", type=int, default=2)
    parser.add_argument("--num_generations", type=int, default=2)
    parser.add_argument("--dataset_size", type=int, default=6)
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--fail_on_process", type=int, default=-1)
    parser.add_argument("--anchor_decay", type=float, default=0.0)
    parser.add_argument("--perturb_on_process", type=int, default=-1, help="start this process from other weights")
    parser.add_argument("--drift", action="store_true", help="log drift/kl (exact) and the parameter drift every step")
    # transformers refuses bf16=True on a host without a GPU unless use_cpu, which turns DeepSpeed off; weights loaded
    # in bf16 give ZeRO-3 the layout bf16=True gives it on a GPU: bf16 partitions beside DeepSpeed's fp32 copy
    parser.add_argument("--bf16_weights", action="store_true", help="load the model in bf16 (bf16=False)")
    parser.add_argument("--unshared_deepspeed_copy", action="store_true",
                        help="ES keeps its own master beside DeepSpeed's fp32 copy, as where that is on NVMe")
    parser.add_argument("--perturbation", default="full",
                        help="'full' (equal weights on every layout are a full-rank promise), 'lowrank', or 'default'")
    args = parser.parse_args()

    if args.unshared_deepspeed_copy:
        import lightning_es.engine.perturbations.zero3 as zero3

        zero3.deepspeed_fp32_partitions = lambda params, optimizer: None
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)  # before ESConfig: under ZeRO-3 it would turn on zero.Init, another initialisation
    if args.bf16_weights:
        model.to(torch.bfloat16)
    dataset = Dataset.from_dict({"prompt": PROMPTS[: args.dataset_size]})
    config = ESConfig(
        output_dir=args.output_dir, max_steps=args.max_steps,
        per_device_train_batch_size=args.prompts_per_process * args.num_generations,
        num_generations=args.num_generations, population_size=8, sigma=0.02, learning_rate=1e-3,
        max_completion_length=5, report_to="none", bf16=False, disable_tqdm=True, logging_steps=1,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        es_anchor_decay=args.anchor_decay,
        **({} if args.perturbation == "default" else {"perturbation": args.perturbation}),
    )
    prompts_per_step = {}

    def token_rate(prompts, completion_ids, trainer_state, **kwargs):
        if trainer.accelerator.process_index == args.fail_on_process:
            raise RuntimeError("this reward fails on one process only")
        prompts_per_step.setdefault(trainer_state.global_step, set()).update(prompts)
        return [sum(t < 150 for t in ids) / max(1, len(ids)) for ids in completion_ids]

    if config.process_index == args.perturb_on_process:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    try:
        trainer = ESTrainer(model, token_rate, args=config, train_dataset=dataset, processing_class=tokenizer)
        if args.drift:
            trainer.add_callback(KLDriftCallback(trainer, PROMPTS[:5], every_n_steps=1, estimator="exact"))
            trainer.add_callback(ParameterDriftCallback(trainer, every_n_steps=1))
        trainer.train(resume_from_checkpoint=args.resume)
    except Exception as error:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        Path(args.output_dir, f"error-{config.process_index}.txt").write_text(f"{type(error).__name__}: {error}")
        raise
    weights = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # gathers a ZeRO-3 model (collective)
    everyone = [None] * trainer.accelerator.num_processes
    if dist.is_initialized():
        dist.all_gather_object(everyone, prompts_per_step)
    else:
        everyone = [prompts_per_step]
    scored = {step: sorted(set().union(*(share.get(step, set()) for share in everyone))) for step in
              sorted(set().union(*everyone))}
    if trainer.accelerator.is_main_process:
        history = trainer.state.log_history
        torch.save({
            "weights": weights,
            "rewards": [h["reward"] for h in history if "reward" in h],
            "update_norms": [h["es/update_norm"] for h in history if "es/update_norm" in h],
            "drift": [{k: v for k, v in h.items() if k.startswith("drift/")} for h in history
                      if any(k.startswith("drift/") for k in h)],
            "prompts_per_step": scored,
            "processes": trainer.accelerator.num_processes,
            "trained_model_type": type(trainer.model_wrapped).__name__,
        }, args.out)
    trainer.accelerator.wait_for_everyone()
    leave()


if __name__ == "__main__":
    main()
