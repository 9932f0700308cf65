"""The distillation engine through the real deepspeed launcher: CPU ranks with gloo, the packaged
teacher, shards built by data_prep from real Wikipedia. Each launched run is checked for several things
at once to keep the suite short: a tiny MiniMoE student (2L;64H, 4 experts) and 64-token samples.
The slow tests (make test-all) add a few hundred steps of a small MiniMoE student, exact resume on one
process and resuming onto another layout."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launcher import free_port, launch, run_group

REPO = Path(__file__).resolve().parents[1]
# 4 relation heads: with the default 32 a 64-wide student has 2 dimensions per relation head and learns slowly.
TINY = ["--layers", "2", "--hidden", "64", "--heads", "4", "--experts", "4", "--micro-batch-size", "8",
        "--global-batch-size", "16", "--relation-heads", "4"]

pytestmark = pytest.mark.multiproc


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="session")
def wiki_shards(shared_data, teacher_dir, tmp_path_factory) -> Path:
    """Shards of two real Wikipedia files, 64-token samples, built by data_prep with the teacher's tokenizer."""
    out = tmp_path_factory.mktemp("wiki") / "shards"
    inputs = [str(shared_data / "wikipedia" / "AA" / name) for name in ("wiki_00", "wiki_01")]
    subprocess.run([sys.executable, "-m", "data_prep", "build", "--input", *inputs, "--format", "wikiextractor",
                    "--tokenizer", str(teacher_dir), "--output", str(out), "--max-seq-length", "64", "--workers", "2"],
                   cwd=REPO, check=True, capture_output=True)
    return out


