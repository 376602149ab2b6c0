"""Does the main job teach the skill as a user runs it? The README's ES recipes, run over seeds: held-out accuracy
before and after (the gain's t-interval over the seeds), answer format, off-task KL, the share of iterations without
signal, and each run's wall time and peak memory.

    python studies/main_job.py run --recipe trl --seeds 1 2 3          # accelerate launch recipes/es_gsm8k.py --seed N
    python studies/main_job.py run --recipe lightning --seeds 1 2 3    # python recipes/lightning_es_arithmetic.py --seed N
    python studies/main_job.py render

Run it with the python of the venv to measure (a fresh one for the README's figures): each recipe starts from that
venv's ``accelerate`` or ``python``, alone, and its figures are read from what it prints. Each run is appended to
``docs/reports/main-job/runs.jsonl`` as it finishes (a recipe and seed saved there is not run again, so a study cut
off resumes), and ``result.json`` and ``report.md`` are rebuilt from that file. Arguments after ``--`` go to the recipe
(their runs are summed up apart from the defaults', under the recipe's name and the arguments).
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_race import commit, load_runs  # noqa: E402
from accuracy_race_report import t_interval  # noqa: E402

from lightning_es.tasks.models import cache_root  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RECIPES = {"trl": [str(BIN / "accelerate"), "launch", "recipes/es_gsm8k.py"],
           "lightning": [sys.executable, "recipes/lightning_es_arithmetic.py"]}
TARGET_MINUTES = 10  # issue 36: the main job within 10 minutes on the 2-core machine, from a fresh venv
NO_SIGNAL_LIMIT = 0.1  # issue 36: no more than a tenth of the iterations without signal

# what before_after_lines and no_signal_line (trl_ext/recipes.py) print
SCORE = re.compile(r"^(?P<task>.+) (?P<name>accuracy|answer format) on (?P<problems>\d+) held-out problems: "
                   r"before (?P<before>[\d.]+)%, after (?P<after>[\d.]+)%$")
KL = re.compile(r"^(?P<task>.+) off-task KL to the base model \(.*\): before (?P<before>-?[\d.]+), "
                r"after (?P<after>-?[\d.]+)$")
NO_SIGNAL = re.compile(r"^.+ iterations without signal \(.*\): (?P<share>[\d.]+)% of (?P<iterations>\d+)$")


def printed_figures(output: str) -> dict:
    """The figures a recipe printed: {"task", "problems", "accuracy", "answer_format", "off_task_kl": [before, after],
    "no_signal", "iterations"}; a ValueError names what is missing."""
    figures = {}
    for line in output.splitlines():
        line = line.strip()
        if score := SCORE.match(line):
            figures |= {"task": score["task"], "problems": int(score["problems"]),
                        score["name"].replace(" ", "_"): [float(score["before"]) / 100, float(score["after"]) / 100]}
        elif kl := KL.match(line):
            figures["off_task_kl"] = [float(kl["before"]), float(kl["after"])]
        elif no_signal := NO_SIGNAL.match(line):
            figures |= {"no_signal": float(no_signal["share"]) / 100, "iterations": int(no_signal["iterations"])}
    missing = {"accuracy", "answer_format", "off_task_kl", "no_signal"} - figures.keys()
    if missing:
        raise ValueError(f"the recipe printed no {', '.join(sorted(missing))} line (trl_ext.recipes' printout)")
    return figures


def launched(command: list[str], logs: Path) -> dict:
    """Runs ``command``, echoing its standard output and keeping both streams in ``logs``.{out,err}.log (so a run
    whose printout cannot be read is not lost); its exit status, wall seconds, peak memory (the largest resident set
    of the process and of every process it waited for: ``accelerate launch`` waits for the recipe) and output. Only
    the standard output is parsed: the recipes print their figures there, whole lines, apart from the progress bars
    and warnings of the standard error."""
    logs.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(f"{logs}.err.log", "w") as errors, open(f"{logs}.out.log", "w") as kept:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=errors, encoding="utf-8",
                                   errors="replace")
        output = []
        for line in process.stdout:
            sys.stdout.write(line)
            kept.write(line)
            output.append(line)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": process.returncode, "wall_seconds": time.monotonic() - start,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "output": "".join(output)}


def run(recipe: str, seed: int, extra: list[str], out: Path) -> dict:
    command = [*RECIPES[recipe], "--seed", str(seed), "--output_dir", str(out / f"{recipe}-seed{seed}"), *extra]
    cache_was_empty, at = not any(cache_root().glob("*")), commit()
    finished = launched(command, out / "logs" / f"{recipe}-seed{seed}")
    if finished["returncode"] != 0:
        raise SystemExit(f"{recipe} seed {seed} exited with {finished['returncode']}; not saved (its output: "
                         f"{out / 'logs'}).")
    shown = [Path(command[0]).name if recipe == "trl" else "python", *command[1:]]  # as the README writes it
    return {"recipe": recipe, "seed": seed, "extra": extra, "command": " ".join(shown),
            "commit": at, "venv": sys.prefix, "model_cache_was_empty": cache_was_empty,
            "torch": torch.__version__, "cpus": len(os.sched_getaffinity(0)), "machine": platform.machine(),
            "wall_seconds": finished["wall_seconds"], "peak_rss_bytes": finished["peak_rss_bytes"],
            **printed_figures(finished["output"])}


def summary(runs: list[dict]) -> dict:
    """One recipe's runs (one set of arguments) over their seeds."""
    gains = [r["accuracy"][1] - r["accuracy"][0] for r in runs]
    bounds = t_interval(gains)
    return {"task": runs[0]["task"], "problems": runs[0]["problems"], "seeds": [r["seed"] for r in runs],
            "extra": runs[0]["extra"],
            "accuracy_before": statistics.fmean(r["accuracy"][0] for r in runs),
            "accuracy_after": statistics.fmean(r["accuracy"][1] for r in runs),
            "gain": {"mean": statistics.fmean(gains), "ci95": bounds,
                     "excludes_zero": None if bounds is None else bounds[0] > 0 or bounds[1] < 0},
            "answer_format_after": statistics.fmean(r["answer_format"][1] for r in runs),
            "off_task_kl_after": statistics.fmean(r["off_task_kl"][1] for r in runs),
            "no_signal_max": max(r["no_signal"] for r in runs),
            "wall_seconds": {"mean": statistics.fmean(r["wall_seconds"] for r in runs),
                             "max": max(r["wall_seconds"] for r in runs)},
            "within_target": all(r["wall_seconds"] <= 60 * TARGET_MINUTES for r in runs),
            "peak_rss_gb": max(r["peak_rss_bytes"] for r in runs) / 1e9}


