"""What ``beta`` costs: an ESTrainer iteration with the KL penalty against one without, side by side.

    python benchmarks/beta_cost.py --model SmolLM2-135M-Instruct [--repeats 5] [--out docs/reports/beta-cost]

ESConfig's defaults (its population, greedy members) on a batch of 2 GSM8K-style prompts at 24 new tokens, with
``beta=0`` and ``beta=0.04`` (TRL's old default), the same prompts, ``--repeats`` interleaved iterations each after one
warm-up. The penalty adds two teacher-forced passes over the members' completions (one with the member's noise, one
with the start weights swapped in) and keeps one copy of the start weights on the host. Prints and writes
(DIR/result.json) the median seconds per iteration and their ratio, the range of the per-pair ratios, the start
copy's bytes and the largest logits the passes held at once.
"""

import json
import statistics
import tempfile

import torch
from transformers import AutoTokenizer

import trl_ext.kl_penalty as kl_penalty_module
from common import arguments, interleaved, ratios, write_result
from lightning_es.tasks import gsm8k
from lightning_es.tasks.models import resolve_model
from trl_ext import ESConfig, ESTrainer


def build(path: str, beta: float, dataset):
    args = ESConfig(output_dir=tempfile.mkdtemp(), beta=beta, max_completion_length=24, bf16=False, use_cpu=True,
                    report_to="none", disable_tqdm=True, reward_weights=[1.0, 0.5])
    trainer = ESTrainer(model=path, reward_funcs=[gsm8k.correctness_reward, gsm8k.format_reward], args=args,
                        train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(path))
    trainer.state.global_step = 1  # past the first step's member check, which measures the KL whatever beta is
    return trainer


def main():
    args = arguments(__doc__, model="SmolLM2-135M-Instruct", repeats=5).parse_args()
    torch.manual_seed(0)
    path = resolve_model(args.model)
    dataset, _ = gsm8k.load_splits(train_size=16, eval_size=2, seed=0, style="final_answer")
    trainers = {beta: build(path, beta, dataset) for beta in (0.0, 0.04)}
    batch = [dataset[i] for i in range(2)]
    largest = [0]
    logits = kl_penalty_module.completion_logits

    def measuring(model, completion_batch):
        out = logits(model, completion_batch)
        largest[0] = max(largest[0], out.numel() * out.element_size())
        return out

    kl_penalty_module.completion_logits = measuring
    seconds = interleaved({beta: (lambda trainer=trainer: trainer.training_step(trainer.model, batch))
                           for beta, trainer in trainers.items()}, args.repeats, warmup=1)
    ratio = ratios(seconds[0.04], seconds[0.0])
    start = trainers[0.04].es.start
    result = {
        "model": args.model, "repeats": args.repeats,
        "seconds_per_iteration": {str(beta): statistics.median(s) for beta, s in seconds.items()},
        "beta_vs_none": ratio["median"], "beta_vs_none_range": [ratio["min"], ratio["max"]],
        "start_copy_bytes": start.nbytes, "largest_logits_bytes": 2 * largest[0],  # member's and reference's at once
        "kl_logged": trainers[0.04]._metrics["train"]["kl"][-1],
    }
    print(json.dumps(result, indent=2))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
