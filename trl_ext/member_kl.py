"""Each completion's KL from the policy that generated it to the reference policy: GRPO's ``beta`` term, per member.

TRL's GRPO estimates ``KL(pi || pi_ref)`` per completion token with the k3 estimator on sampled tokens,
``exp(r) - r - 1`` with ``r = log pi_ref(y_t) - log pi(y_t)`` (log-probabilities at the sampling temperature), and
averages it over the completion tokens. That holds when the tokens are samples of ``pi``. A greedy token is not a
sample, so when members decode greedily the exact KL over the vocabulary at each generated position is taken instead,
``sum_v pi(v) (log pi(v) - log pi_ref(v))``.

Both need the member's and the reference's next-token distributions at the completion positions: one teacher-forced
pass over prompt + completion with the member's weights (inside its perturbation) and one with the reference's. Only
the positions that predict completion tokens are computed (``logits_to_keep``), over sequences padded on the left so
that every completion ends at the last position; ``chunks`` splits the rows so that one pass holds at most
``LOGITS_BYTES`` of logits, and the KL is reduced a few positions at a time.
"""

from dataclasses import dataclass

import torch

from lightning_es.drift.metrics import exact_token_kl

LOGITS_BYTES = 2**28  # fp32 logits one pass may hold: 256 MiB
REDUCE_BYTES = 2**26  # float64 values one step of the exact KL's reduction may hold


@dataclass
class CompletionBatch:
    input_ids: torch.Tensor  # (rows, length): prompt + completion, left-padded
    attention_mask: torch.Tensor
    targets: torch.Tensor  # (rows, T): the last T tokens, T the longest completion
    mask: torch.Tensor  # (rows, T): which of them are completion tokens

    @classmethod
    def build(cls, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int,
              device: torch.device) -> "CompletionBatch":
        sequences = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
        length = max(len(s) for s in sequences)
        longest = max(1, max(len(c) for c in completion_ids))
        ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(sequences), length), dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.bool)
        for row, (sequence, completion) in enumerate(zip(sequences, completion_ids, strict=True)):
            ids[row, length - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
            attention[row, length - len(sequence):] = 1
            if completion:
                mask[row, longest - len(completion):] = True
        return cls(ids.to(device), attention.to(device), ids[:, length - longest:].to(device), mask.to(device))

    @property
    def completion_positions(self) -> int:
        return self.targets.shape[1]


def chunks(rows: int, group: int, positions: int, vocabulary: int) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges that each hold at most ``LOGITS_BYTES`` of fp32 logits, in whole groups of
    ``group`` rows where possible (one member's rows: a member's perturbation is applied to a group)."""
    size = max(1, LOGITS_BYTES // max(1, positions * vocabulary * 4))
    if size >= group:  # whole members at a time
        size -= size % group
        return [(start, min(start + size, rows)) for start in range(0, rows, size)]
    return [(start, min(start + size, first + group))  # parts of one member's rows
            for first in range(0, rows, group) for start in range(first, first + group, size)]


def completion_logits(model, batch: CompletionBatch) -> torch.Tensor:
    """(rows, T, vocabulary) fp32 logits predicting the last T tokens of each row."""
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)  # from each row's first real token, as generate
    keep = batch.completion_positions + 1
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions,
                   logits_to_keep=keep, use_cache=False).logits
    return logits[:, -keep:-1].float()


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)).double()


def per_token_kl(member_logits: torch.Tensor, reference_logits: torch.Tensor, targets: torch.Tensor,
                 exact: bool, temperature: float = 1.0) -> torch.Tensor:
    """(rows, T): the exact KL at each position, or TRL's k3 estimate at the sampled tokens (log-probabilities at
    ``temperature``, as the tokens were sampled)."""
    if not exact:
        log_ratio = (_target_logprobs(reference_logits / temperature, targets)
                     - _target_logprobs(member_logits / temperature, targets))
        return torch.exp(log_ratio) - log_ratio - 1
    rows, positions, vocabulary = member_logits.shape
    step = max(1, REDUCE_BYTES // (vocabulary * 8))  # positions per float64 softmax
    member, reference = member_logits.reshape(-1, vocabulary), reference_logits.reshape(-1, vocabulary)
    return torch.cat([exact_token_kl(member[i:i + step], reference[i:i + step])
                      for i in range(0, rows * positions, step)]).view(rows, positions)


def row_kl_sums(member_logits: torch.Tensor, reference_logits: torch.Tensor, batch: CompletionBatch,
                exact: bool, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of the per-token KL over its completion tokens, and their number (float64, on the host)."""
    kl = per_token_kl(member_logits, reference_logits, batch.targets, exact, temperature).double() * batch.mask
    return kl.sum(-1).cpu(), batch.mask.double().sum(-1).cpu()
