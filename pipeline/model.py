"""MiniLM / MiniMoE students: a BERT-style encoder whose FFNs are dense or mixtures of experts.

The student and its task heads are transformers models (`StudentConfig` is a `PreTrainedConfig` with its
own model_type, the models are `PreTrainedModel`s registered with the Auto classes at the end of this
file): save_pretrained / from_pretrained are transformers' own (config.json + model.safetensors).

One code path for dense and MoE students: every layer's FFN returns (output, aux loss, expert counts);
the dense FFN returns a zero aux loss and no counts. One expert = one dense FFN of the student's size, so
a MiniMoE student has the dense student's per-token compute and ~E x its FFN parameters (paper Sec. 3.2).
MoE blocks are plain torch (TorchMoE, for one process: a loaded model needs no DeepSpeed) or, built with
`deepspeed_moe=True` for training in the engine, DeepSpeed's classic `deepspeed.moe.layer.MoE`; both route
with the same Router and share one state dict. Expert parallelism is applied from outside: build with
`Student(config, deepspeed_moe=True, ep_size=N)` (a launch setting, not saved), then `deepspeed.initialize`
creates the expert-parallel groups.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification,
                          PreTrainedConfig, PreTrainedModel)
from transformers import initialization as init
from transformers.utils import ModelOutput

from pipeline.objectives import task_loss

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
# "layers.0.ffn.deepspeed_moe.experts.deepspeed_experts.3.fc1.weight" -> prefix, expert id, suffix
EXPERT_KEY = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..*)$")


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
        ] if not ok]
        if problems:
            raise ValueError("StudentConfig: " + "; ".join(problems))

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1 or self.attention_experts > 1

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


@dataclass
class StudentOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    """(B, T, H) output of the last layer."""
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    """Q, K, V projections (B, T, H) each, before the head split, of layer `qkv_layer` (None if not asked)."""
    aux_loss: torch.Tensor | None = None
    """Scalar: aux_loss_weight x the mean of the MoE layers' load-balancing losses (0 for a dense student)."""
    expert_counts: list[torch.Tensor] | None = None
    """Per MoE FFN layer, (E,) tokens routed to each expert on this process (real tokens, before any drop)."""
    qkv_layer_input: torch.Tensor | None = None
    """(B, T, H) hidden state entering layer `qkv_layer` (TinyBERT's hidden-state loss)."""
    relation_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    """The Q, K, V that MiniLMv2's relations are distilled from: the relation projection's of the last hidden
    state when the config has one (the authors' MiniMoE), else `qkv` (the authors' MiniLM)."""


