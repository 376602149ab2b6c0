"""Generated problems with train, validation and test splits disjoint by construction.

A problem is a template filled with numbers (and, for word problems, a name and an item). Its split is a function of
its *numbers and answer* alone (a stable hash), never of a seed or a position: the same numbers with the same answer
fall in the same split whatever the template, name or item, so no test problem's text, nor its numbers and answer,
can occur in training or validation. A split of ``size`` problems is drawn from the problem space with ``seed`` until
it holds ``size`` distinct problems of that split; different seeds give different (possibly overlapping) draws of the
same split, never problems of another split. (reasoning-gym draws item i of seed s from ``Random(s + i)``, so two of
its datasets whose seeds differ by less than their sizes are shifted copies of each other: it is not used for splits.)

Two tasks: ``word_problems`` (GSM8K's form: one operation on numbers of two or three digits, in a sentence) and
``arithmetic`` (sums, differences and products, asked bare): both answered as ``gsm8k`` asks (``#### <number>``) and
scored by ``gsm8k.correctness_reward``.
"""

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from datasets import Dataset

from . import gsm8k

SPLITS = {"test": range(0, 2), "validation": range(2, 3), "train": range(3, 20)}  # of 20 buckets: 10%, 5%, 85%
NAMES = ("Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Ivy", "Jack", "Lena", "Max", "Nora", "Omar",
         "Priya", "Sam", "Tara", "Yusuf", "Zoe", "Leo")
ITEMS = ("apples", "stickers", "marbles", "books", "pencils", "cookies", "stamps", "shells", "cards", "coins", "eggs",
         "flowers", "beads", "toy cars", "oranges")


@dataclass(frozen=True)
class Template:
    """``text`` with ``{name}``, ``{item}`` and ``{a}``, ``{b}``, ``{c}`` placeholders; ``numbers`` draws them;
    ``answer`` computes the answer from them (None: this draw has no valid answer, e.g. a negative count)."""

    text: str
    numbers: Callable[[random.Random], tuple[int, ...]]
    answer: Callable[..., int | None]


def _two(low: int, high: int) -> Callable[[random.Random], tuple[int, ...]]:
    return lambda rng: (rng.randint(low, high), rng.randint(low, high))


# One operation each, on numbers of two or three digits: SmolLM2-135M-Instruct answers none of the two-operation
# problems it was shown here (0 of 40 per template, docs/reports/accuracy-race/tasks.md) and some of these; the ranges
# make the space of (numbers, answer) about 40k problems, over 20 times the splits a run reads.
WORD_PROBLEMS = (
    Template("{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?",
             lambda rng: (rng.randint(10, 199), rng.randint(10, 99)), lambda a, b: a + b),
    Template("{name} has {a} {item} and a friend has {b}. How many {item} do they have together?",
             _two(10, 199), lambda a, b: a + b),
    Template("{name} had {a} {item} and gave {b} of them to a friend. How many {item} does {name} have left?",
             lambda rng: (lambda a: (a, rng.randint(10, a - 1)))(rng.randint(20, 199)), lambda a, b: a - b),
    Template("{name} has {a} {item}. A friend has {b} more than {name}. How many {item} does the friend have?",
             lambda rng: (rng.randint(10, 199), rng.randint(10, 99)), lambda a, b: a + b),
    Template("A box holds {a} {item}. {name} fills {b} boxes. How many {item} are in the boxes?",
             lambda rng: (rng.randint(3, 199), rng.randint(2, 12)), lambda a, b: a * b),
    Template("Each pack has {a} {item}. {name} buys {b} packs. How many {item} does {name} buy?",
             lambda rng: (rng.randint(3, 199), rng.randint(2, 12)), lambda a, b: a * b),
    Template("{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?",
             lambda rng: (lambda b, q: (b * q, b))(rng.randint(2, 12), rng.randint(2, 99)), lambda a, b: a // b),
)

# Bare arithmetic of two numbers: sums and differences up to three digits, products by one digit
ARITHMETIC = (
    Template("What is {a} + {b}?", _two(10, 199), lambda a, b: a + b),
    Template("What is {a} - {b}?", lambda rng: (lambda a: (a, rng.randint(10, a - 1)))(rng.randint(20, 199)),
             lambda a, b: a - b),
    Template("What is {a} * {b}?", lambda rng: (rng.randint(10, 199), rng.randint(2, 9)), lambda a, b: a * b),
)

TASKS = {"word_problems": WORD_PROBLEMS, "arithmetic": ARITHMETIC}


def split_of(numbers: tuple[int, ...], answer: int) -> str:
    """The split a problem with these numbers and this answer belongs to, whatever its template and wording."""
    digest = hashlib.sha256(repr((tuple(sorted(numbers)), answer)).encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % 20
    return next(name for name, buckets in SPLITS.items() if bucket in buckets)


def draw(task: str, rng: random.Random) -> dict:
    """One problem of ``task``: its question, answer and numbers."""
    templates = TASKS[task]
    while True:
        template = templates[rng.randrange(len(templates))]
        numbers = template.numbers(rng)
        answer = template.answer(*numbers)
        if answer is None or answer < 0:
            continue
        fill = dict(zip("abc", numbers), name=rng.choice(NAMES), item=rng.choice(ITEMS))
        return {"question": template.text.format(**fill), "answer": answer, "numbers": numbers}


def key(problem: dict) -> tuple:
    """What decides a problem's split: its numbers (in any order) and its answer."""
    return tuple(sorted(problem["numbers"])), problem["answer"]


def problems(task: str, split: str, size: int, seed: int = 0) -> list[dict]:
    """``size`` problems of ``split`` (``"train"``, ``"validation"``, ``"test"``), drawn with ``seed``, no two with the
    same numbers and answer (the same calculation in other words would count twice)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}.")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}.")
    rng = random.Random(f"{task}/{split}/{seed}")
    chosen, seen = [], set()
    for _ in range(200 * size + 10_000):
        problem = draw(task, rng)
        if key(problem) in seen or split_of(problem["numbers"], problem["answer"]) != split:
            continue
        seen.add(key(problem))
        chosen.append(problem)
        if len(chosen) == size:
            return chosen
    raise ValueError(f"the {task} problem space holds fewer than {size} distinct {split} problems.")


def dataset(task: str, split: str, size: int, seed: int = 0, style: str = "final_answer") -> Dataset:
    """The prompts (a user turn asking for ``#### <number>``) and answers of ``problems(task, split, size, seed)``."""
    chosen = problems(task, split, size, seed)
    return gsm8k.to_prompts([p["question"] for p in chosen], [str(p["answer"]) for p in chosen], style)
