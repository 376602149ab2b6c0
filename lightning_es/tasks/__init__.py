"""What the recipes train on: tasks, the embedded model, and greedy held-out evaluation.

- ``gsm8k``, ``countdown``: data generation and reward functions with TRL's signature (``completions`` plus dataset
  columns as keyword arguments, one float per completion); they import nothing from TRL;
- ``probes``: off-task prompts for drift measurements;
- ``models``: a hub id, a local folder, or the embedded SmolLM2-135M-Instruct;
- ``evaluation``: greedy task scores of a causal LM, shared across processes.
"""

from .text import completion_text

__all__ = ["completion_text"]