class Embeddings(nn.Module):
    def __init__(self, config: StudentConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.layer_norm(x))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, num_heads: int,
           dropout: float) -> torch.Tensor:
    """Multi-head scaled dot-product attention: q, k, v (B, T, H), key_mask (B, 1, 1, T) -> (B, T, H)."""
    B, T, H = q.shape
    heads = [t.view(B, T, num_heads, H // num_heads).transpose(1, 2) for t in (q, k, v)]  # (B, nh, T, hs)
    y = F.scaled_dot_product_attention(*heads, attn_mask=key_mask, dropout_p=dropout)
    return y.transpose(1, 2).reshape(B, T, H)


class QKV(nn.Module):
    """Q, K, V projections Linear(H, H) each, with bias."""

    def __init__(self, config: StudentConfig):
        super().__init__()
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.query(x), self.key(x), self.value(x)


class SelfAttention(QKV):
    def __init__(self, config: StudentConfig):
        super().__init__(config)
        self.num_heads = config.num_heads
        self.dropout = config.dropout
        self.output = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, used_tokens: torch.Tensor):
        """x (B, T, H), key_mask (B, 1, 1, T) bool, True = attend -> (B, T, H), (q, k, v) each (B, T, H), None
        (no routing)."""
        q, k, v = self.project(x)
        y = attend(q, k, v, key_mask, self.num_heads, self.dropout if self.training else 0.0)
        return self.output(y), (q, k, v), None


class LowRankLinear(nn.Module):
    """A rank-r factorisation of Linear(in, out): x -> up(down(x)), e.g. a truncated SVD of its weight."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class FeedForward(nn.Module):
    """The dense FFN, and one expert of an MoE FFN."""

    def __init__(self, config: StudentConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Router(nn.Module):
    """The authors' routing gate in plain torch: a biased Linear(H, E) and the training-time noise. DeepSpeed's MoE
    layer takes it through `deepspeed_router`, which adds DeepSpeed's gate interface to these methods."""

    def __init__(self, config: StudentConfig, num_experts: int):
        super().__init__()
        self.init_routing(config, num_experts)

    def init_routing(self, config: StudentConfig, num_experts: int) -> None:
        self.wg = nn.Linear(config.hidden_size, num_experts, bias=config.router_bias)
        self.noisy_gate_policy, self.jitter = config.router_noise, config.router_jitter

    def logits(self, x: torch.Tensor, noisy: bool = True) -> torch.Tensor:
        """(S, H) tokens -> (S, E) fp32 routing logits, with the training-time Jitter / LogitJitter noise
        unless not `noisy`. (The authors add U[1 - eps, 1 + eps]; the constant 1 cancels in the softmax.)"""
        noise = self.noisy_gate_policy if self.training and noisy else None
        x = x.float()
        if noise == "Jitter":  # DeepSpeed's multiplicative_jitter, draw for draw
            x = x * torch.distributions.Uniform(*x.new_tensor([1 - 1e-2, 1 + 1e-2])).rsample(x.shape)
        bias = None if self.wg.bias is None else self.wg.bias.float()
        logits = F.linear(x, self.wg.weight.float(), bias)
        if noise == "LogitJitter":
            logits = logits + torch.empty_like(logits).uniform_(-self.jitter, self.jitter)
        return logits

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-1: -> gate probabilities (S, E), chosen expert (S,); RSample picks argmax(logits + Gumbel) (DeepSpeed's
        gumbel_rsample, draw for draw)."""
        probs = logits.softmax(-1)
        if self.training and self.noisy_gate_policy == "RSample":
            gumbel = torch.distributions.Gumbel(*logits.new_tensor([0.0, 1.0]))
            return probs, (logits + gumbel.rsample(logits.shape)).argmax(-1)
        return probs, probs.argmax(-1)


def deepspeed_router(config: StudentConfig, num_experts: int) -> nn.Module:
    """The Router as DeepSpeed's TopKGate, so that it plugs into DeepSpeed's MoE layer (capacity-padded dispatch,
    expert parallelism) as well as into the sorted dispatch."""
    from deepspeed.moe.sharded_moe import TopKGate, top1gating, top2gating

    class DeepSpeedRouter(TopKGate):
        init_routing, logits, choose = Router.init_routing, Router.logits, Router.choose

        def __init__(self):
            super().__init__(config.hidden_size, num_experts, k=config.top_k, capacity_factor=config.capacity_factor,
                             eval_capacity_factor=config.capacity_factor, min_capacity=0,
                             noisy_gate_policy=config.router_noise, drop_tokens=config.drop_tokens,
                             use_rts=config.drop_tokens)
            self.init_routing(config, num_experts)

        def forward(self, input: torch.Tensor, used_token: torch.Tensor | None = None, sparse_routes: bool = False,
                    use_tutel: bool = False):
            """DeepSpeed's TopKGate.forward on our logits (its noise policy is applied in `logits` / by top1gating)."""
            capacity = self.capacity_factor if self.training else self.eval_capacity_factor
            logits = self.logits(input)
            if self.k == 1:
                rsample = "RSample" if self.training and self.noisy_gate_policy == "RSample" else None
                return top1gating(logits, capacity, self.min_capacity, used_token, rsample, self.drop_tokens,
                                  self.use_rts, self.ep_group, sparse_routes, use_tutel)
            return top2gating(logits, capacity, self.min_capacity, self.drop_tokens, self.ep_group,
                              self.top2_2nd_expert_sampling, sparse_routes)

    return DeepSpeedRouter()


def route_top1(gate: nn.Module, x: torch.Tensor, used_token: torch.Tensor | None):
    """Top-1 routing of tokens x (S, H) as DeepSpeed's top1gating decides it, without capacity padding ->
    chosen expert (S,), its gate value (S, 1), l_aux, tokens per expert (E,) (tokens with used_token 0 uncounted).
    l_aux is the Switch/GShard balance loss as DeepSpeed computes it: E * sum_e mean_s(p_se) * routed_e / S."""
    probs, choice = gate.choose(gate.logits(x))
    num_experts = probs.size(1)
    routed = F.one_hot(choice, num_experts)
    if used_token is not None:
        routed = routed * used_token[:, None]
    counts = routed.sum(0)
    l_aux = num_experts * (probs.mean(0) * counts.float() / x.size(0)).sum()
    return choice, probs.gather(1, choice[:, None]), l_aux, counts


def sorted_dispatch(moe: nn.Module, hidden_states: torch.Tensor, used_token: torch.Tensor | None):
    """Top-1 MoE FFN on one rank, nothing dropped: `moe.gate` routes (route_top1), tokens are grouped by a stable
    sort by expert and each group goes through its expert of `moe.experts.deepspeed_experts`; no capacity padding,
    nothing exchanged. -> (output like hidden_states, l_aux, tokens per expert (E,))."""
    x = hidden_states.reshape(-1, hidden_states.size(-1))  # (S, H)
    choice, gate_value, l_aux, counts = route_top1(moe.gate, x, used_token)
    experts = moe.experts.deepspeed_experts
    # Sort tokens by expert; padding (used_token 0) gets the extra id E and sorts last, unrouted.
    expert_of = choice if used_token is None else choice.masked_fill(used_token == 0, len(experts))
    order = torch.sort(expert_of, stable=True)[1]
    *chunks, padding = x.index_select(0, order).split(counts.tolist() + [x.size(0) - int(counts.sum())])
    out = torch.cat([expert(chunk) for expert, chunk in zip(experts, chunks)] + [torch.zeros_like(padding)])
    # Back to token order, scaled by the chosen expert's gate value (in fp32, as DeepSpeed).
    y = torch.empty_like(out).index_copy_(0, order, out) * gate_value
    moe.l_aux, moe.exp_counts = l_aux, counts
    return y.to(x.dtype).view_as(hidden_states), l_aux, counts


class TorchMoE(nn.Module):
    """The MoE FFN in plain torch, for inference and training in one process without DeepSpeed: top-1 routing
    with sorted dispatch, as DeepSpeed's layer computes it on one rank. Its modules carry the names of DeepSpeed's
    layer (deepspeed_moe.gate, deepspeed_moe.experts.deepspeed_experts.E), so both share one state dict."""

    def __init__(self, config: StudentConfig, num_experts: int):
        super().__init__()
        if config.top_k != 1 or config.drop_tokens:
            raise ValueError(f"the plain-torch MoE routes top-1 without dropping tokens (got top_k {config.top_k}, "
                             f"drop_tokens {config.drop_tokens}); build the student with deepspeed_moe=True")
        self.deepspeed_moe = nn.Module()
        self.deepspeed_moe.gate = Router(config, num_experts)
        self.deepspeed_moe.experts = nn.Module()
        expert = FeedForward(config)  # copies, as DeepSpeed's layer makes them (re-initialised by Student)
        self.deepspeed_moe.experts.deepspeed_experts = nn.ModuleList(copy.deepcopy(expert) for _ in range(num_experts))

    def forward(self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None):
        return sorted_dispatch(self.deepspeed_moe, hidden_states, used_token)


def moe_feed_forward(config: StudentConfig, num_experts: int | None = None, deepspeed_moe: bool = False,
                     ep_size: int = 1) -> nn.Module:
    """`num_experts` (default: the config's) copies of FeedForward (re-initialised by Student) behind a router: the
    plain-torch TorchMoE, or with `deepspeed_moe` DeepSpeed's classic MoE layer (the engine's training path:
    expert parallelism over `ep_size` ranks, MoE parameter groups, expert checkpoints)."""
    num_experts = num_experts or config.num_experts
    if not deepspeed_moe:
        return TorchMoE(config, num_experts)
    from deepspeed.moe.layer import MoE  # imported here: importing deepspeed costs ~3 s

    class SortedDispatchMoE(MoE):
        """deepspeed.moe.layer.MoE whose local top-1, no-drop case takes the sorted dispatch.

        DeepSpeed's dispatch pads every expert to a common capacity and copies tokens through
        (E, C, H) buffers; with one expert-parallel rank and nothing dropped there is nothing to pad
        or exchange (BENCHMARKS.md, "Models"). The routing, noise, aux loss and counts are DeepSpeed's
        top1gating, step for step; with ep_size > 1, token dropping or top-2 the DeepSpeed path runs."""

        def forward(self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None):
            gate = self.deepspeed_moe.gate
            if self.ep_size > 1 or gate.drop_tokens or gate.k != 1:
                return super().forward(hidden_states, used_token)
            return sorted_dispatch(self.deepspeed_moe, hidden_states, used_token)

    block = SortedDispatchMoE(config.hidden_size, FeedForward(config), num_experts=num_experts, ep_size=ep_size,
                              k=config.top_k, capacity_factor=config.capacity_factor,
                              eval_capacity_factor=config.capacity_factor, min_capacity=0,
                              drop_tokens=config.drop_tokens, use_rts=config.drop_tokens)
    block.deepspeed_moe.gate = deepspeed_router(config, num_experts)
    return block


class ExpertAttention(nn.Module):
    """`attention_experts` self-attentions routed top-1 per token (the authors' attention experts): a token's
    Q, K, V and output projection are its expert's; attention itself runs over all tokens. Local to each rank
    (not expert-parallel)."""

    def __init__(self, config: StudentConfig):
        super().__init__()
        self.router = Router(config, config.attention_experts)
        self.experts = nn.ModuleList(SelfAttention(config) for _ in range(config.attention_experts))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, used_tokens: torch.Tensor):
        """As SelfAttention.forward, with the routing: -> (B, T, H), (q, k, v), (l_aux, counts)."""
        flat = x.reshape(-1, x.size(-1))
        choice, gate_value, l_aux, counts = route_top1(self.router, flat, used_tokens)
        tokens = [(choice == e).nonzero().squeeze(1) for e in range(len(self.experts))]
        q, k, v = (self._per_expert(flat, tokens, [getattr(e, name) for e in self.experts])
                   for name in ("query", "key", "value"))
        first = self.experts[0]
        dropout = first.dropout if self.training else 0.0
        y = attend(*(t.view_as(x) for t in (q, k, v)), key_mask, first.num_heads, dropout)
        out = self._per_expert(y.reshape_as(flat), tokens, [e.output for e in self.experts]) * gate_value
        return out.view_as(x), tuple(t.view_as(x) for t in (q, k, v)), (l_aux, counts)

    @staticmethod
    def _per_expert(x: torch.Tensor, tokens: list[torch.Tensor], linears: list[nn.Module]) -> torch.Tensor:
        out = x.new_empty(x.size(0), linears[0].out_features)
        for index, linear in zip(tokens, linears):
            out.index_copy_(0, index, linear(x.index_select(0, index)))
        return out


