"""Off-task probe prompts for drift measurements: general requests unrelated to arithmetic word problems."""

OFF_TASK_PROMPTS = [
    "Write a short poem about the sea.",
    "What is the capital of Japan, and what is it known for?",
    "Explain what a noun is to a child.",
    "Give three tips for sleeping better.",
    "Translate 'good morning, friends' into French.",
    "Describe the colour blue to someone who cannot see.",
    "Write a Python function that reverses a string.",
    "Summarise the story of Little Red Riding Hood in two sentences.",
]


def chat(prompts: list[str]) -> list[list[dict]]:
    return [[{"role": "user", "content": p}] for p in prompts]
