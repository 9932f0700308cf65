"""minimoe-export: dense students as plain BERT (loaded in a process that never imports this project), MiniMoE
students in the registered format, sentence-transformers modules after a short real distillation, the model card
and file modes; compress, report and experts read BERT-format dirs."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from minimoe_common.cli import InputError
from minimoe_common.files import file_sha256
from minimoe_common.tokenizer import load_tokenizer
from pipeline import export
from pipeline.distill import DistillConfig
from pipeline.models import Student, StudentConfig
from pipeline.models.hf_export import load_student
from pipeline.report import compute_report

REPO = Path(__file__).resolve().parents[1]
SENTENCES = (["The cat sat on the mat.", "A longer sentence, with a comma and more words in it."],
             ["a second segment", "x"])

TRAINED_ON = b'{"format": "minimoe-shards"}\n'  # the manifest the fake run trained on


def fake_checkpoint(run: Path, teacher_dir: Path, experts: int) -> Student:
    """A run dir with one checkpoint as distill writes it (trainer state, model states, tokenizer) of a tiny
    student with the teacher's vocabulary; returns the student (its relation projection included for MoE)."""
    tokenizer = load_tokenizer(str(teacher_dir))
    config = StudentConfig.from_preset("3L384H", tokenizer=tokenizer, num_layers=2, hidden_size=64, num_heads=4,
                                       intermediate_size=128, num_experts=experts)
    torch.manual_seed(0)
    student = Student(config).eval()
    step = run / "checkpoints" / "step-00000007"
    step.mkdir(parents=True)
    torch.save({"module": student.state_dict()}, step / "mp_rank_00_model_states.pt")
    tokenizer.save_pretrained(str(step / "tokenizer"))
    (run / "shards").mkdir()
    (run / "shards" / "manifest.json").write_bytes(TRAINED_ON)
    trained_on = file_sha256(run / "shards" / "manifest.json")
    (run / "shards" / "manifest.json").write_text('{"format": "minimoe-shards", "rebuilt": true}\n')  # after the run
    cfg = DistillConfig(teacher=str(teacher_dir), shards=str(run / "shards"), max_steps=7, global_batch_size=64)
    state = {"step": 7, "tag": step.name, "student": config.student_dict(), "config": dataclasses.asdict(cfg),
             "layout": {"world_size": 2, "ep_size": 1, "zero_stage": 2, "dtype": "torch.float32"}, "tokens_seen": 12345,
             "data_manifest_sha256": trained_on}
    (step / "trainer_state.json").write_text(json.dumps(state))
    (run / "checkpoints" / "latest").write_text(step.name)
    return student


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


# Run in a fresh interpreter, cwd a temporary dir, PYTHONPATH cleared: transformers alone loads the dir.
NO_PROJECT = """
import json, sys, torch
from transformers import AutoModel, AutoModelForSequenceClassification
ref = torch.load("ours.pt")
model = AutoModel.from_pretrained("model").eval()
head, info = AutoModelForSequenceClassification.from_pretrained("model", num_labels=3, output_loading_info=True)
with torch.no_grad():
    hidden = model(**ref["inputs"]).last_hidden_state
    head_hidden = head.eval().bert(**ref["inputs"]).last_hidden_state
    logits = head(**ref["inputs"]).logits
print(json.dumps({"model": type(model).__name__, "head": type(head).__name__, "missing": sorted(info["missing_keys"]),
                  "diff": (hidden - ref["hidden"]).abs().max().item(), "head_diff": (head_hidden - ref["hidden"]).abs().max().item(),
                  "logits": list(logits.shape), "project_imported": any(m.split(".")[0] in ("pipeline", "minimoe_common", "data_prep") for m in sys.modules),
                  "path": sys.path}))
"""