def moefy_neurons(num_experts: int, expert_size: int) -> list[torch.Tensor]:
    """The authors' `moefy` cut: which neurons of one wide layer of num_experts x expert_size neurons each
    expert takes: the first 2/3 of expert_size (shared by all experts), then its own neurons, strided
    (e, e + E, e + 2E, ... after the shared block)."""
    shared = expert_size * 2 // 3
    own = torch.arange(expert_size - shared)
    return [torch.cat([torch.arange(shared), shared + e + num_experts * own]) for e in range(num_experts)]


@torch.no_grad()
def moefy_init(experts: list[tuple[list[nn.Linear], list[nn.Linear]]], unit: int, std: float) -> None:
    """Initialise experts as slices of one wide random layer (normal(0, std), zero biases, as BERT's init).

    experts: per expert, (the Linears whose output rows are its units, the Linears whose input columns are),
    e.g. ([fc1], [fc2]) for an FFN expert or ([query, key, value], [output]) for an attention expert; unit:
    the rows/columns of one unit (1 for an FFN neuron, the head size for an attention head)."""
    first_in, first_out = experts[0]
    units = first_in[0].out_features // unit
    cuts = [(neurons[:, None] * unit + torch.arange(unit)).flatten() for neurons in moefy_neurons(len(experts), units)]
    wide = len(experts) * units * unit
    wide_in = [torch.randn(wide, linear.in_features) * std for linear in first_in]
    wide_out = [torch.randn(linear.out_features, wide) * std for linear in first_out]
    for (ins, outs), cut in zip(experts, cuts):
        for linear, weight in zip(ins, wide_in):
            init.copy_(linear.weight, weight[cut])  # (transformers' init functions skip loaded weights)
        for linear, weight in zip(outs, wide_out):
            init.copy_(linear.weight, weight[:, cut])
        for linear in ins + outs:
            init.zeros_(linear.bias)


