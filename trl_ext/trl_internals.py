"""The TRL names ``ESTrainer`` relies on beyond TRL's documented API, checked when ``trl_ext`` is imported.

``ESTrainer`` subclasses ``GRPOTrainer`` and drives its generation and reward code directly (``trl_adapter``): a TRL
release that renames one of these names would otherwise fail deep inside the first training step (an AttributeError,
or worse a process left waiting in a collective). ``check_trl()`` fails at import instead, naming the installed TRL
version, every missing name and the range of TRL releases lightning-es is tested with.

What is checked, and how:

- ``MODULE_NAMES``: names imported from TRL modules (public ones, and TRL's internal helpers), and the module global
  ``gather`` that ``trl_adapter`` replaces in ``trl.trainer.grpo_trainer``: looked up on the module.
- ``METHODS``: ``GRPOTrainer`` methods ES calls, with the positional parameters it passes: looked up on the class,
  their signature read with ``inspect.signature``.
- ``INSTANCE_ATTRIBUTES``: attributes ``GRPOTrainer.__init__`` sets on the trainer, which ES reads, replaces or fills.
  They do not exist on the class, and making an instance needs a model, so they are checked in TRL's source: each must
  be assigned (``self.<name> = ...``) somewhere in the source of a TRL class of ``GRPOTrainer``'s bases (whichever
  method TRL moves the assignment to), or be a class attribute (a property). Reading the source at import costs a few
  tens of milliseconds and reports a rename before a model is loaded; a runtime check after ``__init__`` would report
  it only after the model and datasets were loaded. Where TRL's source cannot be read (an install without ``.py``
  files), that part is skipped with a debug log: the names are then only found missing at run time.

The ``_generate`` result's order (prompt ids, completion ids, tool mask, completions, ...) is not checked here: a
change there is a change of meaning that no name check sees, and the swap tests (tests/test_swap.py) are what catch it.
"""

import ast
import importlib
import inspect
import logging
import textwrap
import warnings

logger = logging.getLogger(__name__)

# The trl requirement in pyproject.toml (tests/test_trl_internals.py keeps the two equal): every 1.x from the oldest
# that has the internals below, so that a user on a newer TRL can install lightning-es beside it; the check at import
# refuses one that lacks a name. TESTED: the releases the swap tests ran against (README, "Versions"); a release
# outside it that passes the check gets a warning.
SUPPORTED = ">=1.14,<2"
TESTED = ">=1.14,<1.17"

# (module, name): why ESTrainer needs it
MODULE_NAMES = {
    ("trl", "GRPOConfig"): "ESConfig extends it (trl_ext.config, trl_ext.grpo_fields)",
    ("trl", "GRPOTrainer"): "ESTrainer subclasses it (trl_ext.trainer)",
    ("trl", "TrlParser"): "the recipes parse their command lines with it (trl_ext.recipes)",
    ("trl.trainer.utils", "identity"): "the data loader's collate function, and the no-op gather during scoring",
    ("trl.trainer.utils", "get_callable_name"): "reward functions are named as GRPO names them (reward_checks)",
    ("trl.trainer.utils", "is_async_callable"): "async reward functions are told apart as GRPO does (reward_checks)",
    ("trl.trainer.grpo_trainer", "gather"): "replaced by a no-op while members are scored, so that the rewards "
                                            "GRPOTrainer._calculate_rewards computes stay on this process",
}

# GRPOTrainer method: (the positional parameters ES passes after self, why ESTrainer needs it)
METHODS = {
    "_generate": (("prompts",), "generates each population member's completions (trl_adapter._score)"),
    "_calculate_rewards": (("inputs", "prompts", "completions", "completion_ids_list"),
                           "calls the reward functions as GRPO does on each member's completions (trl_adapter._score)"),
}

# attribute GRPOTrainer.__init__ sets: why ESTrainer needs it
INSTANCE_ATTRIBUTES = {
    "_metrics": "TRL's buffer of logged metrics: ES fills it with GRPO's reward metrics and its own (logs, callbacks)",
    "_logs": "TRL's completion table (log_completions): ES resizes it and fills it with every member's rows",
    "_pending_extra_logs": "what reward functions give log_extra: read and cleared after each member's scoring",
    "_pending_metrics": "what reward functions give log_metric: read and cleared after each member's scoring",
    "_tokenizer": "the tokenizer of processing_class: its pad token ends a completion and pads the KL passes",
    "eos_token_ids": "the end-of-sequence tokens: a completion ending otherwise is truncated",
    "reward_weights": "the reward functions' weights in a member's fitness",
    "reward_func_names": "the reward functions' names in the logged metrics and the completion table",
    "num_generations": "completions per prompt and member",
    "generation_kwargs": "the decoding settings: ES's greedy members override them",
    "generation_config": "the decoding settings: ES's greedy members override them",
    "log_completions": "whether to fill the completion table",
    "temperature": "the sampling temperature of the members' KL to the reference",
    "shuffle_dataset": "whether ES's data loader shuffles the prompts",
}


