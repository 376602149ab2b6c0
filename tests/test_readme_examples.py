"""The README's two examples run as written. Only the model differs: the embedded model's cache folder
(``LIGHTNING_ES_CACHE``) holds a tiny model under SmolLM2-135M-Instruct's name, which ``resolve_model(None)`` returns as
it returns the converted GGUF on a user's machine."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_es.tasks.models import EMBEDDED_NAME
from tiny import save_tiny

README = Path(__file__).resolve().parents[1] / "README.md"


def example(heading: str) -> str:
    section = README.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


@pytest.fixture
def cache(tmp_path):
    save_tiny(tmp_path / "cache" / EMBEDDED_NAME)
    return tmp_path / "cache"


def run(code: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, LIGHTNING_ES_CACHE=str(cache))
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("heading", ["A first `ESTrainer` run", "A first Lightning run"])
def test_the_readme_example_runs_as_written(heading, tmp_path, cache):
    code = example(heading)
    assert len([line for line in code.splitlines() if line.strip()]) <= 18, "the example grew beyond a first read"
    done = run(code, tmp_path, cache)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    if "ESTrainer" in heading:
        assert "'train_runtime'" in done.stdout  # the Trainer's summary of a finished run
    else:
        assert "`Trainer.fit` stopped: `max_steps=" in done.stdout + done.stderr
