"""Helpers for tests that start processes through ./launch.sh and the deepspeed launcher."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> dict[str, str]:
    # PATH stays as it is: a PATH with another `ninja` first would make DeepSpeed rebuild its JIT op. The ranks are
    # CPU ranks (gloo) on every machine: a node with one GPU could not hold two GPU ranks.
    return {**os.environ, "PYTHON": sys.executable, "DS_ACCELERATOR": "cpu"}


def run_group(cmd: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    """Run a launcher command; on timeout kill its whole process group (launcher and ranks), then fail."""
    with subprocess.Popen(cmd, env=launcher_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True) as process:
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, _ = process.communicate()
            pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, process.returncode, out)


def launch(command: str, args: list[str], procs: int = 2, timeout: int = 400) -> subprocess.CompletedProcess:
    """./launch.sh COMMAND (distill or finetune) on `procs` local CPU ranks (stdout and stderr in .stdout)."""
    return run_group(["bash", str(REPO / "launch.sh"), command, "--num-procs", str(procs),
                      "--master-port", str(free_port()), *args], timeout)


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start a launcher command in its own process group, its stdout and stderr going to `log` (a file, so that
    nobody has to drain a pipe while the test waits on several launchers at once)."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=launcher_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_all(processes: list[subprocess.Popen], timeout: int = 400) -> list[int]:
    """Wait for launchers started by `start`; -> their exit codes. Once one fails, or the time is up, kill the
    process groups of the others, as a scheduler ends a job whose task failed: the other nodes' ranks would
    wait for their lost peer until the collective timeout (30 min)."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in processes):
        if time.monotonic() > deadline or any(p.returncode not in (None, 0) for p in processes):
            for p in processes:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            break
        time.sleep(0.2)
    return [p.returncode for p in processes]
