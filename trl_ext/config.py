"""``ESConfig``: ``GRPOConfig`` plus the ES settings (``lightning_es.engine.ESSettings``) and the knobs only a TRL run
has (how members decode, which optimizer steps, how many rows one ``generate`` call holds)."""

import dataclasses
import os
import warnings
from dataclasses import dataclass, field

import torch
from transformers.trainer_utils import SchedulerType
from trl import GRPOConfig

from lightning_es.engine.settings import DEFAULT_LEARNING_RATE, ESSettings
from lightning_es.engine.shaping import min_prompts

from .grpo_fields import FIELDS, SwapWarning, apply_audit, default, warn_changes

ES_OPTIMIZERS = ("sgd", "trainer")


@dataclass
class ESConfig(ESSettings, GRPOConfig):
    r"""Configuration for [`ESTrainer`]: every `GRPOConfig` field keeps its TRL meaning, plus the ES settings
    (`lightning_es.engine.ESSettings`, shared with `ESStrategy`) and the TRL-only knobs below.

    One ES iteration draws `per_device_train_batch_size // num_generations` prompts (at least one), the same prompts
    on every process; every population member answers each of them `num_generations` times, and its fitness is its
    mean reward. Replicated processes split the population; under DeepSpeed ZeRO-3 they split the prompts, each
    process answering its own `per_device_train_batch_size // num_generations`.

    Noise and step come in two units. Relative (the default): `relative_sigma` and `relative_learning_rate` are
    fractions of each tensor's own scale (its RMS for a matrix, each entry's magnitude for a vector, fixed at the start:
    `lightning_es.engine.scales`), so that they mean the same on every model. Absolute: set `sigma` (then
    `learning_rate` is the step), as the ES papers write them. Either way the step is `lr` in `theta += lr * g` with
    `g = sum_i f_i eps_i / (N sigma)`; the ES-at-scale paper writes it as `alpha / N * sum_i f_i eps_i`, so
    `lr = alpha * sigma`. Its settings for 0.5B-7B models are `population_size=30`, `sigma=1e-3`,
    `learning_rate=5e-7` (alpha 5e-4), with `fitness_shaping="zscore"`.

    Defaults (docs/reports/accuracy-race/: tuned on the validation accuracy of generated word problems,
    SmolLM2-135M-Instruct): 8 prompts per iteration, each answered greedily by 16 members, normalised per prompt in
    GRPO's manner (`prompt_zscore`); rank-4 noise of relative_sigma 0.03, which keeps the members of SmolLM2-135M and
    Gemma-3-270M coherent (0.08 and 0.13 nats per token from their base model, docs/reports/noise-scale/), and a step
    of 1.5e-3 (relative).
    """

    per_device_train_batch_size: int = field(
        default=8,
        metadata={"help": "Rows each member answers per process and iteration: per_device_train_batch_size / "
                  "num_generations prompts. 8 prompts: their correctness, read per prompt, carries a signal in "
                  "most iterations (docs/reports/accuracy-race/)."},
    )
    lr_scheduler_type: SchedulerType | str = field(
        default="constant", metadata={"help": "Schedule of the ES step size; constant, as the ES papers use."}
    )
    num_generations: int = field(
        default=1,
        metadata={"help": "Completions per prompt and per population member (1: one greedy completion, as ES-at-scale)."},
    )
    max_grad_norm: float = field(
        default=0.0,
        metadata={"help": "Clips the ES estimate handed to the Trainer's optimizer (es_optimizer='trainer'); 0: none. "
                  "The estimate is not a loss gradient: its norm grows with the parameter count over sigma (about 1e4 "
                  "on a 135M model), so TrainingArguments' 1.0 would shrink every step 10^4-fold."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "ES never calls backward, so checkpointing would only slow generation."}
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Evaluate members without dropout, so that fitness differences come from noise."}
    )
    es_greedy: bool | None = field(
        default=None,
        metadata={
            "help": "Greedy decoding for population members. Unset: greedy when num_generations == 1, otherwise "
            "sampled with TRL's temperature/top_p/top_k."
        },
    )
    es_optimizer: str = field(
        default="sgd",
        metadata={
            "help": "'sgd': the plain ES step theta += lr * g, accumulated in an fp32 master copy. 'trainer': hand "
            "-g to the Trainer's optimizer (`optim`, e.g. AdamW), with its weight decay and gradient clipping."
        },
    )
    es_max_generation_rows: int | None = field(
        default=512,
        metadata={"help": "Most rows one `generate` call of the low-rank population holds: the members are generated "
                  "in chunks of whole members (each member's rows are per_device_train_batch_size), so that the KV "
                  "cache of population x prompts rows is never held at once. None: the whole population in one call. "
                  "Sampled members (num_generations > 1) draw per chunk, so their samples depend on the chunking."},
    )

    def __post_init__(self):
        self._check_es_fields()
        self._refuse_fsdp()
        changes = apply_audit(self)
        self.use_vllm = False  # warned: ES generates its population itself
        self._check_batch()
        if self.es_greedy and self._sampling_requested():
            changes.append("es_greedy=True: members decode greedily; the sampling settings (temperature, top_p, "
                           "top_k, min_p, generation_kwargs) are ignored")
        warn_changes(f"ESConfig: {len(changes)} field(s) set are not used as GRPOTrainer would use them:", changes)
        self._use_gloo_without_accelerator()
        self.gradient_accumulation_steps = 1  # one update per iteration (the audit warned if it was set)
        self.generation_batch_size = self.steps_per_generation = None  # ignored (warned if set)
        # GRPOConfig requires two completions per prompt for its group advantages and checks the generation and eval
        # batches against them; check against what ES generates instead, then restore the ES values.
        requested, requested_eval = self.num_generations, self.num_generations_eval
        self.num_generations, self.num_generations_eval = 2, requested_eval or requested
        self.steps_per_generation = 2
        GRPOConfig.__post_init__(self)  # not ESSettings': the ES fields were checked above
        self.num_generations, self.num_generations_eval = requested, requested_eval
        self.steps_per_generation = 1
        self.generation_batch_size = self.per_device_train_batch_size * self.world_size

    def _check_batch(self) -> None:
        size, generations = self.per_device_train_batch_size, self.num_generations
        if size % generations:
            lower, higher = size - size % generations, size - size % generations + generations
            suggestion = f"{lower} or {higher}" if lower else f"{higher}"
            raise ValueError(
                f"per_device_train_batch_size ({size}) must be a multiple of num_generations ({generations}): each "
                f"member answers per_device_train_batch_size / num_generations prompts num_generations times, and "
                f"{size % generations} rows would be dropped. Use per_device_train_batch_size={suggestion}."
            )

    def _sampling_requested(self) -> bool:
        """The user asked for sampled decoding: a sampling field differs from its default, or generation_kwargs
        samples."""
        changed = any(getattr(self, name) != default(type(self), name) for name in ("temperature", "top_p", "top_k",
                                                                                      "min_p"))
        kwargs = self.generation_kwargs or {}
        return changed or bool(kwargs.get("do_sample")) or bool({"temperature", "top_p", "top_k", "min_p"} & set(kwargs))

    def _use_gloo_without_accelerator(self) -> None:
        """Several processes on a host without GPUs: create the process group with gloo (otherwise accelerate leaves
        the backend unset and each process trains alone) and, outside DeepSpeed, run on the CPU."""
        if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
            return
        if self.ddp_backend is None:
            self.ddp_backend = "gloo"
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
            self.use_cpu = True

    def _refuse_fsdp(self) -> None:
        """FSDP (``fsdp=...`` or an accelerate config with FSDP, which sets ACCELERATE_USE_FSDP) replaces the
        parameters ES perturbs with flat shards after ES captured them: every member would score the same."""
        if self.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            raise ValueError(
                f"ESTrainer does not run under FSDP (fsdp={self.fsdp!r}, ACCELERATE_USE_FSDP="
                f"{os.environ.get('ACCELERATE_USE_FSDP', 'unset')}): ES perturbs and updates the parameters it "
                "captured before accelerate wraps the model, and FSDP replaces them with flat shards, so every member "
                "would score the same and nothing would train. Shard a large model with DeepSpeed ZeRO-3 (accelerate "
                "launch --config_file recipes/configs/deepspeed_zero3.yaml), or replicate it (no FSDP config)."
            )

    def _check_es_fields(self) -> None:
        if not isinstance(self.fitness_shaping, str):
            raise ValueError(
                f"ESConfig(fitness_shaping={self.fitness_shaping!r}): ESConfig takes a shaping's name (it is saved "
                "with checkpoints as JSON), one of 'zscore', 'centered_rank', 'evidence_zscore', 'prompt_zscore'; a callable is "
                "ESStrategy's only.")
        if self.es_optimizer not in ES_OPTIMIZERS:
            raise ValueError(f"es_optimizer must be one of {ES_OPTIMIZERS}, got {self.es_optimizer!r}.")
        self.check(optimizer_steps=self.es_optimizer == "trainer")
        if not self.beta >= 0:
            raise ValueError(
                f"beta must be non-negative, got {self.beta}: it weighs each member's KL to the starting weights in its "
                "fitness (fitness = shaped reward - beta * KL); 0 turns the penalty off.")
        if (self.perturbation == "lowrank" and self.es_max_generation_rows is not None
                and self.es_max_generation_rows < self.per_device_train_batch_size):
            raise ValueError(
                f"es_max_generation_rows={self.es_max_generation_rows} is smaller than one population member's rows "
                f"(per_device_train_batch_size={self.per_device_train_batch_size}: a member answers all its prompts in "
                f"one call). Set es_max_generation_rows to at least {self.per_device_train_batch_size} (a multiple of "
                "it wastes nothing), or None for the whole population in one call.")
        if self.num_generations < 1:
            raise ValueError(f"num_generations must be at least 1, got {self.num_generations}.")
        needed = min_prompts(self.shaping)
        if self.prompts_per_step < needed:
            raise ValueError(
                f"fitness_shaping={self.fitness_shaping!r} weighs each member's lead prompt by prompt, which needs at "
                f"least {needed} prompts per step; per_device_train_batch_size={self.per_device_train_batch_size} with "
                f"num_generations={self.num_generations} gives {self.prompts_per_step}. Set per_device_train_batch_size="
                f"{needed * self.num_generations}, or choose fitness_shaping='prompt_zscore'.")

    # renamed to ESSettings' names; the old ones work until the next release
    @property
    def es_sigma(self) -> float:
        warnings.warn("ESConfig.es_sigma is renamed noise_sigma.", FutureWarning, stacklevel=2)
        return self.noise_sigma

    def es_learning_rate(self, scheduled: float) -> float:
        warnings.warn("ESConfig.es_learning_rate() is renamed step_size().", FutureWarning, stacklevel=2)
        return self.step_size(scheduled)

    @property
    def es_param_spec(self):
        warnings.warn("ESConfig.es_param_spec is renamed param_spec.", FutureWarning, stacklevel=2)
        return self.param_spec

    @property
    def prompts_per_step(self) -> int:
        return self.per_device_train_batch_size // self.num_generations

    @property
    def greedy(self) -> bool:
        """es_greedy if set; else greedy when each prompt gets one completion and no sampling was asked for (or
        generation_kwargs says do_sample=False)."""
        if self.es_greedy is not None:
            return self.es_greedy
        if self.generation_kwargs and self.generation_kwargs.get("do_sample") is False:
            return True
        return self.num_generations == 1 and not self._sampling_requested()


