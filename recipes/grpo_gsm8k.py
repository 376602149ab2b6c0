"""Fine-tune a language model on GSM8K-style word problems (generated), or on GSM8K.

    accelerate launch recipes/es_gsm8k.py                        # embedded SmolLM2-135M-Instruct, offline, CPU
    accelerate launch recipes/es_gsm8k.py --dataset_name openai/gsm8k --answer_style step_by_step  # GSM8K itself
    accelerate launch recipes/es_gsm8k.py --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --max_steps 300
        # for ES on a model of that size, add the ES-at-scale paper's settings (README, "Defaults and step size")
    accelerate launch recipes/es_gsm8k.py --config my.yaml       # every config field is also a YAML key / CLI flag

By default the problems are generated (`lightning_es.tasks.generated`: one-operation word problems in GSM8K's form,
training and test problems disjoint by construction); GSM8K itself comes from the hub (`--dataset_name openai/gsm8k`)
or a local copy (`--dataset_path`). The reward is the exact-match accuracy of the final answer; accuracy and answer
format on the held-out problems and the off-task KL to the base model are printed before and after training. This
file and grpo_gsm8k.py differ only in the line that imports the trainer.
"""

from dataclasses import dataclass, field

from transformers import AutoTokenizer
from trl import ModelConfig, ScriptArguments, get_peft_config

from lightning_es.tasks.models import resolve_model
from lightning_es.tasks import gsm8k, prompts_for
from trl_ext.recipes import parse_recipe_args, train_and_report, use_all_cpu_cores
from trl import GRPOConfig, GRPOTrainer

# Fields a config lacks are skipped.
RECIPE_DEFAULTS = dict(
    output_dir="outputs/gsm8k",
    max_completion_length=32,
    logging_steps=1,
    save_steps=20,
    save_total_limit=1,
    bf16=False,
    report_to="none",
)
# Where the two trainers need different values, each as tuned on validation accuracy in the accuracy race
# (docs/reports/accuracy-race/), for about its 1,500 training seconds on a 2-core CPU. ES: ESConfig's own defaults
# (8 prompts x 16 members, per-prompt normalisation, rank-4 relative noise), 60 iterations of about 25 s. GRPO: 2
# prompts x 8 completions sampled at temperature 0.7 and a constant AdamW step of 1e-5 (TRL's 1e-6 barely moves;
# 3e-5 lost the calculation), without gradient checkpointing (memory is not short), 80 steps of about 18 s.
TRAINER_DEFAULTS = {"ESConfig": dict(max_steps=60),
                    "GRPOConfig": dict(max_steps=80, per_device_train_batch_size=16, num_generations=8, learning_rate=1e-5,
                                       temperature=0.7, lr_scheduler_type="constant", gradient_checkpointing=False)}
QUICK = dict(max_steps=2, per_device_train_batch_size=2, num_generations=2, max_completion_length=8, population_size=4,
             save_steps=1, train_size=8, eval_size=4)


@dataclass
class GSM8KArguments(ScriptArguments):
    dataset_name: str | None = field(default=None, metadata={
        "help": "Hub id of GSM8K (openai/gsm8k); unset: generated GSM8K-style word problems."})
    dataset_config: str = field(default="main", metadata={"help": "GSM8K configuration."})
    dataset_path: str | None = field(default=None, metadata={"help": "A local copy (load_dataset path or saved folder)."})
    train_size: int = field(default=1000, metadata={"help": "Training problems (the run draws from them)."})
    eval_size: int = field(default=200, metadata={"help": "Held-out problems scored before and after training."})
    answer_style: str = field(
        default="one_line",
        metadata={"help": "'one_line' (the calculation and the answer, about 20 tokens), 'final_answer' (the answer "
                          "only) or 'step_by_step' (chain of thought: GSM8K itself needs a few hundred tokens)."},
    )
    quick: bool = field(default=False, metadata={"help": "Smoke mode: a few tiny steps, for tests."})


def main(script_args, training_args, model_args):
    model = resolve_model(model_args.model_name_or_path)
    training_args.model_init_kwargs = {"dtype": model_args.dtype}
    train_dataset, eval_dataset = gsm8k.load_splits(
        script_args.dataset_name, script_args.dataset_config, script_args.dataset_path,
        script_args.dataset_train_split, script_args.dataset_test_split, script_args.train_size,
        script_args.eval_size, seed=training_args.seed, style=script_args.answer_style,
    )
    tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left", truncation_side="left")  # as TRL loads it
    shown = gsm8k.demonstrations(script_args.answer_style)  # asked of a model without a chat template only
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[gsm8k.correctness_reward],
        args=training_args,
        train_dataset=prompts_for(tokenizer, train_dataset, shown),
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    rewards = {"accuracy": gsm8k.correctness_reward, "answer format": gsm8k.format_reward}
    return train_and_report(trainer, prompts_for(tokenizer, eval_dataset, shown), rewards, gsm8k.task_name(eval_dataset))


if __name__ == "__main__":
    use_all_cpu_cores()
    defaults = {**RECIPE_DEFAULTS, **TRAINER_DEFAULTS[GRPOConfig.__name__]}
    main(*parse_recipe_args((GSM8KArguments, GRPOConfig, ModelConfig), defaults, QUICK))
