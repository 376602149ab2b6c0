def completion_text(completion) -> str:
    """The text of a completion in TRL's standard (string) or conversational (list of messages) format."""
    if isinstance(completion, str):
        return completion
    return "".join(message["content"] for message in completion if message.get("role") == "assistant")
