"""The student's configuration: `StudentConfig`, a transformers config with its own model_type, its size presets,
and the legacy values of fields added after models were first saved."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedConfig

STUDENT_MODEL_TYPE = "minimoe-student"
ROUTER_NOISE = ("LogitJitter", "RSample", "Jitter", None)
# Fields added after models were first saved, with the behaviour those models were trained with.
LEGACY_FIELDS = {"router_bias": False, "expert_init": "independent",
                 "relation_projection": False}
# Keys that transformers' PreTrainedConfig takes besides its fields: those its to_dict writes and its from_dict
# passes on (everything else is an unknown StudentConfig field).
HF_CONFIG_KEYS = {"model_type", "_name_or_path", "output_attentions", "num_labels", "name_or_path", "torch_dtype",
                  "attn_implementation", "experts_implementation", "_commit_hash"}
# The task head class of each `task_head.kind` in config.json files of our earlier format.
HEAD_CLASSES = {"sequence_classification": "StudentForSequenceClassification",
                "token_classification": "StudentForTokenClassification"}


class StudentConfig(PreTrainedConfig):
    """Shape and MoE settings of a student; a transformers config that round-trips through config.json
    (unknown keys are errors)."""

    model_type = STUDENT_MODEL_TYPE
    # transformers' standard names, read by other libraries (sentence-transformers, pipelines)
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}

    num_layers: int = 6
    """Transformer layers."""
    hidden_size: int = 384
    """Hidden size H; every layer's input and output width."""
    num_heads: int = 12
    """Attention heads; head size = hidden_size / num_heads (the paper keeps 12 heads for every student)."""
    intermediate_size: int | None = None
    """FFN inner width (of the dense FFN and of each expert); None -> 4 x hidden_size."""
    vocab_size: int = 30522
    """Token vocabulary; take it from the teacher's tokenizer (`from_preset(..., tokenizer=tok)`)."""
    max_position_embeddings: int = 512
    """Learned absolute positions."""
    type_vocab_size: int = 2
    """Segment (token type) embeddings: A and B of a [CLS] A [SEP] B [SEP] pair."""
    pad_token_id: int = 0
    """[PAD] id of the tokenizer."""
    cls_token_id: int = 101
    """[CLS] id of the tokenizer (the sequence classification head pools this position, index 0)."""
    sep_token_id: int = 102
    """[SEP] id of the tokenizer."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon (BERT's value)."""
    dropout: float = 0.1
    """Dropout on embeddings, attention probabilities and residual branches (training only)."""
    initializer_range: float = 0.02
    """Std of the normal initialisation of linear and embedding weights (BERT's value)."""
    num_experts: int = 1
    """Experts per FFN: 1 = dense MiniLM student, 4 = MiniMoE (the paper's default)."""
    attention_experts: int = 1
    """Attention experts per layer (the paper's "x,y" ablation, x here): each is a full set of Q/K/V/output
    projections, routed top-1 per token like the FFN; 1 = dense attention (the paper's default "1,4")."""
    top_k: int = 1
    """Experts each token is routed to (the paper: top-1)."""
    capacity_factor: float = 1.0
    """Expert capacity = capacity_factor x tokens / experts; used only when drop_tokens is True."""
    drop_tokens: bool = False
    """Drop tokens above an expert's capacity (GShard style); False routes every token (the default)."""
    router_noise: str | None = "LogitJitter"
    """Router noise during training: "LogitJitter" (uniform noise in [-router_jitter, router_jitter] added to
    the routing logits, the authors' router), "RSample" (Gumbel noise: the choice becomes a sample of the
    softmax), "Jitter" (DeepSpeed's multiplicative input jitter) or None."""
    router_jitter: float = 0.1
    """Half-width of the LogitJitter noise (the authors: the hidden dropout, 0.1)."""
    router_bias: bool = True
    """Routing Linear(H, E) with a bias (the authors') or without (DeepSpeed's TopKGate)."""
    routing: str = "learned"
    """How a token's FFN expert is chosen: "learned", the router above (the expert's output times its gate
    probability, balanced by aux_loss_weight); "hash", MoEBERT's hash-random routing: each token id's expert
    drawn once, uniformly, from hash_seed (no parameters, the output unscaled). Attention experts are learned."""
    hash_seed: int = 0
    """Seed of routing "hash"'s token id -> expert table (kept in the weights as `expert_of_token`)."""
    expert_init: str = "moefy"
    """"moefy": the experts are cut from one random FFN of E x intermediate_size neurons, each sharing 2/3
    of its neurons with every other expert (the authors' initialisation); "independent": each expert drawn
    on its own."""
    relation_projection: bool | None = None
    """A self-attention Q/K/V projection (3 x Linear(H, H)) of the last hidden state that the relations are
    distilled from, so that every layer's FFN gets distillation gradient (the authors' MiniMoE); None = on
    for MoE students, off for dense ones (which use the last layer's own Q/K/V, as the authors' MiniLM).
    Training-only: export drops it."""
    aux_loss_weight: float = 0.01
    """Weight of the load-balancing loss (Switch/GShard l_aux), averaged over MoE layers (the authors'; with
    attention experts, the mean of the attention and the FFN averages)."""
    ffn_ranks: dict[str, int] | None = None
    """Low-rank FFN matrices (written by pipeline.compress): FFN Linear path (a key of
    `Student.ffn_linears()`, e.g. "layers.0.ffn.fc1") -> rank r; that Linear(in, out) becomes
    LowRankLinear: Linear(in, r, bias=False) then Linear(r, out). None = all full-rank."""
    layer_heads: list[int] | None = None
    """Attention heads of each layer (written by pipeline.baselines.prune, which removes heads): Q/K/V are
    heads x head size wide, the head size staying hidden_size / num_heads; 0 leaves the layer's attention
    to its output bias. None = num_heads in every layer."""
    layer_intermediate_sizes: list[int] | None = None
    """FFN inner width of each layer (written by pipeline.baselines.prune, which removes neurons); 0 leaves the FFN to
    its output bias. None = intermediate_size in every layer."""

    def __post_init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - HF_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown StudentConfig field(s) {unknown}; known: {sorted(student_fields())}")
        super().__post_init__(**kwargs)
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.relation_projection is None:
            self.relation_projection = self.is_moe
        problems = [message for ok, message in [
            (self.hidden_size % self.num_heads == 0,
             f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"),
            (self.num_experts >= 1, f"num_experts {self.num_experts} must be >= 1"),
            (1 <= self.top_k <= min(2, self.num_experts), f"top_k {self.top_k} must be 1 or 2 and <= num_experts"),
            (self.router_noise in ROUTER_NOISE, f"router_noise {self.router_noise!r} must be one of {ROUTER_NOISE}"),
            (self.expert_init in ("moefy", "independent"),
             f"expert_init {self.expert_init!r} must be 'moefy' or 'independent'"),
            (self.attention_experts >= 1, f"attention_experts {self.attention_experts} must be >= 1"),
            (self.routing in ("learned", "hash"), f"routing {self.routing!r} must be 'learned' or 'hash'"),
            (self.routing == "learned" or (self.top_k == 1 and not self.drop_tokens),
             f"routing 'hash' routes top-1 without dropping tokens (got top_k {self.top_k}, drop_tokens "
             f"{self.drop_tokens})"),
            *[(sizes is None or (len(sizes) == self.num_layers and min(sizes) >= 0),
               f"{name} {sizes} must hold one count >= 0 per layer ({self.num_layers})")
              for name, sizes in (("layer_heads", self.layer_heads),
                                  ("layer_intermediate_sizes", self.layer_intermediate_sizes))],
            (not (self.is_moe and self.is_pruned), "layer_heads / layer_intermediate_sizes are for dense students"),
        ] if not ok]
        if problems:
            raise ValueError("StudentConfig: " + "; ".join(problems))

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1 or self.attention_experts > 1

    @property
    def is_pruned(self) -> bool:
        """Whether some layer has its own head count or FFN width (a pruned model)."""
        return self.layer_heads is not None or self.layer_intermediate_sizes is not None

    def heads_of(self, layer: int) -> int:
        return self.num_heads if self.layer_heads is None else self.layer_heads[layer]

    def intermediate_size_of(self, layer: int) -> int:
        return self.intermediate_size if self.layer_intermediate_sizes is None else self.layer_intermediate_sizes[layer]

    def __eq__(self, other: object) -> bool:
        """The same student: equal StudentConfig fields (transformers' bookkeeping, e.g. the version, aside)."""
        return isinstance(other, StudentConfig) and self.student_dict() == other.student_dict()

    def student_dict(self) -> dict[str, Any]:
        """model_type and the StudentConfig fields: what a checkpoint records and `from_dict` reads back."""
        return {"model_type": STUDENT_MODEL_TYPE, **{name: getattr(self, name) for name in student_fields()}}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], source: str = "config", **kwargs: Any) -> "StudentConfig":
        """From a dict; one that we wrote ("model_type" set) before a field existed gets the field's old value,
        and the task head of our earlier format (`task_head`) becomes transformers' architectures/num_labels."""
        values = dict(config_dict)
        if values.get("model_type") == STUDENT_MODEL_TYPE:
            values = {**LEGACY_FIELDS, **values}
        values.pop("ep_size", None)  # a launch setting, which configs held before: a saved model holds every expert
        head = values.pop("task_head", None)
        if head is not None:
            values.update(architectures=[HEAD_CLASSES[head["kind"]]], num_labels=head["num_labels"])
        try:
            return super().from_dict(values, **kwargs)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None

    @classmethod
    def from_preset(cls, name: str, tokenizer=None, **overrides: Any) -> "StudentConfig":
        """A size preset (STUDENT_PRESETS), with vocabulary and special ids from `tokenizer` if given."""
        if name not in STUDENT_PRESETS:
            raise ValueError(f"unknown student preset {name!r}; known: {sorted(STUDENT_PRESETS)}")
        values = dict(STUDENT_PRESETS[name])
        if tokenizer is not None:
            values.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id)
        return cls(**{**values, **overrides})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StudentConfig":
        """Read a config.json (a model dir's or a standalone student config file)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        with open(file) as f:
            return cls.from_dict(json.load(f), source=str(file))


def student_fields() -> list[str]:
    """The fields StudentConfig declares (not those of transformers' PreTrainedConfig)."""
    inherited = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    return [f.name for f in dataclasses.fields(StudentConfig) if f.name not in inherited]


# The paper's students (Table 1/2; 12 heads each) and its teacher assistants ("w/ TA").
STUDENT_PRESETS: dict[str, dict[str, int]] = {
    "6L384H": dict(num_layers=6, hidden_size=384),
    "4L384H": dict(num_layers=4, hidden_size=384),
    "3L384H": dict(num_layers=3, hidden_size=384),
    "4L192H": dict(num_layers=4, hidden_size=192),
    "4L312H": dict(num_layers=4, hidden_size=312, intermediate_size=1200),  # TinyBERT's general-distillation student
    "12L384H": dict(num_layers=12, hidden_size=384),  # teacher assistant of BERT-base students
    "12L768H": dict(num_layers=12, hidden_size=768),  # BERT-base shape (teacher assistant of BERT-large)
}


def is_student_dir(path: str | os.PathLike) -> bool:
    """True when `path/config.json` describes one of our students (not a Hugging Face model)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return False
    with open(file) as f:
        return json.load(f).get("model_type") == STUDENT_MODEL_TYPE
