"""ES iteration time against plain generation of the same sequences, and batched low-rank against member-by-member.

    python benchmarks/es_speed.py --model tiny|smollm2 [--population 32] [--prompts 8] [--new_tokens 32]

Prints, measured side by side in one run (best of --repeats):
  1. ES iteration / plain `generate` of population x prompts sequences (the floor is 1.0), for full-rank noise
     evaluated member by member and for low-rank noise evaluated as one batch;
  2. throughput of batched low-rank evaluation / member-by-member full-rank evaluation.
"""

import argparse

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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model, tokenizer = load(args.model)
    model.to(args.device).eval()
    inputs = encode(tokenizer, args.prompts, args.device)
    everything = {k: v.repeat(args.population, 1) for k, v in inputs.items()}
    common = dict(population_size=args.population, lr=0.0, seed=0)
    full = EvolutionStrategy(build_perturbation("full", select_parameters(model), 1e-3), **common)
    lowrank = EvolutionStrategy(build_perturbation("lowrank", select_parameters(model), 1e-3, model=model), **common)

    plain = timed(lambda: generate(model, everything, args.new_tokens), args.repeats)
    full_time = timed(lambda: es_iteration(model, full, inputs, args.new_tokens), args.repeats)
    lowrank_time = timed(lambda: es_iteration(model, lowrank, inputs, args.new_tokens), args.repeats)

    sequences = args.population * args.prompts
    print(f"model={args.model} device={args.device} population={args.population} prompts={args.prompts} "
          f"new_tokens={args.new_tokens} ({sequences} sequences per iteration)")
    print(f"plain generate, one batch of {sequences}:        {plain:8.2f} s   (1.00)")
    print(f"ES iteration, full-rank, member by member: {full_time:8.2f} s   ({full_time / plain:.2f} x plain)")
    print(f"ES iteration, low-rank, one batch:          {lowrank_time:8.2f} s   ({lowrank_time / plain:.2f} x plain)")
    print(f"throughput, batched low-rank / member-by-member full-rank: {full_time / lowrank_time:.2f} x")


if __name__ == "__main__":
    main()
