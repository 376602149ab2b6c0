"""Reward functions wrapped so that a failure names the function (the population loop adds the step and member).

TRL turns ``None`` into NaN before the trainer sees the rewards, so a NaN *returned* by a reward function (a float,
``numpy.float32('nan')``, a 0-d tensor) would pass unnoticed as "no reward"; it is caught here, while ``None`` keeps
TRL's meaning.
"""

import functools
import math
from collections.abc import Callable

from trl.trainer.utils import get_callable_name, is_async_callable


class RewardFunctionError(RuntimeError):
    pass


def check_rewards(name: str, rewards, expected: int) -> None:
    if not hasattr(rewards, "__len__"):
        raise RewardFunctionError(
            f"reward function {name!r} returned {type(rewards).__name__}; "
            f"it must return a list of {expected} floats (or None), one per completion."
        )
    if len(rewards) != expected:
        raise RewardFunctionError(
            f"reward function {name!r} returned {len(rewards)} rewards, expected {expected}: "
            "return exactly one reward per completion."
        )
    for i, reward in enumerate(rewards):
        if reward is None:
            continue
        try:
            value = float(reward)  # Python, numpy and 0-d torch numbers alike
        except (TypeError, ValueError):
            raise RewardFunctionError(
                f"reward function {name!r} returned {reward!r} ({type(reward).__name__}) for completion {i}: return a "
                "number, or None to leave that completion unscored."
            ) from None
        if math.isnan(value):
            raise RewardFunctionError(
                f"reward function {name!r} returned NaN for completion {i}: return a finite number, "
                "or None to leave that completion unscored."
            )


def checked_reward_function(func: Callable) -> Callable:
    """Wrap ``func`` (sync or async) so that it raises ``RewardFunctionError`` with its name."""
    name = get_callable_name(func)

    def failure(error: Exception) -> RewardFunctionError:
        return RewardFunctionError(f"reward function {name!r} raised {type(error).__name__}: {error}")

    if is_async_callable(func):

        async def checked(*args, **kwargs):
            try:
                rewards = await func(*args, **kwargs)
            except Exception as error:
                raise failure(error) from error
            check_rewards(name, rewards, len(kwargs["prompts"]))
            return rewards

    else:

        def checked(*args, **kwargs):
            try:
                rewards = func(*args, **kwargs)
            except Exception as error:
                raise failure(error) from error
            check_rewards(name, rewards, len(kwargs["prompts"]))
            return rewards

    functools.update_wrapper(checked, func, assigned=("__module__", "__doc__"), updated=())
    checked.__name__ = checked.__qualname__ = name
    return checked
