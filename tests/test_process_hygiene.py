"""What a process leaves behind: stdout carries results only (what DeepSpeed logs or prints goes to stderr,
pipeline.logs), and no shared memory (DeepSpeed's CPU allreduce buffer)."""
import json
import os
import subprocess
import sys


def test_deepspeed_log_lines_and_prints_go_to_stderr():
    code = ("import json, pipeline, deepspeed\n"
            "from deepspeed.utils import logger\n"
            "from pipeline.logs import prints_to_stderr\n"
            "logger.warning('a library warning')\n"
            "with prints_to_stderr():\n"
            "    print('a library print')\n"
            "print(json.dumps({'result': 1}))\n")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # DeepSpeed's CPU fallback warns
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"result": 1}
    assert "[DeepSpeed] WARNING: a library warning" in run.stderr
    assert "a library print" in run.stderr


def test_deepspeeds_shared_memory_buffer_is_released_at_exit():
    """DeepSpeed's CPU allreduce leaves a 69 MB buffer per rank in /dev/shm; init_distributed unlinks it at exit."""
    code = ("from pipeline.optim import init_distributed, init_single_process, shared_memory_buffer\n"
            "init_single_process()\ninit_distributed()\nbuffer = shared_memory_buffer()\n"
            "assert buffer.stat().st_size > 50_000_000, buffer\nprint(buffer)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert run.returncode == 0, run.stderr
    buffer = run.stdout.strip().splitlines()[-1]
    assert buffer.startswith("/dev/shm/deepspeed_allreduce_buffer_") and not os.path.exists(buffer)
