"""TinyBERT's general distillation (Jiao et al. 2020): the layer mapping by hand; the teachers' attention scores
against the eager models' own attention probabilities (a tiny MPNet, the packaged BERT teacher, an exported
student, the real all-mpnet-base-v2 when installed); DeBERTa and ModernBERT refused; a 3-step 4L;312H run from
the packaged teacher through the DeepSpeed engine on the bundled Wikipedia sample; the recipe the checkpoint
checks on resume. The loss against a per-layer loop: tests/test_objectives.py."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import (AutoModel, DebertaV2Config, DebertaV2Model, ModernBertConfig, ModernBertModel, MPNetConfig,
                          MPNetModel)

from pipeline import checkpoint, distill
from pipeline.distill import DistillConfig, parse_config
from pipeline.models import Student, StudentConfig
from pipeline.models.teacher import Teacher
from pipeline.objectives import attention_scores, tinybert_layer_map

REPO = Path(__file__).resolve().parents[1]
SENTENCES = ["The cat sat.", "Distillation lifts the curse of capacity gap in language models, they say."]


@pytest.mark.parametrize("student_layers, teacher_layers, mapping, expected", [
    (4, 12, "uniform", [0, 3, 6, 9, 12]),  # TinyBERT_4 from BERT-base: g(m) = 3m
    (3, 6, "uniform", [0, 2, 4, 6]),  # g(m) = 2m
    (6, 6, "uniform", [0, 1, 2, 3, 4, 5, 6]),  # g(m) = m
    (4, 6, "uniform", [0, 1, 3, 4, 6]),  # 1.5m rounded down: 1.5, 3, 4.5, 6
    (4, 12, "top", [0, 9, 10, 11, 12]),  # 12 - 4 + m
    (4, 12, "bottom", [0, 1, 2, 3, 4]),
])
def test_layer_mapping_by_hand(student_layers, teacher_layers, mapping, expected):
    assert tinybert_layer_map(student_layers, teacher_layers, mapping) == expected


def test_layer_mapping_refuses_a_deeper_student_and_an_unknown_mapping():
    with pytest.raises(ValueError, match="the student's 7 layers .* 1 <= student layers <= the teacher's 6"):
        tinybert_layer_map(7, 6)
    with pytest.raises(ValueError, match="must be one of uniform, top, bottom \\(got 'skip'\\)"):
        tinybert_layer_map(3, 6, "skip")


def assert_scores_are_the_models_attention(teacher: Teacher, hf, inputs: dict, layers: list[int]) -> float:
    """softmax over real keys of `layer_states`' scores equals the eager model's attention probabilities, and its
    hidden states equal the model's hidden_states; -> the largest difference softmax(Q·Kᵀ/√d) alone would make."""
    hidden, scores = teacher.layer_states(**inputs, layers=layers)
    with torch.no_grad():
        out = hf(**inputs, output_attentions=True, output_hidden_states=True)
    padded_keys = inputs["attention_mask"][:, None, None, :] == 0
    without_bias = dataclasses.replace(teacher.adapter, score_bias=None)
    plain = Teacher(teacher.model, without_bias, -1, teacher.num_heads, teacher.hidden_size, teacher.num_layers)
    gap = 0.0
    for n, own, bare in zip(layers, scores, plain.layer_states(**inputs, layers=layers)[1]):
        torch.testing.assert_close(own.masked_fill(padded_keys, -math.inf).softmax(-1), out.attentions[n - 1],
                                   atol=1e-5, rtol=0)
        gap = max(gap, (bare.masked_fill(padded_keys, -math.inf).softmax(-1) - out.attentions[n - 1]).abs().max().item())
    for got, expected in zip(hidden, [out.hidden_states[n] for n in [0, *layers]], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    return gap


def test_tiny_mpnet_scores_carry_its_relative_position_bias(tmp_path):
    torch.manual_seed(0)
    config = MPNetConfig(vocab_size=60, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                         initializer_range=0.2)  # peaked: the position bias moves the attention visibly
    MPNetModel(config).eval().save_pretrained(tmp_path)
    inputs = {"input_ids": torch.randint(5, 60, (2, 9)), "attention_mask": torch.tensor([[1] * 9, [1] * 5 + [0] * 4])}
    teacher = Teacher.from_pretrained(tmp_path)
    hf = MPNetModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert assert_scores_are_the_models_attention(teacher, hf, inputs, [2, 4]) > 1e-2  # the bias matters


def test_packaged_bert_teacher_scores_are_its_attention(teacher_dir):
    teacher = Teacher.from_pretrained(teacher_dir)
    inputs = teacher.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    hf = AutoModel.from_pretrained(teacher_dir, attn_implementation="eager").eval()
    layers = tinybert_layer_map(4, teacher.num_layers)[1:]  # the 4L;312H student's: 1, 3, 4, 6
    assert assert_scores_are_the_models_attention(teacher, hf, inputs, layers) < 1e-5  # BERT adds no bias


def test_real_mpnet_scores_are_its_attention(mpnet_dir):
    teacher = Teacher.from_pretrained(mpnet_dir)
    assert (teacher.num_layers, teacher.num_heads, teacher.hidden_size) == (12, 12, 768)
    inputs = teacher.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    hf = AutoModel.from_pretrained(mpnet_dir, attn_implementation="eager").eval()
    gap = assert_scores_are_the_models_attention(teacher, hf, inputs, [3, 6, 9, 12])
    print(f"all-mpnet-base-v2: softmax(QK^T/sqrt(d)) without the position bias differs by up to {gap:.2f}")
    assert gap > 0.1


def test_exported_student_as_teacher_gives_its_own_states(tmp_path):
    torch.manual_seed(0)
    student = Student(StudentConfig(num_layers=3, hidden_size=24, num_heads=2, vocab_size=50, num_experts=1)).eval()
    student.save_pretrained(tmp_path)
    ids, mask = torch.randint(3, 50, (2, 6)), torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    hidden, scores = Teacher.from_pretrained(tmp_path).layer_states(ids, mask, layers=[1, 3])
    out = student(ids, mask, output_hidden_states=True, output_qkv=True)
    for got, expected in zip(hidden, [out.hidden_states[n] for n in (0, 1, 3)], strict=True):
        torch.testing.assert_close(got, expected)
    for got, n in zip(scores, (1, 3), strict=True):
        torch.testing.assert_close(got, attention_scores(*out.layer_qkv[n - 1][:2], 2))


def test_forward_stops_after_the_deepest_mapped_layer(teacher_dir):
    teacher = Teacher.from_pretrained(teacher_dir)
    inputs = teacher.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    calls = []
    for index, block in enumerate(teacher.model.encoder.layer):
        block.register_forward_pre_hook(lambda module, args, index=index: calls.append(index))
    hidden, scores = teacher.layer_states(**inputs, layers=tinybert_layer_map(3, 6, "bottom")[1:])
    assert calls == [0, 1, 2] and len(hidden) == 4 and len(scores) == 3  # layers 4-6 never ran


def tiny_deberta(path: Path) -> Path:
    DebertaV2Model(DebertaV2Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, relative_attention=True, pos_att_type=["p2c", "c2p"])
                   ).save_pretrained(path)
    return path


