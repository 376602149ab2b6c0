"""Off-task probe prompts for drift measurements: general requests unrelated to arithmetic word problems."""

import torch

from .text import as_question

OFF_TASK_PROMPTS = [
    "Write a short poem about the sea.",
    "What is the capital of Japan, and what is it known for?",
    "Explain what a noun is to a child.",
    "Give three tips for sleeping better.",
    "Translate 'good morning, friends' into French.",
    "Describe the colour blue to someone who cannot see.",
    "Write a Python function that reverses a string.",
    "Summarise the story of Little Red Riding Hood in two sentences.",
    "What should I pack for a weekend hiking trip?",
    "Write a polite email declining a meeting invitation.",
    "Why do leaves change colour in autumn?",
    "Suggest a name for a friendly orange cat.",
    "What is the difference between weather and climate?",
    "Write a haiku about morning coffee.",
    "How do I make a cup of green tea?",
    "Name three famous painters and one work by each.",
    "Explain what a rainbow is in one paragraph.",
    "Write a short thank-you note to a teacher.",
    "What are the planets of the solar system?",
    "Give me a simple recipe for pancakes.",
    "Describe a busy market in a few sentences.",
    "What does a librarian do?",
    "Tell a short story about a lost umbrella.",
    "How can I keep a houseplant healthy?",
]


def chat(prompts: list[str]) -> list[list[dict]]:
    return [[{"role": "user", "content": p}] for p in prompts]


def render(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt as the model is asked, as text to tokenize without special tokens: its chat template, or for a
    base model without one a question after the beginning-of-sequence token (Gemma's output is noise without it)."""
    if tokenizer.chat_template:
        return [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in chat(prompts)]
    return [f"{tokenizer.bos_token or ''}{as_question(p)}" for p in prompts]


@torch.no_grad()
def answered(model, tokenizer, prompts: list[str] = OFF_TASK_PROMPTS, max_new_tokens: int = 32) -> list[str]:
    """Each probe followed by ``model``'s own greedy answer: text on which the exact KL estimator measures, token by
    token, how far a later model's next-token distributions moved from this one's where this one was sure."""
    texts = render(tokenizer, prompts)
    device = next(model.parameters()).device
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(device)
    was_training = model.training
    model.eval()
    output = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                            temperature=None, top_p=None, top_k=None)
    model.train(was_training)
    answers = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [text + answer for text, answer in zip(texts, answers, strict=True)]
