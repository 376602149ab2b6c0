"""GSM8K: grade-school word problems whose reference answer ends with ``#### <number>``."""

import re
from pathlib import Path
from fractions import Fraction

from datasets import Dataset

from .text import completion_text

INSTRUCTIONS = {
    "step_by_step": "Solve the problem step by step. End with the final answer on its own line as '#### <number>'.",
    "final_answer": "Reply with the final answer only, in the form '#### <number>', and nothing else.",
    # the calculation written out, in a few tokens: SmolLM2-135M-Instruct answers one-operation word problems about
    # as often as step by step in 64 tokens, at a quarter of the tokens (docs/reports/accuracy-race/tasks.md)
    "one_line": "Answer in one line: the calculation with its result, then '#### ' and the number.",
}
# two worked problems, shown to a base model before each question (``prompts_for``): answered as each style asks
_SHOWN = (
    ("Tom has 3 boxes with 4 pens in each box. How many pens does he have?", "Tom has 3 * 4 = 12 pens.", "12"),
    ("A shop sold 15 apples in the morning and 9 in the afternoon. How many apples did it sell?",
     "It sold 15 + 9 = 24 apples.", "24"),
)
NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?"
_FINAL = re.compile(r"####\s*(" + NUMBER + ")")
_ANY_NUMBER = re.compile(NUMBER)
OFFLINE = "GSM8K-style problems generated offline by reasoning-gym's gsm_symbolic"


def parse_number(text: str) -> Fraction | None:
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def final_answer(text: str) -> Fraction | None:
    """The number after the last ``####``; failing that, the last number in the text; None if there is none."""
    marked = _FINAL.findall(text)
    candidates = marked or _ANY_NUMBER.findall(text)
    return parse_number(candidates[-1]) if candidates else None


def reference_answer(answer: str) -> Fraction:
    """The number of a GSM8K reference (``"... #### 1,234"``) or of a bare number string."""
    number = final_answer(answer)
    if number is None:
        raise ValueError(f"GSM8K reference answer {answer!r} holds no number.")
    return number


def correctness_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion's final number equals the reference answer, else 0.0."""
    return [
        float(final_answer(completion_text(c)) == reference_answer(a)) for c, a in zip(completions, answer, strict=True)
    ]


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 when the completion marks a final number with ``####``, as the instruction asks."""
    return [float(bool(_FINAL.search(completion_text(c)))) for c in completions]


def demonstrations(style: str = "step_by_step") -> list[tuple[str, str]]:
    """(question, answer) pairs answered as ``style`` asks, for a base model (``prompts_for``)."""
    if style not in INSTRUCTIONS:
        raise ValueError(f"answer_style must be one of {sorted(INSTRUCTIONS)}, got {style!r}.")
    shown = {"step_by_step": "{steps}\n#### {answer}", "one_line": "{steps} #### {answer}", "final_answer": "#### {answer}"}
    return [(f"{question}\n{INSTRUCTIONS[style]}", shown[style].format(steps=steps, answer=answer))
            for question, steps, answer in _SHOWN]


def to_prompts(questions: list[str], answers: list[str], style: str = "step_by_step") -> Dataset:
    if style not in INSTRUCTIONS:
        raise ValueError(f"answer_style must be one of {sorted(INSTRUCTIONS)}, got {style!r}.")
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"{q}\n{INSTRUCTIONS[style]}"}] for q in questions],
            "answer": [str(reference_answer(a)) for a in answers],
        }
    )


def from_rows(dataset, source: str, style: str = "step_by_step") -> Dataset:
    missing = {"question", "answer"} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"{source} lacks the GSM8K columns {sorted(missing)} (it has {dataset.column_names}); "
            "a GSM8K copy needs 'question' and 'answer' ('... #### <number>')."
        )
    return to_prompts(dataset["question"], dataset["answer"], style)


def generate_offline(size: int, seed: int, style: str = "step_by_step") -> Dataset:
    """GSM8K-style problems with exact answers from reasoning-gym's GSM8K templates (no download)."""
    import reasoning_gym

    problems = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
    dataset = to_prompts([p["question"] for p in problems], [p["answer"] for p in problems], style)
    dataset.info.description = OFFLINE
    return dataset


def task_name(dataset: Dataset) -> str:
    """What a recipe calls the problems it reports on: GSM8K, or the offline stand-in when the hub was unreachable."""
    return "GSM8K-style (reasoning-gym)" if dataset.info.description == OFFLINE else "GSM8K"


def load_splits(
    dataset_name: str = "openai/gsm8k",
    dataset_config: str = "main",
    dataset_path: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    train_size: int = 256,
    eval_size: int = 48,
    seed: int = 0,
    style: str = "step_by_step",
) -> tuple[Dataset, Dataset]:
    """(train, held-out) prompt datasets: from a local copy, else the hub, else generated offline."""
    from datasets import load_dataset, load_from_disk

    from .models import hub_reachable

    source = dataset_path or dataset_name
    if dataset_path:
        if not Path(dataset_path).exists():
            raise FileNotFoundError(f"dataset_path {dataset_path} does not exist.")
        is_saved = (Path(dataset_path) / "dataset_dict.json").exists()
        splits = load_from_disk(dataset_path) if is_saved else load_dataset(dataset_path)
    else:
        try:
            if not hub_reachable():
                raise ConnectionError("the hub is unreachable")
            splits = load_dataset(dataset_name, dataset_config)
        except (ConnectionError, OSError) as error:
            print(f"GSM8K not readable from {source!r} ({error}); using GSM8K-style problems generated offline by "
                  "reasoning-gym.")
            return (
                generate_offline(train_size, seed=seed, style=style),
                generate_offline(eval_size, seed=seed + 1_000_003, style=style),
            )
    train = from_rows(splits[train_split], f"{source}[{train_split}]", style)
    test = from_rows(splits[test_split], f"{source}[{test_split}]", style)
    return (
        train.shuffle(seed=seed).select(range(min(train_size, len(train)))),
        test.select(range(min(eval_size, len(test)))),
    )
