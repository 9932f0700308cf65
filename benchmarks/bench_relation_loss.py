"""MiniLMv2 relation loss, forward + backward: the memory-flat autograd.Function vs the previous implementation.

    python benchmarks/bench_relation_loss.py [--batch 32] [--seq 128] [--heads 32] [--hidden 384 384]
        [--memory-batch 32] [--memory-seq 512] [--rounds 5] [--variants old new ...]

Variants: `old` is the implementation before the autograd.Function, kept here only as the baseline (every
relation's (B, R, T, T) log-probabilities, probabilities and differences in the autograd graph);
`new+compile` is pipeline.objectives.minilm_relation_loss as shipped (torch.compile'd chunk kernels, the chunk
loop eager), `new` the same with its chunk kernels run eagerly, `old+compile` torch.compile of the whole old
loss. Time: best of --rounds (and the median) after a warm-up (the compile), variants interleaved round by round in one
process, three relations, student width --hidden[0], teacher --hidden[1], the last example padded from 3/4
of its length. Memory: the peak RSS growth of one forward + backward at --memory-batch x --memory-seq, each
variant in a fresh subprocess, after a warm-up (VmHWM reset through /proc/self/clear_refs; glibc's mmap
threshold fixed at 1 MiB so that freed buffers go back to the system and the warm-up's do not hide the
measured call's). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pipeline.objectives as objectives  # noqa: E402

VARIANTS = ("old", "old+compile", "new", "new+compile")


def old_relation_log_probs(x: torch.Tensor, key_mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, T, H = x.shape
    heads = x.float().view(B, T, num_heads, H // num_heads).transpose(1, 2)
    scores = heads @ heads.transpose(-1, -2) / math.sqrt(heads.size(-1))
    scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(torch.float32).min)
    return F.log_softmax(scores, dim=-1)


def old_relation_loss(student_qkv, teacher_qkv, attention_mask, num_relation_heads):
    """The baseline: pipeline.objectives.minilm_relation_loss as it was before the autograd.Function."""
    mask = attention_mask.bool()
    real_rows = mask[:, None, :].float()  # (B, 1, T)
    denominator = real_rows.sum() * num_relation_heads
    parts = {}
    for name, s, t in zip(("qq", "kk", "vv"), student_qkv, teacher_qkv):
        log_s = old_relation_log_probs(s, mask, num_relation_heads)
        log_t = old_relation_log_probs(t, mask, num_relation_heads)
        kl_rows = (log_t.exp() * (log_t - log_s)).sum(-1)  # (B, R, T)
        parts[name] = (kl_rows * real_rows).sum() / denominator
    return (parts["qq"] + parts["kk"] + parts["vv"]) / 3


def new_relation_loss(student_qkv, teacher_qkv, attention_mask, num_relation_heads):
    return objectives.minilm_relation_loss(student_qkv, teacher_qkv, attention_mask, num_relation_heads)[0]


class Variant:
    """A loss, and the chunk kernels pipeline.objectives uses while it runs (forward and backward)."""

    def __init__(self, name: str):
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        self.loss = old_relation_loss if name.startswith("old") else new_relation_loss
        if name == "old+compile":
            self.loss = torch.compile(old_relation_loss)
        self.eager = name == "new"

    def step(self, student, teacher, mask, heads) -> float:
        """One forward + backward; returns the loss."""
        for x in student:
            x.grad = None
        shipped = objectives._kernels
        if self.eager:
            objectives._kernels = lambda: (objectives._chunk_loss, objectives._chunk_loss_and_grad)
        try:
            loss = self.loss(student, teacher, mask, heads)
            loss.backward()
        finally:
            objectives._kernels = shipped
        return loss.item()


def inputs(batch: int, seq: int, hidden: tuple[int, int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq * 3 // 4:] = 0
    student = tuple(torch.randn(batch, seq, hidden[0], generator=g).requires_grad_() for _ in range(3))
    teacher = tuple(torch.randn(batch, seq, hidden[1], generator=g) * 2 for _ in range(3))
    return student, teacher, mask


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def memory_child(args) -> None:
    """In a fresh process: warm up, reset the peak RSS, one forward + backward; print the growth as JSON."""
    variant = Variant(args.child)
    student, teacher, mask = inputs(args.memory_batch, args.memory_seq, tuple(args.hidden))
    variant.step(student, teacher, mask, args.heads)  # the compile, the first-call allocations
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_mib("VmRSS")
    loss = variant.step(student, teacher, mask, args.heads)
    print(json.dumps({"peak_mib": _status_mib("VmHWM") - before, "loss": loss}))


def _available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return math.inf


def measure_memory(args, name: str) -> dict | None:
    """The child's figures, or None when the old graph would not fit in the memory available now (it holds
    about 9 fp32 (B, R, T, T) tensors at its peak, measured; a shared machine should not be pushed to OOM)."""
    if name.startswith("old"):
        need = 9 * 4 * args.memory_batch * args.heads * args.memory_seq**2 / 2**20
        if need > 0.8 * _available_mib():
            print(f"  {name}: memory run skipped, needs about {need:,.0f} MiB, {_available_mib():,.0f} available")
            return None
    cmd = [sys.executable, __file__, "--child", name, "--heads", str(args.heads), "--hidden", *map(str, args.hidden),
           "--memory-batch", str(args.memory_batch), "--memory-seq", str(args.memory_seq)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="timed batch size (default 32)")
    parser.add_argument("--seq", type=int, default=128, help="timed sequence length (default 128)")
    parser.add_argument("--heads", type=int, default=32, help="relation heads R (default 32)")
    parser.add_argument("--hidden", type=int, nargs=2, default=(384, 384), metavar=("STUDENT", "TEACHER"),
                        help="hidden widths of the student's and the teacher's Q/K/V (default 384 384)")
    parser.add_argument("--memory-batch", type=int, default=32, help="batch size of the memory runs (default 32)")
    parser.add_argument("--memory-seq", type=int, default=512, help="sequence length of the memory runs (default 512)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per variant (default 5)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="default: all")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return memory_child(args)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; time: B={args.batch} T={args.seq} "
          f"R={args.heads} hidden {args.hidden[0]}/{args.hidden[1]}; memory: B={args.memory_batch} T={args.memory_seq}")
    student, teacher, mask = inputs(args.batch, args.seq, tuple(args.hidden))
    variants, times = {}, {name: [] for name in args.variants}
    for name in args.variants:  # warm-up (and compile) in the order given
        t0 = time.perf_counter()
        variants[name] = Variant(name)
        loss = variants[name].step(student, teacher, mask, args.heads)
        print(f"  {name}: first call {time.perf_counter() - t0:.1f} s, loss {loss:.6f}", flush=True)
    for _ in range(args.rounds):
        for name in args.variants:
            t0 = time.perf_counter()
            variants[name].step(student, teacher, mask, args.heads)
            times[name].append(time.perf_counter() - t0)
    # Best of the rounds: on a shared machine the other processes only ever add time (the median is printed too).
    ms = {name: 1e3 * min(times[name]) for name in args.variants}
    median = {name: 1e3 * statistics.median(times[name]) for name in args.variants}
    memory = {name: None if args.no_memory else measure_memory(args, name) for name in args.variants}

    base = args.variants[0]
    print(f"\n| variant | fwd+bwd ms, best (median), B={args.batch} T={args.seq} | speed vs {base} | "
          f"peak MiB, B={args.memory_batch} T={args.memory_seq} | {base} / variant |")
    print("|---|---:|---:|---:|---:|")
    for name in args.variants:
        peak, ratio = memory[name] and memory[name]["peak_mib"], ""
        if peak and memory[base]:
            ratio = f"{memory[base]['peak_mib'] / peak:.1f}"
        peak = f"{peak:,.0f}" if peak else ""
        print(f"| {name} | {ms[name]:,.0f} ({median[name]:,.0f}) | {ms[base] / ms[name]:.2f}x | {peak} | {ratio} |")


if __name__ == "__main__":
    main()
