"""Which parameters evolve."""

import re
from collections.abc import Iterable, Mapping, Sequence

import torch

EVOLVABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def require_every(names: Iterable[str], given: Mapping, what: str) -> None:
    """Raise a KeyError naming the evolved tensors of ``names`` that ``given`` (``what``) lacks."""
    missing = set(names) - set(given)
    if missing:
        raise KeyError(f"{what} lack {len(missing)} evolved tensors, e.g. {sorted(missing)[:3]}.")


def select_parameters(model: torch.nn.Module, es_params: str | Sequence[str] | None = None) -> dict[str, torch.nn.Parameter]:
    """Pick the parameters ES perturbs and updates.

    ``None`` (default): every parameter with ``requires_grad``, which for a PEFT model means its adapters.
    ``"all"``: every parameter, frozen or not. ``"lora"``: the LoRA adapter weights of a PEFT model.
    Any other string, or a list of strings: regular expressions; a parameter evolves if its name matches one.
    """
    named = list(model.named_parameters())
    if es_params is None:
        selected = {n: p for n, p in named if p.requires_grad}
    elif es_params == "all":
        selected = dict(named)
    elif es_params == "lora":
        selected = {n: p for n, p in named if "lora_" in n}
    else:
        patterns = [es_params] if isinstance(es_params, str) else list(es_params)
        compiled = [re.compile(pattern) for pattern in patterns]
        selected = {n: p for n, p in named if any(c.search(n) for c in compiled)}
    if not selected:
        example = ", ".join(n for n, _ in named[:3])
        raise ValueError(
            f"es_params={es_params!r} selects no parameter of {type(model).__name__}. "
            f"Use None (all trainable), 'all', 'lora', or regular expressions matching names such as: {example}."
        )
    for name, p in selected.items():
        if p.dtype not in EVOLVABLE_DTYPES:
            raise ValueError(
                f"{name} is stored as {p.dtype} ({type(p).__name__}): ES perturbs and updates weights in "
                f"{', '.join(str(d).removeprefix('torch.') for d in EVOLVABLE_DTYPES)} only, and cannot evolve quantized "
                "weights. Evolve LoRA adapters over the quantized model (peft_config, es_params='lora'), leave these "
                "weights out with es_params, or load the model unquantized."
            )
    return selected
