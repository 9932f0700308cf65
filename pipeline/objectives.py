"""Distillation objectives. Each returns (loss, parts): parts are detached scalars for logging.

- minilm_relation_loss: MiniLMv2 self-attention relation distillation (Wang et al. 2021, Eq. 2-4), the
  task-agnostic objective of the paper's MiniLM and MiniMoE students.
- tinybert_loss: TinyBERT layer-wise loss (Jiao et al. 2020, Eq. 7-8): attention-score MSE + hidden MSE
  through a learned projection.
- logit_kd_loss: temperature-scaled logit KD (Hinton et al. 2015) with an optional hard-label term,
  for task-specific distillation (the paper's "w/ KD" rows).
- task_loss: the finetuning loss on labels (cross-entropy, or MSE for regression), the hard-label term
  of logit_kd_loss; the one definition that finetuning and the task heads use.
The student's MoE aux loss (already weighted by StudentConfig.aux_loss_weight) is added when given.
All arithmetic is fp32: bf16/fp16 inputs are upcast before any product, softmax or exp.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, H) -> (B, nh, T, H / nh), in fp32."""
    B, T, H = x.shape
    if H % num_heads:
        raise ValueError(f"hidden size {H} is not divisible by {num_heads} heads")
    return x.float().view(B, T, num_heads, H // num_heads).transpose(1, 2)


def _with_aux(loss: torch.Tensor, parts: dict[str, torch.Tensor], aux_loss: torch.Tensor | None):
    if aux_loss is not None:
        loss = loss + aux_loss
        parts["aux"] = aux_loss.detach()
    parts["loss"] = loss.detach()
    return loss, parts


def relation_log_probs(x: torch.Tensor, key_mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """log softmax(x_h x_h^T / sqrt(d_h)) per relation head: x (B, T, H), key_mask (B, T) -> (B, R, T, T)."""
    heads = _split_heads(x, num_heads)
    scores = heads @ heads.transpose(-1, -2) / math.sqrt(heads.size(-1))
    # A finite fill (not -inf): masked entries get exp() = 0 and never produce inf - inf = NaN.
    scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(torch.float32).min)
    return F.log_softmax(scores, dim=-1)


def minilm_relation_loss(student_qkv, teacher_qkv, attention_mask: torch.Tensor, num_relation_heads: int = 32,
                         aux_loss: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MiniLMv2 loss: mean over Q-Q, K-K, V-V of KL(teacher relation || student relation).

    student_qkv / teacher_qkv: (q, k, v), each (B, T, Hs) / (B, T, Ht); hidden sizes may differ (the
    relations are T x T). attention_mask (B, T), 1 = real token. The KL of each real query row (over real
    keys) is averaged over rows, relation heads and the batch; padded rows and keys count for nothing."""
    mask = attention_mask.bool()
    real_rows = mask[:, None, :].float()  # (B, 1, T)
    denominator = real_rows.sum() * num_relation_heads
    parts = {}
    for name, s, t in zip(("qq", "kk", "vv"), student_qkv, teacher_qkv):
        log_s = relation_log_probs(s, mask, num_relation_heads)
        log_t = relation_log_probs(t, mask, num_relation_heads)
        kl_rows = (log_t.exp() * (log_t - log_s)).sum(-1)  # (B, R, T)
        parts[name] = (kl_rows * real_rows).sum() / denominator
    loss = (parts["qq"] + parts["kk"] + parts["vv"]) / 3
    return _with_aux(loss, {k: v.detach() for k, v in parts.items()}, aux_loss)


def attention_scores(q: torch.Tensor, k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Unnormalised attention scores q_h k_h^T / sqrt(d_h): (B, T, H) x2 -> (B, nh, T, T), fp32."""
    qh, kh = _split_heads(q, num_heads), _split_heads(k, num_heads)
    return qh @ kh.transpose(-1, -2) / math.sqrt(qh.size(-1))


def tinybert_loss(student_scores: torch.Tensor, teacher_scores: torch.Tensor, student_hidden: torch.Tensor,
                  teacher_hidden: torch.Tensor, projection: nn.Linear, attention_mask: torch.Tensor,
                  aux_loss: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TinyBERT layer loss: MSE(A_s, A_t) + MSE(h_s W_h, h_t) (Eq. 7-8), over real tokens only.

    scores (B, nh, T, T) from `attention_scores` (same head count on both sides); hidden (B, T, Hs) and
    (B, T, Ht); projection: the learned W_h, nn.Linear(Hs, Ht), trained with the student."""
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(f"attention scores differ in shape: student {tuple(student_scores.shape)}, "
                         f"teacher {tuple(teacher_scores.shape)} (TinyBERT needs equal head counts)")
    mask = attention_mask.bool()
    pair = (mask[:, None, :, None] & mask[:, None, None, :]).expand_as(student_scores)  # (B, nh, T, T)
    attention = F.mse_loss(student_scores.float()[pair], teacher_scores.float()[pair])
    bias = None if projection.bias is None else projection.bias.float()  # fp32 even when the engine runs bf16
    projected = F.linear(student_hidden.float(), projection.weight.float(), bias)  # (B, T, Ht)
    hidden = F.mse_loss(projected[mask], teacher_hidden.float()[mask])
    return _with_aux(attention + hidden, {"attention": attention.detach(), "hidden": hidden.detach()}, aux_loss)


def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  labels: torch.Tensor | None = None, alpha: float = 0.5,
                  aux_loss: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha x soft + (1 - alpha) x hard (hard only with labels; without labels loss = soft).

    soft = T^2 KL(softmax(t/T) || softmax(s/T)), mean over examples; logits (N, C). For regression
    (C == 1) soft = MSE between the outputs and hard = MSE to the labels."""
    s, t = student_logits.float(), teacher_logits.float()
    if s.size(-1) == 1:
        soft = F.mse_loss(s, t)
    else:
        soft = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                        reduction="batchmean", log_target=True) * temperature**2
    parts = {"soft": soft.detach()}
    loss = soft
    if labels is not None:
        hard = task_loss(s, labels)
        parts["hard"] = hard.detach()
        loss = alpha * soft + (1 - alpha) * hard
    return _with_aux(loss, parts, aux_loss)


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MSE for regression (logits (N, 1), float labels (N,)); otherwise cross-entropy over the last dim, for
    sequence logits (N, C) with labels (N,) and token logits (B, T, C) with labels (B, T) alike. Labels
    -100 (padding, non-first sub-tokens) count for nothing."""
    logits = logits.float()
    if logits.size(-1) == 1:
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
