"""Helpers for tests that start processes through ./launch.sh and the deepspeed launcher."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(cmd: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    """Run a launcher command; on timeout kill its whole process group (launcher and ranks), then fail."""
    # PATH stays as it is: a PATH with another `ninja` first would make DeepSpeed rebuild its JIT op.
    env = {**os.environ, "PYTHON": sys.executable}
    with subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as process:
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
