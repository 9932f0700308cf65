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


SHM_WORKER = """
import json, os, re, signal, torch
from pathlib import Path
import deepspeed.comm
from pipeline.optim import init_distributed, shared_memory_buffer
init_distributed()
rank = int(os.environ["RANK"])
buffer = shared_memory_buffer()
mapped = re.findall(r"/dev/shm/deepspeed_allreduce_buffer_\\S+", Path("/proc/self/maps").read_text())
total = torch.full((8,), float(rank + 1))
deepspeed.comm.inference_all_reduce(total)  # the shared-memory allreduce, through the unlinked buffers
Path(os.environ["SHM_OUT"], f"rank{rank}.json").write_text(json.dumps(
    {"buffer": str(buffer), "exists": buffer.exists(), "mapped": sorted(set(mapped)), "sum": total.tolist()}))
deepspeed.comm.barrier()
if rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_deepspeeds_shared_memory_buffers_are_gone_once_mapped(tmp_path):
    """DeepSpeed's CPU allreduce makes a 69 MB buffer per rank in /dev/shm and never removes it. init_distributed
    unlinks each rank's once every rank has mapped all of them: the shared-memory allreduce still works, and a
    rank SIGKILLed afterwards leaves nothing behind."""
    from launcher import REPO, free_port, run_group

    worker = tmp_path / "shm_worker.py"
    worker.write_text(SHM_WORKER)
    env = {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "SHM_OUT": str(tmp_path)}
    os.environ.update(env)  # (run_group passes the environment on)
    try:
        run = run_group([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                         str(free_port()), str(worker)], timeout=300)
    finally:
        for key in env:
            os.environ.pop(key)
    assert run.returncode != 0, run.stdout[-3000:]  # rank 1 was killed
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    buffers = [r["buffer"] for r in ranks]
    assert buffers[0].startswith("/dev/shm/deepspeed_allreduce_buffer_") and buffers[1] == buffers[0][:-1] + "1"
    for r in ranks:
        assert r["exists"] is False
        assert r["mapped"] == buffers  # each rank maps both buffers, whose files are gone
        assert r["sum"] == [3.0] * 8  # rank 0's 1 + rank 1's 2
    assert not any(os.path.exists(b) for b in buffers)
