"""What a cluster does to a run, done on this machine: two nodes started as a Slurm user would (the
launcher of each node with --no-ssh and its --node-rank), `./launch.sh --slurm` turning Slurm's variables
into that per-node command, and a rank SIGKILLed in the middle of a step.

The runs are tiny (a 1L;32H MiniMoE student with 2 experts, the packaged teacher, shards of a few tokens per
sample) and checked against each other: a resumed run must repeat the uninterrupted run's losses."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from launcher import REPO, free_port, launch, launcher_env, run_group, start, wait_all

from pipeline import checkpoint

# 2 experts over the 2 ranks (ep_size 2), ZeRO-2: the layout of a cluster run, at the smallest size.
TINY = ["--layers", "1", "--hidden", "32", "--heads", "2", "--experts", "2", "--relation-heads", "2",
        "--micro-batch-size", "4", "--lr", "5e-3", "--log-every", "1", "--seed", "5",
        "--deepspeed-config", str(REPO / "ds_configs" / "zero2.json")]


@pytest.fixture(scope="module")
def shards(teacher_dir, tmp_path_factory) -> Path:
    """400 short samples in the teacher's vocabulary (tests/test_data_loader.write_shards)."""
    from test_data_loader import write_shards

    from minimoe_common.tokenizer import load_tokenizer, tokenizer_fingerprint

    out = tmp_path_factory.mktemp("cluster") / "shards"
    write_shards(out, [200, 200], fingerprint=tokenizer_fingerprint(load_tokenizer(str(teacher_dir))))
    return out


