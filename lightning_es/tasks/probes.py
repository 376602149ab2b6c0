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
