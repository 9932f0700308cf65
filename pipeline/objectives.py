"""Distillation objectives. Each returns (loss, parts): parts are detached scalars for logging.

- minilm_relation_loss: MiniLMv2 self-attention relation distillation (Wang et al. 2021, Eq. 2-4), the
  task-agnostic objective of the paper's MiniLM and MiniMoE students; memory-flat (chunks of (example, head)
  pairs, no (B, R, T, T) tensor kept for the backward).
- tinybert_loss: TinyBERT's general-distillation loss (Jiao et al. 2020, Eq. 7-11): attention-score MSE and
  hidden-state MSE through one learned projection on every mapped layer (tinybert_layer_map), plus the embeddings'.
- logit_kd_loss: temperature-scaled logit KD (Hinton et al. 2015) with an optional hard-label term,
  for task-specific distillation (the paper's "w/ KD" rows).
- task_loss: the finetuning loss on labels (cross-entropy, or MSE for regression), the hard-label term
  of logit_kd_loss; the one definition that finetuning and the task heads use.
- patient_loss: PKD's normalised [CLS] hidden-state loss (Sun et al. 2019, L_PT), added to logit KD by
  finetuning's --pkd-beta.
- moebert_loss: MoEBERT's layer-wise distillation term (Zuo et al. 2022): hidden-state MSE of every layer and the
  embeddings plus the symmetric KL of the predictions, added to the task loss by finetuning's --moebert-distill.
The student's MoE aux loss (already weighted by StudentConfig.aux_loss_weight) is added when given.
All arithmetic is fp32: bf16/fp16 inputs are upcast before any product, softmax or exp.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

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


# Elements of one (pairs, T, T) chunk of scores, per device type. CPU: 2 M fp32 = 8 MiB per temporary, so a
# chunk's three stay in a 32 MiB L3 cache (2^19 to 2^21 were best, 2^22 1.2x and 2^23 1.7-2.2x slower;
# BENCHMARKS.md, "Relation loss"). Accelerators: fewer, larger chunks, kernel launches being the cost there
# (not measured yet).
RELATION_CHUNK_ELEMENTS = {"cpu": 1 << 21}
ACCELERATOR_CHUNK_ELEMENTS = 1 << 26


def _relation_operands(x: torch.Tensor, num_heads: int, key_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (example, head) pair, queries [x / sqrt(d), 1] and keys [x, bias], (B * R, T, d + 1) fp32 each.

    Their product is x x^T / sqrt(d) + bias_j: the scale and the padding mask ride in the score product's
    extra column, with no pass over the (T, T) scores (a broadcast baddbmm bias is a strided copy, slower
    here). x (B, T, H); key_bias (B, 1, T): 0, or a large negative fill at padded keys."""
    heads = _split_heads(x, num_heads)  # (B, R, T, d)
    B, R, T, d = heads.shape
    queries, keys = heads.new_empty(B, R, T, d + 1), heads.new_empty(B, R, T, d + 1)
    torch.mul(heads, 1.0 / math.sqrt(d), out=queries[..., :d])
    queries[..., d] = 1.0
    keys[..., :d] = heads
    keys[..., d] = key_bias
    return queries.view(B * R, T, d + 1), keys.view(B * R, T, d + 1)


