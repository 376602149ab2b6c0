"""Low-rank perturbations applied through forward hooks, for a whole population in one batch (EGGROLL).

Every evolved parameter is perturbed, as a gradient method would train it:

- a matrix W (rows x cols; a tensor of more dimensions is viewed as rows x the rest) gets member i's noise
  ``eps_i = A_i B_i^T / sqrt(r)`` with A_i (rows x r) and B_i (cols x r) standard normal, regenerated from the member
  seed: entries of eps_i have unit variance, like full-rank noise. An ``nn.Linear`` adds
  ``sigma * sign_i * (x B_i) A_i^T / sqrt(r)`` to its output; an ``nn.Embedding`` looks the rows of its ids up in the
  factor, adding ``sigma * sign_i * A_i[ids] B_i^T / sqrt(r)`` (times ``embed_scale`` for an embedding that scales its
  lookup, as Gemma's does). A weight shared by both (tied embeddings) is one parameter with one noise, applied in both
  places. Subclasses that override ``forward`` otherwise count as "any other module" below;
- a vector (norm gains, biases) gets full-rank noise, cheap at its size: a linear layer adds it to its output,
  any other module (norms) is evaluated once for all members with each member's perturbed vector
  (``torch.func.vmap`` over ``functional_call``, or one call with the vectors broadcast once that is shown to give
  the same result), which needs no knowledge of the module's formula;
- ``transformers``' ``Conv1D`` (GPT-2), a linear layer with its weight stored as (in, out), is hooked as one;
- a matrix held by any other module, a module returning something other than a tensor, one without a forward of its
  own (``nn.ParameterDict``) or one that also holds parameterised submodules is refused by name: use full-rank noise
  or leave the parameter out.

The weights are never modified, so every member shares one batched forward. Batch rows are grouped by member, in
the order the members were given: rows ``[m * R, (m + 1) * R)`` belong to member ``m``. How the terms meet the
forward's precision (autocast, bf16 or fp16 weights) is decided in ``engine.precision``.

What a compiler can capture: the hooks are registered once (on first use; ``close`` takes them off) and do nothing
outside ``apply_population``; inside, they read the factors and vectors of the population from tensors kept per
population size and refilled in place (``engine.precision.CastBuffers``), so a compiled forward (``torch.compile``,
static-cache decoding) sees the same module calls and the same tensors at every step. The factors of a step's members
are drawn once (``prepare``, called with each step's population) and used again by the update; they are kept until
the next step: (rows + columns) x rank x 4 bytes per matrix and member of the step. The buffers the hooks read hold
the factors of the members of one ``generate`` call again, per population size in use (a chunk, and a shorter last
chunk), plus their casts to the forward's dtype where it is below fp32. Linear layers that read one input (q, k and
v; gate and up) project it onto their factors in one product (``_InputGroups``).
"""

import math
import weakref
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call, vmap

from ..master import MasterWeights
from ..noise import GaussianNoise
from ..population import Member
from ..precision import CastBuffers, outside_autocast, perturbed_value
from .base import Perturbation


WAY_OUT = "Use perturbation='full', or leave it out with es_params (ESConfig) / params (ESStrategy)."


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


class _InputGroups:
    """Evolved linear layers that may read one input: siblings in one module with the same input width and layout
    (attention's q, k, v and o; an MLP's gate and up). The first of a group called on an input projects it onto the
    whole group's concatenated factors in one ``bmm``; a sibling called on that very tensor (q, k and v on the
    attention's input; up after gate) takes its slice, one called on another input (o; cross-attention's k and v)
    projects it onto its own factors only. Fixed by the model's structure, so that every population, the first
    included, computes alike (a resumed run as the uninterrupted one)."""

    def __init__(self, model: nn.Module, owners: Mapping[nn.Module, Mapping[str, str]], rank: int):
        siblings = defaultdict(list)  # (parent, input width, layout): the into keys of its evolved linear layers
        for parent in model.modules():
            for module in parent.children():
                weight = owners.get(module, {}).get("weight")
                if weight is None or not (is_plain_linear(module) or is_transposed_linear(module)):
                    continue
                transposed = is_transposed_linear(module)
                width = module.weight.shape[0] if transposed else module.weight.shape[1]
                siblings[id(parent), width, transposed].append(f"{weight}#A" if transposed else f"{weight}#B")
        self.groups = [("+".join(keys), keys) for keys in siblings.values() if len(keys) > 1]
        self.of_key: dict[str, tuple[str, int, int]] = {}  # a layer's into key: its group, column start, stop
        for group, keys in self.groups:
            for i, key in enumerate(keys):
                self.of_key[key] = (group, i * rank, (i + 1) * rank)


