"""The student's dense building blocks: embeddings, attention, FFN and the low-rank Linear of compressed FFNs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.config import StudentConfig


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
    head_size = H // max(num_heads, 1)  # a layer pruned to no heads has 0-wide q, k, v
    heads = [t.view(B, T, num_heads, head_size).transpose(1, 2) for t in (q, k, v)]  # (B, nh, T, hs)
    y = F.scaled_dot_product_attention(*heads, attn_mask=key_mask, dropout_p=dropout)
    return y.transpose(1, 2).reshape(B, T, H)


class QKV(nn.Module):
    """Q, K, V projections Linear(H, width) each, with bias; width H unless given (a pruned layer's)."""

    def __init__(self, config: StudentConfig, width: int | None = None):
        super().__init__()
        width = config.hidden_size if width is None else width
        self.query = nn.Linear(config.hidden_size, width)
        self.key = nn.Linear(config.hidden_size, width)
        self.value = nn.Linear(config.hidden_size, width)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.query(x), self.key(x), self.value(x)


class SelfAttention(QKV):
    """num_heads heads of size hidden_size / config.num_heads (config.num_heads unless given: a pruned layer's)."""

    def __init__(self, config: StudentConfig, num_heads: int | None = None):
        num_heads = config.num_heads if num_heads is None else num_heads
        width = num_heads * (config.hidden_size // config.num_heads)
        super().__init__(config, width)
        self.num_heads = num_heads
        self.dropout = config.dropout
        self.output = nn.Linear(width, config.hidden_size)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, used_tokens: torch.Tensor):
        """x (B, T, H), key_mask (B, 1, 1, T) bool, True = attend -> (B, T, H), (q, k, v) each (B, T, width),
        None (no routing)."""
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
    """The dense FFN, and one expert of an MoE FFN; intermediate_size unless given (a pruned layer's)."""

    def __init__(self, config: StudentConfig, intermediate_size: int | None = None):
        super().__init__()
        width = config.intermediate_size if intermediate_size is None else intermediate_size
        self.fc1 = nn.Linear(config.hidden_size, width)
        self.fc2 = nn.Linear(width, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))
