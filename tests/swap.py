"""Run a GRPO script from tests/scripts through the one-line swap, as a user would."""

import runpy
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"
SWAP = ("from trl import GRPOTrainer", "from trl_ext import ESTrainer as GRPOTrainer")


def run_swapped(script_name: str, tmp_path: Path, monkeypatch, **environment: str) -> dict:
    """The swapped script's namespace after it ran with ``environment`` set; asserts that one line changed."""
    source = (SCRIPTS / script_name).read_text()
    swapped = source.replace(*SWAP)
    assert sum(a != b for a, b in zip(source.splitlines(), swapped.splitlines())) == 1
    script = tmp_path / f"swapped_{script_name}"
    script.write_text(swapped)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(str(script))
