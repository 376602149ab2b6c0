"""``KLDrift``: how far a policy has moved from its reference, as a torchmetrics Metric.

Two per-token estimators feed it (both estimate KL(p_current || p_reference), averaged over tokens):

- ``sampled_token_kl`` (the one the ES-vs-GRPO paper reports): sample continuations from the current model at
  temperature 1, score the sampled tokens under both models, and take ``log p_current(y_t) - log p_ref(y_t)``. Its
  mean over tokens is a Monte Carlo estimate; single tokens may be negative.
- ``exact_token_kl``: the full next-token KL ``sum_v p_current(v) (log p_current(v) - log p_ref(v))`` at every
  position of teacher-forced probe text; exact, never negative, costs a vocabulary-sized softmax per token.

The metric keeps two sums (KL and token count) reduced by summation, so ``compute()`` is the token-weighted mean over
every process; it syncs through ``engine.collectives``, which moves them to the process group's device.
"""

import torch
from torchmetrics import Metric

from ..engine import collectives


def sampled_token_kl(current_logprobs: torch.Tensor, reference_logprobs: torch.Tensor) -> torch.Tensor:
    return current_logprobs.double() - reference_logprobs.double()


def exact_token_kl(current_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    current = torch.log_softmax(current_logits.double(), dim=-1)
    reference = torch.log_softmax(reference_logits.double(), dim=-1)
    return (current.exp() * (current - reference)).sum(dim=-1)


class KLDrift(Metric):
    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs):
        # synced through the library's collectives: its states live on the host, which NCCL refuses
        super().__init__(**{"dist_sync_fn": collectives.all_gather, **kwargs})
        self.add_state("kl_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, per_token_kl: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        values = per_token_kl.double()
        if mask is not None:
            values = values * mask
            count = mask.double().sum()
        else:
            count = torch.tensor(float(values.numel()), dtype=torch.float64)
        self.kl_sum += values.sum().to(self.kl_sum.device)
        self.tokens += count.to(self.tokens.device)

    def compute(self) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("KLDrift has seen no token: update it with at least one probe token before compute().")
        return self.kl_sum / self.tokens
