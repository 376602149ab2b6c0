"""Every error or warning message that names a field or argument names one that exists.

The test walks every ``.py`` file under ``lightning_es/`` and ``trl_ext/`` with ``ast``, takes the message strings of
``raise X(...)`` and of ``warnings.warn(...)``/``warn(...)``/``<logger>.warning|info|error(...)`` calls, extracts the
names they mention and checks them against the names users can actually set.

What is a message's text (``collect_messages``):

- string constants, implicit concatenations, strings joined by ``+``, ``%``-templates (``"..." % args`` and a
  logger's first argument) and ``"...".format(...)`` templates, with each placeholder replaced by ``PLACEHOLDER``;
- f-strings: their constant parts, each ``{value}`` replaced by ``PLACEHOLDER`` (so ``f"sigma={x!r}"`` keeps
  ``sigma=``), except a ``{NAME}`` whose NAME is assigned a string in the enclosing function or at module level
  (``WAY_OUT = "..."``): its text is inlined; a bare NAME passed as the message (``raise ValueError(message)``) is
  resolved the same way;
- ``a if c else b``: both branches; anything else (``", ".join(...)``, attributes) is a placeholder.

Which names a message mentions (``mentioned_names``):

1. ``name=``: an identifier of lower-case letters, digits and ``_`` directly followed by ``=`` (not by another ``=``,
   so ``==`` is skipped; ``!=``, ``<=``, ``>=`` and ``+=`` have no identifier right before the ``=``). A placeholder
   before ``=`` (``f"{name}={value}"``) names nothing we can check.
2. Code examples of other APIs are skipped: the argument list of a call written ``something.method(...)`` whose
   ``method`` starts with a lower-case letter (``dataset.rename_column(...)``, ``torch.load(..., weights_only=...)``)
   is blanked out before rule 1. Calls of a bare name (``ESStrategy(...)``, ``Trainer(...)``) and dotted calls of a
   class (``lightning_es.ESStrategy(...)``) are checked.
3. ```name```: an identifier between single or double backticks.
4. Names next to an integration's class are checked against *that integration's own names only* (``scopes()``:
   ``ESConfig``'s fields; the keyword arguments ``ESStrategy`` accepts), because they tell the user
   of that class what to set, and a name that merely exists somewhere else (the engine's ``EvolutionStrategy(lr=...)``)
   is still wrong there. "Next to" means exactly one of:

   - ``ESConfig.name`` (an attribute);
   - ``name=`` inside ``ESConfig(...)`` (the call's parentheses);
   - ``name (ESConfig)`` or ``name (ESConfig's field...`` (also ``argument``, ``parameter``, ``knob``) right after
     the name; not any parenthesis that opens with the class: "as it was trained (ESConfig's defaults ..." is prose;
   - ``name=`` in the clause that starts at ``ESConfig's`` and ends at the next ``;``, ``)``, end of a sentence
     (``.`` then a space or the end) or the end of the message (``"ESStrategy's: sigma=1e-3, lr=5e-7"``).

   The innermost of these regions decides the scope of a ``name=``. When ``ESStrategy.__init__`` takes ``**kwargs``,
   its scope also holds the fields of the engine's ``...Settings`` dataclass (its ES knobs) and ``DDPStrategy``'s
   parameters (where the rest of the keyword arguments go).

Every other name must be in ``known_names()``: the fields of ``trl_ext.ESConfig`` (with GRPOConfig's and
TrainingArguments'), the parameters of ``ESStrategy.__init__``, ``DDPStrategy.__init__``, Lightning's
``Trainer.__init__``, ``ESTrainer.__init__``, the engine's public classes and functions
(``lightning_es.engine.__all__``) and the fields of an engine ``...Settings`` dataclass if the engine has one, the
DeepSpeed keys of ``DEEPSPEED_KEYS``, the public names themselves (``ESConfig``, ``EvolutionStrategy``, ...) and
``ALLOWED``: names that are not arguments but are legitimate in a message, each with its reason.
"""

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lightning_es", "trl_ext")
PLACEHOLDER = "\x00"  # stands for a value the message computes; never part of an identifier

LOG_METHODS = {"warning", "info", "error"}
DEEPSPEED_KEYS = {"zero_optimization", "stage", "optimizer", "scheduler", "train_micro_batch_size_per_gpu"}
ALLOWED = {  # names that are not arguments of ours but are legitimate in a message
    "do_sample": "a transformers GenerationConfig field (sampling vs greedy decoding)",
    "dtype": "a tensor's attribute, and the from_pretrained argument",
    "gguf": "a PyPI package name (`pip install gguf`)",
    "dataset_name": "TRL's ScriptArguments field, the GSM8K recipes' --dataset_name flag",
}

