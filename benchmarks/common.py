"""Models and prompts shared by the benchmarks: the tiny test model, or the embedded SmolLM2-135M-Instruct."""

import sys
import time
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


def timed(function, repeats: int = 3) -> float:
    """Best of ``repeats`` wall times: the least disturbed run on a noisy machine."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best
