"""What every `GRPOConfig` field (TRL 1.16), and every `TrainingArguments` field a GRPO script sets, means under
`ESTrainer`: the audit behind docs/grpo_fields.md (generated from ``FIELDS`` by ``audit_table``), applied by
`ESConfig`.

- ``SAME``: the field keeps its TRL/transformers meaning;
- ``ES``: the field keeps its role with an ES meaning, documented in the row;
- ``WARNED``: set to anything but GRPO's default, a one-line warning names it and says what ES does with it (mostly:
  ignores it, having no counterpart);
- ``REFUSED``: set to anything but GRPO's default, it is an error that names it and says why;
- ``OPTIMIZER``: the Trainer's optimizer settings: same meaning with ``es_optimizer="trainer"`` (the optimizer steps on
  the ES estimate), ignored with a warning when set under ``es_optimizer="sgd"`` (the plain ES step).
"""

import dataclasses
import warnings
from dataclasses import dataclass
from enum import Enum

from trl import GRPOConfig


class SwapWarning(UserWarning):
    """What ESTrainer does differently from GRPOTrainer with the fields a script set: one warning, listing them all."""


def warn_changes(header: str, changes: list[str], stacklevel: int = 4) -> None:
    """One warning for every change (a warnings.warn, not a log line: it shows whether or not logging is set up)."""
    if changes:
        warnings.warn("\n  - ".join([header, *changes]), SwapWarning, stacklevel=stacklevel)


class Meaning(Enum):
    SAME = "same meaning"
    ES = "ES meaning"
    WARNED = "warned when set"
    REFUSED = "refused when set"
    OPTIMIZER = "same meaning with es_optimizer='trainer', warned under 'sgd'"


@dataclass(frozen=True)
class Row:
    meaning: Meaning
    grpo: str  # what GRPO does with it
    es: str  # what ES does with it, or why it is ignored or refused
    companions: tuple[str, ...] = ()  # fields that serve only this one: its warning names those set too


SAME, ES, WARNED, REFUSED, OPTIMIZER = Meaning.SAME, Meaning.ES, Meaning.WARNED, Meaning.REFUSED, Meaning.OPTIMIZER
_LOSS = "ignored: a term of GRPO's policy-gradient loss; ES has no loss (fitness is a member's mean reward)"
_VLLM = "used only with use_vllm=True, which ESTrainer ignores (it generates with transformers)"
_VLLM_FIELDS = (
    "vllm_mode", "vllm_model_impl", "vllm_enable_sleep_mode", "vllm_structured_outputs_regex", "vllm_server_base_url",
    "vllm_server_host", "vllm_server_port", "vllm_server_timeout", "vllm_group_port", "vllm_gpu_memory_utilization",
    "vllm_max_model_length", "vllm_tensor_parallel_size", "vllm_importance_sampling_correction",
    "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min",
    "vllm_importance_sampling_cap")
_REF = ("GRPO's reference model, used only with beta > 0; ES's reference is the starting weights (the adapter-free "
        "model under PEFT), fixed")
_ENTROPY = "ignored: GRPO's entropy regularisation of the policy-gradient loss; ES has no loss"
_LOGS = "members' completions: every member's rows of the step, advantage = the member's shaped fitness"

