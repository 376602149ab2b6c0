"""ESTrainer's adapter to TRL's GRPOTrainer: the members' completions and rewards through TRL's generation and reward
functions, and the metric buffers TRL logs from. Every private TRL name ESTrainer uses is here, so that a TRL release
that renames one breaks this file only.
"""

from collections import defaultdict, deque
from collections.abc import Callable
from contextlib import contextmanager

import torch
import trl.trainer.grpo_trainer as grpo_trainer_module
from trl.trainer.utils import identity

from lightning_es.engine import Member, MemberScores
from lightning_es.engine.evaluation import joined
from lightning_es.engine.noise import derive_seed

from .scoring import ScoredRows, member_sums, nothing

class TRLScoring:
    """Mixin of ``ESTrainer`` (a ``GRPOTrainer``): scores population members with TRL's generation and rewards."""

    def trl_metrics(self, mode: str) -> dict[str, list]:
        """TRL's buffer of the metrics it logs (``"train"`` or ``"eval"``), averaged at each logging step."""
        return self._metrics[mode]

    @property
    def pad_token_id(self) -> int:
        return self._tokenizer.pad_token_id

    @property
    def trl_completion_logs(self) -> dict:
        """TRL's buffer of the completion table (``log_completions``)."""
        return self._logs

    def resize_completion_logs(self, rows: int) -> None:
        """Keep every member's rows of a step in the completion table (TRL keeps one generation batch)."""
        self._logs = {key: (defaultdict(lambda: deque(maxlen=rows)) if key in ("rewards", "extra")
                            else deque(maxlen=rows)) for key in self._logs}

    def population_score(self, inputs: list[dict], step: int, measure_kl: bool
                         ) -> tuple[Callable[[list[Member]], MemberScores], list[ScoredRows], int]:
        """The scoring function of step ``step`` on the batch ``inputs``, the list it fills with this process's
        scored rows (for the logs), and the rows each member answers on this process. ``measure_kl``: each row's KL to the reference is measured too (``KLPenalty``)."""
        rows, padding = self._rows_of_this_process(inputs)
        weights = self.reward_weights.cpu()
        prompt_of_row = self._prompt_of_row(len(rows))
        scored: list[ScoredRows] = []

        def score(members: list[Member]) -> MemberScores:
            with self._member_weights(members), self._sampling_seed(step, members[0]):
                group = self._score(rows * len(members))
            if measure_kl:
                group.kl, group.kl_tokens = self._completion_kl(members, group, step)
            records = []
            for member, rows_of_member in zip(members, group.split(len(rows)), strict=True):
                rows_of_member.member = member.index
                rows_of_member.prompt_ids = rows_of_member.completion_ids = []  # used; not gathered for the logs
                if not padding:
                    scored.append(rows_of_member)
                records.append(nothing(len(weights)) if padding else member_sums(
                    rows_of_member, weights, self.args.mask_truncated_completions, prompt_of_row))
            return joined(records)

        return score, scored, len(rows)

    def _rows_of_this_process(self, inputs: list[dict]) -> tuple[list[dict], bool]:
        """The rows this process generates for, each prompt ``num_generations`` times. Sharded, the processes split
        the batch; one whose share of a short last batch is empty scores a stand-in row that counts for nothing, so
        that it still joins the forward passes whose parameter gathers the others wait for."""
        padding = False
        if self.sharded:
            share = inputs[self.processes.rank :: self.processes.world_size]
            padding = not share
            inputs = share or inputs[:1]
        return [row for row in inputs for _ in range(self.num_generations)], padding

    def _prompt_of_row(self, rows: int) -> list[int]:
        """Each row's index among the step's prompts (each prompt fills num_generations rows; sharded, the processes
        hold every world_size-th prompt)."""
        stride, offset = (self.processes.world_size, self.processes.rank) if self.sharded else (1, 0)
        return [offset + stride * (row // self.num_generations) for row in range(rows)]

    def _member_weights(self, members: list[Member]):
        """Inside, the model computes as ``members`` (a batched perturbation: rows grouped by member)."""
        if self.es.perturbation.batched:
            return self.es.perturbation.apply_population(members)
        (member,) = members
        return self.es.perturbed(member)

    @contextmanager
    def _sampling_seed(self, step: int, member: Member):
        """Seed sampled decoding by (step, member): with full-rank noise in the replicated layout, a member's completions
        then do not depend on which process scores it (sharded, each process samples its own rows under this seed). A
        low-rank population is seeded by the first member of each generate call, so its samples depend on the process
        count and on ``es_max_generation_rows``."""
        device = self.accelerator.device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(derive_seed(self.args.seed, "sampling", step, member.index))
            yield

    def _score(self, rows: list[dict]) -> ScoredRows:
        """Generate and score completions for ``rows`` with the current weights, on this process only; with what the
        reward functions logged through ``log_extra`` and ``log_metric`` during the call.

        Generation runs inside one autocast (where mixed precision is on): accelerate enters autocast per forward, and
        leaving the outermost one drops its cache of casts, so every decoding step cast every trainable fp32 weight to
        half precision again (autocast caches only those; frozen ones, such as a PEFT base, are cast per use either
        way). The weights do not change within one ``generate`` call (a population's noise is in the hooks; full-rank
        noise gives each member a call of its own), so the casts are kept for its length: the same peak as one forward
        holding them."""
        prompts = [row["prompt"] for row in rows]
        with self._on_this_process():
            with self.accelerator.autocast():  # one autocast for the whole call, not one per decoding step
                prompt_ids, completion_ids, _, completions, *_ = self._generate(prompts)
            rewards = self._calculate_rewards(rows, prompts, completions, completion_ids)
        ends = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        scored = ScoredRows(
            prompts=prompts, completions=completions, rewards=rewards.cpu().double(),
            prompt_lengths=[len(ids) for ids in prompt_ids],
            completion_lengths=[len(ids) for ids in completion_ids],
            truncated=[bool(ids) and ids[-1] not in ends for ids in completion_ids],
            extra=dict(self._pending_extra_logs), metrics=dict(self._pending_metrics),
            prompt_ids=[list(ids) for ids in prompt_ids], completion_ids=[list(ids) for ids in completion_ids],
        )
        self._pending_extra_logs.clear()
        self._pending_metrics.clear()
        return scored

    @contextmanager
    def _on_this_process(self):
        """TRL's ``_generate`` and ``_calculate_rewards`` gather their results over processes. ES scores other members
        (or other rows) on each process and combines them in the population loop, so here they stay on this process:
        an error on one process (a reward function raising) then cannot leave its peers waiting in a gather. The
        per-call metrics and token count TRL records would be this process's only: ES logs its own (``_log_step``)."""
        metrics, tokens = self._metrics, self.state.num_input_tokens_seen
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        saved_gather = grpo_trainer_module.gather
        grpo_trainer_module.gather = self.accelerator.gather = identity
        try:
            yield
        finally:
            grpo_trainer_module.gather = saved_gather
            del self.accelerator.gather  # the instance attribute hid the method
            self._metrics, self.state.num_input_tokens_seen = metrics, tokens
