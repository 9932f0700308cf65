"""stdout carries results only: what DeepSpeed logs or prints goes to stderr (pipeline.logs)."""
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