class TransformerLayer(nn.Module):
    """Post-LayerNorm BERT layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, config: StudentConfig, deepspeed_moe: bool = False, ep_size: int = 1):
        super().__init__()
        self.attention = ExpertAttention(config) if config.attention_experts > 1 else SelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = moe_feed_forward(config, None, deepspeed_moe, ep_size) if config.num_experts > 1 else FeedForward(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, used_tokens: torch.Tensor):
        """-> x (B, T, H), (q, k, v), attention routing and FFN routing: (aux loss, expert counts (E,)) or None."""
        attended, qkv, attention_routing = self.attention(x, key_mask, used_tokens)
        x = self.attention_norm(x + self.dropout(attended))
        if isinstance(self.ffn, FeedForward):
            y, ffn_routing = self.ffn(x), None
        else:
            # used_tokens (B*T,) keeps padding out of the routing, the counts and the expert compute.
            y, aux, counts = self.ffn(x, used_tokens)
            ffn_routing = (aux, counts)
        return self.ffn_norm(x + self.dropout(y)), qkv, attention_routing, ffn_routing


class StudentPreTrainedModel(PreTrainedModel):
    """What the student and its task heads share: the config class, BERT's initialisation with the authors'
    router and expert init, saving with every expert under its global id."""

    config_class = StudentConfig
    base_model_prefix = "student"

    @classmethod
    def is_custom_code(cls) -> bool:
        # transformers skips _init_weights on modules without parameters of their own in code outside its
        # library (the router, the whole-student moefy); ours only uses its guarded init functions.
        return False

    def _init_weights(self, module: nn.Module) -> None:
        """BERT's init per module (transformers calls it children first), then the authors' moefy experts once
        the whole student is built (whole-model order, so a seed gives the same weights as before)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            init.zeros_(module.weight[module.padding_idx])
        if isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        if getattr(module, "wg", None) is not None and self.config.router_bias:  # the authors' router keeps
            module.wg.reset_parameters()  # PyTorch's default Linear init
        if isinstance(module, Student) and self.config.expert_init == "moefy" and self.config.ffn_ranks is None:
            module.moefy_experts()

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """transformers' save_pretrained (config.json, model.safetensors) with all experts under global ids,
        the files readable by others.

        With ep_size > 1 every rank of the expert-parallel group must call this (experts are gathered);
        rank 0 writes."""
        if self.ep_size > 1:
            kwargs.update(state_dict=gather_experts(self.state_dict(), self.config.num_experts, self.ep_size),
                          is_main_process=torch.distributed.get_rank() == 0)
        super().save_pretrained(save_directory, **kwargs)
        if kwargs.get("is_main_process", True):
            umask_file_modes(save_directory)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """transformers' from_pretrained, DeepSpeed's marks on expert parameters restored (loading replaces the
        Parameters; the engine's MoE parameter groups and gradient reduction read the marks)."""
        loaded = super().from_pretrained(*args, **kwargs)
        for module in (loaded[0] if isinstance(loaded, tuple) else loaded).modules():  # (output_loading_info)
            if hasattr(module, "expert_group_name"):  # a DeepSpeed MoE block
                for param in module.deepspeed_moe.experts.parameters():
                    param.allreduce, param.group_name = False, module.expert_group_name
        return loaded