@pytest.fixture()
def one_thread(monkeypatch):
    """One OpenMP thread per rank: this machine's 2 cores are shared."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def stopped_at(run: Path, tag: str, out: Path) -> Path:
    """A copy of `run` as if it had stopped right after checkpoint `tag` (later checkpoints gone)."""
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("tensorboard"))
    for later in (out / "checkpoints").glob("step-*"):
        if later.name > tag:
            shutil.rmtree(later)
    (out / "checkpoints" / "latest").write_text(tag)
    return out


# Slurm: the per-node command, from fake Slurm variables and a fake scontrol (fast)

def dry_run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "PYTHON"}
    return subprocess.run(["bash", str(REPO / "launch.sh"), *args, "--dry-run"], capture_output=True, text=True,
                          timeout=60, env={**base, **env})


def printed_command(run: subprocess.CompletedProcess) -> list[str]:
    line = next(line for line in run.stderr.splitlines() if line.startswith("+ "))
    return shlex.split(line[2:])


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


@pytest.fixture()
def slurm(tmp_path) -> dict[str, str]:
    """Node 1 of a 3-node job gpu[07-09] (job 4242): Slurm's variables, and an scontrol that expands the list."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-09]" ] || { echo "bad call: $*" >&2; exit 1; }\n'
                        'printf "gpu07\\ngpu08\\ngpu09\\n"\n')
    scontrol.chmod(0o755)
    return {"SLURM_JOB_NODELIST": "gpu[07-09]", "SLURM_NODEID": "1", "SLURM_JOB_ID": "4242", "TMPDIR": str(tmp_path),
            "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_slurm_gives_each_node_its_no_ssh_command(slurm, tmp_path):
    run = dry_run("--slurm", "distill", "--num-procs", "2", "--shards", "S", "--output", "O", env=slurm)
    assert run.returncode == 0, run.stderr
    command = printed_command(run)
    assert "--no_ssh" in command
    assert (option(command, "--node_rank"), option(command, "--master_addr")) == ("1", "gpu07")
    assert option(command, "--master_port") == str(20000 + 4242 % 10000)  # the same on every node of the job
    assert option(command, "--num_gpus") == "2"
    hostfile = Path(option(command, "--hostfile"))
    assert hostfile.parent == tmp_path and hostfile.read_text() == "gpu07 slots=2\ngpu08 slots=2\ngpu09 slots=2\n"
    assert command[command.index("--module"):] == ["--module", "pipeline.distill", "--shards", "S", "--output", "O"]
    # --slurm is a launch option like the others (anywhere on the line); address and port may be given.
    given = printed_command(dry_run("finetune", "--slurm", "--num-procs", "1", "--master-addr", "10.0.0.7",
                                    "--master-port", "31000", "rte", env=slurm))
    assert (option(given, "--master_addr"), option(given, "--master_port")) == ("10.0.0.7", "31000")
    assert given.count("--master_addr") == given.count("--master_port") == 1
    assert Path(option(given, "--hostfile")).read_text().splitlines()[0] == "gpu07 slots=1"


def test_slurm_and_no_ssh_refusals(slurm, tmp_path):
    if not shutil.which("scontrol"):  # (a machine with Slurm has a real one)
        run = dry_run("--slurm", "distill", env={**slurm, "PATH": os.environ["PATH"]})
        assert (run.returncode, run.stderr) == (2, "error: --slurm: scontrol not found on PATH (it expands "
                                                   "SLURM_JOB_NODELIST=gpu[07-09])\n")
    run = dry_run("--slurm", "distill", env={k: v for k, v in slurm.items() if k != "SLURM_NODEID"})
    assert (run.returncode, run.stderr) == (2, "error: --slurm: SLURM_NODEID is not set; run it under srun, one task "
                                               "per node (see ./launch.sh --help)\n")
    run = dry_run("--slurm", "distill", "--node-rank", "0", env=slurm)
    assert run.returncode == 2 and "--slurm writes the hostfile and sets --no-ssh and --node-rank itself" in run.stderr
    # Without ssh the launcher cannot ask node 0 for its address: each node must be told everything.
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    for args, missing in ((["--no-ssh"], "--hostfile"), (["--no-ssh", "--hostfile", str(hostfile)], "--node-rank I"),
                          (["--no-ssh", "--hostfile", str(hostfile), "--node-rank", "1"], "--master-addr")):
        run = dry_run("distill", *args, env={})
        assert run.returncode == 2 and run.stderr.startswith(f"error: --no-ssh needs {missing} "), run.stderr


@pytest.mark.multiproc
def test_the_launcher_takes_the_slurm_command_as_node_1_of_3(slurm, tmp_path):
    """The deepspeed launcher run with launch.sh's per-node flags gives node 1's ranks their global ranks."""
    command = printed_command(dry_run("--slurm", "distill", "--num-procs", "2", env=slurm))
    script = tmp_path / "ranks.py"
    script.write_text("import json, os, pathlib\n"
                      "keys = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')\n"
                      "out = pathlib.Path(__file__).parent / f\"rank{os.environ['RANK']}.json\"\n"
                      "out.write_text(json.dumps({k: os.environ[k] for k in keys}))\n")
    launcher = [sys.executable, *command[command.index("-m"):command.index("--module")], str(script)]
    run = subprocess.run(launcher, capture_output=True, text=True, timeout=120,
                         env={**launcher_env(), "DS_ACCELERATOR": "cpu"})
    assert run.returncode == 0, run.stderr[-2000:]
    ranks = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    port = str(20000 + 4242 % 10000)
    assert ranks == [{"RANK": str(rank), "LOCAL_RANK": str(rank - 2), "WORLD_SIZE": "6", "MASTER_ADDR": "gpu07",
                      "MASTER_PORT": port} for rank in (2, 3)]


# Two nodes on this machine (slow)

@pytest.mark.slow
@pytest.mark.multiproc
def test_two_nodes_train_checkpoint_and_resume_on_one_node(shards, teacher_dir, tmp_path, one_thread):
    """Node 0 and node 1 (1 rank each, ep_size 2, ZeRO-2) as on a cluster without ssh, then the run resumed
    on one node: 2 ranks repeat the 2-node losses, 1 rank loads the weights only and says so."""
    common = ["--teacher", str(teacher_dir), "--shards", str(shards), *TINY, "--global-batch-size", "8",
              "--max-steps", "6", "--save-every", "3"]
    # Two names for this machine: the launcher counts the hostfile's lines as nodes, MASTER_ADDR is where they meet.
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    full, port = tmp_path / "two-nodes", str(free_port())
    nodes = [start(["bash", str(REPO / "launch.sh"), "distill", "--hostfile", str(hostfile), "--no-ssh",
                    "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port, "--verbose",
                    "--ep-size", "2", *common, "--output", str(full)], tmp_path / f"node{rank}.log")
             for rank in (0, 1)]
    codes = wait_all(nodes, timeout=900)
    logs = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    for rank, log in enumerate(logs):  # each launcher started one rank of a 2-node world
        assert f"nnodes=2, num_local_procs=1, node_rank={rank}" in log, log[-3000:]
        assert "dist_world_size=2" in log
    assert "on 2 rank(s)" in logs[0]
    curve = losses(full)
    assert sorted(curve) == list(range(1, 7))
    step3 = full / "checkpoints" / "step-00000003"
    assert (full / "checkpoints" / "latest").read_text() == "step-00000006"
    assert {"rng-rank00000.pt", "rng-rank00001.pt", "layer_0_expert_0_mp_rank_00_model_states.pt",
            "layer_0_expert_1_mp_rank_00_model_states.pt", "checksums.json"} <= {p.name for p in step3.iterdir()}
    assert checkpoint.damage(step3) is None
    assert json.loads((step3 / "trainer_state.json").read_text())["layout"]["world_size"] == 2

    # One node, 2 ranks: the same layout, so the same run.
    same = stopped_at(full, "step-00000003", tmp_path / "one-node")
    run = launch("distill", [*common, "--ep-size", "2", "--output", str(same), "--resume"], procs=2, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:]
    again = losses(same)
    assert sorted(again) == list(range(1, 7))
    for step in range(4, 7):
        assert abs(again[step] - curve[step]) <= 1e-6, (step, again[step], curve[step])

    # One rank: ep_size 1 holds both experts; the weights load, the optimizer starts afresh, and it says so.
    one = stopped_at(full, "step-00000003", tmp_path / "one-rank")
    run = launch("distill", [*common, "--ep-size", "1", "--output", str(one), "--resume"], procs=1, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:]
    assert ("warning: resumed the weights of step-00000003 only: optimizer state was reset, because the checkpoint's "
            "layout {'world_size': 2, 'ep_size': 2,") in run.stdout
    moved = losses(one)
    assert sorted(moved) == list(range(1, 7))
    # The trained weights, not a fresh student: step 4 is near the 2-node step 4, far from the step-1 loss.
    assert abs(moved[4] - curve[4]) < abs(curve[1] - curve[4]) / 4, (moved, curve)


# A rank SIGKILLed in the middle of a step (slow)

def test_a_lost_peer_is_told_from_other_runtime_errors():
    import torch.distributed as dist

    from pipeline.optim import lost_peer

    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                        "[127.0.0.1]:12717: Connection reset by peer. This is typically caused by a remote worker hanging")
    assert lost_peer(gloo) == "Read error [127.0.0.1]:12717: Connection reset by peer"
    assert lost_peer(dist.DistBackendError("NCCL communicator was aborted on rank 3.\nmore")) == \
        "NCCL communicator was aborted on rank 3."
    assert lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None  # a bug stays a traceback


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line)["step"] for line in text.splitlines(keepends=True) if line.endswith("\n")]