NAME = r"[a-z_][a-z0-9_]*"
CLASS_NAMES = ("ESConfig", "ESStrategy")


# --- the walker -------------------------------------------------------------------------------------------------------


_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[diouxXeEfFgGcrsa]")
_BRACES = re.compile(r"\{[^{}]*\}")


def _percent_template(text: str) -> str:
    return _PERCENT.sub(PLACEHOLDER, text).replace("%%", "%")


def _string_assignments(scope: ast.AST) -> dict[str, list[ast.expr]]:
    """``NAME = <expr>`` assignments in ``scope`` (a module's top level, or a whole function body)."""
    nodes = scope.body if isinstance(scope, ast.Module) else ast.walk(scope)
    found: dict[str, list[ast.expr]] = {}
    for node in nodes:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name):
                found.setdefault(target.id, []).append(value)
    return found


class _Texts:
    """Turns a message expression into text, resolving names through the enclosing scopes' assignments."""

    def __init__(self, scopes: list[dict[str, list[ast.expr]]]):
        self.scopes = scopes  # innermost first, the module last

    def resolve(self, name: str, seen: frozenset[str]) -> str:
        if name in seen:
            return PLACEHOLDER
        for scope in self.scopes:
            if name in scope:
                texts = [self.text(value, seen | {name}) for value in scope[name]]
                return PLACEHOLDER.join(texts)
        return PLACEHOLDER

    def text(self, node: ast.expr, seen: frozenset[str] = frozenset()) -> str:
        if isinstance(node, ast.Constant):
            return node.value if isinstance(node.value, str) else PLACEHOLDER
        if isinstance(node, ast.JoinedStr):
            parts = []
            for value in node.values:
                if isinstance(value, ast.Constant):
                    parts.append(str(value.value))
                elif isinstance(value, ast.FormattedValue) and isinstance(value.value, ast.Name):
                    parts.append(self.resolve(value.value.id, seen))
                else:
                    parts.append(PLACEHOLDER)
            return "".join(parts)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self.text(node.left, seen) + self.text(node.right, seen)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
            return _percent_template(self.text(node.left, seen))
        if isinstance(node, ast.IfExp):
            return self.text(node.body, seen) + PLACEHOLDER + self.text(node.orelse, seen)
        if isinstance(node, ast.Name):
            return self.resolve(node.id, seen)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"
                and isinstance(node.func.value, (ast.Constant, ast.JoinedStr, ast.BinOp))):
            return _BRACES.sub(PLACEHOLDER, self.text(node.func.value, seen))
        return PLACEHOLDER