def test_a_dense_student_exports_as_plain_bert(teacher_dir, tmp_path):
    student = fake_checkpoint(tmp_path / "run", teacher_dir, experts=1)
    assert export.main([str(tmp_path / "run"), str(tmp_path / "model")]) == 0
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert {k: config[k] for k in ("model_type", "architectures", "hidden_act", "num_hidden_layers", "hidden_size",
                                   "num_attention_heads", "intermediate_size", "vocab_size", "layer_norm_eps",
                                   "max_position_embeddings", "type_vocab_size", "pad_token_id")} == {
        "model_type": "bert", "architectures": ["BertModel"], "hidden_act": "gelu", "num_hidden_layers": 2,
        "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 30522,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "type_vocab_size": 2, "pad_token_id": 0}
    from safetensors import safe_open

    with safe_open(tmp_path / "model" / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    assert {"embeddings.LayerNorm.weight", "encoder.layer.1.attention.self.query.weight",
            "encoder.layer.1.attention.output.dense.bias", "encoder.layer.1.attention.output.LayerNorm.weight",
            "encoder.layer.1.intermediate.dense.weight", "encoder.layer.1.output.dense.weight",
            "encoder.layer.1.output.LayerNorm.bias", "pooler.dense.weight"} <= names
    assert len(names) == len(student.state_dict()) + 2  # + the pooler's weight and bias

    # Our outputs, computed here (padding and a second segment included), compared in a process without us.
    inputs = dict(load_tokenizer(str(teacher_dir))(*SENTENCES, padding=True, return_tensors="pt"))
    with torch.no_grad():
        hidden = student(**inputs).last_hidden_state
    torch.save({"inputs": inputs, "hidden": hidden}, tmp_path / "ours.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", NO_PROJECT], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert not result["project_imported"]
    assert REPO not in [Path(p).resolve() for p in result["path"] if p], result["path"]
    assert (result["model"], result["head"], result["logits"]) == ("BertModel", "BertForSequenceClassification", [2, 3])
    assert result["missing"] == ["classifier.bias", "classifier.weight"]  # the pooler is in the checkpoint
    assert result["diff"] < 1e-5 and result["head_diff"] < 1e-5

    # Read back as a Student (compress, report experts): the same weights, bit for bit.
    back = load_student(tmp_path / "model")
    assert back.config.student_dict() == {**student.config.student_dict(), "relation_projection": False}
    for key, value in student.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_report_and_compress_read_a_bert_dir(teacher_dir, tmp_path):
    from pipeline.compress import compress_dir

    student = fake_checkpoint(tmp_path / "run", teacher_dir, experts=1)
    export.export(tmp_path / "run", tmp_path / "bert")
    student.save_pretrained(tmp_path / "ours")
    bert, ours = (compute_report(str(tmp_path / name), throughput=False) for name in ("bert", "ours"))
    assert (bert.embedding_params, bert.layer_params, bert.active_layer_params, bert.gflops) == (
        ours.embedding_params, ours.layer_params, ours.active_layer_params, ours.gflops)
    assert bert.total_params == ours.total_params + 64 * 64 + 64  # every parameter of the dir: the pooler too
    summary = compress_dir(tmp_path / "bert", tmp_path / "compressed", threshold=0.5)
    assert summary["params_before"] == ours.total_params and summary["low_rank_matrices"] > 0
    assert Student.from_pretrained(tmp_path / "compressed").config.ffn_ranks


def test_a_moe_student_exports_in_the_registered_format_with_a_card(teacher_dir, tmp_path):
    from transformers import AutoModel

    student = fake_checkpoint(tmp_path / "run", teacher_dir, experts=4)
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"task": "rte", "metrics": {"rte": {"acc": 61.3718}}, "score": 61.3718,
                                   "best_step": 40, "lr": 3e-5, "batch_size": 16, "seed": 1}))
    assert export.main([str(tmp_path / "run"), str(tmp_path / "model"), "--license", "mit",
                        "--results", str(results)]) == 0
    model_dir = tmp_path / "model"
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "minimoe-student"
    inputs = dict(load_tokenizer(str(model_dir))(*SENTENCES, padding=True, return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(AutoModel.from_pretrained(model_dir).eval()(**inputs).last_hidden_state,
                                   student(**inputs).last_hidden_state, rtol=0, atol=1e-6)

    card = (model_dir / "README.md").read_text()
    assert front_matter(card) == {"library_name": "transformers", "base_model": "sentence-transformers/all-MiniLM-L6-v2",
                                  "pipeline_tag": "feature-extraction", "license": "mit",
                                  "tags": ["distillation", "minimoe", "mixture-of-experts"]}
    report = compute_report(str(model_dir), throughput=False)
    for row in (f"| parameters | {report.total_params:,} |", f"| embeddings | {report.embedding_params:,} |",
                f"| transformer layers | {report.layer_params:,} |",
                f"| active parameters per token (transformer layers) | {report.active_layer_params:,} |",
                f"| GFLOPs per 128-token sequence | {report.gflops:.3f} |",
                "| steps | 7 |", "| tokens seen | 12,345 |", "| global batch | 64 samples |",
                f"manifest.json sha256 `{hashlib.sha256(TRAINED_ON).hexdigest()}`",  # the run's, not today's
                "| student | 2 layers, hidden 64, 4 heads, FFN 128, 4 experts per FFN (top-1) |",
                "| rte | rte | acc 61.37 | 40 | 3e-05 | 16 | 1 |", "import pipeline"):
        assert row in card, row
    assert report.active_layer_params < report.layer_params  # top-1 of 4 experts

    # Every file readable by others.
    for file in model_dir.rglob("*"):
        assert not file.is_file() or stat.S_IMODE(file.stat().st_mode) == 0o644, file


def test_random_init_export_is_the_runs_starting_point(teacher_dir, tmp_path):
    """--random-init: the weights the run's build_student drew from its config and seed (relation projection dropped),
    not the trained ones; the card says so."""
    from pipeline.distill import build_student

    trained = fake_checkpoint(tmp_path / "run", teacher_dir, experts=4)
    assert export.main([str(tmp_path / "run"), str(tmp_path / "init"), "--random-init"]) == 0
    exported = Student.from_pretrained(tmp_path / "init").state_dict()
    initial = build_student(StudentConfig.from_dict(trained.config.student_dict()), seed=42).state_dict()  # the default seed
    assert set(initial) - set(exported) == {f"relation_projection.{m}.{p}" for m in ("query", "key", "value")
                                            for p in ("weight", "bias")}
    for key, value in exported.items():
        assert torch.equal(value, initial[key]), key
    assert not torch.equal(exported["layers.0.attention.query.weight"], trained.state_dict()["layers.0.attention.query.weight"])
    card = (tmp_path / "init" / "README.md").read_text()
    assert "at random initialisation, NOT distilled (step 0: the baseline)" in card and "| steps | 0 |" in card


def test_export_refusals(teacher_dir, tmp_path, capsys):
    fake_checkpoint(tmp_path / "run", teacher_dir, experts=1)
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"MiniLM": {"numbers": {"rte": 60.0}, "glue_score": 60.0}}))
    assert export.main([str(tmp_path / "run"), str(tmp_path / "model"), "--results", str(suite)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --results {suite}: not the results.json of a minimoe-finetune "
                                               f"task run (for a suite, pass its SUITE/ROW/TASK/results.json files)")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(InputError, match="a non-empty dir that is not a model dir"):
        export.export(tmp_path / "run", tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_sentence_transformers_export_of_a_distilled_student(teacher_dir, tmp_path, monkeypatch):
    """A dense student distilled 6 steps from the packaged teacher on the bundled Wikipedia sample."""
    from sentence_transformers import SentenceTransformer
    from test_distill import run_in_process

    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "data_prep", "build", "--input", str(REPO / "examples" / "data" / "wiki_sample"),
                    "--output", str(shards), "--max-seq-length", "32", "--workers", "1"], cwd=REPO, check=True,
                   capture_output=True)
    run = tmp_path / "run"
    assert run_in_process(monkeypatch, ["--teacher", str(teacher_dir), "--shards", str(shards), "--output", str(run),
                                        "--layers", "2", "--hidden", "64", "--heads", "4", "--experts", "1",
                                        "--micro-batch-size", "8", "--global-batch-size", "8", "--max-steps", "6",
                                        "--lr", "1e-3", "--seed", "3", "--save-every", "6",
                                        "--deepspeed-config", str(REPO / "ds_configs" / "zero0.json")]) == 0
    model_dir = tmp_path / "st"
    assert export.main([str(run), str(model_dir), "--sentence-transformers"]) == 0
    assert json.loads((model_dir / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 64
    assert [m["type"].rsplit(".", 1)[1] for m in json.loads((model_dir / "modules.json").read_text())] == [
        "Transformer", "Pooling", "Normalize"]  # the teacher's mean pooling and normalisation
    card = (model_dir / "README.md").read_text()
    assert front_matter(card)["library_name"] == "sentence-transformers"
    assert front_matter(card)["pipeline_tag"] == "sentence-similarity"
    assert "mean pooling, then L2 normalisation (the teacher's)" in card

    # Paraphrases that share words, and an unrelated sentence: reliably ordered for any student whose pooling
    # averages the real tokens (what a few distillation steps can promise; the semantic ordering of the
    # teacher, on paraphrases without shared words, takes a real distillation).
    triple = ["A man is playing a guitar.", "A man plays a guitar.", "Stock markets fell sharply in Tokyo today."]
    model = SentenceTransformer(str(model_dir))
    embeddings = model.encode(triple, convert_to_tensor=True)
    assert embeddings.shape == (3, 64)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))
    similarity = model.similarity(embeddings, embeddings)
    assert torch.isfinite(similarity).all()
    assert similarity[0, 1] > similarity[0, 2] and similarity[0, 1] > similarity[1, 2]
    # The modules compute what the card says: the student's hidden states, mean over real tokens, L2-normalised.
    student = load_student(model_dir).eval()
    inputs = load_tokenizer(str(model_dir))(triple, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = student(**inputs).last_hidden_state
    mask = inputs["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
    torch.testing.assert_close(embeddings, expected, rtol=0, atol=1e-5)
