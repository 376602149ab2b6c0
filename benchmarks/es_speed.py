"""What an ES iteration costs against plain generation of the same rows, as users run it.

    python benchmarks/es_speed.py --model smollm2 [--repeats 5] [--compile] [--profile] [--out docs/reports/speed]

Everything runs with ``ESConfig``'s defaults (its noise, prompts per iteration and greedy members), at two shapes:
``short``, pinned at 8 members x 2 prompts (so that its figures compare across changes of the default), the short
prompts x 24 tokens, and ``main_job``, the README main job's task (GSM8K-style prompts of the recipe, ESConfig's
population, fp32 as the recipe runs, 24 tokens). Per shape and decoding (eager; and compiled with ``--compile``, i.e.
``torch_compile=True``), an ``ESTrainer`` trains and, after each of its steps, the two other variants run on the same
model, so that the three are interleaved:

- ``generate``: plain ``generate`` of the population's rows (members x prompts), the floor;
- ``iteration``: the engine's iteration: the population generated through the perturbation (in chunks of
  ``es_max_generation_rows``) and the update (``EvolutionStrategy.step``);
- ``trainer_step``: the whole ``ESTrainer`` step, as it logs ``step_time`` (rewards, logging and all).

Every row generates exactly 24 tokens in all three. Printed: the median seconds and, per step, the ratios to
``generate`` (median and range). ``--profile`` adds one step per shape and decoding, after the timed ones, with each
variant run once under ``torch.profiler`` (the operators an iteration adds to plain generation: events and self time)
and the trainer step under ``cProfile`` (its slowest Python functions), kept under ``profile`` in each shape's figures.
``--out DIR`` writes ``result.json``: ``iteration_vs_generate`` and
``trainer_step_vs_generate`` (medians, short shape, eager) first, every shape's figures, and the peak memory of an ES
iteration against plain generation of one chunk for populations of 8 to 64 members at a fixed chunk
(``es_memory.population_sweep``): what grows with the population is the factors of the step, not the KV cache.
"""

import cProfile
import pstats
import statistics
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback

from common import PROMPTS, arguments, generate_population, load, ratios, seconds, write_result
from es_memory import population_sweep
from lightning_es.tasks import gsm8k, prompts_for
from trl_ext import ESConfig, ESTrainer
from trl_ext.recipes import use_all_cpu_cores

NEW_TOKENS = 24
SHAPES = ("short", "main_job")


def prompts(shape: str, tokenizer) -> Dataset:
    if shape == "short":
        return prompts_for(tokenizer, Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]}))
    return prompts_for(tokenizer, gsm8k.generate_offline(8, seed=0, style="final_answer"))


def constant_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