def test_zero2_ep2_trains_resumes_exactly_and_exports(wiki_shards, teacher_dir, tmp_path):
    common = ["--teacher", str(teacher_dir), "--shards", str(wiki_shards), *TINY, "--ep-size", "2",
              "--deepspeed-config", str(REPO / "ds_configs" / "zero2.json"), "--max-steps", "16", "--lr", "5e-3",
              "--warmup", "0.1", "--log-every", "1", "--save-every", "8", "--seed", "7"]
    full = tmp_path / "full"
    run = launch("distill", [*common, "--output", str(full)])
    assert run.returncode == 0, run.stdout[-3000:]

    # Trains: the relation loss falls over 16 steps of real data.
    curve = losses(full)
    assert sorted(curve) == list(range(1, 17))
    first, last = sum(curve[s] for s in range(1, 5)) / 4, sum(curve[s] for s in range(13, 17)) / 4
    assert last < 0.85 * first, curve
    # Checkpoints: latest after the final one, both kept, every rank's RNG, experts 0-3 of both ep ranks.
    checkpoints = full / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-00000016"
    for step in ("step-00000008", "step-00000016"):
        names = {p.name for p in (checkpoints / step).iterdir()}
        assert {"rng-rank00000.pt", "rng-rank00001.pt", "trainer_state.json", "tokenizer"} <= names
        assert {f"layer_{l}_expert_{e}_mp_rank_00_model_states.pt" for l in (0, 1) for e in range(4)} <= names
    state = json.loads((checkpoints / "step-00000008" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["data"]["samples_seen"] == 8 * 8 * 2
    assert state["layout"]["world_size"] == 2 and state["layout"]["ep_size"] == 2
    record = json.loads((full / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(record["expert_shares"]) == 2 and all(len(layer) == 4 for layer in record["expert_shares"])
    assert all(abs(sum(layer) - 1) < 1e-3 for layer in record["expert_shares"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(full / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/qq", "train/aux", "train/lr", "train/grad_norm", "train/tokens_per_s",
            "experts/layer1/expert3", "router_entropy/layer0"} <= tags
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([curve[s] for s in range(1, 17)])

    # Exact resume: a run stopped after its step-8 checkpoint, resumed, repeats steps 9-16 exactly.
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("step-00000016", "tensorboard"))
    (resumed / "checkpoints" / "latest").write_text("step-00000008")
    run = launch("distill", [*common, "--output", str(resumed), "--resume"])
    assert run.returncode == 0, run.stdout[-3000:]
    again = losses(resumed)
    assert sorted(again) == list(range(1, 17))
    for step in range(9, 17):
        assert abs(again[step] - curve[step]) <= 1e-5, (step, again[step], curve[step])

    # Export from ep_size 2, load in this plain process: the same outputs as the training-time engine.
    model_dir = tmp_path / "model"
    subprocess.run([sys.executable, "-m", "pipeline.export", str(full), str(model_dir)], cwd=REPO, check=True,
                   capture_output=True)
    probe_out = tmp_path / "probe.pt"
    probe = run_group([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
                       str(REPO / "tests" / "distill_probe.py"), str(checkpoints / "step-00000016"), str(wiki_shards),
                       str(probe_out)])
    assert probe.returncode == 0, probe.stdout[-3000:]
    from pipeline.models import Student

    reference = torch.load(probe_out, weights_only=True)
    student = Student.from_pretrained(model_dir).eval()
    assert student.ep_size == 1 and student.config.num_experts == 4
    with torch.no_grad():
        out = student(reference["input_ids"], reference["attention_mask"], reference["token_type_ids"])
    torch.testing.assert_close(out.last_hidden_state, reference["hidden"], atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(out.qkv, reference["qkv"]):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    # Teacher-assistant chain: the exported student is a valid teacher for the same shards.
    from minimoe_common.tokenizer import load_tokenizer, tokenizer_fingerprint
    from pipeline.models.teacher import Teacher

    assistant = Teacher.from_pretrained(model_dir)
    assert tokenizer_fingerprint(assistant.tokenizer) == tokenizer_fingerprint(load_tokenizer(str(teacher_dir)))
    q, k, v = assistant(reference["input_ids"], reference["attention_mask"], reference["token_type_ids"])
    torch.testing.assert_close(q, reference["qkv"][0], atol=1e-5, rtol=1e-5)


def test_refusals_through_the_launcher(wiki_shards, teacher_dir, tmp_path):
    common = ["--teacher", str(teacher_dir), *TINY, "--max-steps", "1", "--output", str(tmp_path / "run")]
    # Shards whose tokenizer differs from the teacher's.
    foreign = tmp_path / "foreign"
    shutil.copytree(wiki_shards, foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = "0" * 64
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    run = launch("distill", [*common, "--shards", str(foreign)])
    assert run.returncode != 0
    assert f"error: {foreign / 'manifest.json'}: tokenizer fingerprint 000000000000... differs from the teacher's" in run.stdout
    assert "Traceback" not in run.stdout
    # ep_size that does not divide the world size.
    run = launch("distill", [*common, "--shards", str(wiki_shards), "--ep-size", "4"])
    assert run.returncode != 0 and "error: --ep-size 4 does not divide the world size 2" in run.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_real_run_relation_loss_halves_and_no_expert_collapses(wiki_shards, teacher_dir, tmp_path):
    """MiniMoE 4L;192H (4 experts over 2 ranks, ZeRO-2) from the packaged teacher, 300 steps x 32 samples."""
    out = tmp_path / "run"
    run = launch("distill", ["--teacher", str(teacher_dir), "--shards", str(wiki_shards), "--output", str(out),
                  "--student", "4L192H", "--experts", "4", "--ep-size", "2", "--relation-heads", "12",
                  "--micro-batch-size", "16", "--global-batch-size", "32", "--max-steps", "300", "--lr", "1e-3", "--warmup", "0.05",
                  "--log-every", "10", "--save-every", "300", "--collapse-window", "50"], timeout=2400)
    assert run.returncode == 0, run.stdout[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    relation = [(r["loss"] - r["aux"]) for r in records]  # the relation loss: total minus the weighted aux
    assert relation[-1] < 0.5 * relation[0], relation
    assert "router collapse" not in run.stdout
    for record in records[-5:]:  # the last 50 steps: every expert of every layer keeps >= 5% of the tokens
        assert min(min(layer) for layer in record["expert_shares"]) >= 0.05, record["expert_shares"]


@pytest.mark.slow
def test_one_process_exact_resume_and_resume_onto_another_layout(wiki_shards, teacher_dir, tmp_path):
    common = ["--teacher", str(teacher_dir), "--shards", str(wiki_shards), "--layers", "2", "--hidden", "64",
              "--heads", "4", "--experts", "4", "--relation-heads", "4", "--micro-batch-size", "8",
              "--global-batch-size", "16", "--max-steps", "10", "--lr", "5e-3", "--log-every", "1", "--save-every", "5", "--seed", "3"]
    full = tmp_path / "full"
    assert launch("distill", [*common, "--output", str(full)], procs=1).returncode == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("step-00000010", "tensorboard"))
    (resumed / "checkpoints" / "latest").write_text("step-00000005")
    run = launch("distill", [*common, "--output", str(resumed), "--resume"], procs=1)
    assert run.returncode == 0, run.stdout[-3000:]
    curve, again = losses(full), losses(resumed)
    for step in range(6, 11):
        assert abs(again[step] - curve[step]) <= 1e-5, (step, again[step], curve[step])
    # Onto 2 ranks with ep_size 2: the weights load, the optimizer state is reset, and it says so.
    other = tmp_path / "other"
    shutil.copytree(full, other, ignore=shutil.ignore_patterns("step-00000010", "tensorboard"))
    (other / "checkpoints" / "latest").write_text("step-00000005")
    run = launch("distill", [*common, "--output", str(other), "--resume", "--ep-size", "2"], procs=2)
    assert run.returncode == 0, run.stdout[-3000:]
    assert re.search(r"warning: resumed the weights of step-00000005 only: optimizer state was reset", run.stdout)
    assert sorted(losses(other)) == list(range(1, 11))