class UnsupportedTRLError(ImportError):
    """The installed TRL lacks names ``ESTrainer`` relies on."""


def installed_trl_version() -> str:
    try:
        return importlib.import_module("trl").__version__
    except Exception:  # noqa: BLE001 - trl not importable, or without a version: the names' check says the rest
        try:
            from importlib.metadata import version

            return version("trl")
        except Exception:  # noqa: BLE001
            return "unknown"


def _assigned_self_attributes(source: str) -> set[str]:
    """Every NAME of ``self.NAME = ...`` (also augmented, annotated and tuple targets) in a class's source."""
    names = set()
    for node in ast.walk(ast.parse(textwrap.dedent(source))):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        stack = list(targets)
        while stack:
            target = stack.pop()
            if isinstance(target, (ast.Tuple, ast.List)):
                stack.extend(target.elts)
            elif isinstance(target, ast.Starred):
                stack.append(target.value)
            elif (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                  and target.value.id == "self"):
                names.add(target.attr)
    return names


def trl_assigned_attributes(trainer_class) -> set[str] | None:
    """The attributes the TRL classes among ``trainer_class``'s bases assign on ``self``; None where their source
    cannot be read."""
    names = set()
    for cls in trainer_class.__mro__:
        if not cls.__module__.split(".")[0] == "trl":
            continue
        try:
            names |= _assigned_self_attributes(inspect.getsource(cls))
        except (OSError, TypeError, SyntaxError) as error:
            logger.debug("lightning-es: cannot read the source of %s (%s): its instance attributes are not checked "
                         "at import.", cls.__qualname__, error)
            return None
    return names


def missing_trl_names() -> list[tuple[str, str]]:
    """Each name ESTrainer relies on that the installed TRL lacks, with why it is needed (empty: all there)."""
    missing = []
    for (module_name, name), why in MODULE_NAMES.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append((f"{module_name} (the module)", why))
            continue
        if not hasattr(module, name):
            missing.append((f"{module_name}.{name}", why))
    try:
        from trl import GRPOTrainer
    except ImportError:
        return missing  # reported above
    for name, (parameters, why) in METHODS.items():
        method = getattr(GRPOTrainer, name, None)
        if not callable(method):
            missing.append((f"GRPOTrainer.{name}", why))
            continue
        try:
            signature = inspect.signature(method)
        except (TypeError, ValueError):
            continue
        positional = [p.name for p in signature.parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]  # without self
        takes_any = any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values())
        required = [p for p in list(signature.parameters.values())[1:] if p.default is p.empty
                    and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if (len(positional) < len(parameters) and not takes_any) or len(required) > len(parameters):
            missing.append((f"GRPOTrainer.{name}({', '.join(parameters)})",
                            f"{why}; this TRL's takes ({', '.join(positional)})"))
    assigned = trl_assigned_attributes(GRPOTrainer)
    if assigned is not None:
        for name, why in INSTANCE_ATTRIBUTES.items():
            if name not in assigned and not hasattr(GRPOTrainer, name):
                missing.append((f"GRPOTrainer instance attribute self.{name}", why))
    return missing


def _in_tested_range(version: str) -> bool | None:
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        return Version(version) in SpecifierSet(TESTED, prereleases=True)
    except Exception:  # noqa: BLE001 - no packaging, or an unparsable version: say nothing
        return None


def check_trl() -> None:
    """Raise ``UnsupportedTRLError`` naming the installed TRL version, each missing name and the supported range
    when the installed TRL lacks a name ESTrainer relies on; warn when it has them all but is outside that range."""
    version = installed_trl_version()
    missing = missing_trl_names()
    if missing:
        lines = "\n".join(f"  - {name}: {why}" for name, why in missing)
        raise UnsupportedTRLError(
            f"lightning-es cannot use the installed TRL {version}: it lacks {len(missing)} TRL internal(s) that "
            f"ESTrainer relies on:\n{lines}\nlightning-es supports trl{SUPPORTED}; install a release in that range "
            f"(pip install 'trl{SUPPORTED}').")
    if _in_tested_range(version) is False:
        warnings.warn(
            f"lightning-es is tested with trl{TESTED}; the installed TRL {version} has every TRL internal "
            f"ESTrainer relies on, but was not tested.", stacklevel=2)
