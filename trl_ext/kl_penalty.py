"""GRPO's KL penalty in ES's fitness (``beta``), and the first step's check that the noise separates the members from
the start weights without destroying them: each member's per-token KL to the reference over its completions."""

import logging
from contextlib import nullcontext

import torch
from accelerate.utils import gather_object

from lightning_es.engine import Member

from .member_kl import CompletionBatch, chunks, completion_logits, row_kl_sums
from .scoring import ScoredRows

logger = logging.getLogger(__name__)

INCOHERENT_KL = 1.0  # nats per token between a member and the start weights, above which its answers are noise
CHECK_TOKENS = 32  # the first step's member check (without beta) reads each completion's first tokens only


class KLPenalty:
    """Mixin of ``ESTrainer``: the members' KL to the reference (the start weights, or under PEFT the model without
    its adapters)."""

    def _completion_kl(self, members: list[Member], group: ScoredRows, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of ``group`` (the completions of ``members``, grouped by member): the KL to the reference summed
        over its completion tokens, and their number. Rows are taken in chunks that bound the logits held at once
        (sharded, every process runs as many passes as the process with the most); without beta (the first step's
        check) only the first row of each member and its first CHECK_TOKENS tokens: the passes cost about a prefill
        of the rows each."""
        per_member = len(group.completion_ids) // len(members)
        measured = list(range(len(group.completion_ids)))
        if self.beta == 0:
            measured, per_member = measured[::per_member], 1
        prompt_ids = [group.prompt_ids[i] for i in measured]
        completion_ids = [group.completion_ids[i][:CHECK_TOKENS] if self.beta == 0 else group.completion_ids[i]
                          for i in measured]
        rows = len(measured)
        positions = max(1, max(len(ids) for ids in completion_ids))
        config = self.accelerator.unwrap_model(self.model).config
        vocabulary = getattr(config.get_text_config(), "vocab_size", None) or 1
        spans: list[tuple[int, int] | None] = chunks(rows, per_member, positions, vocabulary)
        if self.sharded:  # each pass gathers the parameters: every process runs as many as the one with the most
            spans += [None] * (max(self.processes.gather(len(spans))) - len(spans))
        sums = torch.zeros(len(group.completion_ids), dtype=torch.float64)
        tokens = torch.zeros_like(sums)
        for span in spans:
            start, stop = span or (rows - 1, rows)  # None: a stand-in pass over the last row, its result unused
            batch = CompletionBatch.build(prompt_ids[start:stop], completion_ids[start:stop],
                                          self.pad_token_id, self.accelerator.device)
            with self._member_weights(members[start // per_member:(stop - 1) // per_member + 1]):
                member_logits = self._completion_logits(batch)
            with self._reference_policy(step):
                reference_logits = self._completion_logits(batch)
            if span is not None:
                rows_here = measured[start:stop]
                sums[rows_here], tokens[rows_here] = row_kl_sums(member_logits, reference_logits, batch,
                                                                 self.args.greedy, self.temperature)
            del member_logits, reference_logits
        return sums, tokens

    def _completion_logits(self, batch: CompletionBatch) -> torch.Tensor:
        """The policy's logits at the completion positions, with the precision generation used (autocast), no
        dropout."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                return completion_logits(self.model, batch)
        finally:
            self.model.train(was_training)

    def _reference_policy(self, step: int):
        """Inside, the model is beta's reference: the start weights (at step 0, the weights themselves), or under
        PEFT the model without its adapters, as in GRPO."""
        if self.beta > 0 and self._adapters_only:
            return self.accelerator.unwrap_model(self.model).disable_adapter()
        if step == 0:  # the weights are the start weights (without beta, only the first step measures the KL)
            return nullcontext()
        return self.es.keep_start().swapped_in()

    def _check_members(self, scored: list[ScoredRows], kl: torch.Tensor) -> None:
        """At the first step, warn when the noise cannot separate the members from the start weights: every member
        answered alike (no fitness signal), or every member's answers are noise (KL above INCOHERENT_KL)."""
        everything = [rows for share in gather_object([scored]) for rows in share]
        answers = {}
        for rows in everything:
            answers.setdefault(rows.member, []).extend(rows.completions)
        units = (f"relative_sigma={self.args.relative_sigma}" if self.args.relative_noise
                 else f"sigma={self.args.sigma}")
        if len(answers) > 1 and all(a == next(iter(answers.values())) for a in answers.values()):
            logger.warning(
                "ES step 0: all %d population members gave the same completions (mean KL to the start weights %.2g "
                "nats per token): %s is too small to make the members differ on these prompts, so their fitness "
                "carries no signal. Raise it (or sample: num_generations > 1).", len(answers), float(kl.mean()), units)
        if float(kl.min()) > INCOHERENT_KL:
            logger.warning(
                "ES step 0: every population member is at least %.2g nats per token from the start weights (mean "
                "%.2g; above %g their answers are noise, not variations of the model's): %s is too large for this "
                "model. Lower it.", float(kl.min()), float(kl.mean()), INCOHERENT_KL, units)
