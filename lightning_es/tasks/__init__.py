"""Tasks used by the recipes: data generation and reward functions with TRL's signature.

Reward functions take ``completions`` (strings, or lists of chat messages) plus dataset columns as keyword arguments
and return one float per completion, as TRL calls them; they import nothing from TRL.
"""

from .text import completion_text

__all__ = ["completion_text"]
