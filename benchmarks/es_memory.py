"""Peak memory of an ES step against plain generation of the same batch, with GRPOTrainer's step beside them.

    python benchmarks/es_memory.py --model tiny|smollm2 [--population 8] [--prompts 8] [--new_tokens 32]
    python benchmarks/es_memory.py --model smollm2 --processes 2    # an ESTrainer step on each of 2 processes

Each variant runs in a fresh process; the figure is that process's peak resident memory (CPU) or peak allocated
accelerator memory (CUDA) counted from the resident set once the model is loaded (where Linux's
``/proc/self/clear_refs`` allows; else from the process's start, loading included), so variants do not see each
other's allocations and loading's transient peak is left out. With --processes K, an ESTrainer step
(replicated layout) runs under `accelerate launch --multi_gpu --num_processes K` and every process reports its peak.
``--out DIR`` writes the figures to ``DIR/result.json``.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile

import torch

from common import arguments, encode, forwarded, generate, generate_population, load, write_result


def reset_peak() -> None:
    """Count the peak from now on, so that loading the model (which briefly holds more than running it) is left out:
    CUDA's counter, or the kernel's resident high-water mark (``/proc/self/clear_refs``, Linux)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        print("es_memory: cannot reset the resident high-water mark here; peaks include loading the model",
              file=sys.stderr)


def peak_megabytes() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def allocated_megabytes() -> float:
    """Memory allocated, touched or not (accelerator: reserved by the caching allocator; CPU: the address space,
    VmSize, which counts buffers whose pages were never written and so are not resident)."""
    if torch.cuda.is_available():
        return torch.cuda.memory_reserved() / 2**20
    with open("/proc/self/status") as status:
        kilobytes = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    return kilobytes / 1024


def run_variant(args):
    from datasets import Dataset

    from lightning_es import EvolutionStrategy, build_evolution_strategy, build_perturbation, select_parameters

    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        torch.cuda.set_device(device)  # each process's peak is read on its own device
    model, tokenizer = load(args.model)
    model.to(device)
    inputs = encode(tokenizer, args.prompts, device)
    reset_peak()
    population_batch = {k: v.repeat(args.population, 1) for k, v in inputs.items()}
    if args.variant == "generate":
        generate(model, inputs, args.new_tokens)
    elif args.variant == "generate_population":
        generate(model, population_batch, args.new_tokens)
    elif args.variant in ("es_full", "es_lowrank"):
        lowrank = args.variant == "es_lowrank"
        perturbation = build_perturbation("lowrank" if lowrank else "full", select_parameters(model), 1e-3, model=model)
        es = EvolutionStrategy(perturbation, population_size=args.population, learning_rate=5e-7)
        members = es.members(0)
        if lowrank:
            with es.perturbation.apply_population(members):
                generate(model, population_batch, args.new_tokens)
        else:
            for member in members:
                with es.perturbed(member):
                    generate(model, inputs, args.new_tokens)
        es.step(0, torch.randn(args.population))
    elif args.variant == "es_chunked":  # the default low-rank population, generated chunk_rows rows at a time
        from trl_ext import ESConfig

        config = ESConfig(output_dir=tempfile.mkdtemp(), bf16=False, report_to="none")  # the default noise and step
        config.population_size = args.population
        es = build_evolution_strategy(config, model, seed=0)
        members = es.members(0)
        generate_population(es.perturbation, members, inputs, args.chunk_rows,
                            lambda rows: generate(model, rows, args.new_tokens))
        es.step(0, torch.randn(args.population))
    elif args.variant == "generate_rows":  # plain generation of chunk_rows rows
        generate(model, {k: v.repeat(max(1, args.chunk_rows // args.prompts), 1) for k, v in inputs.items()},
                 args.new_tokens)
    elif args.variant == "estrainer_step":
        from trl_ext import ESConfig, ESTrainer

        dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "What is 12 + 30?"}]] * 64})
        config = ESConfig(output_dir=tempfile.mkdtemp(), max_steps=1, per_device_train_batch_size=args.prompts,
                          population_size=args.population, max_completion_length=args.new_tokens, report_to="none",
                          bf16=False, save_strategy="no", disable_tqdm=True,
                          generation_kwargs={"min_new_tokens": args.new_tokens})
        trainer = ESTrainer(model, lambda completions, **kw: [float(len(c)) for c in completions], args=config,
                            train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
        rank = trainer.accelerator.process_index
        report = {"variant": args.variant, "process": rank, "peak_mb": peak_megabytes(),
                  "allocated_mb": allocated_megabytes(), "trained_model": type(trainer.model_wrapped).__name__}
        print(f"\n{json.dumps(report)}", flush=True)  # a line of its own: the processes share stdout
        return
    elif args.variant == "grpo_step":
        from trl import GRPOConfig, GRPOTrainer

        dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "What is 12 + 30?"}]] * 64})
        config = GRPOConfig(output_dir=tempfile.mkdtemp(), max_steps=1, per_device_train_batch_size=args.prompts,
                            num_generations=min(args.prompts, 8), max_completion_length=args.new_tokens,
                            report_to="none", bf16=False, save_strategy="no", disable_tqdm=True,
                            gradient_checkpointing=False, generation_kwargs={"min_new_tokens": args.new_tokens})
        GRPOTrainer(model, lambda completions, **kw: [float(len(c)) for c in completions], args=config,
                    train_dataset=dataset, processing_class=tokenizer).train()
    print(json.dumps({"variant": args.variant, "peak_mb": peak_megabytes()}))


