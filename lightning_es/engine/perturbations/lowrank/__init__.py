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

The weights are never modified, so every member shares one batched forward. How the terms meet the forward's
precision (autocast, bf16 or fp16 weights) is decided in ``engine.precision``. By job:

- ``structure``: which module holds each evolved parameter, how each is hooked or why it cannot be, which linear
  layers read one input (fixed when the perturbation is built);
- ``hooks``: the linear, embedding and other-module hooks and the compile-stable buffers they read;
- ``perturbation``: ``LowRankPerturbation``, the members' factors, noise sums and the update.
"""

from .hooks import PopulationBuffers, PopulationHooks
from .perturbation import LowRankPerturbation
from .structure import (
    WAY_OUT,
    InputGroups,
    added_vectors,
    check_hookable,
    is_lookup,
    is_matrix,
    is_plain_linear,
    is_transposed_linear,
    parameter_owners,
)

__all__ = [
    "WAY_OUT",
    "InputGroups",
    "LowRankPerturbation",
    "PopulationBuffers",
    "PopulationHooks",
    "added_vectors",
    "check_hookable",
    "is_lookup",
    "is_matrix",
    "is_plain_linear",
    "is_transposed_linear",
    "parameter_owners",
]
