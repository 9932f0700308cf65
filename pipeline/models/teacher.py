"""Frozen teachers: any local Hugging Face encoder (BERT, RoBERTa, MPNet, ...) or one of our students.

The teacher runs only up to the distilled layer: forward hooks catch that layer's Q, K and V
projections and stop the forward as soon as all three exist, so neither the rest of that layer nor
any later layer is computed, and later layers are not even kept in memory.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minimoe_common.tokenizer import load_tokenizer
from pipeline.models import Student, is_student_dir


@dataclass(frozen=True)
class QKVAdapter:
    """Where an architecture keeps its encoder layers and, inside a layer, its Q/K/V projections."""

    layers: str
    """Dotted path of the layer list from the loaded model (AutoModel's base model)."""
    query: str
    key: str
    value: str
    """Dotted paths of the Q, K, V nn.Linear inside one layer."""


BERT_LIKE = QKVAdapter("encoder.layer", "attention.self.query", "attention.self.key", "attention.self.value")
# Hugging Face `model_type` -> adapter. A new architecture needs one line here.
TEACHER_ADAPTERS: dict[str, QKVAdapter] = {
    "bert": BERT_LIKE,
    "roberta": BERT_LIKE,
    "xlm-roberta": BERT_LIKE,
    "electra": BERT_LIKE,
    "mpnet": QKVAdapter("encoder.layer", "attention.attn.q", "attention.attn.k", "attention.attn.v"),
    "distilbert": QKVAdapter("transformer.layer", "attention.q_lin", "attention.k_lin", "attention.v_lin"),
}
STUDENT_ADAPTER = QKVAdapter("layers", "attention.query", "attention.key", "attention.value")


class _QKVCaptured(Exception):
    """Raised by the last Q/K/V hook to end the forward pass early."""


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


class Teacher(nn.Module):
    """A frozen encoder returning one layer's Q, K, V (B, T, Ht) each. Build with `Teacher.from_pretrained`."""

    def __init__(self, model: nn.Module, adapter: QKVAdapter, layer: int, num_heads: int, hidden_size: int,
                 total_layers: int, tokenizer=None):
        super().__init__()
        layers = model.get_submodule(adapter.layers)
        if not -total_layers <= layer < total_layers:
            raise ValueError(f"teacher layer {layer} is out of range for a {total_layers}-layer teacher")
        self.layer = layer % total_layers
        del layers[self.layer + 1:]  # later layers are never computed; free them
        self.model = model.eval().requires_grad_(False)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.num_layers = total_layers
        self.tokenizer = tokenizer
        self._captured: dict[str, torch.Tensor] = {}
        target = layers[self.layer]
        for name in ("query", "key", "value"):
            target.get_submodule(getattr(adapter, name)).register_forward_hook(self._capture_hook(name))

    def _capture_hook(self, name: str):
        def hook(module, inputs, output):
            self._captured[name] = output
            if name == "query":
                self._captured["input"] = inputs[0]  # (B, T, Ht) hidden state entering the layer
            if {"query", "key", "value"} <= self._captured.keys():
                raise _QKVCaptured
        return hook

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, layer: int = -1, dtype: torch.dtype = torch.float32) -> "Teacher":
        """Load a teacher from a local dir. `layer`: the distilled layer, 0-based, negative from the end
        (-1 = last, the choice for base-sized teachers; an upper-middle one for large teachers)."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: no such file; a teacher is a local model dir with config.json")
        tokenizer = load_tokenizer(str(path)) if _has_tokenizer(path) else None
        if is_student_dir(path):
            student = Student.from_pretrained(path).to(dtype)
            c = student.config
            return cls(student, STUDENT_ADAPTER, layer, c.num_heads, c.hidden_size, c.num_layers, tokenizer)
        with open(config_file) as f:
            model_type = json.load(f).get("model_type")
        if model_type not in TEACHER_ADAPTERS:
            raise ValueError(f"{config_file}: model_type {model_type!r} is not a supported teacher; supported: "
                             f"{sorted(TEACHER_ADAPTERS)} and minimoe students (add a QKVAdapter in pipeline/models/teacher.py)")
        from transformers import AutoModel

        adapter = TEACHER_ADAPTERS[model_type]
        model = AutoModel.from_pretrained(str(path), dtype=dtype, local_files_only=True, trust_remote_code=False)
        hf = model.config  # (DistilBERT's config maps these names onto its own)
        total = len(model.get_submodule(adapter.layers))
        return cls(model, adapter, layer, hf.num_attention_heads, hf.hidden_size, total, tokenizer)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # frozen: dropout stays off whatever the caller's mode

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                return_layer_input: bool = False) -> tuple[torch.Tensor, ...]:
        """input_ids, attention_mask (B, T) -> q, k, v (B, T, Ht) of the distilled layer, and with
        return_layer_input the hidden state entering that layer (B, T, Ht) as a fourth tensor (TinyBERT)."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self._takes_token_types():
            kwargs["token_type_ids"] = token_type_ids
        self._captured = {}
        with torch.inference_mode():
            try:
                self.model(**kwargs)
            except _QKVCaptured:
                pass
        if not {"query", "key", "value"} <= self._captured.keys():
            raise RuntimeError("the teacher's forward ended without reaching the distilled layer's Q/K/V")
        names = ("query", "key", "value", "input")[:4 if return_layer_input else 3]
        # Clones leave inference mode, so the losses may save them for the student's backward.
        outputs = tuple(self._captured[name].clone() for name in names)
        self._captured = {}
        return outputs

    def _takes_token_types(self) -> bool:
        # RoBERTa (1 type), MPNet and DistilBERT (none) take no segment ids; our students and BERT do.
        return getattr(self.model.config, "type_vocab_size", 0) > 1
