"""``ESTrainer``: TRL's ``GRPOTrainer`` with the policy-gradient step replaced by an Evolution Strategies step.

Everything else is TRL's and transformers': model and tokenizer loading, PEFT, reward functions (called exactly as
GRPO calls them), prompt formats, callbacks, loggers, checkpoints and evaluation.
"""

import logging
import os
import shutil
import time
from collections import defaultdict, deque
from contextlib import contextmanager, nullcontext
from functools import cached_property

import torch
import trl.trainer.grpo_trainer as grpo_trainer_module
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import TorchDynamoPlugin, gather_object
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from transformers import CompileConfig, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import identity

from lightning_es import EvolutionStrategy, Processes, build_perturbation, derive_seed, select_parameters
from lightning_es.engine import Member, evaluate_population
from lightning_es.engine.evaluation import FITNESS, WEIGHT

from .checkpoints import ES_STATE_NAME, TRAINER_STATE_NAME, last_resumable_checkpoint, why_not_resumable
from .config import ESConfig, to_es_config
from .member_kl import CompletionBatch, chunks, completion_logits, row_kl_sums
from .reward_checks import checked_reward_function
from .scoring import (
    KL,
    KL_TOKENS,
    ScoredRows,
    member_kl,
    member_sums,
    normalized_then_summed,
    nothing,
    weighted_rewards,
)

logger = logging.getLogger(__name__)

INCOHERENT_KL = 1.0  # nats per token between a member and the start weights, above which its answers are noise
CHECK_TOKENS = 32  # the first step's member check (without beta) reads each completion's first tokens only


def cannot_compile(device: torch.device, backend: str = "inductor", sharded: bool = False) -> str | None:
    """Why ``torch.compile`` cannot compile decoding on ``device`` with ``backend`` here, or None."""
    import torch._dynamo
    from torch.utils._triton import has_triton

    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile is not supported with this Python and PyTorch ({torch.__version__})"
    if sharded:
        return "under DeepSpeed ZeRO-3, whose parameter gathers in every forward a compiled step cannot capture"
    if backend != "inductor":
        return None
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")):
        return "inductor needs a C++ compiler on the CPU and none was found (set CXX)"
    if device.type == "cuda" and not has_triton():
        return "inductor needs Triton on this GPU and it is not available"
    return None


def _check_prompt_column(dataset, argument: str) -> None:
    if isinstance(dataset, dict):
        for name, split in dataset.items():
            _check_prompt_column(split, f"{argument}[{name!r}]")
        return
    columns = getattr(dataset, "column_names", None)
    if columns is not None and "prompt" not in columns:
        raise ValueError(
            f"{argument} has no 'prompt' column (its columns: {columns}). Rename the column holding the prompts, "
            f"e.g. dataset.rename_column('question', 'prompt')."
        )


