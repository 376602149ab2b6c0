"""ES on a GPU at a 1.5B model's size, sized to about 10 minutes of device time.

    python benchmarks/es_speed_gpu.py --out docs/reports/speed-gpu

A randomly initialised model of Qwen2.5-1.5B's shape in bf16 (no hub access: the weights' values do not change the
cost), population 32 x 8 prompts x 256 tokens, eager and compiled (``torch_compile=True``): generated tokens per
second, ES iteration / plain generate, trainer step / plain generate (``es_speed.measure``, interleaved), and the peak
memory of the run against plain inference of the same rows; then one iteration at the ES-at-scale shape (population
30 x 200 prompts, generated ``es_max_generation_rows`` rows at a time) for its peak memory. ``--out`` writes
``result.json``.
"""

import json
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Qwen2Config

from common import arguments, generate_population, members_per_call, write_result
from es_speed import measure
from lightning_es import ESSettings, build_evolution_strategy
from tiny import build_tokenizer  # tests/, on the path from common

PROMPT_TOKENS = 64


def qwen_1_5b(vocab_size: int) -> torch.nn.Module:
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda()


def prompts(count: int, seed: int = 0) -> Dataset:
    """Prompts of about PROMPT_TOKENS tokens of the tiny tokenizer (the random model reads any ids)."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "count", "apples", "pears", "42"]
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"prompt": [" ".join(words[int(i)] for i in torch.randint(len(words), (PROMPT_TOKENS,),
                                                                                          generator=generator))
                                         for _ in range(count)]})


def inference_peak_gb(model, tokenizer, rows: int, new_tokens: int) -> float:
    """Peak memory of plain generation of ``rows`` rows."""
    inputs = tokenizer(list(prompts(rows)["prompt"]), return_tensors="pt", padding=True).to("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return torch.cuda.max_memory_allocated() / 2**30


def at_scale(model, tokenizer, population: int, prompt_count: int, new_tokens: int, chunk_rows: int) -> dict:
    """One default low-rank ES iteration at the ES-at-scale shape, chunk_rows rows per generate call."""
    inputs = tokenizer(list(prompts(prompt_count, seed=1)["prompt"]), return_tensors="pt", padding=True).to("cuda")
    es = build_evolution_strategy(ESSettings(population_size=population), model, seed=0)  # the default settings
    members = es.members(0)
    per_call = members_per_call(chunk_rows, prompt_count)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with torch.no_grad():
        generate_population(es.perturbation, members, inputs, chunk_rows, lambda rows: model.generate(
            **rows, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0))
    es.step(0, torch.randn(population))
    seconds = time.perf_counter() - started
    es.perturbation.close()
    return {"population": population, "prompts": prompt_count, "new_tokens": new_tokens, "chunk_rows": chunk_rows,
            "seconds": seconds, "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
            "inference_peak_gb_one_chunk": inference_peak_gb(model, tokenizer, per_call * prompt_count, new_tokens)}


def main():
    parser = arguments(__doc__, repeats=3)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--scale_tokens", type=int, default=64, help="New tokens of the ES-at-scale iteration.")
    args = parser.parse_args()
    tokenizer = build_tokenizer()
    model = qwen_1_5b(151936)
    report = {"device": torch.cuda.get_device_name(), "shape": "population 32 x 8 prompts", "runs": {}}
    for compiled in (False, True):
        key = "compiled" if compiled else "eager"
        # the random model's ids beyond the tiny tokenizer's vocabulary could not be decoded for the rewards
        unreadable = list(range(len(tokenizer), model.config.vocab_size))
        result = measure(model, tokenizer, prompts(8), compiled, args.repeats, warmup=1, new_tokens=args.new_tokens,
                         population_size=32, per_device_train_batch_size=8,
                         generation_kwargs={"suppress_tokens": unreadable})
        result["inference_peak_gb"] = inference_peak_gb(model, tokenizer, 256, args.new_tokens)
        result["peak_vs_inference"] = result["peak_memory_gb"] / result["inference_peak_gb"]
        report["runs"][key] = result
        print(key, json.dumps(result), flush=True)
    report["es_at_scale"] = at_scale(model, tokenizer, 30, 200, args.scale_tokens, chunk_rows=512)
    print("es_at_scale", json.dumps(report["es_at_scale"]), flush=True)
    write_result(args.out, report)


if __name__ == "__main__":
    main()
