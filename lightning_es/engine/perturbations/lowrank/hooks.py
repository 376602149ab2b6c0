"""The forward hooks that make one model compute as a whole population, and the buffers they read.

A linear layer adds each member's low-rank term to its output, an embedding looks its ids up in each member's
factor, any other module (norms) is evaluated once more for all members with each member's vectors. Batch rows are
grouped by member, in the order the members were given: rows ``[m * R, (m + 1) * R)`` belong to member ``m``.

What a compiler can capture: the hooks are registered once (on first use; ``remove`` takes them off) and do nothing
outside ``computing``; inside, they read the factors and vectors of the population from tensors kept per population
size and refilled in place (``PopulationBuffers``, over ``engine.precision.CastBuffers``), so a compiled forward
(``torch.compile``, static-cache decoding) sees the same module calls and the same tensors at every step. The buffers
hold the factors of the members of one ``generate`` call, per population size in use (a chunk, and a shorter last
chunk), plus their casts to the forward's dtype where it is below fp32. Linear layers that read one input (q, k and v;
gate and up) project it onto their factors in one product (``structure.InputGroups``).

The hooks are the hot path of decoding: each does only what its layer's term needs, read from the buffers.
"""

import math
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call, vmap

from ...population import Member
from ...precision import CastBuffers, outside_autocast, perturbed_value
from .structure import WAY_OUT, InputGroups, is_lookup, is_matrix, is_plain_linear, is_transposed_linear

if TYPE_CHECKING:
    from .perturbation import LowRankPerturbation


class PopulationBuffers:
    """What the hooks read while a population of ``count`` members computes: per matrix its factors A (count, rows,
    r), scaled by ``sigma * sign / sqrt(r)`` per member, and B (count, cols, r); per bias of a linear layer each
    member's ``sigma * sign * eps``; per other vector each member's perturbed value, in the parameter's dtype. One
    such object per population size, refilled for each population of that size."""

    def __init__(self, count: int):
        self.count = count
        self.buffers = CastBuffers()
        # per input group: its last input (a weak reference: the forward owns it) and the product with its factors
        self.shared: dict[str, tuple[weakref.ref, torch.Tensor]] = {}

    def fill(self, perturbation: "LowRankPerturbation", members: Sequence[Member], groups: InputGroups) -> None:
        scales = [perturbation.sigma * m.sign for m in members]
        grouped = {}  # a grouped layer's into factors, read through its group's buffer only
        for name, p in perturbation.params.items():
            if is_matrix(p):
                pairs = [perturbation.factors(m.seed, name, p) for m in members]
                per_member = torch.tensor(scales, device=p.device) / math.sqrt(perturbation.rank)
                for key, factors in ((f"{name}#A", torch.stack([a for a, _ in pairs]) * per_member[:, None, None]),
                                     (f"{name}#B", torch.stack([b for _, b in pairs]))):
                    if key in groups.of_key:
                        grouped[key] = factors
                    else:
                        self.buffers.fill(key, factors)
            elif name in perturbation.added_vectors:
                self.buffers.fill(name, torch.stack([perturbation.dense_noise(m.seed, name) * s
                                                     for m, s in zip(members, scales)]))
            else:
                master = perturbation.master.value(name)
                self.buffers.fill(name, torch.stack([
                    perturbed_value(master, perturbation.dense_noise(m.seed, name), s, p.dtype)
                    for m, s in zip(members, scales)]))
        for group, keys in groups.groups:
            self.buffers.fill(group, torch.cat([grouped[key] for key in keys], dim=2))

    def project(self, groups: InputGroups, inputs: torch.Tensor, output: torch.Tensor, into_key: str
                ) -> torch.Tensor:
        """``x @ B`` (or ``x @ A`` for a transposed layer) per member: (count, rows, r), in ``output``'s dtype; for a
        layer of a group, a slice of the group's product, computed by the group's first layer on this input."""
        x = _grouped(inputs, self.count).reshape(self.count, -1, inputs.shape[-1]).to(output.dtype)
        place = groups.of_key.get(into_key)
        if place is None:
            return torch.bmm(x, self.buffers.like(into_key, output))
        group, start, stop = place
        if not torch.compiler.is_compiling():  # nothing here for the compiled step to guard on (it fuses itself)
            kept = self.shared.get(group)
            if kept is not None and kept[0]() is inputs:
                return kept[1][..., start:stop]
            if not start:  # the group's first layer on a new input: the whole group's product, for its siblings
                kept = weakref.ref(inputs), torch.bmm(x, self.buffers.like(group, output))
                self.shared[group] = kept
                return kept[1][..., start:stop]
        # compiled, or a later layer of the group on an input of its own (o after q, k, v): its own columns only
        return torch.bmm(x, self.buffers.like(group, output)[..., start:stop])


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """What a linear layer or an embedding was called with, positionally or by keyword."""
    return args[0] if args else next(iter(kwargs.values()))