def tiny_modernbert(path: Path) -> Path:
    ModernBertModel(ModernBertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     cls_token_id=1, sep_token_id=2)).save_pretrained(path)
    return path


@pytest.mark.parametrize("build, reason", [(tiny_deberta, "DeBERTa's scores add disentangled content-to-position"),
                                           (tiny_modernbert, "ModernBERT's scores are of RoPE-rotated Q/K")])
def test_deberta_and_modernbert_teachers_are_refused_in_one_line(tmp_path, build, reason):
    teacher = Teacher.from_pretrained(build(tmp_path))
    cfg = DistillConfig(teacher=str(tmp_path), shards="s", objective="tinybert")
    student = SimpleNamespace(num_layers=2, num_heads=4, relation_projection=False)
    with pytest.raises(ValueError, match=f"--objective tinybert distils the teacher's attention scores, and "
                                         f"{tmp_path} cannot give them: {reason}") as error:
        distill.check_objective(cfg, student, teacher)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=reason):
        teacher.layer_states(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long), layers=[2])


def test_config_mapping_defaults_and_refusals(tmp_path):
    required = ["--teacher", "t", "--shards", "s"]
    assert parse_config([*required, "--objective", "tinybert"]).tinybert_mapping == "uniform"  # the paper's
    assert parse_config(required).tinybert_mapping is None  # minilm: as checkpoints from before the field
    assert parse_config([*required, "--objective", "tinybert", "--tinybert-mapping", "top"]).tinybert_mapping == "top"
    with pytest.raises(ValueError, match=r"--tinybert-mapping must be one of uniform, top, bottom, with --objective "
                                         r"tinybert only \(got 'top'\)"):
        parse_config([*required, "--tinybert-mapping", "top"])
    file = tmp_path / "run.json"
    file.write_text(json.dumps({"objective": "tinybert", "tinybert_mapping": "skip"}))
    with pytest.raises(ValueError, match=r"--tinybert-mapping must be one of .* \(got 'skip'\)"):
        parse_config(["--config", str(file), *required])
    with pytest.raises(SystemExit):  # argparse's choices
        parse_config([*required, "--objective", "tinybert", "--tinybert-mapping", "skip"])
    with pytest.raises(ValueError, match=r"--teacher-layer must stay -1 with --objective tinybert"):
        parse_config([*required, "--objective", "tinybert", "--teacher-layer", "3"])


