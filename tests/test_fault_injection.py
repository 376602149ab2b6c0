"""Kill a training run with SIGKILL at random moments while it saves checkpoints: the newest checkpoint that resume
accepts must exist every time, and resuming from it must end with the uninterrupted run's weights, bit for bit."""

import contextlib
import multiprocessing
import os
import random
import signal
import time

import pytest
import torch

import checkpoint_kills
from trl_ext.checkpoints import last_resumable_checkpoint

KILLS = 20


def weights(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


@pytest.mark.slow
def test_a_kill_at_any_moment_of_a_save_leaves_a_checkpoint_that_resumes_exactly(tmp_path):
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["checkpoint_kills"])

    def start_run(output_dir):
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=checkpoint_kills.train_reporting_saves, args=(str(output_dir), sender))
        process.start()
        sender.close()
        return process, receiver

    # an uninterrupted run in a process of its own, like the killed ones: how long each of its saves takes
    process, receiver = start_run(tmp_path / "timed")
    events = [receiver.recv() for _ in range(2 * checkpoint_kills.MAX_STEPS)]
    process.join(timeout=120)
    assert process.exitcode == 0
    started = {step: moment for step, event, moment in events if event == "start"}
    durations = {step: moment - started[step] for step, event, moment in events if event == "end"}
    uninterrupted = checkpoint_kills.build_trainer(str(tmp_path / "uninterrupted"))
    uninterrupted.train()
    expected = weights(uninterrupted)

    generator = random.Random(0)
    for kill in range(KILLS):
        output_dir = tmp_path / f"killed-{kill}"
        step = generator.choice(range(2, checkpoint_kills.MAX_STEPS + 1))  # a save with a complete one before it
        delay = generator.uniform(0, durations[step])
        process, receiver = start_run(output_dir)
        while receiver.recv()[:2] != (step, "start"):
            pass
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):  # a save faster than the timed one: the run may have ended
            os.kill(process.pid, signal.SIGKILL)
        process.join()
        newest = last_resumable_checkpoint(str(output_dir))
        assert newest is not None, f"kill {kill}: no resumable checkpoint left after a kill {delay:.3f} s into save {step}"
        resumed = checkpoint_kills.build_trainer(str(output_dir))
        resumed.train(resume_from_checkpoint=True)
        for name, tensor in weights(resumed).items():
            assert torch.equal(tensor, expected[name]), f"kill {kill} ({delay:.3f} s into save {step}): {name}"
