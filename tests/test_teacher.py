"""Teacher: the real packaged BERT teacher's Q/K/V reproduce its own attention probabilities; tiny MPNet
and RoBERTa teachers and an exported student work; the forward stops at the distilled layer. XLM-R, DeBERTa
and ModernBERT teachers: tests/test_modern_teachers.py."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, MPNetConfig, MPNetModel, RobertaConfig, RobertaModel

from pipeline.models import Student, StudentConfig
from pipeline.models.teacher import Teacher

SENTENCES = ["The cat sat.", "Distillation lifts the curse of capacity gap in language models, they say."]


def split_heads(x, num_heads):
    B, T, H = x.shape
    return x.view(B, T, num_heads, H // num_heads).transpose(1, 2)


@pytest.fixture(scope="module")
def real_batch(teacher_dir):
    teacher = Teacher.from_pretrained(teacher_dir)
    return teacher.tokenizer(SENTENCES, padding=True, return_tensors="pt")


@pytest.mark.parametrize("layer", [-1, 2])
def test_real_teacher_qkv_reproduce_hf_attention_probabilities(teacher_dir, real_batch, layer):
    teacher = Teacher.from_pretrained(teacher_dir, layer=layer)
    assert (teacher.num_layers, teacher.num_heads, teacher.hidden_size) == (6, 12, 384)
    assert len(teacher.model.encoder.layer) == teacher.layer + 1  # later layers dropped
    q, k, v = teacher(**real_batch)
    assert q.shape == k.shape == v.shape == (2, real_batch["input_ids"].size(1), 384)
    assert not q.requires_grad and not q.is_inference()

    hf = AutoModel.from_pretrained(teacher_dir, attn_implementation="eager")
    with torch.no_grad():
        expected = hf(**real_batch, output_attentions=True).attentions[layer]  # (B, nh, T, T)
    qh, kh = split_heads(q, 12), split_heads(k, 12)
    scores = qh @ kh.transpose(-1, -2) / (384 / 12) ** 0.5
    scores = scores.masked_fill(real_batch["attention_mask"][:, None, None, :] == 0, float("-inf"))
    torch.testing.assert_close(scores.softmax(-1), expected, atol=1e-5, rtol=1e-4)


def test_forward_stops_at_the_distilled_layer(teacher_dir, real_batch):
    teacher = Teacher.from_pretrained(teacher_dir, layer=1)
    calls = []
    teacher.model.encoder.layer[1].intermediate.register_forward_hook(lambda *a: calls.append(1))
    teacher.model.encoder.layer[0].intermediate.register_forward_hook(lambda *a: calls.append(0))
    teacher(**real_batch)
    assert calls == [0]  # layer 0 ran in full; layer 1 stopped after its Q/K/V projections


def test_teacher_is_frozen_and_bf16(teacher_dir, real_batch):
    teacher = Teacher.from_pretrained(teacher_dir, dtype=torch.bfloat16).train()
    assert not teacher.training and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher(**real_batch)[0].dtype == torch.bfloat16


def hidden_input_qkv(hf_model, inputs, layer, names):
    """Reference: the layer's own q/k/v Linears applied to the hidden state entering it, and that state."""
    with torch.no_grad():
        hidden = hf_model(**inputs, output_hidden_states=True).hidden_states[layer]
        block = hf_model.encoder.layer[layer]
        return [block.get_submodule(name)(hidden) for name in names] + [hidden]


@pytest.mark.parametrize("arch", ["mpnet", "roberta"])
def test_tiny_mpnet_and_roberta_teachers(tmp_path, arch):
    torch.manual_seed(0)
    common = dict(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    if arch == "mpnet":
        hf_model, names = MPNetModel(MPNetConfig(**common)), ["attention.attn.q", "attention.attn.k", "attention.attn.v"]
    else:
        hf_model = RobertaModel(RobertaConfig(**common, type_vocab_size=1, pad_token_id=1))
        names = ["attention.self.query", "attention.self.key", "attention.self.value"]
    hf_model.eval().save_pretrained(tmp_path)
    inputs = {"input_ids": torch.randint(5, 60, (2, 7)), "attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3])}
    teacher = Teacher.from_pretrained(tmp_path, layer=1)
    assert (teacher.num_layers, teacher.num_heads, teacher.hidden_size, teacher.tokenizer) == (3, 4, 32, None)
    # token_type_ids are dropped for architectures without segments
    got = teacher(**inputs, token_type_ids=torch.zeros(2, 7, dtype=torch.long))
    assert len(got) == 3
    for actual, expected in zip(got, hidden_input_qkv(hf_model, inputs, 1, names)):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_exported_student_as_teacher(tmp_path):
    torch.manual_seed(0)
    student = Student(StudentConfig(num_layers=3, hidden_size=24, num_heads=2, vocab_size=50, num_experts=4,
                                    relation_projection=False)).eval()  # as minimoe-export writes it
    student.save_pretrained(tmp_path)
    ids = torch.randint(3, 50, (2, 6))
    mask = torch.ones_like(ids)
    teacher = Teacher.from_pretrained(tmp_path, layer=-2)
    assert (teacher.layer, teacher.num_heads, teacher.hidden_size) == (1, 2, 24)
    for actual, expected in zip(teacher(ids, mask), student(ids, mask, qkv_layer=-2).qkv):
        torch.testing.assert_close(actual, expected)


def test_unsupported_and_missing_teachers_are_clear_errors(tmp_path):
    student_dir = tmp_path / "student"
    Student(StudentConfig(num_layers=3, hidden_size=24, num_heads=2, vocab_size=50)).save_pretrained(student_dir)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config.json: model_type 'gpt2' is not a supported teacher") as error:
        Teacher.from_pretrained(tmp_path)
    message = str(error.value)  # one line, naming every supported type
    assert "\n" not in message and ("supported: bert, deberta-v2, distilbert, electra, modernbert, mpnet, roberta, "
                                    "xlm-roberta and minimoe students") in message
    with pytest.raises(ValueError, match="teacher layer 6 is out of range for a 3-layer teacher"):
        Teacher.from_pretrained(student_dir, layer=6)
    with pytest.raises(FileNotFoundError, match="nowhere/config.json: no such file"):
        Teacher.from_pretrained(tmp_path / "nowhere")
