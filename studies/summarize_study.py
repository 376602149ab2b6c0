"""Markdown tables of the learning curves `es_study.py` writes: held-out reward after the same number of iterations
and after the same training seconds, mean and spread over seeds, one table per task.

    python studies/summarize_study.py outputs/study/perturbations.jsonl

"Same iterations": the last iteration every run of the task reached. "Same seconds": the shortest mean training time
among the task's settings, each run's reward interpolated linearly between its evaluations. "Seconds to reach":
training seconds until a run's held-out reward first reaches --target (interpolated; "-" if it never did).
"""

import argparse
import json
import statistics
from collections import defaultdict

from learning import at_seconds, seconds_to_reach

from lightning_es.tasks.spread import shown


def load(path: str) -> dict[str, dict[str, dict[int, list[dict]]]]:
    """task -> label -> seed -> the run's evaluations in order."""
    runs = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    with open(path) as file:
        for line in file:
            row = json.loads(line)
            runs[row["task"]][row["label"]][row["seed"]].append(row)
    return runs


def spread(values: list[float]) -> str:
    """mean ± sample standard deviation (3 decimals), with the range for small samples."""
    return shown(values, with_range=True)


def at_step(points: list[dict], step: int) -> dict:
    return next(point for point in points if point["step"] == step)


def reached(values: list[float | None]) -> str:
    times = [v for v in values if v is not None]
    if not times:
        return "-"
    return f"{statistics.median(times):.0f} s ({len(times)}/{len(values)} seeds, {min(times):.0f}-{max(times):.0f})"


def table(labels: dict[str, dict[int, list[dict]]], target: float) -> str:
    step = min(points[-1]["step"] for seeds in labels.values() for points in seeds.values())
    budget = min(statistics.fmean(points[-1]["seconds"] for points in seeds.values()) for seeds in labels.values())
    lines = [
        f"| setting | seeds | s / iteration | reward at iteration {step} | accuracy at {step} | format at {step} "
        f"| reward at {budget:.0f} s | seconds to reward {target} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, seeds in labels.items():
        runs = list(seeds.values())
        pace = statistics.fmean(points[-1]["seconds"] / points[-1]["step"] for points in runs)
        same_step = [at_step(points, step) for points in runs]
        same_time = [at_seconds(points, budget) for points in runs]
        lines.append(
            f"| {label} | {len(runs)} | {pace:.1f} | {spread([p['reward'] for p in same_step])} "
            f"| {spread([p['accuracy'] for p in same_step])} | {spread([p['format'] for p in same_step])} "
            f"| {spread(same_time)} | {reached([seconds_to_reach(points, target) for points in runs])} |"
        )
    start = [points[0]["reward"] for seeds in labels.values() for points in seeds.values()]
    lines.append(f"\nStart (iteration 0): reward {spread(start)}.")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--target", type=float, default=0.25, help="held-out reward for the seconds-to-reach column")
    args = parser.parse_args()
    for task, labels in load(args.path).items():
        print(f"### {task}\n\n{table(labels, args.target)}\n")


if __name__ == "__main__":
    main()