@pytest.mark.slow
@pytest.mark.multiproc
def test_sigkill_of_one_rank_mid_step(shards, teacher_dir, tmp_path, one_thread):
    """Rank 1 killed while step 2k+2 computes (checkpoints every 2 steps): the launcher ends the run at once,
    `latest` names the complete checkpoint of step 2k, and --resume goes on to the uninterrupted run's losses."""
    # 4 micro-batches per rank and step: a step lasts long enough to be caught between its start and its end.
    common = ["--teacher", str(teacher_dir), "--shards", str(shards), *TINY, "--global-batch-size", "32",
              "--ep-size", "2", "--max-steps", "7", "--save-every", "2"]
    reference = tmp_path / "reference"
    run = launch("distill", [*common, "--output", str(reference)], timeout=900)
    assert run.returncode == 0, run.stdout[-3000:]

    killed = tmp_path / "killed"
    log = tmp_path / "killed.log"
    launcher = start(["bash", str(REPO / "launch.sh"), "distill", "--num-procs", "2", "--master-port", str(free_port()),
                      *common, "--output", str(killed)], log)
    try:
        # Step 3 logged by rank 0: checkpoint step-2 is complete, and step 4 (whose end saves) is computing.
        deadline = time.monotonic() + 600
        while not logged_steps(killed) or logged_steps(killed)[-1] < 3:
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        ranks = {int(p.environ()["RANK"]): p for p in psutil.Process(launcher.pid).children(recursive=True)
                 if any(arg.startswith("--local_rank=") for arg in p.cmdline())}  # (not the launcher processes)
        assert sorted(ranks) == [0, 1]
        ranks[1].kill()
        killed_at = time.monotonic()
        code = launcher.wait(timeout=120)
        latency = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, 9)
    output = log.read_text()
    print(f"launcher exit {code} {latency:.1f} s after the SIGKILL of rank 1")
    assert code != 0, output[-3000:]
    assert latency < 30, output[-3000:]
    assert not psutil.wait_procs(list(ranks.values()), timeout=5)[1]  # no rank left behind
    # Rank 0 meets the broken connection in its next collective (an all-to-all in every MoE forward), well
    # before the launcher, which looks at its ranks once a second, would stop it: it says so in one line.
    assert "Traceback" not in output, output[-3000:]
    assert re.search(r"^error: another rank is gone \(.*Connection (reset|closed) by peer\); checkpoints/latest "
                     r"names the newest complete checkpoint: rerun with --resume$", output, re.M), output[-3000:]
    # Mid-step: rank 0 never finished step 4 (its record and checkpoint come after the step's last all-reduce).
    assert logged_steps(killed) == [1, 2, 3], output[-3000:]
    root = killed / "checkpoints"
    assert checkpoint.latest_tag(root) == "step-00000002"
    assert {"trainer_state.json", "checksums.json"} <= {p.name for p in (root / "step-00000002").iterdir()}
    assert checkpoint.damage(root / "step-00000002") is None

    run = launch("distill", [*common, "--output", str(killed), "--resume"], timeout=900)
    assert run.returncode == 0, run.stdout[-3000:]
    curve, again = losses(reference), losses(killed)
    assert sorted(again) == list(range(1, 8))
    for step in range(3, 8):
        assert abs(again[step] - curve[step]) <= 1e-6, (step, again[step], curve[step])


