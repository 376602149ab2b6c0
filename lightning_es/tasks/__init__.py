"""What the recipes train on: tasks, the embedded model, and greedy held-out evaluation.

- ``gsm8k``, ``countdown``: data generation and reward functions with TRL's signature (``completions`` plus dataset
  columns as keyword arguments, one float per completion); they import nothing from TRL;
- ``probes``: off-task prompts for drift measurements;
- ``models``: a hub id, a local folder, or an embedded model (SmolLM2-135M-Instruct, Gemma-3-270M);
- ``text``: prompts and completions in TRL's two formats; ``prompts_for`` asks a model without a chat template;
- ``evaluation``: greedy task scores of a causal LM, shared across processes;
- ``spread``: mean ± standard deviation over seeds, for the reports.
"""

from .text import as_question, completion_text, prompts_for

__all__ = ["as_question", "completion_text", "prompts_for"]