def umask_file_modes(directory: str | os.PathLike) -> None:
    """Give every file under `directory` the mode open() gives (0666 less the umask, 0644 as a rule):
    safetensors writes its files 0600, unreadable by the other users of a shared machine."""
    umask = os.umask(0)
    os.umask(umask)
    for file in Path(directory).rglob("*"):
        if file.is_file():
            file.chmod(0o666 & ~umask)


def check_expert_parallel(config: StudentConfig, deepspeed_moe: bool, ep_size: int) -> None:
    """Expert parallelism needs DeepSpeed's MoE layer and a degree that divides the experts."""
    if ep_size < 1 or config.num_experts % ep_size or (ep_size > 1 and not deepspeed_moe):
        raise ValueError(f"num_experts {config.num_experts} must be >= 1 and a multiple of ep_size {ep_size}, and "
                         f"ep_size > 1 needs deepspeed_moe=True (got ep_size {ep_size}, deepspeed_moe {deepspeed_moe})")


def _expert_parallel_rank(ep_size: int) -> int:
    # DeepSpeed's default layout (use_data_before_expert_parallel_=False): expert groups are
    # consecutive ranks, so the rank inside a group is the global rank modulo ep_size.
    return torch.distributed.get_rank() % ep_size if ep_size > 1 else 0


