"""How often does each model answer each generated task's problems right before training (greedy, the main job's
answer check)? The accuracy race's first table: a task whose start accuracy leaves no headroom is no target.

    python studies/task_table.py --out docs/reports/accuracy-race            # both models, both tasks, val and test
    python studies/task_table.py --render docs/reports/accuracy-race         # tasks.md again from tasks.json

Each (model, task, split) is saved in ``tasks.json`` as it finishes, with its per-problem correctness; a run again
skips what is saved.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_es.tasks import generated, gsm8k, prompts_for
from lightning_es.tasks.evaluation import greedy_scores
from lightning_es.tasks.models import EMBEDDED_NAME, GEMMA_NAME, resolve_model

SIZES = {"validation": 200, "test": 500}


def per_problem(model, tokenizer, dataset, max_new_tokens: int) -> list[int]:
    """1 or 0 per problem: greedy completion right by gsm8k.correctness_reward."""
    right = []

    def record(completions, answer, **kwargs):
        scores = gsm8k.correctness_reward(completions, answer)
        right.extend(int(s) for s in scores)
        return scores

    greedy_scores(model, tokenizer, dataset, {"accuracy": record, "format": gsm8k.format_reward}, max_new_tokens,
                  batch_size=32)
    return right


def measure(out: Path, models: list[str], tasks: list[str], splits: list[str], style: str, max_new_tokens: int) -> dict:
    path = out / "tasks.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    torch.manual_seed(0)
    for name in models:
        model_dir = resolve_model(name)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        for task in tasks:
            for split in splits:
                size = SIZES[split]
                key = f"{name}/{task}/{split}/{style}/{max_new_tokens}"
                if key in saved:
                    continue
                started = time.perf_counter()
                dataset = prompts_for(tokenizer, generated.dataset(task, split, size, seed=0, style=style),
                                      gsm8k.demonstrations(style))
                right = per_problem(model, tokenizer, dataset, max_new_tokens)
                saved[key] = {"model": name, "task": task, "split": split, "problems": size, "style": style,
                              "max_new_tokens": max_new_tokens,
                              "accuracy": sum(right) / size, "correct": "".join(map(str, right)),
                              "seconds": round(time.perf_counter() - started, 1)}
                print(f"{key}: {saved[key]['accuracy']:.3f} ({sum(right)}/{size})", flush=True)
                out.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(saved, indent=1) + "\n")
    return saved


def render(out: Path) -> str:
    saved = json.loads((out / "tasks.json").read_text())
    lines = ["| model | task | answer style, new tokens | split | problems | start accuracy (greedy) | 95% interval |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in saved.values():
        p, n = row["accuracy"], row["problems"]
        half = 1.96 * (p * (1 - p) / n) ** 0.5
        lines.append(f"| {row['model']} | {row['task']} | {row['style']}, {row['max_new_tokens']} | {row['split']} | {n} | "
                     f"{p:.3f} | "
                     f"[{max(0.0, p - half):.3f}, {min(1.0, p + half):.3f}] |")
    table = "\n".join(lines) + "\n"
    (out / "tasks.md").write_text(
        "# Start accuracy of each model on each generated task\n\nRebuilt by `python studies/task_table.py --render "
        f"{out}` from `tasks.json`. Greedy decoding, answers checked by "
        "`gsm8k.correctness_reward`; splits from `lightning_es.tasks.generated` (disjoint by construction).\n\n"
        + table)
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/reports/accuracy-race"))
    parser.add_argument("--render", type=Path, default=None, help="only rebuild tasks.md from this folder's tasks.json")
    parser.add_argument("--models", nargs="+", default=[EMBEDDED_NAME, GEMMA_NAME])
    parser.add_argument("--tasks", nargs="+", default=sorted(generated.TASKS))
    parser.add_argument("--splits", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--style", default="one_line", choices=sorted(gsm8k.INSTRUCTIONS))
    parser.add_argument("--max_new_tokens", type=int, default=32)
    args = parser.parse_args()
    if args.render is None:
        measure(args.out, args.models, args.tasks, args.splits, args.style, args.max_new_tokens)
    print(render(args.render or args.out))


if __name__ == "__main__":
    main()