def result(runs: list[dict]) -> dict:
    """{recipe: summary} over its seeds; a recipe run with arguments after ``--`` under "recipe arguments"."""
    groups = {}
    for r in sorted(runs, key=lambda r: (list(RECIPES).index(r["recipe"]), r["extra"], r["seed"])):
        groups.setdefault(" ".join([r["recipe"], *r["extra"]]), []).append(r)
    return {name: summary(group) for name, group in groups.items()}


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def interval(bounds: list[float] | None) -> str:
    return "n/a (one seed)" if bounds is None else f"[{bounds[0]:+.3f}, {bounds[1]:+.3f}]"


def markdown(runs: list[dict], results: dict) -> str:
    lines = ["# The main job as a user runs it", "",
             "Rebuilt by `python studies/main_job.py render` from `runs.jsonl` (one line per finished run).", ""]
    for name, entry in results.items():
        lines += [f"## `{name}`: {entry['task']}, {entry['problems']} held-out problems", "",
                  f"- Accuracy gain over seeds {', '.join(map(str, entry['seeds']))}: mean {entry['gain']['mean']:+.3f}, "
                  f"95% t-interval {interval(entry['gain']['ci95'])} (accuracy {entry['accuracy_before']:.3f} -> "
                  f"{entry['accuracy_after']:.3f}).",
                  f"- Wall time: mean {minutes(entry['wall_seconds']['mean'])}, longest "
                  f"{minutes(entry['wall_seconds']['max'])} (target {TARGET_MINUTES} min: "
                  f"{'met' if entry['within_target'] else 'missed'}); peak memory {entry['peak_rss_gb']:.1f} GB (the largest "
                  "process's resident set).",
                  f"- Iterations without signal: at most {entry['no_signal_max']:.1%} in a run (limit "
                  f"{NO_SIGNAL_LIMIT:.0%}).", ""]
    lines += ["## Every run", "", "| recipe | seed | arguments | accuracy | answer format | off-task KL | no signal | "
              "wall | peak RSS | model cache empty | commit |", "| --- " * 11 + "|"]
    for r in sorted(runs, key=lambda r: (r["recipe"], r["extra"], r["seed"])):
        lines.append(f"| {r['recipe']} | {r['seed']} | {' '.join(r['extra']) or '(defaults)'} | "
                     f"{r['accuracy'][0]:.1%} -> {r['accuracy'][1]:.1%} | {r['answer_format'][0]:.1%} -> "
                     f"{r['answer_format'][1]:.1%} | {r['off_task_kl'][0]:.3f} -> {r['off_task_kl'][1]:.3f} | "
                     f"{r['no_signal']:.1%} of {r['iterations']} | {minutes(r['wall_seconds'])} | "
                     f"{r['peak_rss_bytes'] / 1e9:.2f} GB | {'yes' if r['model_cache_was_empty'] else 'no'} | "
                     f"{r['commit']} |")
    return "\n".join(lines) + "\n"


def render(runs: list[dict], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    results = result(runs)
    (out / "result.json").write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    (out / "report.md").write_text(markdown(runs, results))
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["run", "render"])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="trl")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--report", type=Path, default=ROOT / "docs/reports/main-job")
    parser.add_argument("--outputs", type=Path, default=Path("outputs/main-job"),
                        help="Where the recipes write their checkpoints and models.")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    runs_path = args.report / "runs.jsonl"
    runs = load_runs(runs_path)
    if args.phase == "run":
        args.report.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            if any((r["recipe"], r["seed"], r["extra"]) == (args.recipe, seed, extra) for r in runs):
                continue
            record = run(args.recipe, seed, extra, args.outputs)
            with runs_path.open("a") as file:
                file.write(json.dumps(record) + "\n")
            runs.append(record)
            print(f"{args.recipe} seed {seed}: accuracy {record['accuracy'][0]:.3f} -> {record['accuracy'][1]:.3f}, "
                  f"wall {minutes(record['wall_seconds'])}, peak {record['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    results = render(runs, args.report)
    print(f"wrote {args.report / 'report.md'} and result.json")
    return results


if __name__ == "__main__":
    main()