# A rank SIGKILLed while it writes a checkpoint

@pytest.mark.multiproc
def test_sigkill_during_a_checkpoint_write(shards, teacher_dir, tmp_path, monkeypatch, one_thread):
    """Rank 1 killed halfway through its first file of checkpoint step 4 (tests/kill_in_save.py): `latest`
    stays on step 2, whose files are intact; --resume writes step 4 anew (no file of the killed save left)
    and repeats the uninterrupted run's losses."""
    common = ["--teacher", str(teacher_dir), "--shards", str(shards), *TINY, "--global-batch-size", "8",
              "--ep-size", "2", "--max-steps", "5", "--save-every", "2"]
    reference = tmp_path / "reference"
    run = launch("distill", [*common, "--output", str(reference)])
    assert run.returncode == 0, run.stdout[-3000:]

    killed = tmp_path / "killed"
    monkeypatch.setenv("KILL_RANK", "1")
    monkeypatch.setenv("KILL_TAG", "step-00000004")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    run = run_group([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                     str(free_port()), "--log_level", "warning", str(REPO / "tests" / "kill_in_save.py"),
                     *common, "--output", str(killed)])
    assert run.returncode != 0, run.stdout[-3000:]
    assert "Traceback" not in run.stdout, run.stdout[-3000:]
    assert "error: another rank is gone" in run.stdout, run.stdout[-3000:]
    root = killed / "checkpoints"
    assert checkpoint.latest_tag(root) == "step-00000002"
    assert checkpoint.damage(root / "step-00000002") is None
    # The killed save left a directory without its trainer state, and a file cut short.
    unfinished = root / "step-00000004"
    assert not (unfinished / "trainer_state.json").exists()
    written = {p.name: p.stat().st_size for p in unfinished.iterdir() if p.is_file()}
    assert written, "the kill came before the checkpoint's first file"

    monkeypatch.delenv("KILL_RANK")
    run = launch("distill", [*common, "--output", str(killed), "--resume"])
    assert run.returncode == 0, run.stdout[-3000:]
    curve, again = losses(reference), losses(killed)
    assert sorted(again) == list(range(1, 6))
    for step in range(3, 6):
        assert abs(again[step] - curve[step]) <= 1e-6, (step, again[step], curve[step])
    assert checkpoint.latest_tag(root) == "step-00000005"
    assert checkpoint.damage(root / "step-00000004") is None
    assert sorted(p.name for p in (root / "step-00000004").iterdir()) == \
        sorted(p.name for p in (reference / "checkpoints" / "step-00000004").iterdir())
