"""The student encoder (`Student`) and what it shares with its task heads (`StudentPreTrainedModel`).

One code path for dense and MoE students: every layer's FFN returns (output, aux loss, expert counts); the dense
FFN returns no routing. One expert = one dense FFN of the student's size, so a MiniMoE student has the dense
student's per-token compute and ~E x its FFN parameters (paper Sec. 3.2)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from minimoe_common.files import umask_file_modes
from pipeline.models.config import StudentConfig
from pipeline.models.layers import QKV, Embeddings, FeedForward, LowRankLinear, SelfAttention
from pipeline.models.moe import ExpertAttention, check_expert_parallel, gather_experts, moe_feed_forward, moefy_init

# Trained with the student, not part of the deployed model (export drops them): MiniMoE's relation projection and
# TinyBERT's W_h, which distillation attaches to the student under this name.
TINYBERT_PROJECTION = "tinybert_projection"
TRAINING_ONLY_PREFIXES = ("relation_projection.", TINYBERT_PROJECTION + ".")


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
    layer_qkv: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...] | None = None
    """With output_qkv, every layer's Q, K, V (B, T, H) each (TinyBERT's attention scores of every layer)."""
    relation_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    """The Q, K, V that MiniLMv2's relations are distilled from: the relation projection's of the last hidden
    state when the config has one (the authors' MiniMoE), else `qkv` (the authors' MiniLM)."""
    hidden_states: tuple[torch.Tensor, ...] | None = None
    """With output_hidden_states, transformers': the embeddings' output then each layer's, (B, T, H) each."""



class TransformerLayer(nn.Module):
    """Post-LayerNorm BERT layer: x = LN(x + Attn(x)); x = LN(x + FFN(x)). `index`: its place in the stack,
    which picks its head count and FFN width (a pruned student's differ per layer)."""

    def __init__(self, config: StudentConfig, deepspeed_moe: bool = False, ep_size: int = 1, index: int = 0):
        super().__init__()
        self.attention = (ExpertAttention(config) if config.attention_experts > 1
                          else SelfAttention(config, config.heads_of(index)))
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = (moe_feed_forward(config, None, deepspeed_moe, ep_size, index) if config.num_experts > 1
                    else FeedForward(config, config.intermediate_size_of(index)))
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, used_tokens: torch.Tensor, token_ids: torch.Tensor):
        """token_ids (B*T,): for hash routing -> x (B, T, H), (q, k, v), attention routing and FFN routing: (aux
        loss, expert counts (E,)) or None."""
        attended, qkv, attention_routing = self.attention(x, key_mask, used_tokens)
        x = self.attention_norm(x + self.dropout(attended))
        if isinstance(self.ffn, FeedForward):
            y, ffn_routing = self.ffn(x), None
        else:
            # used_tokens (B*T,) keeps padding out of the routing, the counts and the expert compute.
            y, aux, counts = self.ffn(x, used_tokens, token_ids)
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
        self.layers = nn.ModuleList(TransformerLayer(config, deepspeed_moe, ep_size, index)
                                    for index in range(config.num_layers))
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
                output_hidden_states: bool = False, output_qkv: bool = False,
                return_dict: bool | None = None) -> StudentOutput | tuple:
        """input_ids (B, T); attention_mask (B, T), 1 = real token; qkv_layer: layer index (negative counts
        from the end) whose Q/K/V to return, None for none (and no relation Q/K/V either); output_hidden_states:
        also every layer's output (PKD, TinyBERT); output_qkv: every layer's Q/K/V (TinyBERT); return_dict=False
        gives transformers' tuple form."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        wanted = None if qkv_layer is None else range(self.config.num_layers)[qkv_layer]
        key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        used_tokens = attention_mask.reshape(-1).long()  # (B*T,); int: the gate counts with it
        token_ids = input_ids.reshape(-1)  # (B*T,): what hash routing routes by
        x = self.embeddings(input_ids, token_type_ids)
        qkv, attention_aux, ffn_aux, counts = None, [], [], []
        hidden = [x] if output_hidden_states else None  # kept only when asked: L more activations held
        all_qkv = [] if output_qkv else None
        for index, layer in enumerate(self.layers):
            x, layer_qkv, attention_routing, ffn_routing = layer(x, key_mask, used_tokens, token_ids)
            if hidden is not None:
                hidden.append(x)
            if all_qkv is not None:
                all_qkv.append(layer_qkv)
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
                            expert_counts=counts, layer_qkv=None if all_qkv is None else tuple(all_qkv),
                            relation_qkv=relation_qkv, hidden_states=None if hidden is None else tuple(hidden))
        return out if return_dict is not False else out.to_tuple()

    def ffn_linears(self) -> dict[str, nn.Module]:
        """Every FFN matrix by its module path (dense fc1/fc2, or each expert's fc1/fc2; global expert ids
        when ep_size is 1): an nn.Linear, or a LowRankLinear where config.ffn_ranks says so."""
        return {name: module for name, module in self.named_modules() if name.rsplit(".", 1)[-1] in ("fc1", "fc2")}
