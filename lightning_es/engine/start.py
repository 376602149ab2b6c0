"""The weights training started from, kept once for everything that measures or pulls towards them.

Anchored weight decay pulls towards them, ``beta`` scores each member's KL to the policy they define, and the drift
callbacks measure off-task KL and parameter movement from them. Each holding its own copy would add a model's worth
of memory per option to a method sold on inference-level memory; this one copy serves them all.

It holds the evolved tensors only (nothing else changes during ES), in each weight's dtype: exact, since the fp32
master copy starts from those same values; on ``device``, the host by default, where memory is cheapest. A pass
with the start weights exchanges them with the model's, one tensor at a time (``swapped_in``): no second copy of the
current weights is made, and both are bit-exact afterwards.
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from .params import require_every


class StartWeights:
    def __init__(self, params: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor] | None = None,
                 device: torch.device | str = "cpu", after_write=None):
        """``params``: the tensors the model computes with (ZeRO-3 slices when sharded); ``values``: the start values
        (default: the tensors' current ones); ``after_write``: called after the model's tensors were written (ZeRO-3
        drops its gathered copies)."""
        self.params = dict(params)
        source = self.params if values is None else values
        require_every(self.params, source, "the start weights")
        self.tensors = {name: source[name].detach().to(device, self.params[name].dtype, copy=True)
                        for name in self.params}
        self.after_write = after_write or (lambda: None)

    def value(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """The start value of ``name`` in fp32 (on ``device``, default the tensor's own)."""
        return self.tensors[name].to(device or self.params[name].device, torch.float32)

    def of_model(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The start value of every parameter of ``model`` under the model's names: the held ones (found by identity,
        whatever they are called here), the model's own current values for the rest (nothing else changes)."""
        held = {id(p): self.tensors[name] for name, p in self.params.items()}
        return {name: held.get(id(p), p.detach()) for name, p in model.named_parameters()}

    def names_in(self, model: torch.nn.Module) -> list[str]:
        """The model's names of the held parameters (the evolved, or trained, ones)."""
        held = {id(p) for p in self.params.values()}
        return [name for name, p in model.named_parameters() if id(p) in held]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside, the model computes with the start weights; after, with its own again, bit for bit. (Inside, this
        object holds the model's current values: ask ``value`` outside.)"""
        self._exchange()
        try:
            yield
        finally:
            self._exchange()

    @torch.no_grad()
    def _exchange(self) -> None:
        for name, p in self.params.items():
            held = self.tensors[name]
            current = p.detach().to(held.device, copy=True)
            p.copy_(held)
            held.copy_(current)
            del current
        self.after_write()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        require_every(self.tensors, state, "the saved start weights")
        for name, t in self.tensors.items():
            t.copy_(state[name])

    def load_model_state(self, model: torch.nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
        """Adopt start values saved under ``model``'s parameter names (found by identity, whatever they are called
        here), as drift callbacks saved them before ES kept the start weights."""
        names = {id(p): n for n, p in model.named_parameters()}
        self.load_state_dict({name: saved[names[id(p)]] for name, p in self.params.items() if names.get(id(p)) in saved})
