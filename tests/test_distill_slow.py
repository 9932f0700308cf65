"""Longer runs of the distillation engine (make test-all): a few hundred steps of a small MiniMoE
student on real Wikipedia, exact resume on one process, resuming onto another layout."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from tests.test_distill_multiproc import launch, losses, wiki_shards  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def test_real_run_relation_loss_halves_and_no_expert_collapses(wiki_shards, teacher_dir, tmp_path):
    """MiniMoE 4L;192H (4 experts over 2 ranks, ZeRO-2) from the packaged teacher, 300 steps x 32 samples."""
    out = tmp_path / "run"
    run = launch(["--teacher", str(teacher_dir), "--shards", str(wiki_shards), "--output", str(out),
                  "--student", "4L192H", "--experts", "4", "--ep-size", "2", "--relation-heads", "12",
                  "--micro-batch-size", "16", "--max-steps", "300", "--lr", "1e-3", "--warmup", "0.05",
                  "--log-every", "10", "--save-every", "300", "--collapse-window", "50"])
    assert run.returncode == 0, run.stdout[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    relation = [(r["loss"] - r["aux"]) for r in records]  # the relation loss: total minus the weighted aux
    assert relation[-1] < 0.5 * relation[0], relation
    assert "router collapse" not in run.stdout
    for record in records[-5:]:  # the last 50 steps: every expert of every layer keeps >= 5% of the tokens
        assert min(min(layer) for layer in record["expert_shares"]) >= 0.05, record["expert_shares"]


def test_one_process_exact_resume_and_resume_onto_another_layout(wiki_shards, teacher_dir, tmp_path):
    common = ["--teacher", str(teacher_dir), "--shards", str(wiki_shards), "--layers", "2", "--hidden", "64",
              "--heads", "4", "--experts", "4", "--relation-heads", "4", "--micro-batch-size", "8",
              "--max-steps", "10", "--lr", "5e-3", "--log-every", "1", "--save-every", "5", "--seed", "3"]
    full = tmp_path / "full"
    assert launch([*common, "--output", str(full)], procs=1).returncode == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("step-00000010", "tensorboard"))
    (resumed / "checkpoints" / "latest").write_text("step-00000005")
    run = launch([*common, "--output", str(resumed), "--resume"], procs=1)
    assert run.returncode == 0, run.stdout[-3000:]
    curve, again = losses(full), losses(resumed)
    for step in range(6, 11):
        assert abs(again[step] - curve[step]) <= 1e-5, (step, again[step], curve[step])
    # Onto 2 ranks with ep_size 2: the weights load, the optimizer state is reset, and it says so.
    other = tmp_path / "other"
    shutil.copytree(full, other, ignore=shutil.ignore_patterns("step-00000010", "tensorboard"))
    (other / "checkpoints" / "latest").write_text("step-00000005")
    run = launch([*common, "--output", str(other), "--resume", "--ep-size", "2"], procs=2)
    assert run.returncode == 0, run.stdout[-3000:]
    assert re.search(r"warning: resumed the weights of step-00000005 only: optimizer state was reset", run.stdout)
    assert sorted(losses(other)) == list(range(1, 11))
