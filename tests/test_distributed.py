"""ESTrainer over several processes, launched the way users launch it (accelerate launch; gloo on this CPU host)."""

import sys
from pathlib import Path

import pytest
import torch

from processes import run_command

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"
ZERO3_CONFIG = Path(__file__).parents[1] / "recipes" / "configs" / "deepspeed_zero3.yaml"
TWO_PROCESSES = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no"]


def run(tmp_path, name, *flags, launcher=(), port=29517, check=True, timeout=None):
    """Run train_tiny.py (under ``accelerate launch <launcher>`` if given); its result, or the finished process."""
    out = tmp_path / f"{name}.pt"
    prefix = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--main_process_port", port]
    command = [*(prefix if launcher else [sys.executable]), SCRIPT, "--out", out, "--output_dir", tmp_path / name, *flags]
    result = run_command(command, tmp_path, timeout=timeout or (120 if not check else 600), check=check)
    return result if not check else torch.load(out)


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """8 steps over 5 prompts, 2 a step (3 steps an epoch, the last one short), a checkpoint after every step; process 1
    builds its model with other weights than process 0."""
    tmp = tmp_path_factory.mktemp("two-processes")
    flags = ["--dataset_size", 5, "--max_steps", 8, "--save_steps", 1, "--perturb_on_process", 1]
    return tmp, flags, run(tmp, "full", *flags, launcher=TWO_PROCESSES)


@pytest.mark.slow
def test_two_processes_start_from_process_0_and_give_the_weights_of_one_without_a_ddp_wrapper(tmp_path,
                                                                                                 two_process_run):
    _, flags, two = two_process_run
    one = run(tmp_path, "one", *flags)
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["rewards"] == two["rewards"] and one["prompts_per_step"] == two["prompts_per_step"]
    assert_same_weights(one["weights"], two["weights"], atol=1e-6)
    # ES never calls backward: DDP's reducer would only hold gradient buckets the size of the model
    assert two["trained_model_type"] == "Qwen2ForCausalLM"


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", [4, 7])  # one step into the second epoch, one step into the third
def test_two_processes_resume_mid_epoch_exactly(two_process_run, checkpoint):
    tmp, flags, full = two_process_run
    resumed = run(tmp, f"resumed-{checkpoint}", *flags, "--resume", tmp / "full" / f"checkpoint-{checkpoint}",
                  launcher=TWO_PROCESSES, port=29518)
    assert resumed["prompts_per_step"] == {s: p for s, p in full["prompts_per_step"].items() if s >= checkpoint}
    assert_same_weights(full["weights"], resumed["weights"])


@pytest.mark.slow
def test_a_reward_failing_on_one_process_stops_both_with_the_same_error(tmp_path):
    # were process 0 left waiting for process 1, the run would hang: run_command fails the test after `timeout`
    result = run(tmp_path, "failing", "--fail_on_process", 1, launcher=TWO_PROCESSES, port=29519, check=False,
                 timeout=120)
    assert result.returncode != 0
    reports = [(tmp_path / "failing" / f"error-{rank}.txt").read_text() for rank in range(2)]
    assert reports[0] == reports[1], reports  # each process raised it itself, with the same message
    assert reports[0].startswith("PopulationError: ES step 0, population member 1 (process 1): RewardFunctionError: "
                                 "reward function 'token_rate' raised RuntimeError: this reward fails on one process")