class _Population:
    """What the hooks read while a population of ``count`` members computes: per matrix its factors A (count, rows,
    r), scaled by ``sigma * sign / sqrt(r)`` per member, and B (count, cols, r); per bias of a linear layer each
    member's ``sigma * sign * eps``; per other vector each member's perturbed value, in the parameter's dtype. One
    such object per population size, refilled for each population of that size."""

    def __init__(self, count: int):
        self.count = count
        self.buffers = CastBuffers()
        # per input group: its last input (a weak reference: the forward owns it) and the product with its factors
        self.shared: dict[str, tuple[weakref.ref, torch.Tensor]] = {}

    def fill(self, perturbation: "LowRankPerturbation", members: Sequence[Member]) -> None:
        scales = [perturbation.sigma * m.sign for m in members]
        grouped = {}  # a grouped layer's into factors, read through its group's buffer only
        for name, p in perturbation.params.items():
            if is_matrix(p):
                pairs = [perturbation.factors(m.seed, name, p) for m in members]
                per_member = torch.tensor(scales, device=p.device) / math.sqrt(perturbation.rank)
                for key, factors in ((f"{name}#A", torch.stack([a for a, _ in pairs]) * per_member[:, None, None]),
                                     (f"{name}#B", torch.stack([b for _, b in pairs]))):
                    if key in perturbation._groups.of_key:
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
        for group, keys in perturbation._groups.groups:
            self.buffers.fill(group, torch.cat([grouped[key] for key in keys], dim=2))

    def project(self, groups: _InputGroups, inputs: torch.Tensor, output: torch.Tensor, into_key: str
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


class LowRankPerturbation(Perturbation):
    batched = True

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, nn.Parameter],
        sigma: float,
        rank: int = 1,
        noise: GaussianNoise | None = None,
        master_device: torch.device | str | None = None,
        copy_all: bool = False,
    ):
        """``copy_all``: keep an fp32 master copy of fp32 weights too, to measure a step another optimizer takes."""
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}.")
        if not params:
            raise ValueError("params is empty: ES needs at least one parameter to evolve.")
        self.owners = parameter_owners(model, params)
        check_hookable(self.owners, params)
        self.params = dict(params)
        self.sigma = sigma
        self.rank = rank
        self.noise = noise or GaussianNoise()
        # nothing is written into the weights, so fp32 weights need no restore source and take updates directly
        self.master = MasterWeights(self.params, device=master_device, only_low_precision=not copy_all)
        self._broadcasts: dict[tuple, bool] = {}  # per kind of call of a module: do its vectors broadcast (_module_hook)
        # vectors added to a linear layer's output (its bias); the other vectors are swapped into their module
        self.added_vectors = {name for module, held in self.owners.items()
                              if is_plain_linear(module) or is_transposed_linear(module)
                              for attribute, name in held.items() if attribute == "bias"}
        self._step_seeds: frozenset[int] = frozenset()  # the seeds of the step whose factors are kept (prepare)
        self._drawn: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._populations: dict[int, _Population] = {}  # per population size, the buffers the hooks read
        self._active: _Population | None = None  # the population the model computes as, inside apply_population
        self._hooks: list | None = None
        self._groups = _InputGroups(model, self.owners, rank)

    @property
    def noise_kind(self) -> str:
        # "every parameter": before, the low-rank noise evolved nn.Linear weights only; such a checkpoint is refused
        return f"lowrank(rank={self.rank}, every parameter)" + self.scale_kind

    def prepare(self, members: Sequence[Member]) -> None:
        """Keep the factors of these members (a step's population) once drawn, for the hooks and for the update."""
        seeds = frozenset(m.seed for m in members)
        if seeds != self._step_seeds:
            self._step_seeds, self._drawn = seeds, {}

    def set_scales(self, scales) -> None:
        super().set_scales(scales)
        self._drawn = {}  # A carries the scale

    def factors(self, seed: int, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Member ``seed``'s factors of a matrix: A (rows x r, times the matrix's scale) and B (cols x r), fp32; drawn
        once per step for the members of ``prepare`` (do not modify them)."""
        drawn = self._drawn.get((seed, name))
        if drawn is not None:
            return drawn
        rows, cols = weight.shape[0], weight[0].numel()
        a = self.scaled_noise(seed, name, f"{name}#A", torch.Size([rows, self.rank]))  # A carries the tensor's scale
        b = self.noise.sample(seed, f"{name}#B", torch.Size([cols, self.rank]), weight.device)
        if seed in self._step_seeds:
            self._drawn[seed, name] = a, b
        return a, b

    def dense_noise(self, seed: int, name: str) -> torch.Tensor:
        """Member ``seed``'s noise of one parameter as a dense fp32 tensor of its shape."""
        p = self.params[name]
        if not is_matrix(p):
            return self.scaled_noise(seed, name)
        a, b = self.factors(seed, name, p)
        return (a @ b.T).div_(math.sqrt(self.rank)).view(p.shape)

    @contextmanager
    def apply_population(self, members: Sequence[Member]) -> Iterator[None]:
        """Inside, the model computes as ``members``. The hooks are registered once, on first use, and read the
        population's buffers, refilled here in place: nothing about the forward changes from one step to the next but
        the buffers' values, which a compiled forward (``torch.compile``, static-cache decoding) then reads."""
        if self._active is not None:
            raise RuntimeError("apply_population is already active: one population computes at a time.")
        population = self._populations.setdefault(len(members), _Population(len(members)))
        population.fill(self, members)
        self._register_hooks()
        self._active = population
        try:
            yield
        finally:
            self._active = None
            population.shared.clear()

    @contextmanager
    def apply(self, member: Member) -> Iterator[None]:
        with self.apply_population([member]):
            yield

    def close(self) -> None:
        """Take the hooks off the model and free the buffers they read and the step's factors (the hooks do nothing
        outside ``apply_population``; the next use registers them again)."""
        for handle in self._hooks or ():
            handle.remove()
        self._hooks = None
        self._populations, self._drawn, self._step_seeds = {}, {}, frozenset()

    def _register_hooks(self) -> None:
        if self._hooks is not None:
            return
        self._hooks = []
        for module, held in self.owners.items():
            if is_plain_linear(module) or is_transposed_linear(module):
                hook = self._linear_hook(module, held, transposed=is_transposed_linear(module))
            elif is_lookup(module):
                hook = self._embedding_hook(held["weight"])
            else:
                hook = self._module_hook(module, held)
            self._hooks.append(module.register_forward_hook(hook, with_kwargs=True))

    def _linear_hook(self, module: nn.Module, held: Mapping[str, str], transposed: bool = False):
        """``x W^T`` gets ``(x B) A^T``; a transposed layer's ``x W`` (W as in x out) gets ``(x A) B^T``. Layers that
        read the same input (attention's q, k and v; an MLP's gate and up) project it onto their factors once,
        together (``_InputGroups``)."""
        weight, bias = held.get("weight"), held.get("bias")
        into_key, out_of_key = (f"{weight}#A", f"{weight}#B") if transposed else (f"{weight}#B", f"{weight}#A")

        def hook(module, args, kwargs, output):
            population = self._active
            if population is None:
                return None
            count = population.count
            if not output.is_contiguous():
                output = output.contiguous()
            grouped = _grouped(output, count).view(count, -1, output.shape[-1])
            with outside_autocast(output):
                if weight is not None:
                    inputs = _first_input(args, kwargs)
                    projected = population.project(self._groups, inputs, output, into_key)
                    grouped.baddbmm_(projected, population.buffers.like(out_of_key, output).transpose(1, 2))
                if bias is not None:
                    grouped.add_(population.buffers.like(bias, output)[:, None, :])
            return output

        return hook

    def _embedding_hook(self, weight: str):
        def hook(module, args, kwargs, output):
            population = self._active
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
            population = self._active
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
            if self._broadcasts.get(key) is not False:
                result = broadcast(values, count, grouped_args, grouped_kwargs, output.dim() + 1)
            if result is None or key not in self._broadcasts:
                inside.append(True)
                try:
                    exact = vmap(one_member, in_dims=(0, arg_dims, kwarg_dims))(values, grouped_args, grouped_kwargs)
                finally:
                    inside.clear()
                self._broadcasts[key] = result is not None and result.shape == exact.shape and torch.equal(result, exact)
                result = exact
            return result.reshape(output.shape).to(output.dtype)

        return hook

    def _stacked_factors(self, coefficients: Mapping[int, float], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``A B^T = sum_s c_s * eps_s * sqrt(r)``: the weighted factors side by side."""
        weight = self.params[name]
        a_columns, b_columns = [], []
        for seed, coefficient in coefficients.items():
            a, b = self.factors(seed, name, weight)
            a_columns.append(a * coefficient)
            b_columns.append(b)
        return torch.cat(a_columns, dim=1), torch.cat(b_columns, dim=1)

    def noise_sum(self, coefficients: Mapping[int, float], name: str) -> torch.Tensor:
        """``sum_s c_s * eps_s`` for one parameter; for a matrix, a single matmul of the stacked factors."""
        p = self.params[name]
        if not coefficients:
            return torch.zeros(p.shape, device=p.device, dtype=torch.float32)
        if not is_matrix(p):
            return super().noise_sum(coefficients, name)
        a, b = self._stacked_factors(coefficients, name)
        return (a @ b.T).div_(math.sqrt(self.rank)).view(p.shape)

    def add_noise_sum(self, coefficients: Mapping[int, float], name: str, scale: float) -> float:
        """For a matrix without a master copy (fp32), the update ``scale * sum_s c_s eps_s`` is one ``addmm_`` into
        the weight, and the squared norm of ``sum_s c_s eps_s`` comes from the factors' small Gram matrices: no dense
        update tensor."""
        p = self.params[name]
        if name in self.master.copies or not coefficients or not is_matrix(p):
            return super().add_noise_sum(coefficients, name, scale)
        a, b = self._stacked_factors(coefficients, name)
        alpha = 1 / math.sqrt(self.rank)
        with torch.no_grad():
            p.view(p.shape[0], -1).addmm_(a.to(p.dtype), b.T.to(p.dtype), alpha=scale * alpha)
        a, b = a.double(), b.double()
        return float(((a.T @ a) * (b.T @ b)).sum()) * alpha**2
