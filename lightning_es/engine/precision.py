"""Where a perturbation's arithmetic meets the forward pass's precision: the one place that decides it.

The model computes in whatever its user set: fp32 weights, weights stored in bf16 or fp16, or autocast over fp32
weights (``bf16=True`` in TRL and accelerate, ``precision="bf16-mixed"`` in Lightning), where a layer's output need not
have its weight's dtype. Noise is always drawn in fp32 (``GaussianNoise``). The rule:

- a term added to a module's output (low-rank hooks) is computed outside autocast, in the dtype of that output, from
  its inputs and the fp32 noise cast to that dtype, as the layer's own product was: the perturbed output has the
  dtype, and the rounding, of the unperturbed one;
- a perturbed parameter value is formed in fp32 (the master copy plus the noise) and rounded once to the parameter's
  dtype (``perturbed_value``), never by adding noise to rounded weights.
"""

from contextlib import nullcontext

import torch


def outside_autocast(tensor: torch.Tensor):
    """A context in which ``tensor``'s device runs no autocast, so that explicitly cast operands keep their dtype."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


class CastCache:
    """fp32 tensors of one population step, cast once per (dtype, device) the forward passes ask for."""

    def __init__(self, tensor: torch.Tensor):
        self.fp32 = tensor
        self._cast: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def like(self, other: torch.Tensor) -> torch.Tensor:
        key = (other.dtype, other.device)
        if key not in self._cast:
            self._cast[key] = self.fp32.to(device=other.device, dtype=other.dtype)
        return self._cast[key]


def perturbed_value(master: torch.Tensor, noise: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``master + scale * noise`` in fp32 (computed in ``noise``'s storage, which it consumes), rounded once to
    ``dtype``."""
    return noise.mul_(scale).add_(master.to(noise.device)).to(dtype)
