"""PKD (Sun et al. 2019): the PKD-Skip / PKD-Last layer mappings, the patient loss and the total loss by hand
and against explicit loops, the refusals, per-layer hidden states of our student, and real finetunes of a
tiny finetuned teacher into our MiniMoE student and into a plain BERT student."""
import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_finetune import SST2_SLICE, _tensorboard_tags, one_process_group, tokenizer  # noqa: F401 (fixtures)

from minimoe_common.cli import InputError
from pipeline.finetune import main
from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.run import distillation_loss, pkd_layer_pairs
from pipeline.models import Student, StudentConfig, StudentForSequenceClassification
from pipeline.objectives import patient_loss
from pipeline.tasks import get_task


@pytest.mark.parametrize("student, teacher, skip, last", [
    (6, 12, [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10)], [(1, 7), (2, 8), (3, 9), (4, 10), (5, 11)]),
    (3, 12, [(1, 4), (2, 8)], [(1, 10), (2, 11)]),
    (3, 6, [(1, 2), (2, 4)], [(1, 4), (2, 5)]),
])
def test_layer_mapping(student, teacher, skip, last):
    """The paper's Fig. 1 for 12 -> 6 (skip: every 2nd teacher layer; last: 7 to 11); the teacher's final layer
    and the student's last one are never paired (the logits distil those)."""
    assert pkd_layer_pairs(student, teacher, "skip") == skip
    assert pkd_layer_pairs(student, teacher, "last") == last


@pytest.mark.parametrize("student, teacher", [(1, 12), (4, 3)])
def test_layer_mapping_refuses_students_without_pairs_or_deeper_than_the_teacher(student, teacher):
    expected = rf"needs 2 <= Ls <= Lt, got a student of {student} layers and a teacher of {teacher}"
    with pytest.raises(InputError, match=expected):
        pkd_layer_pairs(student, teacher, "skip")


def test_patient_loss_by_hand():
    """B = 2 examples, M = 2 pairs, H = 2. Normalised, the student's [CLS] states are (.6, .8), (1, 0) and
    (0, 1), (1, 0); the teacher's (0, 1), (0, 1) and (0, 1), (-1, 0). Squared distances: .36 + .04 = .4 and
    2 (example 1), 0 and 4 (example 2). The paper's L_PT (sum over pairs, mean over examples): (2.4 + 4) / 2 = 3.2;
    averaged over the M x H units as the authors' code: 0.8."""
    student = torch.tensor([[[3.0, 4.0], [1.0, 0.0]], [[0.0, 2.0], [5.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 1.0], [0.0, 3.0]], [[0.0, 7.0], [-1.0, 0.0]]])
    assert patient_loss(student, teacher).item() == pytest.approx(3.2 / (2 * 2))
    assert patient_loss(7 * student, teacher).item() == pytest.approx(0.8)  # normalised: the scale drops out
    assert patient_loss(student, 0.5 * student).item() == pytest.approx(0.0, abs=1e-7)


def test_total_loss_is_hard_plus_soft_plus_beta_patient(tmp_path):
    """(1 - alpha) CE + alpha T^2 KL(teacher || student at T) + beta L_PT, against a per-example loop; the
    hidden states are transformers' tuples (embeddings first), the [CLS] state at position 0."""
    torch.manual_seed(0)
    B, T, H, classes = 3, 5, 4, 2

    def output(layers: int) -> SimpleNamespace:  # logits, and hidden states of the embeddings then each layer
        hidden = tuple(torch.randn(B, T, H) for _ in range(layers + 1))
        return SimpleNamespace(logits=torch.randn(B, classes), hidden_states=hidden)

    student, teacher = output(3), output(4)
    labels, pairs = torch.tensor([0, 1, 1]), [(1, 2), (2, 4)]
    config = FinetuneConfig("M", "sst2", "D", str(tmp_path), teacher="T", pkd_beta=100.0)
    assert (config.kd_alpha, config.temperature) == (0.7, 10.0)  # the PKD authors' recipe is the default
    mask = torch.ones(B, T)
    loss, terms = distillation_loss(get_task("sst2"), student, teacher, labels, mask, config, pairs)
    patient = terms["patient_loss"]

    alpha, temperature, beta = 0.7, 10.0, 100.0
    hard = soft = distance = 0.0
    for b in range(B):
        s, t = student.logits[b].double(), teacher.logits[b].double()
        hard -= math.log(torch.softmax(s, 0)[labels[b]]) / B
        p_s, p_t = torch.softmax(s / temperature, 0), torch.softmax(t / temperature, 0)
        soft += float((p_t * (p_t / p_s).log()).sum()) * temperature**2 / B
        for i, j in pairs:
            u, v = student.hidden_states[i][b, 0].double(), teacher.hidden_states[j][b, 0].double()
            distance += float(((u / u.norm() - v / v.norm()) ** 2).sum()) / B  # the paper's L_PT, mean over examples
    expected_patient = distance / (len(pairs) * H)
    assert patient.item() == pytest.approx(expected_patient, rel=1e-4)
    assert loss.item() == pytest.approx((1 - alpha) * hard + alpha * soft + beta * expected_patient, rel=1e-4)
    # without pairs: plain KD, and KD's own defaults
    kd = FinetuneConfig("M", "sst2", "D", str(tmp_path), teacher="T", kd_alpha=0.7, temperature=10.0)
    assert distillation_loss(get_task("sst2"), student, teacher, labels, mask, kd, [])[0].item() == pytest.approx(
        (1 - alpha) * hard + alpha * soft, rel=1e-4)
    plain = FinetuneConfig("M", "sst2", "D", str(tmp_path), teacher="T")
    assert (plain.kd_alpha, plain.temperature, plain.pkd_beta) == (0.5, 1.0, 0.0)


