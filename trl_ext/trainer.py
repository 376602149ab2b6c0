"""``ESTrainer``: TRL's ``GRPOTrainer`` with the policy-gradient step replaced by an Evolution Strategies step.

Everything else is TRL's and transformers': model and tokenizer loading, PEFT, reward functions (called exactly as
GRPO calls them), prompt formats, callbacks, loggers, checkpoints and evaluation.
"""

import logging
import math
import os
import time
from contextlib import contextmanager

import torch
from datasets import Dataset, IterableDataset
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import identity

from lightning_es import EvolutionStrategy, derive_seed, select_parameters
from lightning_es.population import Member
from lightning_es.sharding import ShardedNoise, release_gathered, zero3_shards

from .config import ESConfig, to_es_config
from .data import SeededShuffleSampler, SharedPromptLoader
from .reward_checks import checked_reward_function

logger = logging.getLogger(__name__)

ES_STATE_NAME = "es_state.pt"


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
        if args.use_vllm:
            raise NotImplementedError("ESTrainer generates with transformers; set use_vllm=False.")
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
            checked_reward_function(f, lambda: self.state.global_step) if callable(f) and not isinstance(f, torch.nn.Module) else f
            for f in reward_funcs
        ]

        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )

        if args.greedy:
            greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "min_p": None}
            self.generation_kwargs = {**self.generation_kwargs, **greedy}
            for key, value in greedy.items():
                setattr(self.generation_config, key, value)

        self.sharded = self._check_deepspeed()
        if self.sharded:
            self.es = None  # built over the ZeRO-3 partitions once DeepSpeed has created them, in train()
        else:
            self.es = self._build_es(select_parameters(self.model, args.es_param_spec))
            self.es.local_members(0, self.accelerator.process_index, self.accelerator.num_processes)  # checks the split

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
                "Under DeepSpeed ZeRO-3, ESTrainer updates the partitions in place: use es_optimizer='sgd' and "
                "perturbation='full'."
            )
        return True

    def _build_es(self, params, noise=None) -> EvolutionStrategy:
        args = self.args
        return EvolutionStrategy(
            params,
            population_size=args.population_size,
            sigma=args.sigma,
            lr=args.learning_rate,
            antithetic=args.antithetic,
            fitness_shaping=args.fitness_shaping,
            seed=derive_seed(args.seed, "es-noise"),
            master_device=args.es_master_device,
            perturbation=args.perturbation,
            rank=args.perturbation_rank,
            model=self.model,
            anchor_decay=args.es_anchor_decay,
            noise=noise,
        )

    def _ensure_sharded_es(self) -> None:
        if self.es is None:
            shards, layouts = zero3_shards(select_parameters(self.model, self.args.es_param_spec))
            self.es = self._build_es(shards, ShardedNoise(layouts))

    # ---- data: every process sees the same prompts -------------------------------------------------------------

    def get_train_dataloader(self):
        dataset = self.train_dataset
        if isinstance(dataset, Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
            sampler = SeededShuffleSampler(len(dataset), seed=self.args.seed, shuffle=self.shuffle_dataset)
        else:
            sampler = None
        # sharded: each process takes its own prompts_per_step rows of the batch (training_step)
        prompts = self.args.prompts_per_step * (self.accelerator.num_processes if self.sharded else 1)
        return SharedPromptLoader(
            dataset,
            batch_size=prompts,
            sampler=sampler,
            collate_fn=identity,
            drop_last=self.args.dataloader_drop_last,
        )

    # ---- one ES iteration --------------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        started = time.perf_counter()
        self.model.train()  # GRPO files metrics under "train" or "eval" by reading model.training
        if self.args.es_optimizer == "trainer":
            self.es.master.sync_from_model()
        step = self.state.global_step
        world_size = self.accelerator.num_processes
        if self.sharded:
            self._ensure_sharded_es()
            inputs = inputs[self.accelerator.process_index :: world_size]
        rows = [row for row in inputs for _ in range(self.num_generations)]

        fitness = torch.full((self.es.population_size,), math.nan, dtype=torch.float64)
        member_rewards = []  # per member: (rows, n_funcs)
        if self.sharded:
            for member in self.es.members(step):
                rewards = self._score_sharded(step, member, rows)
                member_rewards.append(rewards)
                fitness[member.index] = self._weighted_rewards(rewards).nanmean()
        else:
            local = self.es.local_members(step, self.accelerator.process_index, world_size)
            for round_index, group in self._evaluation_rounds(step, local, rows):
                for rank, block in enumerate(group.cpu().chunk(world_size)):
                    for offset, member_block in enumerate(block.chunk(len(group) // (world_size * len(rows)))):
                        member_rewards.append(member_block)
                        fitness[(round_index + offset) * world_size + rank] = self._weighted_rewards(member_block).nanmean()
        if fitness.isnan().any():
            bad = torch.nonzero(fitness.isnan()).flatten().tolist()
            raise ValueError(
                f"every reward function returned None for every completion of members {bad} at step {step}: "
                "their fitness is undefined. Return a number for at least one completion."
            )

        lr = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler is not None else self.args.learning_rate
        if self.args.es_optimizer == "sgd":
            stats = self.es.step(step, fitness, lr=lr)
        else:
            stats = self.es.write_gradients(step, fitness)
        if self.sharded:
            release_gathered(self.model.parameters())
        self._log_step(torch.cat(member_rewards), stats, lr, time.perf_counter() - started)
        return torch.tensor(-stats.fitness_mean, device=self.args.device)

    def _evaluation_rounds(self, step: int, members: list[Member], rows: list[dict]):
        """Yield ``(first round, rewards)``: one member at a time, or all of them in one batch with low-rank noise.

        The rewards stack every process's rows; within a process's block, rows are grouped by member.
        """
        if self.es.perturbation.batched:
            with self.es.perturbation.apply_population(members), self._sampling_seed(step, members[0]):
                yield 0, self._score(rows * len(members))
            return
        for round_index, member in enumerate(members):
            with self.es.perturbed(member), self._sampling_seed(step, member):
                yield round_index, self._score(rows)

    def _score_sharded(self, step: int, member: Member, rows: list[dict]) -> torch.Tensor:
        """Every process applies the member to its partitions and scores its own rows; rewards of all rows."""
        with self.es.perturbed(member), self._sampling_seed(step, member):
            release_gathered(self.model.parameters())  # gather the perturbed partitions, not a kept full copy
            return self._score(rows).cpu()

    @contextmanager
    def _sampling_seed(self, step: int, member: Member):
        """Seed sampled decoding by (step, member), so completions do not depend on which process runs the member."""
        device = self.accelerator.device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(derive_seed(self.args.seed, "sampling", step, member.index))
            yield

    def _score(self, rows: list[dict]) -> torch.Tensor:
        """Generate and score completions for ``rows`` with the current weights; gathered over processes."""
        prompts = [row["prompt"] for row in rows]
        _, completion_ids, _, completions, *_ = self._generate(prompts)
        return self._calculate_rewards(rows, prompts, completions, completion_ids)

    def _weighted_rewards(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        weighted = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        return weighted.masked_fill(rewards_per_func.isnan().all(dim=1), math.nan)

    def _log_rewards(self, mode: str, rewards_per_func: torch.Tensor) -> torch.Tensor:
        metrics = self._metrics[mode]
        for i, name in enumerate(self.reward_func_names):
            column = rewards_per_func[:, i]
            metrics[f"rewards/{name}/mean"].append(column.nanmean().item())
            metrics[f"rewards/{name}/std"].append(column[~column.isnan()].std(unbiased=False).item())
        rewards = self._weighted_rewards(rewards_per_func)
        valid = rewards[~rewards.isnan()]
        metrics["reward"].append(valid.mean().item())
        metrics["reward_std"].append(valid.std(unbiased=False).item())
        return valid

    def _log_step(self, rewards_per_func: torch.Tensor, stats, lr: float, seconds: float) -> None:
        self._log_rewards("train", rewards_per_func)
        metrics = self._metrics["train"]
        metrics["es/fitness_mean"].append(stats.fitness_mean)
        metrics["es/fitness_std"].append(stats.fitness_std)
        metrics["es/fitness_max"].append(stats.fitness_max)
        metrics["es/update_norm"].append(stats.update_norm)
        metrics["es/sigma"].append(self.es.sigma)
        metrics["es/lr"].append(lr)
        metrics["step_time"].append(seconds)

    # ---- evaluation: reward of the unperturbed weights ---------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            rewards = self._log_rewards("eval", self._score(inputs).cpu())
        return torch.tensor(-rewards.mean().item(), device=self.args.device), None, None

    # ---- checkpoints carry the ES state ------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        state = {**self.es.state_dict(), "step": self.state.global_step}  # a collective when sharded
        if not self.args.should_save:
            return
        checkpoint = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        path = os.path.join(checkpoint, ES_STATE_NAME)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if self.sharded:
            self._ensure_sharded_es()
        path = os.path.join(checkpoint, ES_STATE_NAME)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{checkpoint} has no {ES_STATE_NAME}: it was not written by ESTrainer or its save was interrupted. "
                "Resume from an earlier checkpoint."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["seed"] != self.es.population.seed:
            raise ValueError(
                f"{checkpoint} was trained with another seed; resume with the seed it was trained with (args.seed)."
            )
        self.es.load_state_dict(state)
