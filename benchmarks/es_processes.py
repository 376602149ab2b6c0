"""ES iteration time with 2 processes against 1 process at a fixed population (each process holds the model).

    python benchmarks/es_processes.py --model tiny|smollm2 [--population 16] [--prompts 8] [--new_tokens 32]

Launches the same worker with torchrun (gloo) on 1 and on 2 processes; the machine's cores are split evenly among
the processes (torch threads per process = cores / processes), so both runs use the same hardware. ``--out DIR``
writes the figures to ``DIR/result.json``.
"""

import itertools
import os
import subprocess
import sys

import torch.distributed as dist

from common import arguments, encode, forwarded, generate, interleaved, load, write_result

SETTINGS = ("model", "population", "prompts", "new_tokens", "steps")  # what the workers are told


def worker(args):
    from lightning_es import (EvolutionStrategy, FullRankPerturbation, MemberScores, Processes, evaluate_population,
                              select_parameters)

    dist.init_process_group("gloo")
    model, tokenizer = load(args.model)
    inputs = encode(tokenizer, args.prompts)
    es = EvolutionStrategy(FullRankPerturbation(select_parameters(model), sigma=1e-3), population_size=args.population,
                           learning_rate=5e-7)
    processes = Processes.current()

    def score(members):
        (member,) = members
        with es.perturbed(member):
            output = generate(model, inputs, args.new_tokens)
        return MemberScores(fitness=[float(output.float().mean())], weight=[1.0])

    steps = itertools.count()

    def iteration():
        step = next(steps)
        es.step(step, evaluate_population(es.members(step), step, score, processes).fitness)

    times = interleaved({"iteration": iteration}, args.steps, warmup=1)["iteration"]  # the first iteration warms up
    if processes.rank == 0:
        print(f"SECONDS_PER_ITERATION {min(times)}")
    dist.destroy_process_group()


def launch(args, processes: int) -> float:
    threads = max(1, (os.cpu_count() or 1) // processes)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_port=29533",
               __file__, "--worker"] + forwarded({k: getattr(args, k) for k in SETTINGS})
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    output = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    return float(next(line for line in output.splitlines() if line.startswith("SECONDS")).split()[1])


def main():
    parser = arguments(__doc__, model="tiny")
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    one, two = launch(args, 1), launch(args, 2)
    print(f"model={args.model} population={args.population} prompts={args.prompts} new_tokens={args.new_tokens} "
          f"cores={os.cpu_count()}")
    print(f"1 process:   {one:7.2f} s/iteration")
    print(f"2 processes: {two:7.2f} s/iteration   (two_vs_one ideally 0.5, with one core per process)")
    write_result(args.out, {**{k: getattr(args, k) for k in SETTINGS}, "cores": os.cpu_count(),
                            "seconds_per_iteration": {"1": one, "2": two}, "two_vs_one": two / one})


if __name__ == "__main__":
    main()
