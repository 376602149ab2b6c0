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
"""

import math
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.func import functional_call, vmap

from ..master import MasterWeights
from ..noise import GaussianNoise
from ..population import Member
from ..precision import CastCache, outside_autocast, perturbed_value
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


class _StepNoise:
    """The noise of one population, per evolved tensor, drawn once and shared by every module that uses it."""

    def __init__(self, perturbation: "LowRankPerturbation", members: Sequence[Member]):
        self.perturbation = perturbation
        self.members = members
        self.scales = [perturbation.sigma * m.sign for m in members]
        self._factors: dict[str, tuple[CastCache, CastCache]] = {}
        self._vectors: dict[str, CastCache] = {}

    def factors(self, name: str) -> tuple[CastCache, CastCache]:
        """``(A, B)``: A (M, rows, r) scaled by ``sigma * sign / sqrt(r)`` per member, B (M, cols, r)."""
        if name not in self._factors:
            p = self.perturbation.params[name]
            pairs = [self.perturbation.factors(m.seed, name, p) for m in self.members]
            scale = torch.tensor(self.scales, device=p.device) / math.sqrt(self.perturbation.rank)
            a = torch.stack([pair[0] for pair in pairs]) * scale[:, None, None]
            b = torch.stack([pair[1] for pair in pairs])
            self._factors[name] = (CastCache(a), CastCache(b))
        return self._factors[name]

    def vector(self, name: str) -> CastCache:
        """(M, *shape): each member's ``sigma * sign * eps``, for a term added to an output."""
        if name not in self._vectors:
            noise = [self.perturbation.dense_noise(m.seed, name) * s for m, s in zip(self.members, self.scales)]
            self._vectors[name] = CastCache(torch.stack(noise))
        return self._vectors[name]

    def values(self, name: str) -> torch.Tensor:
        """(M, *shape): each member's perturbed value of the parameter, in its dtype."""
        p = self.perturbation.params[name]
        master = self.perturbation.master.value(name)
        return torch.stack([perturbed_value(master, self.perturbation.dense_noise(m.seed, name), s, p.dtype)
                            for m, s in zip(self.members, self.scales)])


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

    @property
    def noise_kind(self) -> str:
        # "every parameter": before, the low-rank noise evolved nn.Linear weights only; such a checkpoint is refused
        return f"lowrank(rank={self.rank}, every parameter)" + self.scale_kind

    def factors(self, seed: int, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Member ``seed``'s factors of a matrix: A (rows x r, times the matrix's scale) and B (cols x r), fp32."""
        rows, cols = weight.shape[0], weight[0].numel()
        a = self.scaled_noise(seed, name, f"{name}#A", torch.Size([rows, self.rank]))  # A carries the tensor's scale
        b = self.noise.sample(seed, f"{name}#B", torch.Size([cols, self.rank]), weight.device)
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
        noise = _StepNoise(self, members)
        with ExitStack() as hooks:
            for module, held in self.owners.items():
                if is_plain_linear(module) or is_transposed_linear(module):
                    hook = self._linear_hook(held, noise, transposed=is_transposed_linear(module))
                elif is_lookup(module):
                    hook = self._embedding_hook(held["weight"], noise)
                else:
                    hook = self._module_hook(module, held, noise)
                hooks.callback(module.register_forward_hook(hook, with_kwargs=True).remove)
            yield

    @contextmanager
    def apply(self, member: Member) -> Iterator[None]:
        with self.apply_population([member]):
            yield

    def _linear_hook(self, held: Mapping[str, str], noise: _StepNoise, transposed: bool = False):
        """``x W^T`` gets ``(x B) A^T``; a transposed layer's ``x W`` (W as in x out) gets ``(x A) B^T``."""
        weight, bias = held.get("weight"), held.get("bias")
        count = len(noise.members)

        def hook(module, args, kwargs, output):
            if not output.is_contiguous():
                output = output.contiguous()
            grouped = _grouped(output, count).view(count, -1, output.shape[-1])
            with outside_autocast(output):
                if weight is not None:
                    a, b = noise.factors(weight)
                    inputs = _first_input(args, kwargs)
                    x = _grouped(inputs, count).reshape(count, -1, inputs.shape[-1]).to(output.dtype)
                    into, out_of = (a, b) if transposed else (b, a)
                    grouped.baddbmm_(torch.bmm(x, into.like(output)), out_of.like(output).transpose(1, 2))
                if bias is not None:
                    grouped.add_(noise.vector(bias).like(output)[:, None, :])
            return output

        return hook

    def _embedding_hook(self, weight: str, noise: _StepNoise):
        count = len(noise.members)

        def hook(module, args, kwargs, output):
            ids = _first_input(args, kwargs)
            if ids.shape[0] % count:  # e.g. learned positions, shared by every row of the batch
                raise RuntimeError(
                    f"perturbation='lowrank' cannot perturb {weight}: its {type(module).__name__} was called with "
                    f"{ids.shape[0]} rows of ids for a population of {count} (ids shared by the whole batch, such as "
                    f"positions), so its members cannot differ. {WAY_OUT}")
            ids = _grouped(ids, count).reshape(count, -1)
            grouped = _grouped(output, count).view(count, -1, output.shape[-1])
            a, b = noise.factors(weight)
            members = torch.arange(count, device=ids.device)[:, None]
            scale = getattr(module, "embed_scale", None)
            with outside_autocast(output):
                a_rows = a.like(output)[members, ids]
                if scale is not None:
                    a_rows = a_rows * torch.as_tensor(scale, dtype=output.dtype, device=output.device)
                grouped.baddbmm_(a_rows, b.like(output).transpose(1, 2))
            return output

        return hook

    def _module_hook(self, module: nn.Module, held: Mapping[str, str], noise: _StepNoise):
        """Any other module (norms): its forward once more, for all members at once, with each member's vectors.

        Exactly: ``vmap`` over ``functional_call``, batching every argument whose rows are the batch's. Most such
        modules use their vectors elementwise, so the members' vectors also broadcast against the rows grouped by
        member in one call of the module's own forward, several times cheaper than ``vmap``: that is used for calls
        like one (the module, the population size, the output's dtype and rank) whose result was equal to ``vmap``'s
        bit for bit; on any failure the module goes back to ``vmap``."""
        values = {attribute: noise.values(name) for attribute, name in held.items()}
        count = len(noise.members)
        inside = []  # set while vmap re-runs the module, whose own call would otherwise re-enter this hook

        def one_member(member_values, args, kwargs):
            return functional_call(module, member_values, args, kwargs)

        def broadcast(args, kwargs, dim):
            """The module's own forward (no hooks) with the stacked vectors in place of its parameters; a plain swap
            in ``_parameters`` costs a fraction of ``functional_call``'s, in a hook run at every decoding step."""
            saved = {attribute: module._parameters[attribute] for attribute in values}
            for attribute, v in values.items():
                module._parameters[attribute] = v.view(count, *[1] * (dim - v.dim()), *v.shape[1:])
            try:
                return module.forward(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:  # not elementwise in its vectors
                return None
            finally:
                module._parameters.update(saved)

        def hook(module, args, kwargs, output):
            if inside:
                return None
            if not isinstance(output, torch.Tensor):
                raise RuntimeError(
                    f"perturbation='lowrank' cannot perturb {next(iter(held.values()))}: its {type(module).__name__} "
                    f"returns a {type(output).__name__}, not a tensor, so its members' outputs cannot be formed. "
                    f"{WAY_OUT}")

            def batched(a):
                return isinstance(a, torch.Tensor) and a.shape[:1] == output.shape[:1]

            arg_dims = tuple(0 if batched(a) else None for a in args)
            kwarg_dims = {k: 0 if batched(v) else None for k, v in kwargs.items()}
            grouped_args = tuple(_grouped(a, count) if batched(a) else a for a in args)
            grouped_kwargs = {k: _grouped(v, count) if batched(v) else v for k, v in kwargs.items()}
            key = (module, count, output.dtype, output.dim())
            result = None
            if self._broadcasts.get(key) is not False:
                result = broadcast(grouped_args, grouped_kwargs, output.dim() + 1)
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