FIELDS: dict[str, Row] = {
    # ---- model and data -----------------------------------------------------------------------------------------
    "model_init_kwargs": Row(SAME, "kwargs of from_pretrained for a model given by name", "the same"),
    "trust_remote_code": Row(SAME, "allows remote code when loading models", "the same"),
    "disable_dropout": Row(SAME, "turns dropout off in the policy", "the same; ES defaults to True, so that fitness "
                           "differences come from the noise"),
    "cast_lm_head_to_fp32": Row(SAME, "computes the output layer in fp32", "the same, in generation"),
    "shuffle_dataset": Row(SAME, "shuffles the training prompts", "the same (seeded by data_seed or seed, per epoch)"),
    "remove_unused_columns": Row(SAME, "keeps dataset columns for reward functions (GRPO default False)", "the same"),
    "chat_template_kwargs": Row(SAME, "extra arguments of the chat template", "the same"),
    "pad_to_multiple_of": Row(SAME, "pads generation inputs", "the same"),
    "ds3_gather_for_generation": Row(SAME, "gathers ZeRO-3 weights once for generation", "the same"),
    # ---- batch and generation -----------------------------------------------------------------------------------
    "num_generations": Row(ES, "completions per prompt (the group of the advantage)", "completions per prompt and "
                           "member; ES default 1 (one greedy completion, as ES-at-scale)"),
    "num_generations_eval": Row(SAME, "completions per prompt in evaluation", "the same (of the unperturbed policy)"),
    "per_device_train_batch_size": Row(ES, "completions per process and step", "rows each member answers per "
                                       "process: per_device_train_batch_size / num_generations prompts (must divide); "
                                       "a GRPOConfig's value is kept, even TRL's default"),
    "per_device_eval_batch_size": Row(SAME, "evaluation rows per process", "the same (must divide by the evaluation "
                                      "completions per prompt)"),
    "generation_batch_size": Row(WARNED, "generates several steps' completions at once", "ignored: ES generates "
                                 "each iteration's completions in that iteration"),
    "steps_per_generation": Row(WARNED, "steps sharing one generation batch", "ignored: ES generates each iteration's "
                                "completions in that iteration"),
    "max_completion_length": Row(SAME, "longest completion", "the same"),
    "temperature": Row(SAME, "sampling temperature", "the same; greedy decoding only when num_generations == 1 and no "
                       "sampling field (temperature, top_p, top_k, min_p, generation_kwargs) is set (es_greedy)"),
    "top_p": Row(SAME, "nucleus sampling", "the same (see temperature)"),
    "top_k": Row(SAME, "top-k sampling", "the same (see temperature)"),
    "min_p": Row(SAME, "min-p sampling", "the same (see temperature)"),
    "repetition_penalty": Row(SAME, "repetition penalty", "the same"),
    "generation_kwargs": Row(SAME, "overrides of the generation config", "the same (see temperature)"),
    "cache_implementation": Row(SAME, "KV cache kind", "the same"),
    "use_transformers_continuous_batching": Row(REFUSED, "generates with transformers' continuous batching", "it "
                                                "packs and reorders rows, which ES must attribute to members"),
    "transformers_continuous_batching_config": Row(SAME, "config of continuous batching", "used only with "
                                                   "use_transformers_continuous_batching, which is refused"),
    "use_transformers_paged": Row(REFUSED, "deprecated name of continuous batching", "see "
                                  "use_transformers_continuous_batching"),
    "max_tool_calling_iterations": Row(SAME, "tool-call turns", "used only with tools, which ESTrainer refuses"),
    # ---- rewards and the objective ------------------------------------------------------------------------------
    "reward_weights": Row(SAME, "weights of the reward functions in the sum", "the same"),
    "multi_objective_aggregation": Row(ES, "'sum_then_normalize' or 'normalize_then_sum' of the rewards", "the same "
                                       "order over members: 'normalize_then_sum' z-scores each function's member "
                                       "fitness over the population before the weighted sum (GRPO: within each "
                                       "prompt's group); with several functions that sum is shaped without its "
                                       "prompts, as a z-score (a warning says so under a per-prompt shaping)"),
    "scale_rewards": Row(WARNED, "how advantages are normalised in a group", "ignored: ES shapes member fitness with "
                         "fitness_shaping (default 'prompt_zscore': each prompt's rewards z-scored across the members, "
                         "as scale_rewards='group' does across a prompt's completions)"),
    "mask_truncated_completions": Row(ES, "truncated completions leave the loss", "truncated completions leave the "
                                      "member's fitness (as if every reward function returned None for them)"),
    "beta": Row(ES, "KL penalty against the reference model, per completion token", "the same penalty in each "
                "member's fitness: its shaped reward minus beta times its mean per-token KL to the starting weights "
                "(the adapter-free model under PEFT) over its completions, centred over the members, as GRPO adds it "
                "beside its normalised advantages; TRL's k3 estimator when members sample, the "
                "exact KL over the vocabulary when they decode greedily; logged as kl. Costs two forward passes over "
                "the members' completions per step (README, beta); must be >= 0"),
    "num_iterations": Row(WARNED, "policy updates per generation batch", "ignored: ES makes one update per evaluated "
                          "population"),
    "loss_type": Row(WARNED, "normalisation of GRPO's loss", _LOSS),
    "epsilon": Row(WARNED, "lower clipping of the importance ratio", _LOSS),
    "epsilon_high": Row(WARNED, "upper clipping of the importance ratio", _LOSS),
    "delta": Row(WARNED, "two-sided clipping bound", _LOSS),
    "importance_sampling_level": Row(WARNED, "token or sequence importance ratios", _LOSS),
    "sapo_temperature_neg": Row(WARNED, "SAPO loss parameter", _LOSS),
    "sapo_temperature_pos": Row(WARNED, "SAPO loss parameter", _LOSS),
    "vespo_k_pos": Row(WARNED, "VESPO loss parameter", _LOSS),
    "vespo_lambda_pos": Row(WARNED, "VESPO loss parameter", _LOSS),
    "vespo_k_neg": Row(WARNED, "VESPO loss parameter", _LOSS),
    "vespo_lambda_neg": Row(WARNED, "VESPO loss parameter", _LOSS),
    "use_bias_correction_kl": Row(WARNED, "bias correction of the KL term", _LOSS),
    "off_policy_mask_threshold": Row(WARNED, "masks off-policy sequences in the loss", _LOSS),
    "router_aux_loss_coef": Row(WARNED, "MoE router auxiliary loss", _LOSS),
    "top_entropy_quantile": Row(WARNED, "trains only on high-entropy tokens", _ENTROPY),
    "entropy_coef": Row(WARNED, "entropy bonus", _ENTROPY),
    "use_adaptive_entropy": Row(WARNED, "adapts the entropy bonus", _ENTROPY),
    "entropy_coef_min": Row(WARNED, "adaptive entropy bound", _ENTROPY),
    "entropy_coef_max": Row(WARNED, "adaptive entropy bound", _ENTROPY),
    "entropy_coef_delta": Row(WARNED, "adaptive entropy step", _ENTROPY),
    "entropy_target": Row(WARNED, "adaptive entropy target", _ENTROPY),
    "sync_ref_model": Row(REFUSED, "updates the reference model towards the policy", _REF),
    "ref_model_mixup_alpha": Row(SAME, "mix-up of the reference update", _REF),
    "ref_model_sync_steps": Row(SAME, "steps between reference updates", _REF),
    # ---- vLLM -----------------------------------------------------------------------------------------------------
    "use_vllm": Row(WARNED, "generates with vLLM", "ignored, and no vLLM engine is started: ESTrainer generates "
                    "every member's completions itself with transformers (the low-rank population in one batch "
                    "through hooks vLLM cannot run), so the vllm_* fields do not apply", companions=_VLLM_FIELDS),
    **{name: Row(SAME, "vLLM setting", _VLLM) for name in _VLLM_FIELDS},
    # ---- logging ----------------------------------------------------------------------------------------------------
    "log_completions": Row(SAME, "logs a completions table (console, parquet, wandb/trackio)", _LOGS),
    "num_completions_to_print": Row(SAME, "rows of the console table", "the same"),
    "log_unique_prompts": Row(SAME, "one row per prompt in the logged table", "the same"),
    "log_multimodal": Row(SAME, "logs images with completions", "the same"),
    "log_completions_hub_repo": Row(SAME, "uploads the completion tables", "the same"),
    # ---- TrainingArguments a GRPO script sets ---------------------------------------------------------------------
    "learning_rate": Row(ES, "AdamW step size on the policy gradient", "the ES step lr in theta += lr * g, in the units "
                         "of the noise: a fraction of each tensor's scale under relative noise (the default), absolute "
                         "with sigma (es_optimizer='sgd'); or the optimizer's (es_optimizer='trainer'); a GRPOConfig's "
                         "value, tuned for Adam on true gradients, is not used, which the swap's warning says"),
    "lr_scheduler_type": Row(ES, "schedule of the learning rate", "schedule of the ES step (ES default 'constant')"),
    "lr_scheduler_kwargs": Row(ES, "arguments of the schedule", "the same, for the ES step"),
    "warmup_steps": Row(ES, "warm-up of the learning rate", "warm-up of the ES step"),
    "optim": Row(OPTIMIZER, "the optimizer", "the optimizer that steps on -g"),
    "optim_args": Row(OPTIMIZER, "optimizer arguments", "the same"),
    "weight_decay": Row(OPTIMIZER, "decoupled weight decay", "the same (es_anchor_decay pulls towards the start "
                        "instead, under 'sgd')"),
    "adam_beta1": Row(OPTIMIZER, "Adam moment decay", "the same"),
    "adam_beta2": Row(OPTIMIZER, "Adam moment decay", "the same"),
    "adam_epsilon": Row(OPTIMIZER, "Adam epsilon", "the same"),
    "max_grad_norm": Row(OPTIMIZER, "gradient clipping", "clips the ES estimate g; ES's default is 0 (none): the "
                         "estimate's norm grows with the parameter count over sigma (about 1e4 on a 135M model), so "
                         "1.0 would shrink every step 10^4-fold"),
    "gradient_accumulation_steps": Row(WARNED, "micro-batches per update", "set to 1: ES makes one update per "
                                       "iteration"),
    "gradient_checkpointing": Row(WARNED, "recomputes activations in backward (GRPO default True)", "ignored: nothing "
                                  "is differentiated (ES default False)"),
    "gradient_checkpointing_kwargs": Row(SAME, "arguments of gradient checkpointing", "see gradient_checkpointing"),
    "torch_compile": Row(ES, "compiles the training forward", "compiles the members' decoding steps instead (ES runs "
                         "no training forward), over a static KV cache unless cache_implementation names another "
                         "compileable one, with torch_compile_backend and torch_compile_mode; where the platform cannot "
                         "compile, a one-line warning and eager decoding"),
    "auto_find_batch_size": Row(REFUSED, "refused by GRPO too", "the same"),
    "seed": Row(ES, "seeds the run", "also seeds the ES noise and the members' sampling"),
    "data_seed": Row(SAME, "seeds the data order", "the same (accelerate's seedable sampler)"),
    "num_train_epochs": Row(SAME, "passes over the prompts", "the same (one iteration per batch)"),
    "max_steps": Row(SAME, "optimizer steps", "ES iterations"),
    "bf16": Row(SAME, "bf16 mixed precision", "the same; updates accumulate in an fp32 master copy"),
    "fp16": Row(SAME, "fp16 mixed precision", "the same"),
    "logging_steps": Row(SAME, "steps between logs", "the same"),
    "report_to": Row(SAME, "loggers", "the same"),
    "output_dir": Row(SAME, "where checkpoints go", "the same"),
    "save_strategy": Row(SAME, "when to save", "the same; checkpoints also hold es_state.pt"),
    "save_steps": Row(SAME, "steps between checkpoints", "the same"),
    "save_total_limit": Row(SAME, "checkpoints kept", "the same; an older one goes only once the newer is complete"),
    "save_only_model": Row(WARNED, "saves the weights only", "kept, but a run cannot resume from such checkpoints "
                           "(they lack the ES state)"),
    "eval_strategy": Row(SAME, "when to evaluate", "the same: the rewards of the unperturbed policy"),
    "eval_steps": Row(SAME, "steps between evaluations", "the same"),
    "load_best_model_at_end": Row(SAME, "reloads the best checkpoint", "the same"),
    "metric_for_best_model": Row(SAME, "what 'best' means", "the same (e.g. eval_reward)"),
    "push_to_hub": Row(SAME, "uploads checkpoints", "the same (with es_state.pt)"),
    "deepspeed": Row(ES, "DeepSpeed config", "ZeRO-3 shards one model over the processes; stages 1 and 2 are refused"),
    "fsdp": Row(REFUSED, "FSDP", "ESTrainer does not run under FSDP, which replaces the parameters ES perturbs with "
                "flat shards (every member would score the same): shard with DeepSpeed ZeRO-3 instead"),
    "use_cpu": Row(SAME, "runs on the CPU", "the same"),
    "ddp_backend": Row(SAME, "process-group backend", "the same; gloo when several processes run without a GPU"),
    "resume_from_checkpoint": Row(SAME, "checkpoint to resume", "the same, exactly (True: the newest complete one)"),
}


