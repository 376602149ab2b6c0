"""How far one population member is from its base model, per noise setting and model: does a sigma mean the same on
every model?

    python studies/noise_scale.py --models SmolLM2-135M-Instruct gemma-3-270m --out docs/reports/noise-scale

For each model and setting, ``--members`` members of ES step 0 (seeded as ESConfig seeds them) are scored against the
unperturbed model: the exact KL(member || base) per token (nats), teacher-forced on the base model's own greedy
continuation (32 tokens) of the off-task probe prompts (``lightning_es.tasks.probes``), and member 0's greedy answer
to "What is 12 + 7?". Settings: absolute sigma 1e-3, 3e-3 and 1e-2 with full-rank noise on the linear weights (how
the issue that introduced relative noise measured), and ESConfig's default noise (low-rank, every parameter) at
absolute sigma 1e-2 (the default before) and at each ``--relative_sigmas`` (default: ESConfig's). Writes
DIR/result.json and DIR/report.md (``--render DIR`` writes the report again from the saved result).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_es import Population, build_perturbation, derive_seed, select_parameters
from lightning_es.drift.metrics import exact_token_kl
from lightning_es.engine.scales import DEFAULT_RELATIVE_SIGMA
from lightning_es.tasks.models import resolve_model
from lightning_es.tasks.probes import OFF_TASK_PROMPTS, render

QUESTION = "What is 12 + 7?"
CONTINUATION = 32


def linear_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(m.weight)]: m.weight for m in model.modules()
            if isinstance(m, nn.Linear) and id(m.weight) not in embedded}


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], new_tokens: int) -> tuple[dict, torch.Tensor]:
    tokenizer.padding_side = "left"
    inputs = tokenizer(render(tokenizer, prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
    return inputs, out


@torch.no_grad()
def continuation_logits(model, sequences: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=sequences, attention_mask=mask, position_ids=positions,
                   logits_to_keep=CONTINUATION + 1).logits
    return logits[:, :-1].float()


def settings(model: nn.Module, relative_sigmas: list[float]) -> dict[str, dict]:
    linear = linear_weights(model)
    every = select_parameters(model)
    chosen = {f"sigma {sigma:g}, full-rank, linear weights": dict(kind="full", params=linear, sigma=sigma)
              for sigma in (1e-3, 3e-3, 1e-2)}
    chosen["sigma 1e-2, default low-rank (before)"] = dict(kind="lowrank", params=every, sigma=1e-2)
    for sigma in relative_sigmas:
        chosen[f"relative_sigma {sigma:g}, default low-rank"] = dict(kind="lowrank", params=every, sigma=sigma,
                                                                   relative=True)
    return chosen


def measure(name: str, members: int, relative_sigmas: list[float]) -> dict:
    path = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    linear_rms = [float(p.detach().pow(2).mean().sqrt()) for p in linear_weights(model).values()]
    probe_inputs, probe_out = greedy(model, tokenizer, OFF_TASK_PROMPTS, CONTINUATION)
    mask = torch.cat([probe_inputs["attention_mask"], torch.ones_like(probe_out[:, -CONTINUATION:])], dim=1)
    base_logits = continuation_logits(model, probe_out, mask)
    question_inputs, base_answer = greedy(model, tokenizer, [QUESTION], 16)
    result = {"model": name, "linear_weight_rms_median": statistics.median(linear_rms),
              "base_answer": tokenizer.decode(base_answer[0, question_inputs["input_ids"].shape[1]:],
                                              skip_special_tokens=True),
              "settings": {}}
    population = Population(2 * members, antithetic=True, seed=derive_seed(42, "es-noise")).members(0)[:members]
    for label, setting in settings(model, relative_sigmas).items():
        options = dict(setting)
        perturbation = build_perturbation(options.pop("kind"), options.pop("params"), options.pop("sigma"),
                                          model=model, rank=4, **options)
        kls, answers = [], []
        started = time.perf_counter()
        for member in population:
            applied = (perturbation.apply_population([member]) if perturbation.batched
                       else perturbation.apply(member))
            with applied:
                member_logits = continuation_logits(model, probe_out, mask)
                _, answer = greedy(model, tokenizer, [QUESTION], 16)
            kls.append(float(exact_token_kl(member_logits, base_logits).mean()))
            answers.append(tokenizer.decode(answer[0, question_inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        result["settings"][label] = {"kl_per_token": kls, "kl_mean": statistics.mean(kls),
                                     "answers": answers, "seconds": time.perf_counter() - started}
        print(f"{name} | {label} | KL {statistics.mean(kls):.3g} ({min(kls):.3g}-{max(kls):.3g}) | "
              f"{answers[0]!r}", flush=True)
    return result


def report(results: list[dict]) -> str:
    labels = list(results[0]["settings"])
    shown = {label: f"**{label} (ESConfig's default)**" if label.startswith(f"relative_sigma {DEFAULT_RELATIVE_SIGMA:g},")
             else label for label in labels}
    lines = ["# Noise scale: one member's distance from its base model", "",
             "Exact KL(member || base) per token, teacher-forced on the base model's greedy continuation of the 24 "
             "off-task probe prompts, mean (range) over the first members of ES step 0; and member 0's greedy answer "
             f"to {QUESTION!r}. `python studies/noise_scale.py --relative_sigmas "
             + " ".join(l.split(",")[0].split()[1] for l in labels if l.startswith("relative_sigma"))
             + " --out docs/reports/noise-scale` wrote this.", "",
             "| model | linear-weight RMS (median) | base answer | " + " | ".join(shown[l] for l in labels) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in labels) + " |"]
    for r in results:
        cells = []
        for label in labels:
            s = r["settings"][label]
            cells.append(f"{s['kl_mean']:.3g} ({min(s['kl_per_token']):.3g}-{max(s['kl_per_token']):.3g}), "
                         f"{s['answers'][0].strip()[:40]!r}")
        lines.append(f"| {r['model']} | {r['linear_weight_rms_median']:.3g} | {r['base_answer'].strip()[:40]!r} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["SmolLM2-135M-Instruct", "gemma-3-270m"])
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--relative_sigmas", type=float, nargs="+", default=[DEFAULT_RELATIVE_SIGMA])
    parser.add_argument("--out", default=None, help="write result.json and report.md here")
    parser.add_argument("--render", default=None, help="only write report.md again from DIR/result.json")
    args = parser.parse_args()
    if args.render:
        results = json.loads((Path(args.render) / "result.json").read_text())
        (Path(args.render) / "report.md").write_text(report(results))
        return
    torch.manual_seed(0)
    results = [measure(name, args.members, args.relative_sigmas) for name in args.models]
    text = report(results)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "report.md").write_text(text)


if __name__ == "__main__":
    main()
