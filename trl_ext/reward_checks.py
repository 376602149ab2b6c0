"""Reward functions wrapped so that a failure names the function and the step.

TRL turns ``None`` into NaN before the trainer sees the rewards, so a NaN *returned* by a reward function would pass
unnoticed as "no reward"; it is caught here, while ``None`` keeps TRL's meaning.
"""

import functools
import math
from collections.abc import Callable

from trl.trainer.utils import get_callable_name, is_async_callable


class RewardFunctionError(RuntimeError):
    pass


def check_rewards(name: str, rewards, expected: int, step: int) -> None:
    if not hasattr(rewards, "__len__"):
        raise RewardFunctionError(
            f"reward function {name!r} returned {type(rewards).__name__} at step {step}; "
            f"it must return a list of {expected} floats (or None), one per completion."
        )
    if len(rewards) != expected:
        raise RewardFunctionError(
            f"reward function {name!r} returned {len(rewards)} rewards at step {step}, expected {expected}: "
            "return exactly one reward per completion."
        )
    for i, reward in enumerate(rewards):
        if reward is not None and isinstance(reward, float | int) and math.isnan(reward):
            raise RewardFunctionError(
                f"reward function {name!r} returned NaN for completion {i} at step {step}: return a finite number, "
                "or None to leave that completion unscored."
            )


def checked_reward_function(func: Callable, step_of: Callable[[], int]) -> Callable:
    """Wrap ``func`` (sync or async) so that it raises ``RewardFunctionError`` with its name and the step."""
    name = get_callable_name(func)

    def failure(error: Exception) -> RewardFunctionError:
        return RewardFunctionError(f"reward function {name!r} raised {type(error).__name__} at step {step_of()}: {error}")

    if is_async_callable(func):

        async def checked(*args, **kwargs):
            try:
                rewards = await func(*args, **kwargs)
            except Exception as error:
                raise failure(error) from error
            check_rewards(name, rewards, len(kwargs["prompts"]), step_of())
            return rewards

    else:

        def checked(*args, **kwargs):
            try:
                rewards = func(*args, **kwargs)
            except Exception as error:
                raise failure(error) from error
            check_rewards(name, rewards, len(kwargs["prompts"]), step_of())
            return rewards

    functools.update_wrapper(checked, func, assigned=("__module__", "__doc__"), updated=())
    checked.__name__ = checked.__qualname__ = name
    return checked
