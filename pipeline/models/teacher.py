"""Frozen teachers: any local Hugging Face encoder of TEACHER_ADAPTERS' types, or one of our students.

The teacher runs only up to the distilled layer: forward hooks catch that layer's Q, K and V
projections and stop the forward as soon as all three exist, so neither the rest of that layer nor
any later layer is computed, and later layers are not even kept in memory.

Which Q/K/V the relations use, per architecture (docs/fidelity.md, "The teachers"):
- BERT-like (BERT, RoBERTa, XLM-R, ELECTRA), MPNet, DistilBERT, our students: the outputs of the layer's
  query/key/value Linears, the Q and K whose scaled dot products are the model's attention scores.
- DeBERTa-v2/v3: the content projections query_proj/key_proj/value_proj. Its disentangled attention adds
  content-to-position and position-to-content terms (Q against relative-position keys, K against
  relative-position queries) to Q·K; those need the relative embeddings, not Q/K alone, so the Q-Q/K-K
  relations see content only and the model's attention is not softmax(Q·K) of them.
- ModernBERT: its fused Wqkv output split in three. Q and K are rotated by RoPE before attention:
  rope="post" (default) distils the rotated Q/K, the vectors whose dot products are the attention the model
  computes (q_i·k_j then depends on content and on i - j); rope="pre" the unrotated, position-free content.
  Relations span every real token pair on every layer: on ModernBERT's local (sliding-window) layers the
  model attends only within the window, so distil a global layer (the last one in ModernBERT-base and -large).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from minimoe_common.tokenizer import load_tokenizer
from pipeline.models import Student, is_student_dir

QKV = ("query", "key", "value")


@dataclass(frozen=True)
class QKVAdapter:
    """Where an architecture keeps its encoder layers and, inside a layer, its Q/K/V projections."""

    layers: str
    """Dotted path of the layer list from the loaded model (AutoModel's base model)."""
    query: str
    key: str
    value: str
    """Dotted paths of the Q, K, V nn.Linear inside one layer; one path for all three is a fused Linear whose
    output is [Q | K | V] (ModernBERT's Wqkv)."""
    rotary: str | None = None
    """The module inside a layer that rotates Q and K with its `position_embeddings=(cos, sin)` argument (RoPE),
    read for rope="post"; None for architectures without rotary embeddings."""


BERT_LIKE = QKVAdapter("encoder.layer", "attention.self.query", "attention.self.key", "attention.self.value")
# Hugging Face `model_type` -> adapter. A new architecture needs one line here.
TEACHER_ADAPTERS: dict[str, QKVAdapter] = {
    "bert": BERT_LIKE,
    "roberta": BERT_LIKE,
    "xlm-roberta": BERT_LIKE,
    "electra": BERT_LIKE,
    "mpnet": QKVAdapter("encoder.layer", "attention.attn.q", "attention.attn.k", "attention.attn.v"),
    "distilbert": QKVAdapter("transformer.layer", "attention.q_lin", "attention.k_lin", "attention.v_lin"),
    "deberta-v2": QKVAdapter("encoder.layer", "attention.self.query_proj", "attention.self.key_proj",
                             "attention.self.value_proj"),
    "modernbert": QKVAdapter("layers", "attn.Wqkv", "attn.Wqkv", "attn.Wqkv", rotary="attn"),
}
STUDENT_ADAPTER = QKVAdapter("layers", "attention.query", "attention.key", "attention.value")
Rope = Literal["post", "pre"]


class _QKVCaptured(Exception):
    """Raised by the last Q/K/V hook to end the forward pass early."""


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rotate every head of x (B, T, H) by cos, sin (B or 1, T, head size): x cos + rotate_half(x) sin, in fp32,
    the rotation of Hugging Face's Llama-style RoPE (halves of each head, not interleaved pairs)."""
    B, T, H = x.shape
    heads = x.view(B, T, num_heads, H // num_heads).float()  # (B, T, nh, hd)
    first, second = heads.chunk(2, dim=-1)
    rotated = heads * cos[:, :, None].float() + torch.cat((-second, first), dim=-1) * sin[:, :, None].float()
    return rotated.flatten(2).to(x.dtype)


class Teacher(nn.Module):
    """A frozen encoder returning one layer's Q, K, V (B, T, Ht) each. Build with `Teacher.from_pretrained`."""

    def __init__(self, model: nn.Module, adapter: QKVAdapter, layer: int, num_heads: int, hidden_size: int,
                 total_layers: int, tokenizer=None, rope: Rope = "post"):
        super().__init__()
        if rope not in ("post", "pre"):
            raise ValueError(f"rope must be 'post' or 'pre' (got {rope!r})")
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
        self.rope = rope if adapter.rotary else None
        self._captured: dict[str, torch.Tensor] = {}
        target = layers[self.layer]
        target.register_forward_pre_hook(self._capture_input)
        if self.rope == "post":
            target.get_submodule(adapter.rotary).register_forward_pre_hook(self._capture_rotary, with_kwargs=True)
        paths = dict(zip(QKV, (adapter.query, adapter.key, adapter.value)))
        for path in dict.fromkeys(paths.values()):  # a fused Linear gets one hook for the three
            names = [name for name in QKV if paths[name] == path]
            target.get_submodule(path).register_forward_hook(self._capture_hook(names))

    def _capture_input(self, layer: nn.Module, args: tuple) -> None:
        self._captured["input"] = args[0]  # (B, T, Ht) hidden state entering the layer

    def _capture_rotary(self, attention: nn.Module, args: tuple, kwargs: dict) -> None:
        self._captured["cos"], self._captured["sin"] = kwargs["position_embeddings"]  # (B or 1, T, head size)

    def _capture_hook(self, names: list[str]):
        def hook(module, inputs, output):
            # (DeBERTa-v3 also applies query_proj/key_proj to its relative-position embeddings, but only after
            # all three content projections, when the forward has already stopped.)
            self._captured.update(zip(names, output.chunk(len(names), dim=-1)))
            if set(QKV) <= self._captured.keys():
                raise _QKVCaptured
        return hook

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, layer: int = -1, dtype: torch.dtype = torch.float32,
                        rope: Rope = "post") -> "Teacher":
        """Load a teacher from a local dir. `layer`: the distilled layer, 0-based, negative from the end
        (-1 = last, the choice for base-sized teachers; an upper-middle one for large teachers). `rope`, for
        teachers with rotary position embeddings (ModernBERT): distil the rotated Q/K the attention uses
        ("post") or the unrotated content projections ("pre"); ignored by the others."""
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
                             f"{', '.join(sorted(TEACHER_ADAPTERS))} and minimoe students "
                             "(add a QKVAdapter in pipeline/models/teacher.py)")
        from transformers import AutoModel

        adapter = TEACHER_ADAPTERS[model_type]
        model = AutoModel.from_pretrained(str(path), dtype=dtype, local_files_only=True, trust_remote_code=False)
        hf = model.config  # (DistilBERT's config maps these names onto its own)
        total = len(model.get_submodule(adapter.layers))
        return cls(model, adapter, layer, hf.num_attention_heads, hf.hidden_size, total, tokenizer, rope)

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
            captured, self._captured = self._captured, {}
            if not set(QKV) <= captured.keys():
                raise RuntimeError("the teacher's forward ended without reaching the distilled layer's Q/K/V")
            if self.rope == "post":
                for name in ("query", "key"):
                    captured[name] = apply_rope(captured[name], captured["cos"], captured["sin"], self.num_heads)
        names = ("query", "key", "value", "input")[:4 if return_layer_input else 3]
        # Clones leave inference mode, so the losses may save them for the student's backward.
        return tuple(captured[name].clone() for name in names)

    def _takes_token_types(self) -> bool:
        # RoBERTa (1 type), MPNet and DistilBERT (none) take no segment ids; our students and BERT do.
        return getattr(self.model.config, "type_vocab_size", 0) > 1