def localize_experts(state: dict[str, torch.Tensor], num_experts: int, ep_size: int) -> dict[str, torch.Tensor]:
    """Global-id expert weights (as saved) -> this rank's local experts (ids 0..E/ep_size-1)."""
    if ep_size == 1:
        return state
    num_local = num_experts // ep_size
    first = _expert_parallel_rank(ep_size) * num_local
    local = {}
    for key, value in state.items():
        match = EXPERT_KEY.match(key)
        if match is None:
            local[key] = value
        elif first <= int(match[2]) < first + num_local:
            local[f"{match[1]}{int(match[2]) - first}{match[3]}"] = value
    return local


def gather_experts(state: dict[str, torch.Tensor], num_experts: int, ep_size: int) -> dict[str, torch.Tensor]:
    """This rank's local experts -> all experts with global ids (all-gather over the expert group)."""
    if ep_size == 1:
        return state
    from deepspeed.utils import groups

    group = groups._get_expert_parallel_group(f"ep_size_{ep_size}")
    num_local = num_experts // ep_size
    full = {}
    for key, value in state.items():
        match = EXPERT_KEY.match(key)
        if match is None:
            full[key] = value
            continue
        pieces = [torch.empty_like(value) for _ in range(ep_size)]
        torch.distributed.all_gather(pieces, value.contiguous(), group=group)
        for rank, piece in enumerate(pieces):
            full[f"{match[1]}{rank * num_local + int(match[2])}{match[3]}"] = piece
    return full