def _grouped(tensor: torch.Tensor, count: int) -> torch.Tensor:
    if tensor.shape[0] % count:
        raise RuntimeError(f"batch of {tensor.shape[0]} rows cannot be split among {count} population members.")
    return tensor.reshape(count, -1, *tensor.shape[1:])


class PopulationHooks:
    """The hooks on the modules of ``owners`` (``structure.parameter_owners``) and what they read: ``active``, the
    buffers of the population computing now (None: the hooks do nothing), ``populations``, the buffers per population
    size, and ``broadcasts``, per kind of call of a module other than a linear layer or an embedding, whether its
    vectors broadcast (``_module_hook``)."""

    def __init__(self, owners: Mapping[nn.Module, Mapping[str, str]], groups: InputGroups):
        self.owners = owners
        self.groups = groups
        self.active: PopulationBuffers | None = None
        self.populations: dict[int, PopulationBuffers] = {}
        self.broadcasts: dict[tuple, bool] = {}
        self.handles: list | None = None

    @contextmanager
    def computing(self, perturbation: "LowRankPerturbation", members: Sequence[Member]) -> Iterator[None]:
        """Inside, the model computes as ``members`` of ``perturbation``: their population's buffers are refilled in
        place and the hooks (registered on first use) read them."""
        if self.active is not None:
            raise RuntimeError("apply_population is already active: one population computes at a time.")
        population = self.populations.setdefault(len(members), PopulationBuffers(len(members)))
        population.fill(perturbation, members, self.groups)
        self.register()
        self.active = population
        try:
            yield
        finally:
            self.active = None
            population.shared.clear()

    def register(self) -> None:
        if self.handles is not None:
            return
        self.handles = []
        for module, held in self.owners.items():
            if is_plain_linear(module) or is_transposed_linear(module):
                hook = self._linear_hook(module, held, transposed=is_transposed_linear(module))
            elif is_lookup(module):
                hook = self._embedding_hook(held["weight"])
            else:
                hook = self._module_hook(module, held)
            self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        """Take the hooks off the model and free the buffers they read (the next use registers them again)."""
        for handle in self.handles or ():
            handle.remove()
        self.handles = None
        self.populations = {}

    def _linear_hook(self, module: nn.Module, held: Mapping[str, str], transposed: bool = False):
        """``x W^T`` gets ``(x B) A^T``; a transposed layer's ``x W`` (W as in x out) gets ``(x A) B^T``. Layers that
        read the same input (attention's q, k and v; an MLP's gate and up) project it onto their factors once,
        together (``InputGroups``)."""
        weight, bias = held.get("weight"), held.get("bias")
        into_key, out_of_key = (f"{weight}#A", f"{weight}#B") if transposed else (f"{weight}#B", f"{weight}#A")

        def hook(module, args, kwargs, output):
            population = self.active
            if population is None:
                return None
            count = population.count
            if not output.is_contiguous():
                output = output.contiguous()
            grouped = _grouped(output, count).view(count, -1, output.shape[-1])
            with outside_autocast(output):
                if weight is not None:
                    inputs = _first_input(args, kwargs)
                    projected = population.project(self.groups, inputs, output, into_key)
                    grouped.baddbmm_(projected, population.buffers.like(out_of_key, output).transpose(1, 2))
                if bias is not None:
                    grouped.add_(population.buffers.like(bias, output)[:, None, :])
            return output

        return hook

    def _embedding_hook(self, weight: str):
        def hook(module, args, kwargs, output):
            population = self.active
            if population is None:
                return None
            count = population.count
            ids = _first_input(args, kwargs)
            if ids.shape[0] % count:  # e.g. learned positions, shared by every row of the batch
                raise RuntimeError(
                    f"perturbation='lowrank' cannot perturb {weight}: its {type(module).__name__} was called with "
                    f"{ids.shape[0]} rows of ids for a population of {count} (ids shared by the whole batch, such as "
                    f"positions), so its members cannot differ. {WAY_OUT}")
            ids = _grouped(ids, count).reshape(count, -1)
            grouped = _grouped(output, count).view(count, -1, output.shape[-1])
            members = torch.arange(count, device=ids.device)[:, None]
            scale = getattr(module, "embed_scale", None)
            with outside_autocast(output):
                a_rows = population.buffers.like(f"{weight}#A", output)[members, ids]
                if scale is not None:
                    a_rows = a_rows * torch.as_tensor(scale, dtype=output.dtype, device=output.device)
                grouped.baddbmm_(a_rows, population.buffers.like(f"{weight}#B", output).transpose(1, 2))
            return output

        return hook

    def _module_hook(self, module: nn.Module, held: Mapping[str, str]):
        """Any other module (norms): its forward once more, for all members at once, with each member's vectors.

        Exactly: ``vmap`` over ``functional_call``, batching every argument whose rows are the batch's. Most such
        modules use their vectors elementwise, so the members' vectors also broadcast against the rows grouped by
        member in one call of the module's own forward, several times cheaper than ``vmap``: that is used for calls
        like one (the module, the population size, the output's dtype and rank) whose result was equal to ``vmap``'s
        bit for bit; on any failure the module goes back to ``vmap``."""
        inside = []  # set while vmap re-runs the module, whose own call would otherwise re-enter this hook

        def one_member(member_values, args, kwargs):
            return functional_call(module, member_values, args, kwargs)

        def broadcast(values, count, args, kwargs, dim):
            """The module's own forward with the stacked vectors in place of its parameters: a plain swap in
            ``_parameters`` (a fraction of ``functional_call``'s cost, in a hook run at every decoding step), or
            ``functional_call`` where a compiler traces the forward."""
            shaped = {attribute: v.view(count, *[1] * (dim - v.dim()), *v.shape[1:]) for attribute, v in values.items()}
            try:
                if torch.compiler.is_compiling():  # the call runs this hook again: it must pass through
                    inside.append(True)
                    try:
                        return functional_call(module, shaped, args, kwargs)
                    finally:
                        inside.clear()
                saved = {attribute: module._parameters[attribute] for attribute in shaped}
                module._parameters.update(shaped)
                try:
                    return module.forward(*args, **kwargs)
                finally:
                    module._parameters.update(saved)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:  # not elementwise in its vectors
                return None

        def hook(module, args, kwargs, output):
            population = self.active
            if population is None or inside:
                return None
            if not isinstance(output, torch.Tensor):
                raise RuntimeError(
                    f"perturbation='lowrank' cannot perturb {next(iter(held.values()))}: its {type(module).__name__} "
                    f"returns a {type(output).__name__}, not a tensor, so its members' outputs cannot be formed. "
                    f"{WAY_OUT}")
            count = population.count
            values = {attribute: population.buffers.values[name] for attribute, name in held.items()}

            def batched(a):
                return isinstance(a, torch.Tensor) and a.shape[:1] == output.shape[:1]

            arg_dims = tuple(0 if batched(a) else None for a in args)
            kwarg_dims = {k: 0 if batched(v) else None for k, v in kwargs.items()}
            grouped_args = tuple(_grouped(a, count) if batched(a) else a for a in args)
            grouped_kwargs = {k: _grouped(v, count) if batched(v) else v for k, v in kwargs.items()}
            key = (module, count, output.dtype, output.dim())
            result = None
            if self.broadcasts.get(key) is not False:
                result = broadcast(values, count, grouped_args, grouped_kwargs, output.dim() + 1)
            if result is None or key not in self.broadcasts:
                inside.append(True)
                try:
                    exact = vmap(one_member, in_dims=(0, arg_dims, kwarg_dims))(values, grouped_args, grouped_kwargs)
                finally:
                    inside.clear()
                self.broadcasts[key] = result is not None and result.shape == exact.shape and torch.equal(result, exact)
                result = exact
            return result.reshape(output.shape).to(output.dtype)

        return hook