class Interleaved(TrainerCallback):
    """After every trainer step: time plain generation and the engine's iteration of the step's rows."""

    def __init__(self, trainer: ESTrainer, warmup: int, repeats: int, profile: bool = False):
        self.trainer = trainer
        self.timed = range(warmup + 1, warmup + repeats + 1)  # the steps timed
        self.profiled_step = warmup + repeats + 1  # one more step, when profiled: where the time goes (``profiled``)
        self.times = {"generate": [], "iteration": []}
        self.profile = profile
        self.profiles = {}
        self.python = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.profile and state.global_step + 1 == self.profiled_step:
            self.python = cProfile.Profile()
            self.python.enable()

    def on_step_end(self, args, state, control, **kwargs):
        if self.python is not None:  # the trainer step just profiled, before the variants run
            self.python.disable()
            self.profiles["trainer_step_python"] = slowest_functions(self.python)
            self.python = None
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        batch = trainer.train_dataset.select(range(args.per_device_train_batch_size))
        texts = [trainer.processing_class.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 if not isinstance(p, str) else p for p in batch["prompt"]]
        inputs = trainer.processing_class(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        es, members = trainer.es, trainer.es.members(10_000 + state.global_step)  # seeds apart from training's
        rows = args.population_size
        population = {k: v.repeat(rows, 1).to(model.device) for k, v in inputs.items()}

        def plain():  # under the precision the trainer generates with (autocast when bf16)
            with torch.no_grad(), trainer.accelerator.autocast():
                model.generate(**population, generation_config=trainer.generation_config)

        def iteration():
            with torch.no_grad(), trainer.accelerator.autocast():
                generate_population(es.perturbation, members, inputs.to(model.device),
                                    args.es_max_generation_rows or len(members) * len(texts),
                                    lambda batch: model.generate(**batch, generation_config=trainer.generation_config))
            es.step(10_000 + state.global_step, torch.randn(len(members)))

        if self.profile and state.global_step == self.profiled_step:
            self.profiles["operators"] = profiled(plain, iteration)
            return
        for name, variant in (("generate", plain), ("iteration", iteration)):
            took = seconds(variant)
            if state.global_step in self.timed:
                self.times[name].append(took)


def profiled(plain, iteration, top: int = 15) -> dict:
    """The operators an iteration runs beyond plain generation of its rows (torch.profiler): how many more profiler
    events (nested operators count each) and how much more self time, in all and for the ``top`` operators with the
    most extra time; the time is the device's where there is one (CUDA), else the CPU's."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    tables = {}
    for name, variant in (("generate", plain), ("iteration", iteration)):
        with torch.profiler.profile(activities=activities) as profile:
            variant()
        tables[name] = {e.key: (e.count, (e.self_device_time_total if torch.cuda.is_available()
                                          else e.self_cpu_time_total) / 1e3) for e in profile.key_averages()}
    extra = {op: (calls - tables["generate"].get(op, (0, 0.0))[0], ms - tables["generate"].get(op, (0, 0.0))[1])
             for op, (calls, ms) in tables["iteration"].items()}
    return {"events": {name: sum(c for c, _ in t.values()) for name, t in tables.items()},
            "self_ms": {name: sum(ms for _, ms in t.values()) for name, t in tables.items()},
            "extra": [{"operator": op, "calls": calls, "self_ms": ms}
                      for op, (calls, ms) in sorted(extra.items(), key=lambda kv: -kv[1][1])[:top]]}


def slowest_functions(profile: cProfile.Profile, top: int = 25) -> list[dict]:
    """The ``top`` Python functions of a profiled trainer step by cumulative time."""
    rows = [{"function": f"{Path(file).name}:{line}({function})", "calls": calls, "cumulative_s": cumulative}
            for (file, line, function), (_, calls, _, cumulative, _) in pstats.Stats(profile).stats.items()]
    return sorted(rows, key=lambda r: -r["cumulative_s"])[:top]


def measure(model, tokenizer, dataset: Dataset, compiled: bool, repeats: int, warmup: int, new_tokens: int = NEW_TOKENS,
            profile: bool = False, **settings) -> dict:
    """Interleaved timings of the three variants on ``model`` (``settings``: ESConfig fields beyond its defaults)."""
    config = ESConfig(output_dir=tempfile.mkdtemp(prefix="es-speed-"), max_steps=warmup + repeats + profile,
                      report_to="none",
                      save_strategy="no", disable_tqdm=True, logging_steps=1, torch_compile=compiled,
                      use_cpu=not torch.cuda.is_available(),  # transformers refuses bf16 on a CPU host otherwise
                      max_completion_length=new_tokens,
                      generation_kwargs={"min_new_tokens": new_tokens, **settings.pop("generation_kwargs", {})},
                      **settings)
    trainer = ESTrainer(model, constant_reward, args=config, train_dataset=dataset, processing_class=tokenizer)
    interleaved = Interleaved(trainer, warmup, repeats, profile)
    trainer.add_callback(interleaved)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steps = [e["step_time"] for e in trainer.state.log_history if "step_time" in e][warmup:warmup + repeats]
    times = {**interleaved.times, "trainer_step": steps}
    rows = config.population_size * config.per_device_train_batch_size
    result = {"rows": rows, "new_tokens": new_tokens, "seconds": {name: statistics.median(t) for name, t in times.items()},
              "generated_tokens_per_second": rows * new_tokens / statistics.median(times["generate"])}
    for name in ("iteration", "trainer_step"):
        result[f"{name}_vs_generate"] = ratios(times[name], times["generate"])
    if torch.cuda.is_available():
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if profile:
        result["profile"] = interleaved.profiles
    return result


def print_profile(profile: dict) -> None:
    operators = profile["operators"]
    print(f"  profiler events: generate {operators['events']['generate']}, iteration {operators['events']['iteration']}; "
          f"self time {operators['self_ms']['generate']:.0f} ms, {operators['self_ms']['iteration']:.0f} ms")
    for row in operators["extra"][:8]:
        print(f"  iteration's extra {row['operator']}: {row['calls']} events, {row['self_ms']:.0f} ms")
    for row in profile["trainer_step_python"][:12]:
        print(f"  trainer step {row['function']}: {row['calls']} calls, {row['cumulative_s']:.2f} s")


def main():
    parser = arguments(__doc__, model="smollm2", repeats=5,
                       repeats_help="Interleaved runs of each variant (after the warm-up).")
    parser.add_argument("--warmup", type=int, default=2, help="Steps left out first (compilation, caches).")
    parser.add_argument("--compile", action="store_true", help="Also with torch_compile=True (compiled decoding).")
    parser.add_argument("--memory_chunk", type=int, default=16, help="es_max_generation_rows of the memory sweep.")
    parser.add_argument("--profile", action="store_true",
                        help="One more step per shape and decoding, profiled: the operators an iteration adds to plain generation, "
                             "and the trainer step's slowest Python functions (in result.json).")
    args = parser.parse_args()
    use_all_cpu_cores()
    results = {}
    for shape in SHAPES:
        for compiled in (False, True) if args.compile else (False,):
            key = f"{shape}/{'compiled' if compiled else 'eager'}"
            model, tokenizer = load(args.model)
            # short: ESConfig's defaults as they are (TRL's bf16 included) at 8 members x 2 prompts, pinned so that
            # figures compare across changes of the default; main job: as the recipe sets them
            settings = {"population_size": 8, "per_device_train_batch_size": 2} if shape == "short" else {"bf16": False}
            results[key] = measure(model, tokenizer, prompts(shape, tokenizer), compiled, args.repeats, args.warmup,
                                   profile=args.profile, **settings)
            r = results[key]
            print(f"{key}: {r['rows']} rows x {NEW_TOKENS} tokens: generate {r['seconds']['generate']:.2f} s, "
                  f"iteration {r['seconds']['iteration']:.2f} s ({r['iteration_vs_generate']['median']:.3f} x, "
                  f"{r['iteration_vs_generate']['min']:.3f}-{r['iteration_vs_generate']['max']:.3f}), trainer step "
                  f"{r['seconds']['trainer_step']:.2f} s ({r['trainer_step_vs_generate']['median']:.3f} x, "
                  f"{r['trainer_step_vs_generate']['min']:.3f}-{r['trainer_step_vs_generate']['max']:.3f})", flush=True)
            if args.profile:
                print_profile(r["profile"])
    memory = population_sweep(args.model, (8, 16, 32, 64), prompts=2, new_tokens=NEW_TOKENS, chunk_rows=args.memory_chunk)
    for row in memory["populations"]:
        print(f"memory: population {row['population']}, chunks of {args.memory_chunk} rows: peak {row['peak_mb']:.0f} MB "
              f"= {row['vs_generate']:.3f} x plain generation of one chunk ({memory['generate_mb']:.0f} MB)")
    short = results["short/eager"]
    write_result(args.out, {"iteration_vs_generate": short["iteration_vs_generate"]["median"],
                            "trainer_step_vs_generate": short["trainer_step_vs_generate"]["median"],
                            "model": args.model, "device": "cuda" if torch.cuda.is_available() else "cpu",
                            "torch_threads": torch.get_num_threads(), "repeats": args.repeats, "shapes": results,
                            "memory": memory})


if __name__ == "__main__":
    main()