@pytest.mark.parametrize("objective, refused", [("minilm", None), ("tinybert", "--tinybert-mapping None -> 'uniform'")])
def test_checkpoints_from_before_the_mapping_field(tmp_path, objective, refused):
    """A minilm checkpoint written before tinybert_mapping existed resumes; a TinyBERT one (then: one layer) does not."""
    cfg = DistillConfig(teacher="t", shards="s", output=str(tmp_path), objective=objective, resume=True)
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "tinybert_mapping"}
    step_dir = tmp_path / "checkpoints" / checkpoint.tag_for(1)
    step_dir.mkdir(parents=True)
    (step_dir / checkpoint.TRAINER_STATE).write_text(json.dumps({"step": 1, "config": old}))
    (tmp_path / "checkpoints" / checkpoint.LATEST).write_text(step_dir.name)
    if refused is None:
        assert distill.checkpoint_to_resume(cfg)["step"] == 1
    else:
        with pytest.raises(ValueError, match=f"--resume cannot change the distillation: {refused}"):
            distill.checkpoint_to_resume(cfg)


def test_4l312h_from_the_packaged_teacher_through_the_engine(teacher_dir, tmp_path, monkeypatch, capsys):
    """2 steps of TinyBERT's recipe (TinyBERT_4's shape, dense) on the bundled Wikipedia sample, 2 micro batches a
    step: every part logged and finite, W_h 312 -> 384 in the checkpoint, a changed mapping refused on resume."""
    from test_distill import module_states, run_in_process

    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "data_prep", "build", "--input", str(REPO / "examples" / "data" / "wiki_sample"),
                    "--output", str(shards), "--max-seq-length", "32", "--workers", "1"], cwd=REPO, check=True,
                   capture_output=True)
    common = ["--teacher", str(teacher_dir), "--shards", str(shards), "--output", str(tmp_path / "run"),
              "--objective", "tinybert", "--student", "4L312H", "--experts", "1", "--micro-batch-size", "4",
              "--global-batch-size", "8", "--max-steps", "2", "--lr", "1e-3", "--log-every", "1", "--save-every", "2",
              "--deepspeed-config", str(REPO / "ds_configs" / "zero2.json")]
    assert run_in_process(monkeypatch, common) == 0
    assert "(layers [0, 1, 3, 4, 6]) -> student 4L;312H x1 experts" in capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("embedding", "attention", "hidden")), r
        assert r["aux"] == 0 and r["loss"] == pytest.approx(r["embedding"] + r["attention"] + r["hidden"], rel=1e-5)
    assert module_states(tmp_path / "run", 2)["tinybert_projection.weight"].shape == (384, 312)
    assert run_in_process(monkeypatch, [*common, "--resume", "--max-steps", "3", "--tinybert-mapping", "top"]) == 2
    assert "--resume cannot change the distillation: --tinybert-mapping 'uniform' -> 'top'" in capsys.readouterr().err
