"""Update geometry: how far fine-tuning moved the weights, in which direction, and whether two solutions connect.

A delta is ``theta_final - theta_start`` as a mapping from parameter name to an fp32 tensor. ``parameter_drift`` (the
drift callbacks' values) is computed once for both layouts: whole tensors, or ES's ZeRO-3 slices summed over the
processes (``sharded_parameter_drift``).
"""

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

Delta = Mapping[str, torch.Tensor]


def snapshot(model: nn.Module, device: str = "cpu") -> dict[str, torch.Tensor]:
    """fp32 copies of every parameter (on ``device``), the start point of a delta."""
    return {n: p.detach().to(device=device, dtype=torch.float32, copy=True) for n, p in model.named_parameters()}


@contextmanager
def weights_restored(model: nn.Module) -> Iterator[dict[str, nn.Parameter]]:
    """Yield the model's parameters to overwrite freely; their values are copied back exactly on exit."""
    params = dict(model.named_parameters())
    saved = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
    try:
        yield params
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])


def parameter_delta(model: nn.Module, start: Mapping[str, torch.Tensor], names=None) -> dict[str, torch.Tensor]:
    """The model's weights minus ``start``, for the parameters ``names`` (default all)."""
    current = dict(model.named_parameters())
    check_same_parameters(current, start, "model", "start")
    return {n: current[n].detach().to(start[n].device, torch.float32) - start[n]
            for n in (start if names is None else names)}


def check_same_parameters(a: Mapping, b: Mapping, name_a: str = "a", name_b: str = "b") -> None:
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b))[:3], sorted(set(b) - set(a))[:3]
        raise ValueError(
            f"{name_a} and {name_b} hold different parameter sets (only in {name_a}: {only_a}; only in {name_b}: "
            f"{only_b}): compare updates of the same architecture from the same base."
        )
    for key in a:
        if a[key].shape != b[key].shape:
            raise ValueError(f"{key} has shape {tuple(a[key].shape)} in {name_a} but {tuple(b[key].shape)} in {name_b}.")


def update_norm(delta: Delta) -> float:
    return math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta.values()))


def cosine_similarity(delta_a: Delta, delta_b: Delta) -> float:
    """Cosine of the angle between two updates; NaN when either did not move (no direction to compare)."""
    check_same_parameters(delta_a, delta_b, "delta_a", "delta_b")
    norms = update_norm(delta_a) * update_norm(delta_b)
    if norms == 0:
        return float("nan")
    dot = sum(float((delta_a[k].double() * delta_b[k].double()).sum()) for k in delta_a)
    return dot / norms


def realised_fraction(start: Delta, delta: Delta, dtype: torch.dtype = torch.bfloat16) -> float:
    """How much of ``delta`` survives when applied to weights stored in ``dtype``: the projection of
    ``cast(start + delta) - cast(start)`` on ``delta``, over ``|delta|^2`` (1.0 = fully realised, 0.0 = rounded away).

    A precision audit of an update: a step far below the weights' rounding spacing vanishes in half precision. The
    start is first rounded to ``dtype`` (weights stored in it sit on its grid), else a tiny step would cross a rounding
    edge in proportion to its size and read as kept on average.
    """
    check_same_parameters(start, delta, "start", "delta")
    dot = intended_sq = 0.0
    for name, d in delta.items():
        base = start[name].to(dtype).double()
        realised = (base + d.double()).to(dtype).double() - base
        dot += float((realised * d.double()).sum())
        intended_sq += float(d.double().pow(2).sum())
    return dot / intended_sq if intended_sq else float("nan")


def moved_fraction(delta: Delta, threshold: float = 1e-6) -> float:
    """Fraction of weights whose absolute change exceeds ``threshold`` (1 minus the update's sparsity)."""
    moved = sum(int((d.abs() > threshold).sum()) for d in delta.values())
    return moved / sum(d.numel() for d in delta.values())


LAYER_TYPES = (("attention", ("attn",)), ("mlp", ("mlp",)), ("embedding", ("embed",)), ("norm", ("norm",)),
               ("lm_head", ("lm_head",)))


def layer_type(name: str) -> str:
    return next((kind for kind, markers in LAYER_TYPES if any(m in name for m in markers)), "other")


def parameter_drift(model: nn.Module, start: Mapping[str, torch.Tensor], threshold: float = 1e-6,
                    names=None) -> dict[str, float]:
    """``drift/update_norm``, ``drift/relative_norm``, ``drift/moved_fraction`` and ``drift/norm/<layer type>`` of
    ``model``'s weights against ``start`` (whole tensors, as every process holds them when replicated), over the
    parameters ``names`` (default all): the trained ones, so that frozen weights dilute neither the relative norm nor
    the moved fraction (as the ZeRO-3 slices, which hold the evolved ones only, count them)."""
    current = dict(model.named_parameters())
    check_same_parameters(current, start, "model", "start")
    return _drift(list(start if names is None else names), current, start.__getitem__, threshold)


