"""Noise and step relative to each tensor's own scale, so that one ``relative_sigma`` means the same on every model.

An absolute sigma is a different perturbation on every model: SmolLM2-135M's linear weights have a median RMS of 0.19,
Gemma-3-270M's 0.04, so sigma = 1e-2 is a gentle 5% of the first and a quarter of the second
(docs/reports/noise-scale/). With relative scales, member i's noise on tensor t is ``sigma * s_t * eps_i``, ``s_t``
taken from the weights training starts from:

- a matrix (2 or more dimensions): its RMS;
- a vector (norm gains, biases): each entry's magnitude, because one RMS does not describe it: Gemma's norm gains,
  stored as offsets from one, range from about 1 to a few hundred within one vector, and an entry perturbed by the
  vector's RMS would change by more than its own size;
- floors, where the value is not a scale: a vector entry below a tenth of its vector's RMS takes that tenth (an
  offset near zero, i.e. a gain near one); a tensor that is all zeros (PEFT's zero-initialised ``lora_B``, a bias
  at zero) takes the median RMS of the evolved matrices. Under PEFT that makes ``lora_B``'s noise the size of
  ``lora_A``'s entries, a small change of the layer: an absolute ``sigma`` may suit adapters better.

The step is the same ES step written in these units: with ``g`` formed from the scaled noise, ``theta_t += lr * s_t *
sum_i f_i eps_i / (N sigma)``, i.e. OpenAI-ES in the coordinates ``theta_t / s_t``: ``lr`` and ``sigma`` are both
fractions of each tensor's scale, and ``lr / sigma`` is the ES-at-scale paper's ``alpha`` as such a fraction.
Scales are fixed at the start of training and kept in checkpoints; they are fp32 tensors (0-dimensional for a
matrix, one entry per element for a vector).
"""

import math
import statistics

import torch

VECTOR_FLOOR = 0.1  # of the vector's RMS
DEFAULT_RELATIVE_SIGMA = 0.03
DEFAULT_RELATIVE_LEARNING_RATE = 1.5e-3  # relative_learning_rate / relative_sigma = 0.05
MAX_RELATIVE_SIGMA = 0.5
MAX_RELATIVE_ALPHA = 0.5  # relative_learning_rate / relative_sigma


def check_relative(relative_sigma: float, relative_learning_rate: float | None,
                   step_name: str = "relative_learning_rate") -> None:
    """Refuse relative units outside a sensible range, naming the field (``step_name``: the one the step was set by)
    and the fix."""
    if not 0 < relative_sigma <= MAX_RELATIVE_SIGMA:
        raise ValueError(
            f"relative_sigma must be in (0, {MAX_RELATIVE_SIGMA}], got {relative_sigma}: it is the noise as a fraction "
            f"of each tensor's scale, and above {MAX_RELATIVE_SIGMA} a member's weights are more noise than model. "
            f"{DEFAULT_RELATIVE_SIGMA} (the default) keeps members coherent on SmolLM2-135M and Gemma-3-270M.")
    if relative_learning_rate is None:
        return
    if not (relative_learning_rate >= 0 and math.isfinite(relative_learning_rate)):
        raise ValueError(f"{step_name} must be a non-negative finite number, got {relative_learning_rate}.")
    alpha = relative_learning_rate / relative_sigma
    if alpha > MAX_RELATIVE_ALPHA:
        raise ValueError(
            f"{step_name}={relative_learning_rate} with relative_sigma={relative_sigma} moves each tensor by "
            f"{alpha:g} of its scale times the mean shaped noise per step ({step_name} / relative_sigma > "
            f"{MAX_RELATIVE_ALPHA}): the weights would be replaced, not tuned. Lower it, e.g. to "
            f"{DEFAULT_RELATIVE_LEARNING_RATE / DEFAULT_RELATIVE_SIGMA * relative_sigma:g}.")


def relative_scales(perturbation) -> dict[str, torch.Tensor]:
    """Each evolved tensor's scale from its current values (the start of training), as the module docstring says.

    ``perturbation`` provides the values (``master.value``) and its ``layout`` where they live: a process's slices
    when sharded (``real``: without the padding), whose whole-tensor RMS comes from ``total_squared_norm``, and each
    tensor's whole size (``numel``, ``shape``)."""
    layout = perturbation.layout
    values = {name: perturbation.master.value(name) for name in perturbation.params}
    reals = {name: layout.real(name, value) for name, value in values.items()}  # without a slice's padding
    rms = {}
    for name, real in reals.items():
        squared = layout.total_squared_norm(float(torch.linalg.vector_norm(real, dtype=torch.float64) ** 2))
        rms[name] = (squared / layout.numel(name)) ** 0.5
    is_matrix = {name: len(layout.shape(name)) >= 2 for name in values}
    matrices = [r for name, r in rms.items() if is_matrix[name] and r > 0]
    fallback = statistics.median(matrices) if matrices else 0.0
    scales = {}
    for name, value in values.items():
        if rms[name] == 0:
            if fallback == 0:
                raise ValueError(
                    f"relative_sigma has no scale to be relative to: {name} is all zeros and no evolved matrix has a "
                    "non-zero RMS. Set an absolute sigma (and learning_rate / lr) instead."
                )
            scale = torch.tensor(fallback, dtype=torch.float32, device=value.device)
        elif is_matrix[name]:
            scale = torch.tensor(rms[name], dtype=torch.float32, device=value.device)
        else:
            scale = torch.zeros_like(value, dtype=torch.float32)  # padding, if any, gets no noise
            real = reals[name]
            scale.view(-1)[: real.numel()] = real.detach().abs().float().clamp(min=VECTOR_FLOOR * rms[name])
        scales[name] = scale
    return scales
