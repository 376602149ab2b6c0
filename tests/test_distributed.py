import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"


def launch(command, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_give_the_weights_of_one(tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    launch([sys.executable, str(SCRIPT), str(one), str(tmp_path / "run1")], tmp_path)
    launch(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517", str(SCRIPT),
         str(two), str(tmp_path / "run2")],
        tmp_path,
    )
    single, double = torch.load(one), torch.load(two)
    assert (single["processes"], double["processes"]) == (1, 2)
    assert single["rewards"] == double["rewards"]
    for name, tensor in single["weights"].items():
        torch.testing.assert_close(double["weights"][name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_kl_drift_reduces_over_two_processes(tmp_path):
    out = tmp_path / "kl.txt"
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
            str(SCRIPT.parent / "kl_drift_two_processes.py"), str(out)], tmp_path)
    value, world = out.read_text().split()
    assert world == "2" and float(value) > 0
