"""ES iteration time against plain generation of the same sequences, and batched low-rank against member-by-member.

    python benchmarks/es_speed.py --model tiny|smollm2 [--population 32] [--prompts 8] [--new_tokens 32]

Prints, measured side by side in one run (--repeats interleaved runs of every variant; the median, and the range of
the per-run ratios):
  1. ES iteration / plain `generate` of population x prompts sequences (the floor is 1.0), for low-rank noise evaluated
     as one batch and full-rank noise evaluated member by member (the hooks, the factor regeneration and the update
     all count);
  2. throughput of batched low-rank evaluation / member-by-member full-rank evaluation.
"""

import argparse
import statistics

import torch

from common import encode, generate, load, timed
from lightning_es import EvolutionStrategy, build_perturbation, select_parameters


def es_iteration(model, es, inputs, new_tokens, step=0):
    members = es.members(step)
    if es.perturbation.batched:
        batch = {k: v.repeat(len(members), 1) for k, v in inputs.items()}
        with es.perturbation.apply_population(members):
            generate(model, batch, new_tokens)
    else:
        for member in members:
            with es.perturbed(member):
                generate(model, inputs, new_tokens)
    es.step(step, torch.randn(es.population_size))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--population", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no_full_rank", action="store_true", help="Skip the (slow) member-by-member variant.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model, tokenizer = load(args.model)
    model.to(args.device).eval()
    inputs = encode(tokenizer, args.prompts, args.device)
    everything = {k: v.repeat(args.population, 1) for k, v in inputs.items()}
    common = dict(population_size=args.population, lr=0.0, seed=0)
    variants = {"plain": lambda: generate(model, everything, args.new_tokens)}
    lowrank = EvolutionStrategy(build_perturbation("lowrank", select_parameters(model), 1e-3, model=model), **common)
    variants["lowrank"] = lambda: es_iteration(model, lowrank, inputs, args.new_tokens)
    if not args.no_full_rank:
        full = EvolutionStrategy(build_perturbation("full", select_parameters(model), 1e-3), **common)
        variants["full"] = lambda: es_iteration(model, full, inputs, args.new_tokens)

    generate(model, everything, 1)  # warm-up
    times = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved, so that a slow phase of the machine hits every variant alike
        for name, variant in variants.items():
            times[name].append(timed(variant, repeats=1))
    ratios = {name: sorted(t / p for t, p in zip(times[name], times["plain"])) for name in variants}

    def summary(name):
        r = ratios[name]
        return f"{statistics.median(times[name]):8.2f} s   ({statistics.median(r):.2f} x plain; runs {r[0]:.2f}-{r[-1]:.2f})"

    sequences = args.population * args.prompts
    print(f"model={args.model} device={args.device} population={args.population} prompts={args.prompts} "
          f"new_tokens={args.new_tokens} ({sequences} sequences per iteration), median of {args.repeats} interleaved runs")
    print(f"plain generate, one batch of {sequences}:        {statistics.median(times['plain']):8.2f} s   (1.00)")
    if "full" in variants:
        print(f"ES iteration, full-rank, member by member: {summary('full')}")
    print(f"ES iteration, low-rank, one batch:          {summary('lowrank')}")
    if "full" in variants:
        throughput = statistics.median(f / l for f, l in zip(times["full"], times["lowrank"]))
        print(f"throughput, batched low-rank / member-by-member full-rank: {throughput:.2f} x")


if __name__ == "__main__":
    main()