def default(config_class, name: str):
    field = config_class.__dataclass_fields__[name]
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def apply_audit(config) -> list[str]:
    """Refuse what ``config`` sets (to other than its class's default) that ES cannot honour, and return one line for
    each such field ES ignores or treats otherwise (the caller warns them in one block). Call it before
    ``__post_init__`` of the dataclasses above normalises the values."""
    changes = []
    for name, row in FIELDS.items():
        value = getattr(config, name)
        if row.meaning not in (WARNED, REFUSED, OPTIMIZER) or value == default(type(config), name):
            continue
        if row.meaning is REFUSED:
            raise ValueError(f"ESTrainer does not support {name}={value!r}: {row.es}.")
        companions = [f"{other}={getattr(config, other)!r}" for other in row.companions
                      if getattr(config, other) != default(type(config), other)]
        if companions:
            changes.append(f"{name}={value!r} (with {', '.join(companions)}) {row.es}")
        elif row.meaning is OPTIMIZER:
            if config.es_optimizer != "trainer":
                changes.append(f"{name}={value!r} is ignored: es_optimizer='sgd' applies the plain ES step theta += "
                               "lr * g without the Trainer's optimizer; set es_optimizer='trainer' to have it step on "
                               "the ES estimate")
        else:
            changes.append(f"{name}={value!r} {row.es}")
    return changes


def audit_table(es_config_class) -> str:
    """The markdown table of docs/grpo_fields.md."""
    lines = ["| field | GRPO default | ES default | what GRPO does | under ESTrainer | what ES does |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, row in FIELDS.items():
        grpo, es = default(GRPOConfig, name), default(es_config_class, name)
        lines.append(f"| `{name}` | `{grpo!r}` | {'same' if es == grpo else f'`{es!r}`'} | {row.grpo} | "
                     f"{row.meaning.value} | {row.es} |")
    return "\n".join(lines) + "\n"


def settings_table() -> str:
    """The markdown table of the ES settings (``lightning_es.engine.ESSettings``) in docs/grpo_fields.md: the knobs
    ``ESConfig`` adds to ``GRPOConfig``, which ``ESStrategy`` takes under the same names and defaults."""
    from lightning_es.engine.settings import ESSettings

    lines = ["| field | default | meaning |", "| --- | --- | --- |"]
    for field in dataclasses.fields(ESSettings):
        lines.append(f"| `{field.name}` | `{default(ESSettings, field.name)!r}` | {field.metadata['help']} |")
    return "\n".join(lines) + "\n"

