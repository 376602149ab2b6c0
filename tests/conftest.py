import os

import pytest
from datasets import Dataset

from tiny import build_model, build_tokenizer, save_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    return build_model(tokenizer)


PROMPTS = ["the quick", "what is 12", "count the", "brown fox", "lazy dog", "apples and", "is 42", "jumps over"]


@pytest.fixture
def prompt_dataset():
    return Dataset.from_dict({"prompt": PROMPTS, "target": [str(i) for i in range(len(PROMPTS))]})


@pytest.fixture
def chat_dataset():
    return Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": p}] for p in PROMPTS], "target": [str(i) for i in range(len(PROMPTS))]}
    )
