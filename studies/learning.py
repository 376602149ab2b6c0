"""Held-out learning curves for the studies that compare how ES settings (and GRPO) learn on this machine.

``HeldOutCurve`` scores the held-out problems with greedy decoding at the start and then every ``every_steps``
iterations, at the iterations ``at_steps``, or at the first step end past each of ``at_seconds`` seconds of training;
its clock counts training only (evaluation time excluded), so curves of different methods share one time axis.
``budget_seconds`` stops training once that much has been spent, and scores the model there.
"""

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from lightning_es.tasks import countdown, gsm8k
from lightning_es.tasks.evaluation import greedy_scores

REWARD_WEIGHTS = [1.0, 0.5]  # accuracy, answer format: the recipes' weighting
EVAL_SEED = 1_000_003


def task(name: str, train_size: int = 256, eval_size: int = 32, seed: int = 0, eval_seed: int = EVAL_SEED):
    """(train dataset, held-out dataset, reward functions) of a task; the held-out problems depend on eval_seed only."""
    if name == "gsm8k":
        train = gsm8k.generate_offline(train_size, seed=seed, style="final_answer")
        held_out = gsm8k.generate_offline(eval_size, seed=eval_seed, style="final_answer")
        return train, held_out, {"accuracy": gsm8k.correctness_reward, "format": gsm8k.format_reward}
    if name == "arithmetic":  # sums and differences of two digits, answered in GSM8K's '#### <number>' form
        train = arithmetic(train_size, seed)
        held_out = arithmetic(eval_size, eval_seed)
        return train, held_out, {"accuracy": gsm8k.correctness_reward, "format": gsm8k.format_reward}
    if name == "countdown":
        train = countdown.generate(train_size, seed=seed)
        held_out = countdown.generate(eval_size, seed=eval_seed)
        return train, held_out, {"accuracy": countdown.correctness_reward, "format": countdown.format_reward}
    raise ValueError(f"task must be 'gsm8k', 'arithmetic' or 'countdown', got {name!r}.")


def arithmetic(size: int, seed: int):
    import reasoning_gym

    # one digit and two terms: SmolLM2-135M-Instruct answers 38% of them greedily and 14% when sampled, so that GRPO's
    # sampled groups carry signal (with up to two digits and three terms it answered 20% greedily, about none sampled,
    # and neither method gained accuracy)
    problems = reasoning_gym.create_dataset("chain_sum", size=size, seed=seed, min_terms=2, max_terms=2, min_digits=1,
                                            max_digits=1)
    return gsm8k.to_prompts([p["question"] for p in problems], [p["answer"] for p in problems], "final_answer")


# two answered problems of the task itself, shown to a base model before each question (``prompts_for``): shown
# GSM8K's word problems instead, Gemma-3-270M copied their answer, '#### 12', for 28 of 64 sums
ARITHMETIC_QUESTION = "State the final answer to the following arithmetic problem: {} ="
ARITHMETIC_SHOWN = (("3 + 5", "8"), ("7 - 9", "-2"))


def demonstrations(name: str) -> list[tuple[str, str]]:
    """The (question, answer) pairs a model without a chat template is shown before each question of task ``name``."""
    if name == "gsm8k":
        return gsm8k.demonstrations("final_answer")
    if name == "arithmetic":
        shown = gsm8k.to_prompts([ARITHMETIC_QUESTION.format(q) for q, _ in ARITHMETIC_SHOWN],
                                 [a for _, a in ARITHMETIC_SHOWN], "final_answer")
        return [(prompt[0]["content"], f"#### {answer}") for prompt, answer in zip(shown["prompt"], shown["answer"])]
    if name == "countdown":
        return list(countdown.DEMONSTRATIONS)
    raise ValueError(f"task must be 'gsm8k', 'arithmetic' or 'countdown', got {name!r}.")


def weighted(scores: dict[str, float]) -> float:
    return REWARD_WEIGHTS[0] * scores["accuracy"] + REWARD_WEIGHTS[1] * scores["format"]


class HeldOutCurve(TrainerCallback):
    def __init__(self, trainer, held_out, rewards, every_steps: int | None = None, at_seconds=(),
                 budget_seconds: float | None = None, max_new_tokens: int | None = None, at_steps=(),
                 start: dict | None = None):
        """``start``: the held-out scores of the untrained model when already known (greedy, so the same every run)."""
        self.trainer = trainer
        self.held_out = held_out
        self.rewards = rewards
        self.every_steps = every_steps
        self.at_steps = set(at_steps)
        self.marks = sorted(at_seconds)
        self.budget_seconds = budget_seconds
        self.max_new_tokens = max_new_tokens or trainer.args.max_completion_length
        self.points: list[dict] = [start] if start else []
        self.training_seconds = 0.0
        self._since = None

    def evaluate(self, step: int) -> None:
        trainer = self.trainer
        scores = greedy_scores(trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class, self.held_out,
                               self.rewards, max_new_tokens=self.max_new_tokens, accelerator=trainer.accelerator)
        self.points.append({"step": step, "seconds": round(self.training_seconds, 2), **scores,
                            "reward": weighted(scores)})

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.points:
            self.evaluate(state.global_step)
        self._since = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.training_seconds += time.perf_counter() - self._since
        over_budget = self.budget_seconds is not None and self.training_seconds >= self.budget_seconds
        due = (self.every_steps and state.global_step % self.every_steps == 0) or state.global_step in self.at_steps or (
            self.marks and self.training_seconds >= self.marks[0])
        if due or over_budget or state.global_step >= state.max_steps:
            self.evaluate(state.global_step)
            self.marks = [mark for mark in self.marks if mark > self.training_seconds]
        if over_budget:
            control.should_training_stop = True
        self._since = time.perf_counter()


def at_seconds(points: list[dict], seconds: float, metric: str = "reward") -> float:
    """``metric`` at ``seconds`` of training, linearly between marks; the last mark's value past the end."""
    for before, after in zip(points, points[1:]):
        if after["seconds"] >= seconds:
            share = (seconds - before["seconds"]) / max(after["seconds"] - before["seconds"], 1e-9)
            return before[metric] + share * (after[metric] - before[metric])
    return points[-1][metric]


def seconds_to_reach(points: list[dict], reward: float) -> float | None:
    """Training seconds of the first held-out score at or above ``reward`` (linearly between marks)."""
    for before, after in zip(points, points[1:]):
        if after["reward"] >= reward:
            if before["reward"] >= reward:
                return before["seconds"]
            share = (reward - before["reward"]) / (after["reward"] - before["reward"])
            return before["seconds"] + share * (after["seconds"] - before["seconds"])
    return None


def append_jsonl(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")
