"""Frozen teachers: any local Hugging Face encoder of TEACHER_ADAPTERS' types, or one of our students.

Two things a teacher hands the objectives, both caught by forward hooks during one forward pass that stops as soon
as it has them (no later layer is computed):
- `forward`, MiniLMv2: one layer's Q, K and V projections. Later layers are not even kept in memory.
- `layer_states`, TinyBERT: the embeddings' output, and the outputs and pre-softmax attention scores of chosen
  layers: the scores the model itself computes, Q·Kᵀ/√d plus the bias it adds (MPNet's relative positions).
  DeBERTa and ModernBERT are refused (QKVAdapter.no_scores says why).

Which Q/K/V the relations use, per architecture (docs/fidelity.md, "The teachers"):
- BERT-like (BERT, RoBERTa, XLM-R, ELECTRA), MPNet, DistilBERT, our students: the outputs of the layer's
  query/key/value Linears, the Q and K whose scaled dot products are the model's attention scores (MPNet adds its
  relative position bias to them).
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

import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from minimoe_common.tokenizer import load_tokenizer
from pipeline.models import Student, is_student_dir
from pipeline.objectives import attention_scores

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
    score_bias: tuple[str, str] | None = None
    """(module inside a layer, name of its forward argument): the additive bias the model puts on Q·Kᵀ/√d before the
    softmax, besides the padding mask (MPNet's relative position bias); None when the scores are Q·Kᵀ/√d alone."""
    no_scores: str | None = None
    """Why this architecture's attention scores are not Q·Kᵀ/√d plus a captured bias, so that TinyBERT's attention
    loss cannot take them (one line); None when they are."""


BERT_LIKE = QKVAdapter("encoder.layer", "attention.self.query", "attention.self.key", "attention.self.value")
# Hugging Face `model_type` -> adapter. A new architecture needs one line here.
TEACHER_ADAPTERS: dict[str, QKVAdapter] = {
    "bert": BERT_LIKE,
    "roberta": BERT_LIKE,
    "xlm-roberta": BERT_LIKE,
    "electra": BERT_LIKE,
    # MPNetEncoder computes the relative position bias once and passes it to every layer's attention.
    "mpnet": QKVAdapter("encoder.layer", "attention.attn.q", "attention.attn.k", "attention.attn.v",
                        score_bias=("attention.attn", "position_bias")),
    "distilbert": QKVAdapter("transformer.layer", "attention.q_lin", "attention.k_lin", "attention.v_lin"),
    "deberta-v2": QKVAdapter("encoder.layer", "attention.self.query_proj", "attention.self.key_proj",
                             "attention.self.value_proj",
                             no_scores="DeBERTa's scores add disentangled content-to-position and position-to-content "
                                       "terms, computed inside its attention from relative-position embeddings"),
    "modernbert": QKVAdapter("layers", "attn.Wqkv", "attn.Wqkv", "attn.Wqkv", rotary="attn",
                             no_scores="ModernBERT's scores are of RoPE-rotated Q/K, and its local layers attend only "
                                       "within a sliding window"),
}
STUDENT_ADAPTER = QKVAdapter("layers", "attention.query", "attention.key", "attention.value")
Rope = Literal["post", "pre"]


class _Captured(Exception):
    """Raised by the hook that completes what a forward pass was asked for, to end the pass early."""


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
    """A frozen encoder: one layer's Q, K, V (`forward`) or TinyBERT's layer states (`layer_states`), (B, T, Ht)
    tensors. Build with `Teacher.from_pretrained`."""

    def __init__(self, model: nn.Module, adapter: QKVAdapter, layer: int, num_heads: int, hidden_size: int,
                 total_layers: int, tokenizer=None, rope: Rope = "post"):
        super().__init__()
        if rope not in ("post", "pre"):
            raise ValueError(f"rope must be 'post' or 'pre' (got {rope!r})")
        if not -total_layers <= layer < total_layers:
            raise ValueError(f"teacher layer {layer} is out of range for a {total_layers}-layer teacher")
        self.layer = layer % total_layers
        del model.get_submodule(adapter.layers)[self.layer + 1:]  # later layers are never computed; free them
        self.model = model.eval().requires_grad_(False)
        self.adapter = adapter
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.num_layers = total_layers
        self.tokenizer = tokenizer
        self.rope = rope if adapter.rotary else None
        self._captured: dict[tuple[int, str], torch.Tensor] = {}
        self._wanted: set[tuple[int, str]] = set()

    def _block(self, index: int) -> nn.Module:
        return self.model.get_submodule(self.adapter.layers)[index]

    def _store(self, key: tuple[int, str], value: torch.Tensor | None) -> None:
        self._captured[key] = value
        if self._wanted <= self._captured.keys():
            raise _Captured

    def _hook_qkv(self, index: int) -> list[RemovableHandle]:
        """Layer `index`'s Q, K, V Linear outputs as (index, "query"/"key"/"value"); a fused Linear split in three.
        (DeBERTa-v3 also applies query_proj/key_proj to its relative-position embeddings, but only after all three
        content projections.)"""
        block, paths = self._block(index), dict(zip(QKV, (self.adapter.query, self.adapter.key, self.adapter.value)))
        handles = []
        for path in dict.fromkeys(paths.values()):  # a fused Linear gets one hook for the three
            names = [name for name in QKV if paths[name] == path]

            def hook(module, inputs, output, names=names):
                for name, part in zip(names, output.chunk(len(names), dim=-1)):
                    self._store((index, name), part)
            handles.append(block.get_submodule(path).register_forward_hook(hook))
        return handles

    def _hook_rotary(self, index: int) -> RemovableHandle:
        """The (cos, sin) (B or 1, T, head size) that layer `index` rotates Q and K by, as (index, "cos"/"sin")."""
        def hook(attention, args, kwargs):
            for name, value in zip(("cos", "sin"), kwargs["position_embeddings"]):
                self._store((index, name), value)
        return self._block(index).get_submodule(self.adapter.rotary).register_forward_pre_hook(hook, with_kwargs=True)

    def _hook_bias(self, index: int) -> RemovableHandle:
        """The additive score bias that layer `index`'s attention receives (QKVAdapter.score_bias), as (index, "bias")."""
        path, argument = self.adapter.score_bias
        module = self._block(index).get_submodule(path)
        signature = inspect.signature(module.forward)

        def hook(module, args, kwargs):
            self._store((index, "bias"), signature.bind(*args, **kwargs).arguments.get(argument))
        return module.register_forward_pre_hook(hook, with_kwargs=True)

    def _hook_states(self, index: int) -> RemovableHandle:
        """Layer `index`'s output hidden state (B, T, Ht), as (index, "output")."""
        def hook(module, inputs, output):
            self._store((index, "output"), output[0] if isinstance(output, tuple) else output)
        return self._block(index).register_forward_hook(hook)

    def _hook_embeddings(self) -> RemovableHandle:
        """The hidden state entering layer 0, the embeddings' output (B, T, Ht), as (0, "input")."""
        return self._block(0).register_forward_pre_hook(lambda module, args: self._store((0, "input"), args[0]))

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
             handles: list[RemovableHandle], wanted: set[tuple[int, str]]) -> dict[tuple[int, str], torch.Tensor]:
        """The captures of one forward (in the caller's inference mode) that stops once every `wanted` key is
        captured; the hooks are removed after it."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self._takes_token_types():
            kwargs["token_type_ids"] = token_type_ids
        self._captured, self._wanted = {}, wanted
        try:
            self.model(**kwargs)
        except _Captured:
            pass
        finally:
            for handle in handles:
                handle.remove()
        captured, self._captured = self._captured, {}
        if not wanted <= captured.keys():
            raise RuntimeError("the teacher's forward ended without reaching the layers asked for")
        return captured

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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask (B, T) -> q, k, v (B, T, Ht) of the distilled layer (MiniLMv2's relations)."""
        handles = self._hook_qkv(self.layer)
        if self.rope == "post":
            handles.append(self._hook_rotary(self.layer))
        with torch.inference_mode():
            captured = self._run(input_ids, attention_mask, token_type_ids, handles, {(self.layer, n) for n in QKV})
            q, k, v = (captured[(self.layer, name)] for name in QKV)
            if self.rope == "post":
                cos, sin = captured[(self.layer, "cos")], captured[(self.layer, "sin")]
                q, k = (apply_rope(x, cos, sin, self.num_heads) for x in (q, k))
        # Clones leave inference mode, so the losses may save them for the student's backward.
        return q.clone(), k.clone(), v.clone()

    def layer_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     token_type_ids: torch.Tensor | None = None, layers: Sequence[int] = ()
                     ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """TinyBERT's targets for teacher `layers` (1-based and increasing, as hidden_states numbers them) ->
        (hidden states: the embeddings' output, then each layer's output, (B, T, Ht) each; attention scores of each
        layer, (B, nh, T, T) fp32: Q·Kᵀ/√d plus the model's own bias (QKVAdapter.score_bias), without the padding
        mask, so that their softmax over real keys is the model's attention). The forward stops after the last."""
        if self.adapter.no_scores:
            raise ValueError(f"the teacher's attention scores cannot be distilled: {self.adapter.no_scores}")
        if max(layers, default=0) > self.layer + 1:
            raise ValueError(f"teacher layer {max(layers)} was dropped: this teacher keeps layers 1 .. {self.layer + 1}")
        handles, wanted = [self._hook_embeddings()], {(0, "input")}
        for index in (n - 1 for n in layers):
            handles += [*self._hook_qkv(index), self._hook_states(index)]
            wanted |= {(index, "query"), (index, "key"), (index, "output")}
            if self.adapter.score_bias:
                handles.append(self._hook_bias(index))
                wanted.add((index, "bias"))
        with torch.inference_mode():
            captured = self._run(input_ids, attention_mask, token_type_ids, handles, wanted)
            hidden = [captured[(0, "input")], *(captured[(n - 1, "output")] for n in layers)]
            scores = [self._scores(captured, n - 1) for n in layers]
        return tuple(h.clone() for h in hidden), tuple(s.clone() for s in scores)

    def _scores(self, captured: dict[tuple[int, str], torch.Tensor], index: int) -> torch.Tensor:
        """Layer `index`'s pre-softmax attention scores (B, nh, T, T) fp32, the model's bias added."""
        scores = attention_scores(captured[(index, "query")], captured[(index, "key")], self.num_heads)
        bias = captured.get((index, "bias"))  # (B or 1, nh, T, T)
        return scores if bias is None else scores + bias.float()

    def _takes_token_types(self) -> bool:
        # RoBERTa (1 type), MPNet and DistilBERT (none) take no segment ids; our students and BERT do.
        return getattr(self.model.config, "type_vocab_size", 0) > 1
