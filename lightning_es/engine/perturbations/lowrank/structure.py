"""What the model's structure says about the evolved parameters: which module holds each (``parameter_owners``),
how each module is hooked (a linear layer, an embedding lookup, or any other module re-evaluated per member) and which
cannot be (``check_hookable``), and which linear layers read one input (``InputGroups``). Fixed when the perturbation
is built; nothing here runs while the model computes."""

from collections import defaultdict
from collections.abc import Mapping

import torch
from torch import nn


WAY_OUT = "Use perturbation='full', or leave it out of es_params (ESConfig's field, ESStrategy's argument)."


def is_matrix(param: torch.Tensor) -> bool:
    return param.dim() >= 2


def parameter_owners(model: nn.Module, params: Mapping[str, nn.Parameter]) -> dict[nn.Module, dict[str, str]]:
    """Every module that holds an evolved parameter, with ``{attribute: evolved name}``; a tied parameter appears
    under each module that holds it."""
    names = {id(p): name for name, p in params.items()}
    owners: dict[nn.Module, dict[str, str]] = defaultdict(dict)
    for module in model.modules():
        for attribute, p in module.named_parameters(recurse=False):
            if id(p) in names:
                owners[module][attribute] = names[id(p)]
    unheld = set(params) - {name for held in owners.values() for name in held.values()}
    if unheld:
        raise ValueError(f"the evolved parameters {sorted(unheld)[:3]} belong to no module of the model.")
    return dict(owners)


def is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def is_transposed_linear(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``x @ W + b`` with W stored as (in, out)."""
    return type(module).__name__ == "Conv1D" and getattr(module, "nf", None) == module.weight.shape[-1]


def is_lookup(module: nn.Module) -> bool:
    """An embedding whose output is its rows of the ids, possibly times a constant ``embed_scale`` (Gemma's)."""
    return isinstance(module, nn.Embedding) and (type(module).forward is nn.Embedding.forward
                                                 or hasattr(module, "embed_scale"))


def added_vectors(owners: Mapping[nn.Module, Mapping[str, str]]) -> set[str]:
    """The vectors added to a linear layer's output (its bias); the other vectors are swapped into their module."""
    return {name for module, held in owners.items() if is_plain_linear(module) or is_transposed_linear(module)
            for attribute, name in held.items() if attribute == "bias"}


def check_hookable(owners: Mapping[nn.Module, Mapping[str, str]], params: Mapping[str, nn.Parameter]) -> None:
    """A module other than a linear layer or an embedding lookup is re-evaluated per member with its vectors swapped:
    it must have a forward of its own (a ParameterDict's parameters are used by whoever reads them), hold no
    submodule with parameters (they would be evaluated, and hooked, twice), and hold vectors only (a member's dense
    matrix, times the population, is what low-rank noise exists to avoid)."""
    for module, held in owners.items():
        if is_plain_linear(module) or is_transposed_linear(module) or is_lookup(module):
            continue
        name = next(iter(held.values()))
        why = None
        if type(module).forward is nn.Module.forward:
            why = "that has no forward of its own (the modules reading it cannot be hooked)"
        elif any(True for child in module.children() for _ in child.parameters()):
            why = "that also holds submodules with parameters, so its forward cannot be re-evaluated per member"
        else:
            matrix = next((n for n in held.values() if is_matrix(params[n])), None)
            if matrix is not None:
                name, why = matrix, ("which is neither a linear layer nor an embedding, and a matrix: each member would "
                                     "need a dense copy")
        if why is not None:
            raise ValueError(
                f"perturbation='lowrank' cannot perturb {name}: it belongs to a {type(module).__name__} {why}. {WAY_OUT}"
            )


class InputGroups:
    """Evolved linear layers that may read one input: siblings in one module with the same input width and layout
    (attention's q, k, v and o; an MLP's gate and up). The first of a group called on an input projects it onto the
    whole group's concatenated factors in one ``bmm``; a sibling called on that very tensor (q, k and v on the
    attention's input; up after gate) takes its slice, one called on another input (o; cross-attention's k and v)
    projects it onto its own factors only. Fixed by the model's structure, so that every population, the first
    included, computes alike (a resumed run as the uninterrupted one)."""

    def __init__(self, model: nn.Module, owners: Mapping[nn.Module, Mapping[str, str]], rank: int):
        # a weight an embedding also looks up (a tied output layer) keeps its own factors: the lookup reads them
        looked_up = {held["weight"] for module, held in owners.items() if is_lookup(module) and "weight" in held}
        siblings = defaultdict(list)  # (parent, input width, layout): the into keys of its evolved linear layers
        for parent in model.modules():
            for module in parent.children():
                weight = owners.get(module, {}).get("weight")
                if weight is None or weight in looked_up or not (is_plain_linear(module) or is_transposed_linear(module)):
                    continue
                transposed = is_transposed_linear(module)
                width = module.weight.shape[0] if transposed else module.weight.shape[1]
                siblings[id(parent), width, transposed].append(f"{weight}#A" if transposed else f"{weight}#B")
        self.groups = [("+".join(keys), keys) for keys in siblings.values() if len(keys) > 1]
        self.of_key: dict[str, tuple[str, int, int]] = {}  # a layer's into key: its group, column start, stop
        for group, keys in self.groups:
            for i, key in enumerate(keys):
                self.of_key[key] = (group, i * rank, (i + 1) * rank)