def _is_logger(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and (node.id.lower().endswith("logger") or node.id.lower() in {"log", "_log"})


def _message_arguments(node: ast.AST) -> tuple[list[ast.expr], bool] | None:
    """The message expressions of a ``raise``/warning call, and whether they are ``%``-templates; None otherwise."""
    if isinstance(node, ast.Raise):
        if isinstance(node.exc, ast.Call):
            return list(node.exc.args) + [k.value for k in node.exc.keywords if k.arg in {"msg", "message"}], False
        return None
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    first = node.args[:1] or [k.value for k in node.keywords if k.arg in {"msg", "message"}][:1]
    if isinstance(func, ast.Name) and func.id == "warn":
        return first, False
    if isinstance(func, ast.Attribute):
        if func.attr == "warn" and isinstance(func.value, ast.Name) and func.value.id == "warnings":
            return first, False
        if func.attr in LOG_METHODS and _is_logger(func.value):
            return first, True
    return None


def collect_messages(source: str, path: str = "<string>") -> list[tuple[str, int, str]]:
    """``(path, line, text)`` of every ``raise``/warning message in ``source``."""
    tree = ast.parse(source)
    messages: list[tuple[str, int, str]] = []
    module_scope = _string_assignments(tree)

    def visit(node: ast.AST, scopes: list[dict[str, list[ast.expr]]]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            scopes = [_string_assignments(node), *scopes]
        found = _message_arguments(node)
        if found is not None:
            arguments, percent = found
            texts = _Texts(scopes)
            for argument in arguments:
                text = texts.text(argument)
                if percent:
                    text = _percent_template(text)
                if text.strip(PLACEHOLDER).strip():
                    messages.append((path, node.lineno, text))
        for child in ast.iter_child_nodes(node):
            visit(child, scopes)

    visit(tree, [module_scope])
    return messages


def source_messages() -> list[tuple[str, int, str]]:
    messages = []
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            messages += collect_messages(file.read_text(), str(file.relative_to(ROOT)))
    return messages


# --- the names a message mentions ------------------------------------------------------------------------------------


_CLASS = "|".join(CLASS_NAMES)
_NAME_EQUALS = re.compile(rf"\b({NAME})=(?!=)")
_BACKTICKED = re.compile(r"(?<!`)``?([A-Za-z_][A-Za-z0-9_]*)``?(?!`)")
_ATTRIBUTE = re.compile(rf"\b({_CLASS})\.({NAME})\b")
_NAME_THEN_CLASS = re.compile(rf"\b({NAME}) \(({_CLASS})(?:\)|'s (?:field|argument|parameter|knob)\b)")
_CLASS_CALL = re.compile(rf"\b({_CLASS})\(")
_POSSESSIVE = re.compile(rf"\b({_CLASS})'s\b")
_CLAUSE_END = re.compile(r"[;)\n]|\.(?=\s|$)")
_METHOD_CALL = re.compile(r"\.[a-z_][A-Za-z0-9_]*\(")


def _closing(text: str, opening: int) -> int:
    """The index of the ``)`` matching the ``(`` at ``opening`` (the end of the text if there is none)."""
    depth = 0
    for i in range(opening, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return len(text)


def _blank_method_calls(text: str) -> str:
    """Rule 2: the argument lists of ``something.method(...)`` calls, blanked out (same length, so positions hold)."""
    chars = list(text)
    for match in _METHOD_CALL.finditer(text):
        start = match.end() - 1
        for i in range(start + 1, _closing(text, start)):
            chars[i] = " "
    return "".join(chars)


def _scoped_regions(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, class)`` of the ``ESConfig(...)`` calls and ``ESConfig's ...`` clauses in ``text``."""
    regions = []
    for match in _CLASS_CALL.finditer(text):
        regions.append((match.end(), _closing(text, match.end() - 1), match.group(1)))
    for match in _POSSESSIVE.finditer(text):
        end = _CLAUSE_END.search(text, match.end())
        regions.append((match.end(), end.start() if end else len(text), match.group(1)))
    return regions


def mentioned_names(text: str) -> list[tuple[str, str | None, int]]:
    """``(name, scope, position)``: the names ``text`` mentions; ``scope`` is the class whose names it must be among,
    None for any known name."""
    found = []
    regions = _scoped_regions(text)
    for match in _NAME_EQUALS.finditer(_blank_method_calls(text)):
        inside = [r for r in regions if r[0] <= match.start() < r[1]]
        scope = min(inside, key=lambda r: r[1] - r[0])[2] if inside else None
        found.append((match.group(1), scope, match.start()))
    for match in _BACKTICKED.finditer(text):
        found.append((match.group(1), None, match.start(1)))
    for match in _ATTRIBUTE.finditer(text):
        found.append((match.group(2), match.group(1), match.start(2)))
    for match in _NAME_THEN_CLASS.finditer(text):
        found.append((match.group(1), match.group(2), match.start(1)))
    return found


# --- the names that exist --------------------------------------------------------------------------------------------


def _parameters(function) -> set[str]:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return set()
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {p.name for p in parameters if p.name != "self" and p.kind not in variadic}


def _settings_fields() -> set[str]:
    """The fields of the engine's ``...Settings`` dataclass, once it has one (none: an empty set)."""
    import lightning_es.engine as engine

    names = set()
    for value in vars(engine).values():
        if inspect.isclass(value) and value.__name__.endswith("Settings") and dataclasses.is_dataclass(value):
            names |= {field.name for field in dataclasses.fields(value)}
    return names


def _takes_kwargs(function) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(function).parameters.values())


def scopes() -> dict[str, set[str]]:
    from pytorch_lightning.strategies import DDPStrategy

    from lightning_es import ESStrategy
    from trl_ext import ESConfig

    strategy = _parameters(ESStrategy.__init__)
    if _takes_kwargs(ESStrategy.__init__):  # its **kwargs: the engine settings' fields, the rest to DDPStrategy
        strategy |= _settings_fields() | _parameters(DDPStrategy.__init__)
    # ESConfig's fields, and its public attributes (a renamed helper's warning names the old one, which still exists)
    config = {field.name for field in dataclasses.fields(ESConfig)} | {n for n in dir(ESConfig) if not n.startswith("_")}
    return {"ESConfig": config, "ESStrategy": strategy}


def known_names() -> set[str]:
    import pytorch_lightning
    from pytorch_lightning.strategies import DDPStrategy

    import lightning_es.engine as engine
    import lightning_es.lightning.callbacks as lightning_callbacks
    import trl_ext.callbacks as trl_callbacks
    from trl_ext import ESTrainer

    names = set().union(*scopes().values())
    names |= _parameters(DDPStrategy.__init__) | _parameters(pytorch_lightning.Trainer.__init__)
    names |= _parameters(ESTrainer.__init__)
    for callbacks in (trl_callbacks, lightning_callbacks):  # the drift callbacks' messages name their arguments
        names |= _parameters(callbacks.KLDriftCallback.__init__) | _parameters(callbacks.ParameterDriftCallback.__init__)
    names |= {"ESConfig", "ESStrategy", "ESTrainer", *engine.__all__}
    for public in engine.__all__:
        value = getattr(engine, public)
        if inspect.isclass(value):
            names |= _parameters(value.__init__)
        elif inspect.isfunction(value):
            names |= _parameters(value)
    return names | _settings_fields() | DEEPSPEED_KEYS | set(ALLOWED)


def unknown_names(messages, known: set[str], scoped: dict[str, set[str]]) -> list[tuple]:
    """``(path, line, name, scope, excerpt)`` of every mentioned name that does not exist where the message says."""
    offenders = []
    for path, line, text in messages:
        for name, scope, position in mentioned_names(text):
            if name in (scoped[scope] if scope else known):
                continue
            excerpt = text[max(0, position - 50):position + 50].replace(PLACEHOLDER, "{…}").replace("\n", " ")
            offenders.append((path, line, name, scope, excerpt))
    return offenders


# --- the tests -------------------------------------------------------------------------------------------------------


def test_messages_name_existing_fields_and_arguments():
    messages = source_messages()
    assert len(messages) > 100, f"the walker found only {len(messages)} messages: it no longer sees the sources"
    offenders = unknown_names(messages, known_names(), scopes())
    report = "\n".join(
        f"  {path}:{line}: {name!r} ({'not an ' + scope + ' name' if scope else 'unknown'}): ...{excerpt}..."
        for path, line, name, scope, excerpt in offenders
    )
    assert not offenders, f"{len(offenders)} messages name fields or arguments that do not exist:\n{report}"


def test_walker_extracts_names_and_flags_unknown_ones():
    source = '''
import logging, warnings
logger = logging.getLogger(__name__)
HINT = "or pass `es_params`."

def check(x, y):
    if x:
        raise ValueError(f"sigma={x!r} is not positive; " "lr_typo=1e-3 or `es_params` " + "(x == y)")
    if y:
        warnings.warn("use dataset.rename_column(old, new=...) or population_size=" + str(y))
    message = f"rank={y} too small, {HINT}"
    logger.warning("%s=%r: relative_sigma=%g", "a", y, 1.0)
    raise RuntimeError(message)

def clash():
    raise ValueError("ESStrategy's: sigma=1e-3, lr=5e-7; ESConfig's: sigma=1e-2, learning_rate=1e-4. lr=1")
    raise ValueError("es_params (ESConfig) / params (ESStrategy's argument); ESStrategy(seed=..., rank=2) "
                         "ESConfig.typo_field; as trained (ESConfig's defaults)")
'''
    messages = collect_messages(source)
    assert [line for _, line, _ in messages] == [8, 10, 12, 13, 16, 17]
    names = [[(name, scope) for name, scope, _ in mentioned_names(text)] for _, _, text in messages]
    assert names[0] == [("sigma", None), ("lr_typo", None), ("es_params", None)]
    assert names[1] == [("population_size", None)]  # new= is rename_column's, a code example of another API
    assert names[2] == [("relative_sigma", None)]  # "%s=%r" names nothing checkable
    assert names[3] == [("rank", None), ("es_params", None)]  # the message variable and HINT are resolved
    assert names[4] == [("sigma", "ESStrategy"), ("lr", "ESStrategy"), ("sigma", "ESConfig"),
                        ("learning_rate", "ESConfig"), ("lr", None)]
    assert sorted(names[5]) == [("es_params", "ESConfig"), ("params", "ESStrategy"), ("rank", "ESStrategy"),
                                ("seed", "ESStrategy"), ("typo_field", "ESConfig")]

    known = {"sigma", "es_params", "population_size", "relative_sigma", "rank", "learning_rate", "seed", "lr"}
    scoped = {"ESConfig": {"sigma", "es_params", "learning_rate"}, "ESStrategy": {"sigma", "seed", "learning_rate"}}
    flagged = sorted((line, name, scope) for _, line, name, scope, _ in unknown_names(messages, known, scoped))
    assert flagged == [(8, "lr_typo", None), (16, "lr", "ESStrategy"), (17, "params", "ESStrategy"),
                       (17, "rank", "ESStrategy"), (17, "typo_field", "ESConfig")]


if __name__ == "__main__":  # a listing of every message and the names it mentions, to review the rules
    for path, line, text in source_messages():
        print(f"{path}:{line}: {text!r}\n    {[(n, s) for n, s, _ in mentioned_names(text)]}")
    pytest.main([__file__, "-q"])
