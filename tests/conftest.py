import os

import pytest
import torch.distributed as dist
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


@pytest.fixture(autouse=True)
def _fresh_process_group():
    """Lightning's strategies leave the one-process group they create (and its TCP store on MASTER_PORT) in the test
    process, and its variables (MASTER_PORT, WORLD_SIZE, ...) in the environment: a later test would join that group,
    or a process it forks would try to listen on that port again. Each test starts without both."""
    environment = dict(os.environ)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environment)
