"""Greedy task accuracy of a causal LM on a prompt dataset, shared across processes when an accelerator is given."""

from collections.abc import Callable

import torch


def render_prompts(tokenizer, prompts: list) -> list[str]:
    if isinstance(prompts[0], str):
        return prompts
    return [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]


@torch.no_grad()
def greedy_scores(
    model,
    tokenizer,
    dataset,
    rewards: dict[str, Callable[..., list[float]]],
    max_new_tokens: int,
    batch_size: int = 16,
    accelerator=None,
) -> dict[str, float]:
    """Mean of each reward function (TRL signature) over greedy completions of ``dataset["prompt"]``."""
    indices = list(range(len(dataset)))
    if accelerator is not None:
        with accelerator.split_between_processes(indices) as local:
            indices = list(local)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = {name: [] for name in rewards}
    for start in range(0, len(indices), batch_size):
        rows = dataset.select(indices[start : start + batch_size])
        prompts = list(rows["prompt"])
        text = render_prompts(tokenizer, prompts)
        # a chat template writes the special tokens itself; a plain-text prompt gets them as TRL tokenizes it
        specials = isinstance(prompts[0], str)
        inputs = tokenizer(text, return_tensors="pt", padding=True, padding_side="left",
                           add_special_tokens=specials).to(device)
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            temperature=None, top_p=None, top_k=None,
        )
        completions = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        columns = {k: rows[k] for k in rows.column_names if k != "prompt"}
        for name, reward in rewards.items():
            scores[name] += reward(completions=completions, **columns)
    model.train(was_training)
    if accelerator is not None:
        from accelerate.utils import gather_object

        scores = {name: gather_object(values) for name, values in scores.items()}
    return {name: sum(values) / max(1, len(values)) for name, values in scores.items()}