VARIANTS = {
    "generate": "plain generate, prompts",
    "es_full": "ES step, full-rank, member by member",
    "generate_population": "plain generate, population x prompts",
    "es_lowrank": "ES step, low-rank, one batch",
    "grpo_step": "GRPOTrainer step (AdamW), same prompts",
}


def shape(args) -> dict:
    """The options a variant's process is told: the model and the batch's shape."""
    return {k: getattr(args, k) for k in ("model", "population", "prompts", "new_tokens")}


def peak_of(variant: str, **settings) -> float:
    """The peak memory of ``variant`` in a fresh process (MB)."""
    command = [sys.executable, __file__, "--variant", variant] + forwarded(settings)
    output = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ}).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_mb"]


def population_sweep(model: str, populations, prompts: int, new_tokens: int, chunk_rows: int) -> dict:
    """Peak memory of a default low-rank ES iteration generated ``chunk_rows`` rows at a time, per population size,
    against plain generation of one chunk."""
    settings = dict(model=model, prompts=prompts, new_tokens=new_tokens, chunk_rows=chunk_rows)
    baseline = peak_of("generate_rows", population=populations[0], **settings)
    rows = []
    for population in populations:
        peak = peak_of("es_chunked", population=population, **settings)
        rows.append({"population": population, "peak_mb": peak, "vs_generate": peak / baseline})
    return {"chunk_rows": chunk_rows, "prompts": prompts, "generate_mb": baseline, "populations": rows}


def estrainer_processes(args) -> None:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(args.processes), "--mixed_precision", "no", "--dynamo_backend", "no", __file__,
               "--variant", "estrainer_step"] + forwarded(shape(args))
    output = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ}).stdout
    reports = sorted((json.loads(line) for line in output.splitlines() if line.startswith('{"variant"')),
                     key=lambda r: r["process"])
    print(f"model={args.model} processes={args.processes} population={args.population} prompts={args.prompts} "
          f"new_tokens={args.new_tokens}: ESTrainer step, replicated layout")
    for report in reports:
        print(f"process {report['process']}: peak {report['peak_mb']:.0f} MB, allocated after the step "
              f"{report['allocated_mb']:.0f} MB, trained {report['trained_model']}")
    write_result(args.out, {**shape(args), "processes": reports})


def main():
    parser = arguments(__doc__, model="tiny")
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--chunk_rows", type=int, default=16, help="es_chunked, generate_rows: rows per generate call.")
    parser.add_argument("--variant", choices=sorted(VARIANTS) + ["estrainer_step", "es_chunked", "generate_rows"])
    args = parser.parse_args()
    if args.variant:
        return run_variant(args)
    if args.processes > 1:
        return estrainer_processes(args)
    peaks = {variant: peak_of(variant, **shape(args)) for variant in VARIANTS}
    print(f"model={args.model} population={args.population} prompts={args.prompts} new_tokens={args.new_tokens}")
    print(f"{'variant':42s} {'peak MB':>9s} {'ratio':>6s}")
    baselines = {"generate": "generate", "es_full": "generate", "grpo_step": "generate",
                 "generate_population": "generate_population", "es_lowrank": "generate_population"}
    ratios = {variant: peaks[variant] / peaks[baselines[variant]] for variant in VARIANTS}
    for variant, label in VARIANTS.items():
        print(f"{label:42s} {peaks[variant]:9.0f} {ratios[variant]:6.2f}  (vs {VARIANTS[baselines[variant]]})")
    write_result(args.out, {**shape(args), "peak_mb": peaks, "ratio_to": baselines, "ratio": ratios})


if __name__ == "__main__":
    main()
