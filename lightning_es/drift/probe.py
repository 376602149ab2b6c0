"""Off-task drift: KL between the current policy and its starting weights on probe prompts.

The reference weights are the trainable parameters' start values (``engine.StartWeights``): a copy in host memory,
never a second model on the accelerator, or the copy ES already keeps (``use_reference``); they are exchanged with the
model's for the reference pass and exchanged back exactly.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..engine.noise import derive_seed
from ..engine.start import StartWeights
from .metrics import KLDrift, exact_token_kl, sampled_token_kl

ESTIMATORS = ("sampled", "exact")


class DriftProbe:
    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        prompts: Sequence[str],
        estimator: str = "sampled",
        max_new_tokens: int = 32,
        batch_size: int = 8,
        seed: int = 0,
        reference: StartWeights | None = None,
    ):
        """``reference``: the start weights to measure from, kept elsewhere (ES's copy); None: a host copy of the
        model's trainable parameters as they are now."""
        if not prompts:
            raise ValueError("prompts is empty: the drift probe needs at least one off-task prompt.")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")
        self.tokenizer = tokenizer
        self.prompts = list(prompts)
        self.estimator = estimator
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.seed = seed
        context = getattr(model.config, "max_position_embeddings", None)
        longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in self.prompts)
        needed = longest + (max_new_tokens if estimator == "sampled" else 0)
        if context is not None and needed > context:
            raise ValueError(
                f"probe sequences need {needed} tokens (longest prompt {longest}"
                f"{f' + {max_new_tokens} new' if estimator == 'sampled' else ''}) but the model's context is "
                f"{context}: shorten the probe prompts or max_new_tokens."
            )
        if reference is None:
            self.set_reference(model)
        else:
            self.use_reference(reference)

    def set_reference(self, model: nn.Module, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Take the model's current values of its trainable parameters as the reference (a host-memory copy), or
        ``weights`` (saved start values of those parameters); the frozen ones are the model's own."""
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.reference = StartWeights(trainable, weights)
        self.measured = {id(p) for p in trainable.values()}

    def use_reference(self, start: StartWeights) -> None:
        """Measure from ``start``, a copy kept elsewhere (ES's), instead of a copy of its own."""
        self.reference = start
        self.measured = None  # ES's copy holds what ES evolves (ZeRO-3 slices when sharded), not the parameters

    def _require_measured(self, model: nn.Module) -> None:
        """The reference pass swaps the start weights into the parameters they were taken from: measuring another
        model (a trained copy of the one the probe was built with) would compare that model with itself, KL 0, and
        a parameter made trainable since (adapters added, layers unfrozen) would keep its trained values in the
        reference pass."""
        if self.measured is None:
            return
        if not self.measured <= {id(p) for p in model.parameters()}:
            raise ValueError(
                "this DriftProbe's reference weights belong to the model it was built with, not to the model passed "
                "to measure: build the probe with the model it measures, or call probe.set_reference(model, "
                "weights=start) with the start values under that model's parameter names."
            )
        unreferenced = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in self.measured]
        if unreferenced:
            raise ValueError(
                f"{len(unreferenced)} trainable parameters (e.g. {unreferenced[0]}) were not trainable when this "
                "DriftProbe took its reference, so the reference pass would run them at their trained values: "
                "build the probe after the model's trainable parameters are set (after get_peft_model), or call "
                "probe.set_reference(model, weights=start) with their start values."
            )

    @contextmanager
    def reference_weights(self, model: nn.Module) -> Iterator[None]:
        with self.reference.swapped_in():
            yield

    def _batches(self, device):
        for start in range(0, len(self.prompts), self.batch_size):
            chunk = self.prompts[start : start + self.batch_size]
            # left padding for this call only: the caller's tokenizer keeps its padding side
            yield self.tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left",
                                 add_special_tokens=False).to(device)

    @staticmethod
    def _logits(model, ids, mask):
        # positions counted from each row's first real token, as generate does: left padding must not shift them
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, :-1].float()

    def _per_token_kl(self, model: nn.Module, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(per-token KL, mask of the scored tokens) for each batch of probes, in prompt order."""
        self._require_measured(model)
        device = next(model.parameters()).device
        for index, batch in enumerate(self._batches(device)):
            ids, mask = batch["input_ids"], batch["attention_mask"]
            if self.estimator == "sampled":
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(derive_seed(self.seed, "drift", step, index))
                    ids = model.generate(
                        input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                        max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                    )
                generated = ids[:, batch["input_ids"].shape[1] :]
                mask = torch.cat([mask, (generated != self.tokenizer.pad_token_id).long()], dim=1)
            targets = ids[:, 1:]
            scored = mask[:, 1:] * mask[:, :-1]  # a real token predicted from a real one (not from left padding)
            if self.estimator == "sampled":
                scored[:, : batch["input_ids"].shape[1] - 1] = 0  # only the sampled continuation
            current = self._logits(model, ids, mask)
            with self.reference_weights(model):
                reference = self._logits(model, ids, mask)
            if self.estimator == "sampled":
                per_token = sampled_token_kl(
                    torch.log_softmax(current, -1).gather(-1, targets[..., None]).squeeze(-1),
                    torch.log_softmax(reference, -1).gather(-1, targets[..., None]).squeeze(-1),
                )
            else:
                per_token = exact_token_kl(current, reference)
            yield per_token, scored

    @contextmanager
    def _evaluating(self, model: nn.Module) -> Iterator[None]:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            model.train(was_training)

    def measure(self, model: nn.Module, metric: KLDrift | None = None, step: int = 0) -> KLDrift:
        """Feed this process's probe tokens into ``metric`` (a fresh `KLDrift` if None) and return it."""
        metric = metric if metric is not None else KLDrift()
        with self._evaluating(model):
            for per_token, scored in self._per_token_kl(model, step):
                metric.update(per_token, scored)
        return metric

    def measure_each(self, model: nn.Module, step: int = 0) -> list[float]:
        """The KL of each probe prompt on its own (mean over its scored tokens), in prompt order: paired readings
        for comparing two models probe by probe."""
        values = []
        with self._evaluating(model):
            for per_token, scored in self._per_token_kl(model, step):
                weights = scored.to(per_token.dtype)
                values += (per_token * weights).sum(-1).div(weights.sum(-1).clamp(min=1)).tolist()
        return values
