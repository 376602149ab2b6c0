"""Knobs renamed to their one name (``engine.settings``) keep their old names for one release, with a warning."""

import warnings
from collections.abc import Mapping


def take_renamed(given: dict, renamed: Mapping[str, str], owner: str, **values) -> dict:
    """``values`` (the new names' arguments) with each old name in ``given`` moved to its new name, after a
    ``FutureWarning`` that names both; any other name in ``given`` is a TypeError, as Python would raise."""
    unknown = sorted(set(given) - set(renamed))
    if unknown:
        raise TypeError(f"{owner} got unexpected keyword arguments {unknown}.")
    for old, value in given.items():
        new = renamed[old]
        warnings.warn(f"{owner}({old}=...) is renamed {new}=...; {old}= is accepted until the next release.",
                      FutureWarning, stacklevel=3)
        values[new] = value
    return values
