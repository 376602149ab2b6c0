"""Run a test script in its own process group, so that a hang is reported and every process it started is killed."""

import contextlib
import os
import signal
import subprocess

import psutil
import pytest

# PYTHONFAULTHANDLER: a worker that aborts prints where each of its threads was
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "DS_ACCELERATOR": "cpu", "PYTHONFAULTHANDLER": "1"}


def run_command(command, cwd, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    process = subprocess.Popen(list(map(str, command)), cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # the launcher's workers too, which may wait in a collective; torch's launcher starts each in a session of
        # its own, outside the launcher's process group, where they would keep its output pipes open
        workers = psutil.Process(process.pid).children(recursive=True)
        os.killpg(process.pid, signal.SIGKILL)
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"{command} did not finish within {timeout} s:\n{stdout[-2000:]}{stderr[-2000:]}")
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check:
        assert result.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return result