class Student(StudentPreTrainedModel):
    """The student encoder. forward -> StudentOutput (hidden states, Q/K/V of one layer, aux loss, counts).

    MoE FFNs are plain torch (TorchMoE: one process, no DeepSpeed needed, what from_pretrained / AutoModel build),
    or with `deepspeed_moe=True` DeepSpeed's MoE layer, the training path inside the engine, its experts spread
    over `ep_size` ranks (a launch setting, not part of the config); the two compute the same and share one
    state dict."""

    def __init__(self, config: StudentConfig, deepspeed_moe: bool = False, ep_size: int = 1):
        super().__init__(config)
        check_expert_parallel(config, deepspeed_moe, ep_size)
        self.ep_size = ep_size
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(TransformerLayer(config, deepspeed_moe, ep_size) for _ in range(config.num_layers))
        for path, rank in (config.ffn_ranks or {}).items():
            linear = self.ffn_linears().get(path)
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"StudentConfig.ffn_ranks: {path!r} is not an FFN Linear of this student")
            low_rank = LowRankLinear(linear.in_features, linear.out_features, rank)
            for param in low_rank.parameters():  # keep DeepSpeed's expert marks (allreduce=False, group_name)
                param.__dict__.update({k: v for k, v in vars(linear.weight).items() if k in ("allreduce", "group_name")})
            parent, name = path.rsplit(".", 1)
            setattr(self.get_submodule(parent), name, low_rank)
        if config.relation_projection:
            self.relation_projection = QKV(config)
        # Initialised after construction (post_init -> _init_weights): DeepSpeed deep-copies one expert E times.
        self.post_init()

    def moefy_experts(self) -> None:
        std = self.config.initializer_range
        for layer in self.layers:
            if isinstance(layer.attention, ExpertAttention):
                moefy_init([([e.query, e.key, e.value], [e.output]) for e in layer.attention.experts],
                           self.config.hidden_size // self.config.num_heads, std)
            if not isinstance(layer.ffn, FeedForward):
                moefy_init([([e.fc1], [e.fc2]) for e in layer.ffn.deepspeed_moe.experts.deepspeed_experts], 1, std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, qkv_layer: int | None = -1,
                return_dict: bool | None = None) -> StudentOutput | tuple:
        """input_ids (B, T); attention_mask (B, T), 1 = real token; qkv_layer: layer index (negative counts
        from the end) whose Q/K/V to return, None for none (and no relation Q/K/V either); return_dict=False
        gives transformers' tuple form."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        wanted = None if qkv_layer is None else range(self.config.num_layers)[qkv_layer]
        key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        used_tokens = attention_mask.reshape(-1).long()  # (B*T,); int: the gate counts with it
        x = self.embeddings(input_ids, token_type_ids)
        qkv, layer_input, attention_aux, ffn_aux, counts = None, None, [], [], []
        for index, layer in enumerate(self.layers):
            if index == wanted:
                layer_input = x
            x, layer_qkv, attention_routing, ffn_routing = layer(x, key_mask, used_tokens)
            if attention_routing is not None:
                attention_aux.append(attention_routing[0])
            if ffn_routing is not None:
                ffn_aux.append(ffn_routing[0])
                counts.append(ffn_routing[1])
            if index == wanted:
                qkv = layer_qkv
        relation_qkv = qkv
        if self.config.relation_projection and wanted is not None:
            relation_qkv = self.relation_projection.project(x)
        # The authors' balance loss: the mean over MoE layers (of attention and FFN experts, then of the two).
        means = [torch.stack(aux).float().mean() for aux in (attention_aux, ffn_aux) if aux]
        aux_loss = torch.stack(means).mean() if means else x.new_zeros((), dtype=torch.float32)
        out = StudentOutput(last_hidden_state=x, qkv=qkv, aux_loss=self.config.aux_loss_weight * aux_loss,
                            expert_counts=counts, qkv_layer_input=layer_input, relation_qkv=relation_qkv)
        return out if return_dict is not False else out.to_tuple()

    def ffn_linears(self) -> dict[str, nn.Module]:
        """Every FFN matrix by its module path (dense fc1/fc2, or each expert's fc1/fc2; global expert ids
        when ep_size is 1): an nn.Linear, or a LowRankLinear where config.ffn_ranks says so."""
        return {name: module for name, module in self.named_modules() if name.rsplit(".", 1)[-1] in ("fc1", "fc2")}


@dataclass
class TaskOutput(ModelOutput):
    loss: torch.Tensor | None = None
    """Task loss + the student's weighted aux loss (None without labels)."""
    logits: torch.Tensor | None = None
    """(B, num_labels) for sequence heads, (B, T, num_labels) for token heads."""
    aux_loss: torch.Tensor | None = None
    """The student's weighted aux loss (already included in `loss`)."""
    expert_counts: list[torch.Tensor] | None = None


class _TaskHead(StudentPreTrainedModel):
    """A student encoder with a linear task head of config.num_labels outputs; subclasses say what is pooled;
    the loss is objectives.task_loss."""

    kind: str = ""

    def __init__(self, config: StudentConfig, deepspeed_moe: bool = False, ep_size: int = 1):
        super().__init__(config)
        if config.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {config.num_labels}")
        self.num_labels, self.ep_size = config.num_labels, ep_size
        self.student = Student(config, deepspeed_moe, ep_size)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_dict: bool | None = None) -> TaskOutput | tuple:
        out = self.student(input_ids, attention_mask, token_type_ids, qkv_layer=None)
        logits = self.classifier(self.dropout(self.features(out.last_hidden_state)))
        loss = None if labels is None else task_loss(logits, labels) + out.aux_loss
        result = TaskOutput(loss=loss, logits=logits, aux_loss=out.aux_loss, expert_counts=out.expert_counts)
        return result if return_dict is not False else result.to_tuple()


class StudentForSequenceClassification(_TaskHead):
    """Pooled [CLS] (dense + tanh, as BERT) -> linear; num_labels 1 = regression (MSE), else cross-entropy."""

    kind = "sequence_classification"

    def __init__(self, config: StudentConfig, deepspeed_moe: bool = False, ep_size: int = 1):
        super().__init__(config, deepspeed_moe, ep_size)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pooler(hidden[:, 0]))  # (B, H) at [CLS]


class StudentForTokenClassification(_TaskHead):
    """Per-token linear head; labels -100 (padding, non-first sub-tokens) are ignored."""

    kind = "token_classification"

    def __init__(self, config: StudentConfig, deepspeed_moe: bool = False, ep_size: int = 1):
        super().__init__(config, deepspeed_moe, ep_size)
        self.post_init()

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden  # (B, T, H)


# `import pipeline` makes AutoConfig / AutoModel / AutoModelFor{Sequence,Token}Classification know the student.
AutoConfig.register(STUDENT_MODEL_TYPE, StudentConfig)
AutoModel.register(StudentConfig, Student)
AutoModelForSequenceClassification.register(StudentConfig, StudentForSequenceClassification)
AutoModelForTokenClassification.register(StudentConfig, StudentForTokenClassification)