def sharded_parameter_drift(es, threshold: float = 1e-6) -> dict[str, float]:
    """``parameter_drift``'s values for ES's evolved tensors, in whatever layout its perturbation holds them: for
    ZeRO-3 slices, the weights as the model holds them (in its dtype, as unsharded) against ES's start weights, padding
    left out, the partial sums of each process added over the processes that split the tensors (``summed``)."""
    return _drift(list(es.params), es.params, es.start.value, threshold, es.perturbation)


def summed(perturbation, sums: torch.Tensor) -> list[float]:
    """``sums``, this process's parts of sums over the evolved tensors, added over the processes that split them, as
    ``perturbation`` adds a squared norm (``total_squared_norm``: over its process group when it holds ZeRO-3 slices,
    nothing to add when every process holds the whole tensors)."""
    return [perturbation.total_squared_norm(part) for part in sums.tolist()]


def _drift(names: Sequence[str], current: Mapping[str, torch.Tensor], start: Callable[[str], torch.Tensor],
           threshold: float, perturbation=None) -> dict[str, float]:
    """The drift values of ``current[name]`` against ``start(name)`` over ``names``, one tensor at a time; with
    ``perturbation``, of the tensors it evolves (its ``real`` elements, its ``numel`` counts, its sums)."""
    kinds = sorted({layer_type(name) for name in names})
    sums = torch.zeros(3 + len(kinds), dtype=torch.float64)  # |delta|^2, |start|^2, moved, |delta|^2 per kind
    count = 0
    for name in names:
        first = start(name)
        held = current[name].detach().to(first.device, torch.float32)
        first = first.to(torch.float32)
        if perturbation is not None:
            first, held = perturbation.real(name, first), perturbation.real(name, held)
        delta = held - first
        squared = delta.double().pow(2).sum().cpu()
        sums[0] += squared
        sums[1] += first.double().pow(2).sum().cpu()
        sums[2] += float((delta.abs() > threshold).sum())
        sums[3 + kinds.index(layer_type(name))] += squared
        count += delta.numel() if perturbation is None else perturbation.numel(name)
    totals = sums.tolist() if perturbation is None else summed(perturbation, sums)
    values = {"drift/update_norm": math.sqrt(totals[0]),
              "drift/relative_norm": math.sqrt(totals[0]) / math.sqrt(totals[1]),
              "drift/moved_fraction": totals[2] / count}
    values.update({f"drift/norm/{kind}": math.sqrt(totals[3 + i]) for i, kind in enumerate(kinds)})
    return values


@dataclass
class Connectivity:
    alphas: list[float]
    values: list[float]
    barrier: float  # largest gap between the straight line joining the endpoints and the path (0 = no barrier)


@torch.no_grad()
def linear_connectivity(
    model: nn.Module,
    endpoint_a: Mapping[str, torch.Tensor],
    endpoint_b: Mapping[str, torch.Tensor],
    evaluate: Callable[[nn.Module], float],
    grid: Sequence[float] = tuple(i / 10 for i in range(11)),
    higher_is_better: bool = True,
) -> Connectivity:
    """Evaluate ``(1 - a) * theta_A + a * theta_B`` for each ``a`` in ``grid``, using ``model`` as the only copy.

    The endpoints may live on the CPU; the model's own weights are written back when done.
    """
    alphas = sorted(float(a) for a in grid)
    if not alphas or alphas[0] != 0.0 or alphas[-1] != 1.0:
        raise ValueError(f"grid must contain 0 and 1 (the endpoints themselves), got {list(grid)}.")
    check_same_parameters(endpoint_a, endpoint_b, "endpoint_a", "endpoint_b")
    check_same_parameters(dict(model.named_parameters()), endpoint_a, "model", "endpoint_a")
    values = []
    with weights_restored(model) as params:
        for alpha in alphas:
            for name, p in params.items():
                a, b = endpoint_a[name].to(p.device, torch.float32), endpoint_b[name].to(p.device, torch.float32)
                p.copy_(torch.lerp(a, b, alpha))
            values.append(float(evaluate(model)))
    line = [(1 - a) * values[0] + a * values[-1] for a in alphas]
    gaps = [(l - v) if higher_is_better else (v - l) for l, v in zip(line, values)]
    return Connectivity(alphas, values, max(0.0, max(gaps)))
