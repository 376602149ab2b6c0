"""Prompt and completion text in TRL's two formats: standard (a string) and conversational (a list of messages)."""

from collections.abc import Sequence


def completion_text(completion) -> str:
    """The text of a completion in TRL's standard (string) or conversational (list of messages) format."""
    if isinstance(completion, str):
        return completion
    return "".join(message["content"] for message in completion if message.get("role") == "assistant")


def as_question(text: str) -> str:
    """How a base model without a chat template is asked: a question and an answer to complete."""
    return f"Question: {text}\nAnswer:"


def prompts_for(tokenizer, dataset, demonstrations: Sequence[tuple[str, str]] = ()):
    """``dataset`` as ``tokenizer``'s model can be asked: unchanged with a chat template; without one (a base model
    such as Gemma-3-270M), each conversational prompt's user messages as a plain-text question (TRL then tokenizes it
    with the model's special tokens, as a base model needs), after ``demonstrations``, (question, answer) pairs
    answered as the task asks: a base model follows the form of answers it was shown rather than an instruction
    (Gemma-3-270M marks 0% of GSM8K-style answers as asked without them, 97% after two), which is also how
    evaluation harnesses ask base models GSM8K."""
    if tokenizer.chat_template or not len(dataset) or isinstance(dataset[0]["prompt"], str):
        return dataset
    shown = "".join(f"{as_question(question)} {answer}\n\n" for question, answer in demonstrations)
    return dataset.map(lambda row: {"prompt": shown + as_question("\n".join(
        m["content"] for m in row["prompt"] if m["role"] == "user"))})
