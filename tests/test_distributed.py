import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"


ZERO3_CONFIG = Path(__file__).parents[1] / "recipes" / "configs" / "deepspeed_zero3.yaml"


def launch(command, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "DS_ACCELERATOR": "cpu"}
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
def test_estrainer_under_the_zero3_accelerate_config_follows_the_unsharded_run(tmp_path):
    """Two processes hold one ZeRO-3 sharded model, each scoring 2 of the 4 prompts of the one-process run (greedy)."""
    one, sharded = tmp_path / "one.pt", tmp_path / "zero3.pt"
    launch([sys.executable, str(SCRIPT), str(one), str(tmp_path / "run1"), "4", "1"], tmp_path)
    launch(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ZERO3_CONFIG), "--num_processes", "2",
         "--mixed_precision", "no", "--main_process_port", "29523", str(SCRIPT), str(sharded), str(tmp_path / "run2"),
         "2", "1"],
        tmp_path,
    )
    single, zero3 = torch.load(one), torch.load(sharded)
    assert zero3["processes"] == 2
    torch.testing.assert_close(torch.tensor(zero3["rewards"]), torch.tensor(single["rewards"]))
    # each process measures its slices of the update; the logged norm is of the whole update
    torch.testing.assert_close(torch.tensor(zero3["update_norms"]), torch.tensor(single["update_norms"]))
    assert single["weights"].keys() == zero3["weights"].keys()
    for name, tensor in single["weights"].items():
        torch.testing.assert_close(zero3["weights"][name], tensor, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_kl_drift_reduces_over_two_processes(tmp_path):
    out = tmp_path / "kl.txt"
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
            str(SCRIPT.parent / "kl_drift_two_processes.py"), str(out)], tmp_path)
    value, world = out.read_text().split()
    assert world == "2" and float(value) > 0
