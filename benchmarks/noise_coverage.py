"""What evolving every parameter costs: an ES iteration with low-rank noise on every trainable parameter (the
default: matrices, embeddings, norms and biases) against one on the nn.Linear weights only (the default before).

    python benchmarks/noise_coverage.py --model smollm2 [--population 8] [--prompts 2] [--new_tokens 24] [--out DIR]

At ESConfig's default shape (8 members x 2 prompts x 24 greedy tokens, rank 4), --repeats interleaved runs of each
variant: plain ``generate`` of the same rows, the ES iteration (population generation through the hooks, and the
update) with every parameter, and with the linear weights only. Prints the medians and the ranges of the per-run
ratios, and writes them to DIR/result.json (``all_vs_linear``, ``all_vs_generate``, ``linear_vs_generate``).
"""

import argparse
import json
import statistics
from pathlib import Path

import torch
from torch import nn

from common import encode, generate, load, timed
from es_speed import es_iteration
from lightning_es import EvolutionStrategy, build_perturbation, select_parameters


def linear_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The nn.Linear weights not shared with an embedding: what the low-rank default evolved before."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(m.weight)]: m.weight for m in model.modules()
            if isinstance(m, nn.Linear) and id(m.weight) not in embedded}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--new_tokens", type=int, default=24)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None, help="write result.json here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load(args.model)
    model.eval()
    inputs = encode(tokenizer, args.prompts)
    everything = {k: v.repeat(args.population, 1) for k, v in inputs.items()}
    selections = {"all": select_parameters(model), "linear": linear_weights(model)}
    strategies = {
        name: EvolutionStrategy(build_perturbation("lowrank", params, 1e-2, model=model, rank=args.rank),
                                population_size=args.population, lr=0.0, seed=0)
        for name, params in selections.items()
    }
    variants = {"generate": lambda: generate(model, everything, args.new_tokens)}
    variants |= {name: (lambda es=es: es_iteration(model, es, inputs, args.new_tokens)) for name, es in strategies.items()}
    for variant in variants.values():  # warm-up
        variant()
    times = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved, so that a slow phase of the machine hits every variant alike
        for name, variant in variants.items():
            times[name].append(timed(variant, repeats=1))

    def ratio(a, b):
        per_run = sorted(x / y for x, y in zip(times[a], times[b]))
        return {"median": statistics.median(per_run), "min": per_run[0], "max": per_run[-1]}

    result = {
        "model": args.model, "population": args.population, "prompts": args.prompts, "new_tokens": args.new_tokens,
        "rank": args.rank, "repeats": args.repeats,
        "evolved_tensors": {name: len(params) for name, params in selections.items()},
        "evolved_parameters": {name: sum(p.numel() for p in params.values()) for name, params in selections.items()},
        "seconds_median": {name: statistics.median(t) for name, t in times.items()},
        "all_vs_linear": ratio("all", "linear"),
        "all_vs_generate": ratio("all", "generate"),
        "linear_vs_generate": ratio("linear", "generate"),
    }
    print(f"model={args.model}: {args.population} members x {args.prompts} prompts x {args.new_tokens} tokens, "
          f"rank {args.rank}, median of {args.repeats} interleaved runs")
    for name in ("all", "linear"):
        print(f"  {name:6s}: {result['evolved_tensors'][name]:4d} tensors, {result['evolved_parameters'][name]:>11,d} "
              f"parameters, {result['seconds_median'][name]:.2f} s per iteration")
    print(f"  plain generate of the same rows: {result['seconds_median']['generate']:.2f} s")
    for key in ("all_vs_generate", "linear_vs_generate", "all_vs_linear"):
        r = result[key]
        print(f"  {key}: {r['median']:.3f} (runs {r['min']:.3f}-{r['max']:.3f})")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "result.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