class ESTrainer(GRPOTrainer):
    """Drop-in replacement for `trl.GRPOTrainer` that trains with Evolution Strategies.

    Takes the same arguments as `GRPOTrainer`. `args` may be an [`ESConfig`] or a plain `GRPOConfig`, whose shared
    fields are kept and whose learning rate is replaced by the ES default step (with a warning).
    """

    _tag_names = ["trl", "es", "lightning-es"]
    _name = "ES"
    _paper = {
        "title": "Evolution Strategies at Scale: LLM Fine-Tuning Beyond Reinforcement Learning",
        "id": "2509.24372",
        "citation": "@article{qiu2025evolution,\n    title   = {{Evolution Strategies at Scale: LLM Fine-Tuning Beyond "
        "Reinforcement Learning}},\n    author  = {Xin Qiu and others},\n    year    = 2025,\n    eprint  = "
        "{arXiv:2509.24372}\n}",
    }

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: ESConfig | GRPOConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
    ):
        for argument, value in (("tools", tools), ("rollout_func", rollout_func), ("environment_factory", environment_factory)):
            if value:
                raise NotImplementedError(f"ESTrainer does not support `{argument}` yet; remove it to train with ES.")
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = ESConfig(f"{str(name).split('/')[-1]}-ES")
        args = to_es_config(args)
        if train_dataset is None:
            raise ValueError("train_dataset is required: ES draws its prompts from it.")
        _check_prompt_column(train_dataset, "train_dataset")
        if eval_dataset is not None:
            _check_prompt_column(eval_dataset, "eval_dataset")

        if reward_funcs is None:
            reward_funcs = []
        elif not isinstance(reward_funcs, list):
            reward_funcs = [reward_funcs]
        if not reward_funcs:
            raise ValueError("reward_funcs is empty: ES needs at least one reward function to compute fitness.")
        reward_funcs = [
            checked_reward_function(f) if callable(f) and not isinstance(f, torch.nn.Module) else f for f in reward_funcs
        ]

        beta, args.beta = args.beta, 0.0  # GRPO would load a second model as the reference: ES keeps the start weights
        try:
            super().__init__(
                model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                eval_dataset=eval_dataset, processing_class=processing_class,
                reward_processing_classes=reward_processing_classes, callbacks=callbacks, optimizers=optimizers,
                quantization_config=quantization_config, peft_config=peft_config,
            )
        finally:
            args.beta = beta
        self.beta = beta

        if args.greedy:
            greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "min_p": None}
            self.generation_kwargs = {**self.generation_kwargs, **greedy}
            for key, value in greedy.items():
                setattr(self.generation_config, key, value)

        self.sharded = self._check_deepspeed()
        if args.torch_compile:
            self._compile_decoding()
        self.processes = Processes.current(sharded=self.sharded, device=self.accelerator.device)
        if self.sharded:
            # built over the ZeRO-3 partitions once DeepSpeed has created them: on resume, or as training begins,
            # before any other callback (the drift callbacks measure from its start weights)
            self.es = None
            self.callback_handler.callbacks.insert(0, _BuildShardedES(self))
        else:
            # as DDP would when it wraps the model: every process starts from process 0's weights
            self.processes.synchronize([*self.model.parameters(), *self.model.buffers()])
            self.es = self._build_es()
            self.processes.rounds(self.es.members(0), self.es.perturbation.batched)  # checks the population split
            self._prepare_models_for_evaluation()
        self._gradient_norm = None
        self.resumed_checkpoint = None  # the checkpoint train() resumed from, where callbacks find their saved state
        if args.es_optimizer == "trainer":
            self.add_callback(_AppliedUpdateNorm(self))
        rows_per_step = args.population_size * args.per_device_train_batch_size * (
            self.accelerator.num_processes if self.sharded else 1)
        self._logs = {key: (defaultdict(lambda: deque(maxlen=rows_per_step)) if key in ("rewards", "extra")
                            else deque(maxlen=rows_per_step)) for key in self._logs}  # every member's rows

    def _build_accelerator_args(self, **kwargs):
        args = super()._build_accelerator_args(**kwargs)
        # torch_compile compiles the members' decoding (_compile_decoding); accelerate would compile the whole model,
        # which ES never runs forward and backward as a training step
        args["dynamo_plugin"] = TorchDynamoPlugin(backend="no")
        return args

    def _compile_decoding(self) -> None:
        """``torch_compile``: transformers' ``generate`` compiles the decoding steps over a static KV cache (or the
        compileable cache ``cache_implementation`` names), with ``torch_compile_backend`` and ``torch_compile_mode``;
        the low-rank hooks read buffers refilled in place, so one compiled step serves every population. Where this
        platform cannot compile, a one-line warning and eager decoding."""
        backend = self.args.torch_compile_backend or "inductor"
        why_not = cannot_compile(self.accelerator.device, backend, self.sharded)
        if why_not:
            logger.warning("torch_compile=True: decoding runs eagerly, %s.", why_not)
            return
        config = self.generation_config
        config.cache_implementation = config.cache_implementation or "static"
        self.generation_kwargs["cache_implementation"] = config.cache_implementation
        config.disable_compile = False
        mode = self.args.torch_compile_mode or ("reduce-overhead" if self.accelerator.device.type == "cuda" else "default")
        config.compile_config = CompileConfig(backend=backend, mode=mode)
        config.compile_config._compile_all_devices = True  # transformers compiles on accelerators only by default

    def _check_deepspeed(self) -> bool:
        """True for the sharded layout: DeepSpeed ZeRO-3, one model over all processes."""
        if not self.is_deepspeed_enabled:
            return False
        stage = self.accelerator.state.deepspeed_plugin.zero_stage
        if stage != 3:
            raise ValueError(
                f"ESTrainer runs under DeepSpeed with ZeRO stage 3 only (the accelerate config has zero_stage {stage}): "
                "stages 1 and 2 shard optimizer state and gradients, which ES does not have. Use zero_stage 3 to shard "
                "a model too large for one device, or a config without DeepSpeed to replicate it on every process."
            )
        if self.args.es_optimizer != "sgd" or self.args.perturbation != "full":
            raise ValueError(
                "Under DeepSpeed ZeRO-3, ESTrainer perturbs and updates the partitions in place: set "
                f"es_optimizer='sgd' and perturbation='full' (got es_optimizer={self.args.es_optimizer!r}, "
                f"perturbation={self.args.perturbation!r}; ESConfig's default perturbation is 'lowrank', which "
                "perturbs through hooks on whole weights)."
            )
        if self.args.save_on_each_node:
            raise ValueError(
                "save_on_each_node=True with DeepSpeed ZeRO-3: ESTrainer gathers the ES state of a checkpoint on the "
                "first process only. Save on one node (save_on_each_node=False) to a filesystem every node can read."
            )
        return True

    def _prepare_models_for_evaluation(self) -> None:
        """Have accelerate place the policy as it places models for evaluation: without DDP, whose reducer would
        allocate gradient buckets the size of the model. Every process applies the same ES update from the same
        fitness values, so there are no gradients to all-reduce."""
        prepare_model = self.accelerator.prepare_model

        def prepare_for_evaluation(model, device_placement=None, evaluation_mode=False):
            return prepare_model(model, device_placement=device_placement, evaluation_mode=True)

        self.accelerator.prepare_model = prepare_for_evaluation

    def _build_es(self) -> EvolutionStrategy:
        args = self.args
        selected = select_parameters(self.model, args.es_param_spec)
        perturbation = build_perturbation(
            args.perturbation, selected, args.es_sigma, model=self.model, rank=args.perturbation_rank,
            master_device=args.es_master_device, sharded=self.sharded, copy_all=args.es_optimizer == "trainer",
            relative=args.relative_noise, zero3_optimizer=getattr(self.model_wrapped, "optimizer", None),
        )
        es = EvolutionStrategy(
            perturbation,
            population_size=args.population_size,
            lr=args.es_learning_rate(args.learning_rate),
            antithetic=args.antithetic,
            fitness_shaping=args.fitness_shaping,
            seed=derive_seed(args.seed, "es-noise"),
            anchor_decay=args.es_anchor_decay,
            start_device=args.es_start_device,
        )
        if self.beta > 0 and not self._adapters_only:  # beta's reference (with adapters only: the model without them)
            es.keep_start()
        return es

    @cached_property
    def _adapters_only(self) -> bool:
        """A PEFT model whose adapters are all that evolves: beta's reference is then the model without them, as in
        GRPO (other evolved weights, e.g. es_params="all", make it the start weights)."""
        model = self.accelerator.unwrap_model(self.model)
        if not (hasattr(model, "disable_adapter") and hasattr(model, "peft_config")):
            return False
        adapters = {n for n, p in model.named_parameters() if p.requires_grad}
        return set(select_parameters(self.model, self.args.es_param_spec)) <= adapters

    def _ensure_es(self) -> None:
        if self.es is None:
            self.es = self._build_es()

    # ---- data: every process reads the same batches ------------------------------------------------------------

    def get_train_dataloader(self):
        """The same batch of prompts on every process (replicated: they split the population; sharded: they split the
        batch in training_step), in an order that depends on (data seed, epoch) only. accelerate's seedable sampler
        and data loader are what transformers' resume path knows how to fast-forward (skip_first_batches, set_epoch)."""
        dataset = self.train_dataset
        sampler = None
        if isinstance(dataset, Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
            sampler = RandomSampler(dataset) if self.shuffle_dataset else SequentialSampler(dataset)
        prompts = self.args.prompts_per_step * (self.accelerator.num_processes if self.sharded else 1)
        loader = DataLoader(dataset, batch_size=prompts, sampler=sampler, collate_fn=identity,
                            drop_last=self.args.dataloader_drop_last)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return prepare_data_loader(loader, num_processes=1, process_index=0, use_seedable_sampler=True, data_seed=seed)

    # ---- one ES iteration --------------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        started = time.perf_counter()
        self.model.train()  # GRPO files metrics under "train" or "eval" by reading model.training
        self._ensure_es()
        if self.args.es_optimizer == "trainer":
            self.es.master.sync_from_model()
        step = self.state.global_step
        rows, padding = self._rows_of_this_process(inputs)
        scored: list[ScoredRows] = []

        weights = self.reward_weights.cpu()

        # the members' KL to the reference: for beta, and at the first step to check that the noise separates the
        # members from the start weights without destroying them (there the reference is the current weights)
        measure_kl = self.beta > 0 or step == 0
        prompt_of_row = self._prompt_of_row(len(rows))

        def score(members: list[Member]) -> dict[str, list[float]]:
            with self._member_weights(members), self._sampling_seed(step, members[0]):
                group = self._score(rows * len(members))
            if measure_kl:
                group.kl, group.kl_tokens = self._completion_kl(members, group, step)
            groups = group.split(len(rows))
            sums = defaultdict(list)
            for member, group in zip(members, groups, strict=True):
                group.member = member.index
                group.prompt_ids = group.completion_ids = []  # used; not gathered for the logs
                if not padding:
                    scored.append(group)
                for name, value in (nothing(len(weights)) if padding else member_sums(
                        group, weights, self.args.mask_truncated_completions, prompt_of_row)).items():
                    sums[name].append(value)
            return sums

        limit = self.args.es_max_generation_rows
        scores = evaluate_population(self.es.members(step), step, score, self.processes,
                                     batched=self.es.perturbation.batched,
                                     members_per_round=None if limit is None else max(1, limit // len(rows)))
        fitness, taking_part = scores.fitness, scores.scored
        per_prompt = scores.per_prompt
        if self.args.multi_objective_aggregation == "normalize_then_sum":
            fitness = normalized_then_summed(scores, weights)
        kl = member_kl(scores)
        if self.beta > 0:  # GRPO's per-token KL penalty, in the fitness
            fitness = fitness - self.beta * kl
            per_prompt = per_prompt - self.beta * kl[:, None]
        if step == 0:
            self._check_members(scored, kl)
        if not taking_part.all():  # as GRPO gives unscorable completions no advantage, and goes on
            logger.warning(
                "ES step %d: population members %s have no scored completion (every reward function returned None for "
                "each of them%s); they take no part in this step's update.", step,
                torch.nonzero(~taking_part).flatten().tolist(),
                ", or mask_truncated_completions left them out" if self.args.mask_truncated_completions else "")
        scheduled = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler is not None else self.args.learning_rate
        lr = self.args.es_learning_rate(scheduled)
        if self.args.es_optimizer == "sgd":
            stats = self.es.step(step, fitness, lr=lr, scored=taking_part, per_prompt=per_prompt)
        else:  # the optimizer applies it after this step (_AppliedUpdateNorm)
            stats = self.es.write_gradients(step, fitness, scored=taking_part, per_prompt=per_prompt)
        self._gradient_norm = stats.gradient_norm
        if self.beta > 0:
            tokens = scores.totals[KL_TOKENS].sum().clamp(min=1)
            self._metrics["train"]["kl"].append(float(scores.totals[KL].sum() / tokens))
        self._log_step(scored, stats, lr, self.es.shaped(fitness, taking_part, per_prompt),
                       time.perf_counter() - started)
        return torch.tensor(-stats.fitness_mean, device=self.args.device)

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

    def _completion_kl(self, members: list[Member], group: ScoredRows, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of ``group`` (the completions of ``members``, grouped by member): the KL to the reference summed
        over its completion tokens, and their number. Rows are taken in chunks that bound the logits held at once
        (one chunk when sharded, where every process must run the same passes); without beta (the first step's
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
        spans = [(0, rows)] if self.sharded else chunks(rows, per_member, positions, vocabulary)
        sums = torch.zeros(len(group.completion_ids), dtype=torch.float64)
        tokens = torch.zeros_like(sums)
        for start, stop in spans:
            batch = CompletionBatch.build(prompt_ids[start:stop], completion_ids[start:stop],
                                          self._tokenizer.pad_token_id, self.accelerator.device)
            with self._member_weights(members[start // per_member:(stop - 1) // per_member + 1]):
                member_logits = self._completion_logits(batch)
            with self._reference_policy(step):
                reference_logits = self._completion_logits(batch)
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

    def _get_learning_rate(self):
        """The step ES takes, as logged under ``learning_rate`` (relative_learning_rate under relative noise)."""
        return self.args.es_learning_rate(super()._get_learning_rate())

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        """TRL's ``grad_norm`` is the norm of the gradient its step used; ES's step uses the estimate ``g``, whose
        norm is logged under that name (with es_optimizer="trainer" the Trainer measures it in ``.grad`` itself)."""
        if self.args.es_optimizer == "sgd" and self._gradient_norm is not None:
            grad_norm = self._gradient_norm
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

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

    def _log_rewards(self, mode: str, scored: list[ScoredRows]) -> torch.Tensor:
        """TRL's reward metrics, and what the reward functions gave ``log_metric`` (averaged as GRPO does)."""
        rewards_per_func = torch.cat([rows.rewards for rows in scored])
        metrics = self._metrics[mode]
        for i, name in enumerate(self.reward_func_names):
            column = rewards_per_func[:, i]
            metrics[f"rewards/{name}/mean"].append(column.nanmean().item())
            metrics[f"rewards/{name}/std"].append(column[~column.isnan()].std(unbiased=False).item())
        rewards = weighted_rewards(rewards_per_func, self.reward_weights.cpu())
        valid = rewards[~rewards.isnan()]
        metrics["reward"].append(valid.mean().item())
        metrics["reward_std"].append(valid.std(unbiased=False).item())
        logged = defaultdict(list)
        for rows in scored:
            for name, values in rows.metrics.items():
                logged[name] += values
        for name, values in logged.items():
            metrics[name].append(sum(values) / len(values))
        return valid

    def _log_completions(self, scored: list[ScoredRows], shaped_fitness: torch.Tensor) -> None:
        """GRPO's completion table (``log_completions``) with every member's rows: the advantage column holds the
        member's shaped fitness, and a ``member`` column says whose rows they are."""
        logs = self._logs
        for rows in scored:
            logs["prompt"].extend(rows.prompts)
            logs["completion"].extend(rows.completions)
            for i, name in enumerate(self.reward_func_names):
                logs["rewards"][name].extend(rows.rewards[:, i].tolist())
            logs["advantages"].extend([float(shaped_fitness[rows.member])] * len(rows.prompts))
            logs["extra"]["member"].extend([rows.member] * len(rows.prompts))
            for column in {name for other in scored for name in other.extra}:
                logs["extra"][column].extend(rows.extra.get(column, [None] * len(rows.prompts)))

    def _log_step(self, scored: list[ScoredRows], stats, lr: float, shaped_fitness: torch.Tensor,
                  seconds: float) -> None:
        """TRL's reward and completion metrics over every row any process scored in this step, and the ES ones."""
        everything = [rows for share in gather_object([scored]) for rows in share]
        self._log_rewards("train", everything)
        if self.log_completions:
            self._log_completions(everything, shaped_fitness)
        lengths = torch.tensor([n for rows in everything for n in rows.completion_lengths], dtype=torch.float64)
        truncated = torch.tensor([t for rows in everything for t in rows.truncated])
        self.state.num_input_tokens_seen += int(lengths.sum()) + sum(sum(rows.prompt_lengths) for rows in everything)
        metrics = self._metrics["train"]
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]
        metrics["completions/mean_length"].append(lengths.mean().item())
        metrics["completions/min_length"].append(lengths.min().item())
        metrics["completions/max_length"].append(lengths.max().item())
        metrics["completions/clipped_ratio"].append(truncated.double().mean().item())
        terminated = lengths[~truncated] if (~truncated).any() else torch.zeros(1, dtype=torch.float64)
        metrics["completions/mean_terminated_length"].append(terminated.mean().item())
        metrics["completions/min_terminated_length"].append(terminated.min().item())
        metrics["completions/max_terminated_length"].append(terminated.max().item())
        metrics["es/unscored_members"].append(stats.left_out)
        metrics["es/fitness_mean"].append(stats.fitness_mean)
        metrics["es/fitness_std"].append(stats.fitness_std)
        metrics["es/fitness_max"].append(stats.fitness_max)
        if self.args.es_optimizer == "sgd":
            metrics["es/update_norm"].append(stats.update_norm)
        metrics["es/sigma"].append(self.es.sigma)
        metrics["es/lr"].append(lr)
        metrics["step_time"].append(seconds)

    # ---- evaluation: reward of the unperturbed weights ---------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            scored = self.processes.together(lambda: self._score(inputs), "evaluation")
        rewards = self._log_rewards("eval", [rows for share in gather_object([[scored]]) for rows in share])
        return torch.tensor(-rewards.mean().item(), device=self.args.device), None, None

    # ---- checkpoints carry the ES state ------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """As ``Trainer.train``; ``resume_from_checkpoint=True`` takes the newest checkpoint that is complete (one a
        process killed mid-save left unfinished is skipped), and a given path must be complete."""
        if resume_from_checkpoint:  # process 0 decides, so that every process resumes from the same checkpoint
            chosen = self._checkpoint_to_resume(resume_from_checkpoint) if self.processes.rank == 0 else None
            resume_from_checkpoint = self.processes.broadcast(chosen)
            if isinstance(resume_from_checkpoint, Exception):
                raise resume_from_checkpoint
        self.resumed_checkpoint = resume_from_checkpoint or None  # where callbacks find their saved state
        try:
            return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        finally:
            if self.es is not None:
                self.es.perturbation.close()

    def _checkpoint_to_resume(self, requested) -> str | Exception:
        if requested is True:
            newest = last_resumable_checkpoint(self.args.output_dir)
            return newest or ValueError(
                f"resume_from_checkpoint=True, but {self.args.output_dir} holds no complete ES checkpoint."
            )
        reason = why_not_resumable(requested)
        if reason is None:
            return requested
        newest = last_resumable_checkpoint(os.path.dirname(os.path.abspath(requested)))
        return FileNotFoundError(
            f"resume_from_checkpoint={requested} cannot be resumed: {reason}. "
            + (f"The newest complete checkpoint beside it is {newest}." if newest else "Start a new run.")
        )

    def _save_checkpoint(self, model, trial):
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save and os.path.exists(os.path.join(folder, TRAINER_STATE_NAME)):
            # a run resumed from an older checkpoint saves over this one: incomplete until the new state is written
            os.remove(os.path.join(folder, TRAINER_STATE_NAME))
        if self.sharded:
            self._ensure_es()
            self.es.perturbation.write_deepspeed_copies()
        super()._save_checkpoint(model, trial)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial):
        """transformers' loop runs one step before it checks ``max_steps``: a run resumed from its final checkpoint
        (one that ends mid-epoch) would train a step more than the uninterrupted run. Nothing is left to train then."""
        epochs_trained, steps_in_epoch = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        if 0 < max_steps <= self.state.global_step:
            return num_train_epochs, 0
        return epochs_trained, steps_in_epoch

    def _save_rng_state(self, output_dir: str) -> None:
        """Beside the RNG states, the ES state (seed, fp32 master, anchor): written before trainer_state.json, which
        transformers writes last before it pushes the checkpoint and deletes older ones, so a checkpoint is never
        pushed, nor its predecessor deleted, before it can be resumed."""
        save_rng_state = super()._save_rng_state
        self.processes.together(lambda: save_rng_state(output_dir), "saving the RNG states")
        self._ensure_es()
        state = self.es.state_dict()  # a collective when sharded

        def save_es_state():
            if self.args.should_save:
                path = os.path.join(output_dir, ES_STATE_NAME)
                torch.save(state, path + ".tmp")
                os.replace(path + ".tmp", path)
            for callback in self.callback_handler.callbacks:  # the drift callbacks' start weights
                if hasattr(callback, "save_reference"):
                    callback.save_reference(output_dir)

        self.processes.together(save_es_state, f"saving {ES_STATE_NAME}")

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        self._ensure_es()
        # memory-mapped: a sharded process reads only its slices of the saved fp32 tensors
        self.es.load_state_dict(torch.load(os.path.join(checkpoint, ES_STATE_NAME), map_location="cpu",
                                           weights_only=True, mmap=True))
        if self.beta > 0 and not self._adapters_only and not self.es.start_restored:
            logger.warning(
                "beta=%g: the checkpoint %s holds no start weights (it was trained with beta=0 and without the drift "
                "callbacks or es_anchor_decay): the KL penalty is measured from the resumed weights, not from the "
                "weights the run started from.", self.beta, checkpoint)


class _BuildShardedES(TrainerCallback):
    def __init__(self, trainer: ESTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._ensure_es()


class _AppliedUpdateNorm(TrainerCallback):
    """With ``es_optimizer="trainer"`` the Trainer's optimizer takes the step after ``training_step``: log the norm of
    the change it made as ``es/update_norm`` (the applied step, as under "sgd"), and adopt it into the fp32 master."""

    def __init__(self, trainer: ESTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        es = self.trainer.es
        squared = 0.0
        for name, p in es.params.items():
            squared += float((p.detach().double() - es.master.value(name).double()).pow(2).sum())
        es.master.sync_from_model()
        self.trainer._metrics["train"]["es/update_norm"].append(es.perturbation.total_squared_norm(squared) ** 0.5)
