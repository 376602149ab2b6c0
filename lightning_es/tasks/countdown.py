"""Countdown: combine the given numbers with + - * / into an expression that equals the target.

Model output is never passed to ``eval``: expressions are parsed with ``ast`` and only integer literals, the four
operations and parentheses are accepted, evaluated exactly with fractions.
"""

import ast
import re
from fractions import Fraction

from datasets import Dataset

from .text import completion_text

MAX_EXPRESSION_LENGTH = 200
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_OPERATIONS = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__, ast.Div: Fraction.__truediv__}


def prompt_text(numbers: list[int], target: int) -> str:
    return (
        f"Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic "
        "operations (+, -, *, /) and each number must be used exactly once. Think briefly, then give the expression "
        "in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
    )


# two solved problems, shown to a base model before each question (``prompts_for``)
DEMONSTRATIONS = [
    (prompt_text([3, 5, 2], 16), "3 + 5 = 8 and 8 * 2 = 16. <answer> (3 + 5) * 2 </answer>"),
    (prompt_text([9, 4, 1], 6), "9 - 4 = 5 and 5 + 1 = 6. <answer> 9 - 4 + 1 </answer>"),
]


class UnsafeExpression(ValueError):
    pass


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATIONS:
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ZeroDivisionError("division by zero")
        return _OPERATIONS[type(node.op)](left, right)
    raise UnsafeExpression(f"{type(node).__name__} is not allowed in a Countdown expression")


def evaluate_expression(expression: str) -> tuple[Fraction, list[int]]:
    """Value of an arithmetic expression and the integers it uses; raises ValueError for anything else."""
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise UnsafeExpression(f"expression longer than {MAX_EXPRESSION_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as error:
        raise UnsafeExpression(f"not an expression: {error.msg}") from error
    used: list[int] = []
    return _evaluate(tree, used), used


def extract_answer(text: str) -> str | None:
    found = _ANSWER.findall(text)
    return found[-1].strip() if found else None


def correctness_reward(completions, numbers, target, **kwargs) -> list[float]:
    """1.0 when the answer uses every given number exactly once and equals the target, else 0.0."""
    rewards = []
    for completion, available, goal in zip(completions, numbers, target, strict=True):
        expression = extract_answer(completion_text(completion))
        try:
            value, used = evaluate_expression(expression) if expression else (None, [])
        except (ValueError, ZeroDivisionError):
            value, used = None, []
        rewards.append(float(value == goal and sorted(used) == sorted(available)))
    return rewards


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 when the completion gives its answer in <answer> </answer> tags."""
    return [float(extract_answer(completion_text(c)) is not None) for c in completions]


def generate(size: int, seed: int, min_numbers: int = 3, max_numbers: int = 4, max_target: int = 100) -> Dataset:
    """Countdown instances from reasoning-gym's generator (its scorer is not used: it evaluates with sympy)."""
    import reasoning_gym

    problems = reasoning_gym.create_dataset(
        "countdown", size=size, seed=seed, min_numbers=min_numbers, max_numbers=max_numbers, min_target=10,
        max_target=max_target, min_value=1, max_value=max_target,
    )
    numbers = [p["metadata"]["numbers"] for p in problems]
    targets = [p["metadata"]["target"] for p in problems]
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": prompt_text(n, t)}] for n, t in zip(numbers, targets)],
            "numbers": numbers,
            "target": targets,
        }
    )
