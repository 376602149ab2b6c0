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


class CastBuffers:
    """Per key (an evolved tensor and what is kept of it), a tensor kept across steps and refilled in place, so that a
    compiled forward reads the same tensors at every step; beside each fp32 one, its casts to the dtypes and devices
    forward passes asked for, refilled with it."""

    def __init__(self):
        self.values: dict[str, torch.Tensor] = {}
        self._casts: dict[str, dict[tuple[torch.dtype, torch.device], torch.Tensor]] = {}

    def fill(self, key: str, value: torch.Tensor) -> None:
        kept = self.values.get(key)
        if kept is None or kept.shape != value.shape or kept.dtype != value.dtype or kept.device != value.device:
            self.values[key], self._casts[key] = value, {}
            return
        kept.copy_(value)
        for cast in self._casts[key].values():
            cast.copy_(value)

    def like(self, key: str, other: torch.Tensor) -> torch.Tensor:
        """The values of ``key`` in ``other``'s dtype and device."""
        value = self.values[key]
        if value.dtype == other.dtype and value.device == other.device:
            return value
        casts = self._casts[key]
        where = (other.dtype, other.device)
        if where not in casts:
            casts[where] = value.to(device=other.device, dtype=other.dtype)
        return casts[where]


def perturbed_value(master: torch.Tensor, noise: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``master + scale * noise`` in fp32 (computed in ``noise``'s storage, which it consumes), rounded once to
    ``dtype``."""
    return noise.mul_(scale).add_(master.to(noise.device)).to(dtype)