def test_student_returns_every_layers_hidden_state_as_transformers():
    torch.manual_seed(0)
    config = StudentConfig(num_layers=3, hidden_size=32, num_heads=4, vocab_size=100, num_labels=2)
    model = StudentForSequenceClassification(config).eval()
    ids = torch.randint(5, 100, (2, 6))
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 4 and all(h.shape == (2, 6, 32) for h in out.hidden_states)
    encoder = model.student(ids, qkv_layer=None, output_hidden_states=True)
    assert torch.equal(out.hidden_states[-1], encoder.last_hidden_state)
    assert torch.equal(out.hidden_states[0], model.student.embeddings(ids, torch.zeros_like(ids)))
    assert model(ids).hidden_states is None
    assert torch.equal(model(ids).logits, out.logits)


def tiny_bert(path: Path, tokenizer, layers: int, hidden: int) -> Path:
    """A random BertForSequenceClassification (2 labels) with the packaged teacher's tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=2 * hidden, pad_token_id=tokenizer.pad_token_id, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    return path


def tiny_student(path: Path, tokenizer, experts: int) -> Path:
    torch.manual_seed(0)
    config = StudentConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=len(tokenizer), num_experts=experts)
    Student(config, deepspeed_moe=True).save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    return path


def finetune(model: Path, output: Path, *flags: str) -> int:
    """minimoe-finetune in this process on the first 320 rows of the bundled SST-2 slice: 10 steps of 32."""
    return main(["--model", str(model), "--task", "sst2", "--data-dir", str(SST2_SLICE), "--output", str(output),
                 "--max-train-examples", "320", "--max-seq-length", "32", "--epochs", "1", "--lr", "1e-3", *flags])


def test_refusals_are_one_line_errors(tmp_path, tokenizer, one_process_group, capsys):
    student = tiny_student(tmp_path / "student", tokenizer, experts=1)
    assert finetune(student, tmp_path / "a", "--pkd-beta", "500") == 2
    err = capsys.readouterr().err
    assert err == "error: --pkd-beta 500 needs --teacher: PKD distils a model finetuned on the task\n"
    narrow = tiny_bert(tmp_path / "narrow", tokenizer, layers=4, hidden=32)  # has a 2-label sequence head
    assert finetune(student, tmp_path / "b", "--teacher", str(narrow), "--pkd-beta", "500") == 2
    err = capsys.readouterr().err
    assert err == (f"error: --pkd-beta compares [CLS] states of equal width: the student's hidden size is 64, "
                   f"the teacher's 32 ({narrow})\n")
    shallow = tiny_bert(tmp_path / "shallow", tokenizer, layers=1, hidden=64)
    assert finetune(student, tmp_path / "c", "--teacher", str(shallow), "--pkd-beta", "500") == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not any((tmp_path / run / "results.json").exists() for run in "abc")


def test_pkd_finetunes_our_student_and_a_plain_bert_student(tmp_path, tokenizer, one_process_group):
    """A tiny random BERT (4L;64H) finetuned for 10 steps is the teacher; PKD-Skip trains a 2-layer MiniMoE
    student and a 2-layer plain BERT through the same loop (student layer 1 <- teacher layer 2), the patient
    loss logged next to the KD loss, and both runs finish with their results."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    teacher = tiny_bert(tmp_path / "bert4", tokenizer, layers=4, hidden=64)
    assert finetune(teacher, tmp_path / "teacher") == 0
    students = {"minimoe": tiny_student(tmp_path / "minimoe", tokenizer, experts=4),
                "bert": tiny_bert(tmp_path / "bert2", tokenizer, layers=2, hidden=64)}
    for name, student in students.items():
        out = tmp_path / f"pkd-{name}"
        assert finetune(student, out, "--teacher", str(tmp_path / "teacher" / "model"), "--pkd-beta", "500") == 0
        results = json.loads((out / "results.json").read_text())
        assert results["layer_pairs"] == [[1, 2]] and results["steps_trained"] == 10
        assert (results["config"]["kd_alpha"], results["config"]["temperature"]) == (0.7, 10.0)
        assert {"train/loss", "train/aux_loss", "train/patient_loss"} <= _tensorboard_tags(out / "tensorboard")
        [logged] = EventAccumulator(str(out / "tensorboard")).Reload().Scalars("train/patient_loss")
        assert logged.step == 10 and 0 < logged.value < 4 / 64  # unit vectors: squared distance <= 4, over 64 units


def test_suite_reuses_a_run_recorded_before_the_pkd_fields(tmp_path):
    """results.json of a run from before --pkd-beta / --pkd-strategy existed: the same recipe (they were at
    their defaults, off), so the suite reuses it rather than refusing it as another recipe."""
    from pipeline.finetune.suite import reuse_or_train

    run = FinetuneConfig("M", "sst2", "D", str(tmp_path))
    recorded = {k: v for k, v in dataclasses.asdict(run).items() if not k.startswith("pkd_")}
    (tmp_path / "results.json").write_text(json.dumps({"score": 1.0, "config": recorded}))
    assert reuse_or_train(run, tmp_path)["score"] == 1.0
    (tmp_path / "results.json").write_text(json.dumps({"score": 1.0, "config": {**recorded, "pkd_beta": 100.0}}))
    with pytest.raises(ValueError, match=r"another recipe \(--pkd-beta 100.0 -> 0.0\)"):
        reuse_or_train(run, tmp_path)