# GRPOConfig.__post_init__ fills these from others: not settings of the user's
DERIVED = {"generation_batch_size", "steps_per_generation", "activation_checkpointing"}


def to_es_config(args: GRPOConfig) -> ESConfig:
    """The fields a plain `GRPOConfig` sets to other than TRL's defaults, with ES defaults for the rest.

    A field left at TRL's default (or set to it explicitly: the two cannot be told apart) takes ES's default, e.g.
    ``num_generations`` 8 becomes 1, ``lr_scheduler_type`` "linear" becomes "constant", ``gradient_checkpointing``
    True becomes False. ``per_device_train_batch_size`` is always kept: with ``num_generations`` it decides the prompts
    per step (TRL's default and ES's are both 8). ``learning_rate`` is tuned for Adam on true gradients, so the ES step
    replaces it. Fields without an ES counterpart are refused, or ignored, by `ESConfig` (trl_ext.grpo_fields). Every
    such change is listed in one ``SwapWarning``.
    """
    if isinstance(args, ESConfig):
        return args
    changed = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(GRPOConfig)
        if f.init and f.name not in DERIVED and getattr(args, f.name) != default(GRPOConfig, f.name)
    }
    changed["per_device_train_batch_size"] = args.per_device_train_batch_size
    batching = []
    if args.steps_per_generation != args.gradient_accumulation_steps:  # the user set one of the two, which derives
        batching.append(f"generation_batch_size={args.generation_batch_size} (steps_per_generation="  # the other
                        f"{args.steps_per_generation}) {FIELDS['steps_per_generation'].es}")
    replaced = [
        f"{f.name}: {default(GRPOConfig, f.name)!r} -> {default(ESConfig, f.name)!r} ({_reason(f.name)})"
        for f in dataclasses.fields(GRPOConfig)
        if f.init and f.name not in changed and f.name not in DERIVED | {"learning_rate"}
        and default(GRPOConfig, f.name) != default(ESConfig, f.name)
    ]
    if "num_generations" not in changed:
        replaced.append(f"per_device_train_batch_size={args.per_device_train_batch_size} with num_generations 1: "
                        f"{args.per_device_train_batch_size} prompts per iteration, each answered once by every member "
                        f"(GRPOTrainer: {args.per_device_train_batch_size // args.num_generations} prompt(s) x "
                        f"{args.num_generations} sampled completions)")
    learning_rate = changed.pop("learning_rate", args.learning_rate)
    replaced.append(f"learning_rate={learning_rate:g} (tuned for Adam on true gradients) is not used: ES steps by its "
                    f"default learning_rate {DEFAULT_LEARNING_RATE:g}, a fraction of each tensor's scale")
    replaced += batching
    with warnings.catch_warnings(record=True) as caught:  # the audit's lines join this one block
        warnings.simplefilter("always", SwapWarning)
        config = ESConfig(**changed)
    for warning in caught:
        if issubclass(warning.category, SwapWarning):
            replaced += str(warning.message).split("\n  - ")[1:]
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    warn_changes(
        f"ESTrainer got a GRPOConfig; {len(replaced)} field(s) take other values or meanings than under GRPOTrainer "
        "(an ESConfig with the field set chooses it):", replaced)
    return config


def _reason(name: str) -> str:
    """The first sentence of the ES field's help: why ES's default differs."""
    text = ESConfig.__dataclass_fields__[name].metadata.get("help", "ES's default")
    return text.split(". ")[0].rstrip(".")
