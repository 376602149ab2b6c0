"""``ESTrainer``: TRL's ``GRPOTrainer`` with the policy-gradient step replaced by an Evolution Strategies step.

Everything else is TRL's and transformers': model and tokenizer loading, PEFT, reward functions (called exactly as
GRPO calls them), prompt formats, callbacks, loggers, checkpoints and evaluation. This file wires the engine in; each
other concern has a file of its own (docs/architecture.md): ``trl_adapter`` (scoring through TRL's generation and
rewards), ``kl_penalty``, ``logs``, ``checkpoints``, ``runtime_checks``.
"""

import logging
import time
from functools import cached_property

import torch
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import gather_object
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import identity

from lightning_es import EvolutionStrategy, Processes, derive_seed, select_parameters
from lightning_es.engine import Iteration, PopulationScores, build_evolution_strategy, run_iteration
from lightning_es.engine.shaping import uses_prompts

from .checkpoints import ESCheckpoints
from .config import ESConfig, to_es_config
from .kl_penalty import KLPenalty
from .logs import ESLogging, _AppliedUpdateNorm
from .reward_checks import checked_reward_function
from .runtime_checks import RuntimeChecks, _check_prompt_column
from .scoring import KL, KL_TOKENS, member_kl, normalized_then_summed
from .trl_adapter import TRLScoring

logger = logging.getLogger(__name__)


class ESTrainer(ESCheckpoints, ESLogging, KLPenalty, TRLScoring, RuntimeChecks, GRPOTrainer):
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
        # GRPO's normalize_then_sum normalises each function within a prompt's group; ES has each function's sums per
        # member, not per prompt: it normalises each function over the population and shapes the sum without prompts
        self.per_function = args.multi_objective_aggregation == "normalize_then_sum" and len(reward_funcs) > 1
        if self.per_function and uses_prompts(args.shaping):
            logger.warning(
                f"multi_objective_aggregation='normalize_then_sum' with {len(reward_funcs)} reward functions: each "
                f"function's member means are z-scored over the population, then weighted and summed, and "
                f"fitness_shaping={args.fitness_shaping!r} shapes that sum as a z-score (it cannot normalise per prompt "
                "and per function).")

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
        self.processes = Processes.current(sharded=self.sharded)
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
        self.resumed_checkpoint = None  # the checkpoint train() resumed from, where callbacks find their saved state
        if args.es_optimizer == "trainer":
            self.add_callback(_AppliedUpdateNorm(self))
        self.resize_completion_logs(args.population_size * args.per_device_train_batch_size * (
            self.accelerator.num_processes if self.sharded else 1))

    def create_optimizer(self, model=None):
        """ES scales no loss. accelerate's GradScaler (fp16 mixed precision on an accelerator) would find no scaled
        gradient and refuse the optimizer's step (es_optimizer="sgd"), or divide the ES estimate by its scale before
        the step ("trainer"); the optimizer is prepared with a disabled one instead. fp16 autocast is unchanged."""
        if self.accelerator.scaler is not None:
            self.accelerator.scaler = torch.amp.GradScaler(self.accelerator.device.type, enabled=False)
        return super().create_optimizer(model)

    def _prepare_models_for_evaluation(self) -> None:
        """Have accelerate place the policy as it places models for evaluation: without DDP, whose reducer would
        allocate gradient buckets the size of the model. Every process applies the same ES update from the same
        fitness values, so there are no gradients to all-reduce."""
        prepare_model = self.accelerator.prepare_model

        def prepare_for_evaluation(model, device_placement=None, evaluation_mode=False):
            return prepare_model(model, device_placement=device_placement, evaluation_mode=True)

        self.accelerator.prepare_model = prepare_for_evaluation

    def _build_es(self) -> EvolutionStrategy:
        es = build_evolution_strategy(
            self.args, self.model, derive_seed(self.args.seed, "es-noise"), sharded=self.sharded,
            copy_all=self.args.es_optimizer == "trainer", zero3_optimizer=getattr(self.model_wrapped, "optimizer", None))
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
        return set(select_parameters(self.model, self.args.param_spec)) <= adapters

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
        # the members' KL to the reference: for beta, and at the first step to check that the noise separates the
        # members from the start weights without destroying them (there the reference is the current weights)
        score, scored, rows = self.population_score(inputs, step, measure_kl=self.beta > 0 or step == 0)
        lr = self.scheduled_step()
        limit = self.args.es_max_generation_rows

        def checked(iteration: Iteration) -> None:
            if step == 0:
                self._check_members(scored, member_kl(iteration.scores))
            if not iteration.scored.all():  # as GRPO gives unscorable completions no advantage, and goes on
                logger.warning(
                    "ES step %d: population members %s have no scored completion (every reward function returned None "
                    "for each of them%s); they take no part in this step's update.", step,
                    torch.nonzero(~iteration.scored).flatten().tolist(),
                    ", or mask_truncated_completions left them out" if self.args.mask_truncated_completions else "")

        iteration = run_iteration(
            self.es, step, score, self.processes, update="step" if self.args.es_optimizer == "sgd" else "gradients",
            learning_rate=lr, fitness=self._fitness, batched=self.es.perturbation.batched,
            members_per_round=None if limit is None else max(1, limit // rows), check=checked)
        kl = 0.0
        if self.beta > 0:
            kl = float(iteration.scores.extra[KL].sum() / iteration.scores.extra[KL_TOKENS].sum().clamp(min=1))
            self.trl_metrics("train")["kl"].append(kl)
        self._log_step(scored, iteration, lr, time.perf_counter() - started)
        # ``loss``: what GRPO's loss reads at its on-policy step, where the advantages sum to zero: beta times the KL
        return torch.tensor(self.beta * kl, device=self.args.device)

    def _fitness(self, scores: PopulationScores) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """GRPO's reward arithmetic over the combined scores (``multi_objective_aggregation``), and its per-token KL
        penalty (``beta``), charged after the shaping as GRPO adds it beside its normalised advantages: the rewards
        alone decide which prompts are tied."""
        fitness, per_prompt = scores.fitness, scores.per_prompt
        if self.per_function:
            fitness = normalized_then_summed(scores, self.reward_weights.cpu())
            per_prompt = per_prompt[:, :0]  # the weighted sums per prompt would undo each function's normalisation
        return fitness, per_prompt, self.beta * member_kl(scores) if self.beta > 0 else None

    # ---- evaluation: reward of the unperturbed weights ---------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            scored = self.processes.together(lambda: self._score(inputs), "evaluation")
        rewards = self._log_rewards("eval", [rows for share in gather_object([[scored]]) for rows in share])
        return torch.tensor(-rewards.mean().item(), device=self.args.device), None, None


class _BuildShardedES(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._ensure_es()
