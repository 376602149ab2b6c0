"""What the benchmarks share: one harness and result writer, and their models and prompts (the tiny test model, or the
embedded SmolLM2-135M-Instruct).

Each benchmark takes its options from ``arguments`` (its docstring's first line as description; the ``--model``,
``--repeats`` and ``--out DIR`` they share), times its variants with ``interleaved`` (or ``seconds``, one call),
summarises per-run ratios with ``ratios``, passes options on to processes it launches with ``forwarded``, and ends with
``write_result``: it prints the result's ratios and, with ``--out DIR``, writes ``DIR/result.json``. Importing this
module puts ``tests/`` on the path, so that ``from tiny import ...`` finds the tiny test model.
"""

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPTS = [
    "What is 12 + 30?", "Name a prime number larger than 10.", "Write a haiku about rain.", "Count from 1 to 5.",
    "What is the capital of France?", "Spell the word apple backwards.", "Give a synonym for happy.",
    "How many legs does a spider have?",
]


def load(model_name: str):
    if model_name == "tiny":
        from tiny import build_model, build_tokenizer

        tokenizer = build_tokenizer()
        return build_model(tokenizer), tokenizer
    from lightning_es.tasks.models import resolve_model

    path = resolve_model(None if model_name == "smollm2" else model_name)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path, padding_side="left")


def encode(tokenizer, count: int, device="cpu"):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(count)]
    if tokenizer.chat_template:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)


@torch.no_grad()
def generate(model, inputs, new_tokens: int):
    """Exactly ``new_tokens`` greedy tokens per row, so that every variant does the same work."""
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=model.generation_config.pad_token_id or 0, temperature=None, top_p=None,
                          top_k=None)


def members_per_call(rows_per_call: int, prompts: int) -> int:
    """How many members' copies of ``prompts`` rows one generate call holds (at least one member)."""
    return max(1, rows_per_call // prompts)


def generate_population(perturbation, members, inputs, rows_per_call: int, generate_rows) -> None:
    """Generate every member's copy of ``inputs`` through a batched ``perturbation`` (``apply_population``), at most
    ``rows_per_call`` rows per call (``es_max_generation_rows``), in the engine's rounds; ``generate_rows(batch)``
    generates one call's rows."""
    from lightning_es.engine.processes import Processes

    per_call = members_per_call(rows_per_call, len(next(iter(inputs.values()))))
    for part in Processes().rounds(members, batched=True, members_per_round=per_call):
        with perturbation.apply_population(part):
            generate_rows({k: v.repeat(len(part), 1) for k, v in inputs.items()})


def arguments(doc: str, model: str | None = None, repeats: int | None = None,
              repeats_help: str | None = None) -> argparse.ArgumentParser:
    """A benchmark's parser: ``doc``'s first line as its description; ``--model`` (a name ``load`` takes, default
    ``model``) and ``--repeats`` (default ``repeats``) where given, and ``--out DIR`` (``write_result``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if model is not None:
        parser.add_argument("--model", default=model)
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    parser.add_argument("--out", default=None, help="Write result.json here.")
    return parser


def forwarded(settings: Mapping[str, object]) -> list[str]:
    """``--name=value`` of each setting: the options a benchmark passes on to a process it launches."""
    return [f"--{name}={value}" for name, value in settings.items()]


def seconds(function: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def interleaved(variants: Mapping[Hashable, Callable[[], object]], repeats: int,
                warmup: int = 1) -> dict[Hashable, list[float]]:
    """Wall seconds of each variant in ``repeats`` rounds that each run every variant once, in turn, after ``warmup``
    rounds left out (compilation, caches): a slow phase of the machine hits every variant alike."""
    times = {name: [] for name in variants}
    for round_ in range(warmup + repeats):
        for name, variant in variants.items():
            took = seconds(variant)
            if round_ >= warmup:
                times[name].append(took)
    return times


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, float]:
    """The per-run ratios of two interleaved series: their median and range."""
    per_run = sorted(a / b for a, b in zip(numerators, denominators))
    return {"median": statistics.median(per_run), "min": per_run[0], "max": per_run[-1]}


def write_result(out: str | Path | None, result: dict) -> None:
    """Print ``result``'s ratios (its top-level ``*_vs_*`` figures: a median with its range, or one value) and, with
    ``out``, write ``result`` to ``out/result.json``."""
    for key, value in result.items():
        if "_vs_" not in key:
            continue
        if isinstance(value, Mapping):
            shown = f"{value['median']:.3f} (runs {value['min']:.3f}-{value['max']:.3f})"
        elif isinstance(value, Sequence):
            shown = "-".join(f"{v:.3f}" for v in value)
        else:
            shown = f"{value:.3f}"
        print(f"{key}: {shown}")
    if out:
        path = Path(out) / "result.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