def _chunk_kl(s_q: torch.Tensor, s_k: torch.Tensor, t_q: torch.Tensor, t_k: torch.Tensor,
              row_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sum_i w_i KL(p_t[i] || p_s[i]) over a chunk of n (example, head) pairs, operands (n, T, d + 1);
    also log p_s and p_t, (n, T, T)."""
    log_s = torch.log_softmax(torch.bmm(s_q, s_k.transpose(1, 2)), -1)
    log_t = torch.log_softmax(torch.bmm(t_q, t_k.transpose(1, 2)), -1)
    p_t = log_t.exp()
    # Padded keys: p_t = 0 exactly and log_t - log_s is finite (both near the fill), so they add 0.
    kl_rows = torch.linalg.vecdot(p_t, log_t - log_s)  # (n, T)
    return torch.dot(kl_rows.flatten(), row_weight.flatten()), log_s, p_t


def _chunk_loss(s_q, s_k, t_q, t_k, row_weight) -> torch.Tensor:
    """The chunk's sum alone, when no gradient is wanted."""
    return _chunk_kl(s_q, s_k, t_q, t_k, row_weight)[0]


def _chunk_loss_and_grad(s_q, s_k, t_q, t_k, row_weight, factor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's sum and its gradient w.r.t. the student's heads x (n, T, d): with S = x x^T / sqrt(d),
    d KL_i / d S[i, :] = p_s[i, :] - p_t[i, :] = D[i, :], so the gradient is f (D x + D^T (f x)), f (n, T, 1) =
    w / sqrt(d) (the row factor applied to the (T, d) operands, not to the (T, T) D)."""
    total, log_s, p_t = _chunk_kl(s_q, s_k, t_q, t_k, row_weight)
    d = log_s.exp_().sub_(p_t)
    x = s_k[..., :-1]
    return total, torch.bmm(d, x).mul_(factor).add_(torch.bmm(d.transpose(1, 2), x * factor))


@functools.cache
def _kernels():
    """(loss, loss and grad) chunk kernels. torch.compile fuses a chunk's softmaxes, exp, differences and row
    sums into one pass over the (T, T) scores, the products staying BLAS (cuBLAS) calls: BENCHMARKS.md,
    "Relation loss", for the figures against the eager kernels and against compiling the whole unchunked loss.
    Built on first use (importing the compiler takes seconds, and finetuning imports this module for
    task_loss); dynamic=True: one compilation for every chunk size, T and head width. TORCHDYNAMO_DISABLE=1
    runs them eagerly, with the same results."""
    return torch.compile(_chunk_loss, dynamic=True), torch.compile(_chunk_loss_and_grad, dynamic=True)


class _RelationKL(torch.autograd.Function):
    """sum over real query rows, relation heads and the batch of KL(teacher row || student row).

    Memory-flat: no (B, R, T, T) tensor outlives its chunk of (example, head) pairs. The loss is a scalar, so
    its gradient w.r.t. the student is computed in the forward, chunk by chunk, while the chunk's p_s and p_t
    are at hand; the backward only scales that (B, T, Hs) gradient by the upstream one. The cost of a
    backward that recomputed the scores instead (saving only the inputs) is 1.5x the products and a second
    pass of softmaxes (BENCHMARKS.md). The teacher gets no gradient (a fixed target; the caller detaches it)."""

    @staticmethod
    def forward(ctx, student, teacher, key_bias, row_weight, num_heads, with_grad):
        # student (B, T, Hs), teacher (B, T, Ht); key_bias (B, 1, T); row_weight (B * R, T): 1 = real query row;
        # with_grad: whether a backward will follow (ctx.needs_input_grad is True under no_grad as well).
        loss_kernel, loss_and_grad_kernel = _kernels()
        B, T, H = student.shape
        with torch.autocast(student.device.type, enabled=False):  # fp32 products, whatever the caller's autocast
            s_q, s_k = _relation_operands(student, num_heads, key_bias)
            t_q, t_k = _relation_operands(teacher, num_heads, key_bias)
            chunk_elements = RELATION_CHUNK_ELEMENTS.get(student.device.type, ACCELERATOR_CHUNK_ELEMENTS)
            step = max(1, chunk_elements // T**2)
            total = torch.zeros((), dtype=torch.float32, device=student.device)
            if with_grad:
                factor = (row_weight / math.sqrt(H // num_heads))[..., None]  # (B * R, T, 1)
                grad = s_k.new_empty(B * num_heads, T, H // num_heads)
            for i in range(0, B * num_heads, step):
                chunk = slice(i, i + step)
                operands = s_q[chunk], s_k[chunk], t_q[chunk], t_k[chunk], row_weight[chunk]
                if with_grad:
                    loss, grad[chunk] = loss_and_grad_kernel(*operands, factor[chunk])
                else:
                    loss = loss_kernel(*operands)
                total += loss
        if with_grad:
            ctx.save_for_backward(grad.view(B, num_heads, T, -1).transpose(1, 2).reshape(B, T, H))
            ctx.dtype = student.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return (grad * grad_total.float()).to(ctx.dtype), None, None, None, None, None


def minilm_relation_loss(student_qkv, teacher_qkv, attention_mask: torch.Tensor, num_relation_heads: int = 32,
                         aux_loss: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MiniLMv2 loss: mean over Q-Q, K-K, V-V of KL(teacher relation || student relation).

    student_qkv / teacher_qkv: (q, k, v), each (B, T, Hs) / (B, T, Ht); hidden sizes may differ (the
    relations are T x T). attention_mask (B, T), 1 = real token. The KL of each real query row (over real
    keys) is averaged over rows, relation heads and the batch; padded rows and keys count for nothing."""
    mask = attention_mask.bool()
    R = num_relation_heads
    # The padding mask as an additive key bias with a finite fill (not -inf): exp() gives 0 and inf - inf = NaN
    # never happens. The bf16 min is exact in fp32, TF32 and bf16, so a product run in TF32 cannot round it to
    # -inf (the fp32 min would). And a weight per (example, head) query row.
    key_bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    key_bias = key_bias.masked_fill_(~mask, torch.finfo(torch.bfloat16).min)[:, None, :]  # (B, 1, T)
    row_weight = mask.float().repeat_interleave(R, 0)  # (B * R, T)
    denominator = mask.sum() * R
    parts = {}
    for name, s, t in zip(("qq", "kk", "vv"), student_qkv, teacher_qkv):
        with_grad = torch.is_grad_enabled() and s.requires_grad
        parts[name] = _RelationKL.apply(s, t.detach(), key_bias, row_weight, R, with_grad) / denominator
    loss = (parts["qq"] + parts["kk"] + parts["vv"]) / 3
    return _with_aux(loss, {k: v.detach() for k, v in parts.items()}, aux_loss)


def attention_scores(q: torch.Tensor, k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Unnormalised attention scores q_h k_h^T / sqrt(d_h): (B, T, H) x2 -> (B, nh, T, T), fp32."""
    qh, kh = _split_heads(q, num_heads), _split_heads(k, num_heads)
    return qh @ kh.transpose(-1, -2) / math.sqrt(qh.size(-1))


TINYBERT_MAPPINGS = ("uniform", "top", "bottom")


def tinybert_layer_map(student_layers: int, teacher_layers: int, mapping: str = "uniform") -> list[int]:
    """TinyBERT's layer mapping n = g(m) for m = 0 .. M (Jiao et al. 2020, Sec. 3.1 and its Table 7), in
    hidden_states numbering (0: the embeddings' output, m: layer m's output); g(0) = 0 always (the embedding loss).
    uniform: g(m) = m N / M, rounded down where N / M is not whole (TinyBERT's code asserts that it is; 6 -> 4:
    0, 1, 3, 4, 6), so g(M) = N; top: g(m) = N - M + m; bottom: g(m) = m."""
    M, N = student_layers, teacher_layers
    if not 1 <= M <= N:
        raise ValueError(f"TinyBERT maps each of the student's {M} layers to its own teacher layer: it needs "
                         f"1 <= student layers <= the teacher's {N}")
    if mapping not in TINYBERT_MAPPINGS:
        raise ValueError(f"TinyBERT layer mapping must be one of {', '.join(TINYBERT_MAPPINGS)} (got {mapping!r})")
    layer = {"uniform": lambda m: m * N // M, "top": lambda m: N - M + m, "bottom": lambda m: m}[mapping]
    return [0] + [layer(m) for m in range(1, M + 1)]


def _masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over the entries where `mask` (bool, broadcast to the inputs' shape along its size-1
    dims) is True, fp32. Weighted, not gathered: a boolean gather of (B, nh, T, T) scores is slower on CPUs."""
    squared = (student.float() - teacher.float()).square()
    return (squared * mask).sum() / (mask.sum() * (squared.numel() // mask.numel()))


def tinybert_loss(student_scores: Sequence[torch.Tensor], teacher_scores: Sequence[torch.Tensor],
                  student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                  projection: nn.Linear, attention_mask: torch.Tensor,
                  aux_loss: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TinyBERT's general-distillation loss over M mapped layer pairs (Jiao et al. 2020, Eq. 7-11, all lambda 1):
    embedding = MSE(E_s W_h, E_t) (Eq. 9), attention = sum_m MSE(A_s^m, A_t^g(m)) (Eq. 7), hidden = sum_m
    MSE(H_s^m W_h, H_t^g(m)) (Eq. 8); loss = their sum, as TinyBERT's general_distill.py adds them.

    scores: M tensors (B, nh, T, T) each side, pre-softmax, the same head count on both; hidden: M + 1 tensors,
    (B, T, Hs) / (B, T, Ht), the embeddings' outputs first; projection: W_h, nn.Linear(Hs, Ht), one for every layer
    as TinyBERT's `fit_dense`, trained with the student. Each MSE is a mean over real entries only: (query, key)
    pairs of two real tokens, real tokens x Ht (TinyBERT zeroes masked scores, keeps padded rows and counts all)."""
    if len(student_hidden) != len(student_scores) + 1 or len(teacher_hidden) != len(teacher_scores) + 1:
        raise ValueError("TinyBERT's loss takes M attention scores and M + 1 hidden states (the embeddings' first)")
    mask = attention_mask.bool()
    pair = mask[:, None, :, None] & mask[:, None, None, :]  # (B, 1, T, T)
    for s, t in zip(student_scores, teacher_scores, strict=True):
        if s.shape != t.shape:
            raise ValueError(f"attention scores differ in shape: student {tuple(s.shape)}, teacher {tuple(t.shape)} "
                             "(TinyBERT needs equal head counts)")
    attention = torch.stack([_masked_mse(s, t, pair) for s, t in zip(student_scores, teacher_scores)]).sum()
    bias = None if projection.bias is None else projection.bias.float()  # fp32 even when the engine runs bf16
    weight = projection.weight.float()
    hidden = [_masked_mse(F.linear(s.float(), weight, bias), t, mask[..., None])  # (B, T, Ht) each
              for s, t in zip(student_hidden, teacher_hidden, strict=True)]
    embedding, layers = hidden[0], torch.stack(hidden[1:]).sum()
    parts = {"embedding": embedding.detach(), "attention": attention.detach(), "hidden": layers.detach()}
    return _with_aux(embedding + attention + layers, parts, aux_loss)


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


def patient_loss(student_cls: torch.Tensor, teacher_cls: torch.Tensor) -> torch.Tensor:
    """PKD's patient loss L_PT (Sun et al. 2019, Sec. 3.2) on the [CLS] states of M mapped layer pairs.

    student_cls / teacher_cls (B, M, H), each state L2-normalised, then the squared differences averaged over
    the batch, the pairs and the H units, as the authors' code does (F.mse_loss): the paper's per-example sum over
    pairs of squared distances, divided by M x H. Their beta grid (10 to 1000) was tuned on this scale."""
    s, t = F.normalize(student_cls.float(), dim=-1), F.normalize(teacher_cls.float(), dim=-1)
    return F.mse_loss(s, t)


def symmetric_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """MoEBERT's prediction loss (SimiaoZuo/MoEBERT, modeling_bert_moe.py: symmetric_KL_loss(p, q) / batch size):
    1/2 (KL(p || q) + KL(q || p)) = 1/2 sum_c (p_c - q_c)(log p_c - log q_c), summed over classes, averaged over
    the N rows; p, q the softmax of the logits (N, C) at temperature 1. For regression (C == 1) the MSE of the
    outputs, as theirs."""
    s, t = student_logits.float(), teacher_logits.float()
    if s.size(-1) == 1:
        return F.mse_loss(s, t)
    log_p, log_q = F.log_softmax(s, -1), F.log_softmax(t, -1)  # their log(softmax), without its log(0) = -inf
    return 0.5 * ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum() / s.size(0)


def moebert_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                 student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 attention_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MoEBERT's distillation term (SimiaoZuo/MoEBERT, modeling_bert_moe.py get_distillation_loss): hidden = sum over
    the paired states (B, T, H) of their MSE, prediction = symmetric_kl_loss; -> (hidden + prediction, parts).

    Each MSE is a mean over real tokens x H (theirs, `MSELoss()`, over every entry of batches padded to 128: padding
    counted; ours are padded to their longest example, so counting padding would rescale the loss per batch)."""
    mask = attention_mask.bool()[..., None]
    hidden = torch.stack([_masked_mse(s, t, mask) for s, t in zip(student_hidden, teacher_hidden, strict=True)]).sum()
    prediction = symmetric_kl_loss(student_logits, teacher_logits)
    parts = {"hidden": hidden.detach(), "prediction": prediction.detach()}
    return hidden + prediction, parts
