"""A student trained with expert parallelism 2 (two CPU ranks, gloo, the deepspeed launcher) saves all
experts with global ids and loads in one plain process with the same outputs."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher import free_port, launcher_env
from pipeline.models import Student

WORKER = Path(__file__).with_name("ep_save_worker.py")
LAUNCHER = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"]  # two CPU ranks (launcher_env)


@pytest.mark.slow
@pytest.mark.multiproc
def test_ep_size_2_save_gathers_experts_and_loads_in_one_process(tmp_path):
    result = subprocess.run([*LAUNCHER, "--master_port", str(free_port()), str(WORKER), str(tmp_path)],
                            capture_output=True, text=True, timeout=300, env=launcher_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    for rank in (0, 1):  # rank r's local expert i is global expert 2r + i
        for key, value in torch.load(tmp_path / f"local{rank}.pt", weights_only=True).items():
            local = int(re.search(r"deepspeed_experts\.(\d+)\.", key)[1])
            global_key = key.replace(f"deepspeed_experts.{local}.", f"deepspeed_experts.{2 * rank + local}.")
            assert torch.equal(saved[global_key], value), global_key

    model = Student.from_pretrained(tmp_path / "model").eval()
    assert model.ep_size == 1 and "ep_size" not in model.config.to_dict()
    torch.manual_seed(0)
    ids = torch.randint(3, 50, (2, 8))
    with torch.no_grad():
        out = model(ids, torch.ones_like(ids)).last_hidden_state
    for rank in (0, 1):  # DeepSpeed's all-to-all forward on two ranks == our single-process forward
        torch.testing.assert_close(out, torch.load(tmp_path / f"out{rank}.pt", weights_only=True), atol=1e-6, rtol=1e-5)


@pytest.mark.multiproc
def test_ep_size_2_exact_count_exchange_equals_deepspeeds_padded_dispatch(tmp_path):
    worker = Path(__file__).with_name("ep_dispatch_worker.py")
    result = subprocess.run([*LAUNCHER, "--master_port", str(free_port()), str(worker), str(tmp_path)],
                            capture_output=True, text=True, timeout=300, env=launcher_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok0", "ok1"]