@pytest.mark.slow
def test_estrainer_under_the_zero3_accelerate_config_follows_the_unsharded_run(tmp_path):
    """Two processes hold one ZeRO-3 sharded model, each scoring 2 of the 4 prompts of the one-process run (greedy).
    5 prompts: the second batch has one prompt, so one process has no share of it and scores a stand-in row."""
    flags = ["--num_generations", 1, "--dataset_size", 5, "--drift"]
    single = run(tmp_path, "one", *flags, "--prompts_per_process", 4)
    zero3 = run(tmp_path, "zero3", *flags, "--prompts_per_process", 2,
                launcher=["--config_file", ZERO3_CONFIG, "--num_processes", 2, "--mixed_precision", "no"], port=29523)
    assert zero3["processes"] == 2
    assert zero3["prompts_per_step"] == single["prompts_per_step"]
    assert [len(p) for p in single["prompts_per_step"].values()] == [4, 1, 4]
    torch.testing.assert_close(torch.tensor(zero3["rewards"]), torch.tensor(single["rewards"]))
    # each process measures its slices of the update; the logged norm is of the whole update
    torch.testing.assert_close(torch.tensor(zero3["update_norms"]), torch.tensor(single["update_norms"]))
    assert_same_weights(single["weights"], zero3["weights"], atol=1e-5)
    # the drift callbacks read the slices (and probe with gathered weights), not ZeRO-3's empty placeholders
    assert len(zero3["drift"]) == len(single["drift"]) == 3
    for sharded, whole in zip(zero3["drift"], single["drift"]):
        assert sharded.keys() == whole.keys() and whole["drift/update_norm"] > 0 and whole["drift/kl"] > 0
        for key, value in whole.items():
            assert sharded[key] == pytest.approx(value, rel=1e-3, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("master", ["deepspeeds", "kept_in_step"])
def test_zero3_bf16_checkpoints_hold_the_current_weights_for_deepspeeds_tools_and_resume_exactly(tmp_path, master):
    """bf16 weights: DeepSpeed keeps an fp32 copy of every partition, which is ES's master copy (or, where it cannot
    be, as on NVMe, is written from ES's before each save); DeepSpeed's own zero_to_fp32 reads every checkpoint as
    the weights ES trained (before, the step-0 weights), and a run resumed from a checkpoint ends on the
    uninterrupted run's weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    flags = ["--num_generations", 1, "--dataset_size", 5, "--prompts_per_process", 2, "--max_steps", 3,
             "--save_steps", 1, "--bf16_weights", *(["--unshared_deepspeed_copy"] if master == "kept_in_step" else [])]
    launcher = ["--config_file", ZERO3_CONFIG, "--num_processes", 2, "--mixed_precision", "no"]
    full = run(tmp_path, "zero3-bf16", *flags, launcher=launcher, port=29527)
    masters = {}
    for step in (1, 3):
        checkpoint = tmp_path / "zero3-bf16" / f"checkpoint-{step}"
        masters[step] = torch.load(checkpoint / "es_state.pt", weights_only=True)["master"]
        read = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
        for name, value in masters[step].items():
            assert torch.equal(read[name], value), name
    assert any(not torch.equal(masters[1][n], masters[3][n]) for n in masters[1])  # the weights moved in between
    resumed = run(tmp_path, "zero3-bf16-resumed", *flags, "--resume", tmp_path / "zero3-bf16" / "checkpoint-1",
                  launcher=launcher, port=29528)
    assert_same_weights(full["weights"], resumed["weights"])


@pytest.mark.slow
def test_zero3_with_the_default_lowrank_perturbation_is_refused_by_name_on_every_process(tmp_path):
    result = run(tmp_path, "zero3-default", "--perturbation", "default", "--num_generations", 1, check=False,
                 launcher=["--config_file", ZERO3_CONFIG, "--num_processes", 2, "--mixed_precision", "no"], port=29525)
    assert result.returncode != 0
    for rank in range(2):  # each process raised it itself
        report = (tmp_path / "zero3-default" / f"error-{rank}.txt").read_text()
        assert ("perturbation='lowrank' does not run on DeepSpeed ZeRO-3 partitions" in report
                and "Set perturbation='full'" in report)


@pytest.mark.slow
def test_kl_drift_reduces_over_two_processes_through_the_librarys_collectives(tmp_path):
    """Under the collective guard (tests/scripts/collective_guard.py): torchmetrics' own sync of KLDrift's host states,
    which NCCL refused, is caught on gloo; the library's sync reduces the same value."""
    out = tmp_path / "kl.txt"
    run_command([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_port", 29521,
                 SCRIPT.parent / "kl_drift_two_processes.py", out], tmp_path, timeout=600)
    value, world, caught = out.read_text().split(maxsplit=2)
    assert world == "2" and float(value) > 0
    assert caught == "caught"
