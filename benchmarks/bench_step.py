"""One distillation step, taken apart: where the time goes and how close it comes to the machine's matmul rate.

    python benchmarks/bench_step.py [--shards DIR] [--experts 4] [--micro-batch-size 32] [--steps 6]

In one process, the same threads: the distillation step of pipeline.distill (packaged teacher, MiniMoE 3L;384H by
default, relation loss, AdamW) in a plain loop timed piece by piece (teacher forward, student forward, relation loss
forward, the loss's backward down to the student's Q/K/V, the student's backward, optimizer), with the shipped
relation loss and with the previous one (benchmarks/bench_relation_loss.py's baseline), the two alternating step by
step, and the fp32 rate of a 2048 x 2048 torch.mm measured before each round. Useful FLOPs are counted, not
measured: the teacher's forward up to the distilled layer's Q/K/V, the student's forward (one expert per token) and
backward (2x the forward), the relation products (student and teacher scores, and the two products of the
student's gradient). Prints a Markdown table; without --shards the bundled Wikipedia sample is built into a
temporary dir first.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_relation_loss import old_relation_loss  # noqa: E402
from minimoe_common.tokenizer import packaged_teacher_dir  # noqa: E402
from pipeline import distill  # noqa: E402
from pipeline.data import ShardDataset, ShardLoader  # noqa: E402
from pipeline.models.teacher import Teacher  # noqa: E402
from pipeline.objectives import minilm_relation_loss  # noqa: E402

PARTS = ("teacher", "student forward", "loss forward", "loss backward", "student backward", "optimizer")


def matmul_rate(size: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * size**3 * reps / (time.perf_counter() - start)


def layer_flops(tokens: int, batch: int, length: int, hidden: int, inner: int) -> int:
    """Forward FLOPs of one post-LN BERT layer (projections, FFN, the two attention products)."""
    return 2 * tokens * (4 * hidden * hidden + 2 * hidden * inner) + 2 * 2 * batch * length * length * hidden


def step_flops(batch: dict, teacher: Teacher, student) -> int:
    B, T = batch["input_ids"].shape
    N = B * T  # padded tokens: what the step computes
    tc, sc = teacher.model.config, student.config
    t_hidden, t_inner = tc.hidden_size, tc.intermediate_size
    # The layers before the distilled one, then that layer's Q/K/V projections (the teacher stops there).
    teacher_fwd = teacher.layer * layer_flops(N, B, T, t_hidden, t_inner) + 2 * N * 3 * t_hidden * t_hidden
    student_fwd = sc.num_layers * layer_flops(N, B, T, sc.hidden_size, sc.intermediate_size)
    if sc.relation_projection:
        student_fwd += 2 * N * 3 * sc.hidden_size * sc.hidden_size
    relations = 3 * (2 * B * T * T * (sc.hidden_size + t_hidden) + 2 * 2 * B * T * T * sc.hidden_size)
    return teacher_fwd + 3 * student_fwd + relations


class TimedRun:
    """One student trained with one relation loss; `step()` times one distillation step piece by piece."""

    def __init__(self, cfg, teacher, shards, loss_fn):
        self.cfg, self.teacher, self.loss_fn = cfg, teacher, loss_fn
        self.student = distill.build_student(distill.student_config(cfg, teacher.tokenizer), cfg.seed).train()
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr, eps=1e-6, fused=True)
        self.loader = ShardLoader(shards, cfg.micro_batch_size, 0, 1, cfg.seed)
        self.seconds, self.tokens, self.flops = dict.fromkeys(PARTS, 0.0), 0.0, 0.0

    def step(self, timed: bool = True) -> None:
        batch = self.loader.next_batch()
        marks = [time.perf_counter()]
        with torch.no_grad():
            teacher_qkv = self.teacher(**batch)
        marks.append(time.perf_counter())
        out = self.student(**batch)
        marks.append(time.perf_counter())
        loss = self.loss_fn(out.relation_qkv, teacher_qkv, batch["attention_mask"], self.cfg.relation_heads)
        marks.append(time.perf_counter())
        # The same backward as loss.backward(), in two parts: the loss's, down to the student's Q/K/V; the student's.
        qkv_grads = torch.autograd.grad(loss, out.relation_qkv)
        marks.append(time.perf_counter())
        roots, grads = list(out.relation_qkv), list(qkv_grads)
        if out.aux_loss.requires_grad:  # MoE: the balance loss's gradient joins there
            roots.append(out.aux_loss)
            grads.append(torch.ones_like(out.aux_loss))
        torch.autograd.backward(roots, grads)
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        if timed:
            for part, begin, end in zip(PARTS, marks, marks[1:]):
                self.seconds[part] += end - begin
            self.tokens += float(batch["attention_mask"].sum())
            self.flops += step_flops(batch, self.teacher, self.student)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", help="a shard dir built with the packaged teacher's tokenizer (default: build "
                                         "examples/data/wiki_sample into a temporary dir)")
    parser.add_argument("--experts", type=int, default=4, help="experts per FFN (1 = MiniLM; default 4 = MiniMoE)")
    parser.add_argument("--micro-batch-size", type=int, default=32, help="sequences per step (default 32)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant, after one warm-up step")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or f"{tmp}/shards"
        if not args.shards:
            subprocess.run([sys.executable, "-m", "data_prep", "build", "--input", str(REPO / "examples/data/wiki_sample"),
                            "--output", shards], check=True, capture_output=True, cwd=REPO)
        teacher = Teacher.from_pretrained(str(packaged_teacher_dir()))
        dataset = ShardDataset(shards)
        cfg = distill.DistillConfig(teacher=str(packaged_teacher_dir()), shards=shards, experts=args.experts,
                                    micro_batch_size=args.micro_batch_size, global_batch_size=args.micro_batch_size)
        losses = {"relation loss as shipped": lambda s, t, m, r: minilm_relation_loss(s, t, m, r)[0],
                  "previous relation loss": old_relation_loss}
        runs = {name: TimedRun(cfg, teacher, dataset, fn) for name, fn in losses.items()}
        for run in runs.values():
            run.step(timed=False)  # warms up (and compiles the shipped loss's kernels)
        rates = []
        for _ in range(args.steps):  # alternating, so that changes in the machine's load hit both alike
            rates.append(matmul_rate())
            for run in runs.values():
                run.step()
        rate = sum(rates) / len(rates)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"{torch.get_num_threads()} threads; fp32 torch.mm 2048^2: {rate / 1e9:.0f} GFLOP/s (mean of one "
          f"measurement before each round: {min(rates) / 1e9:.0f}-{max(rates) / 1e9:.0f}); MiniMoE 3L;384H x"
          f"{args.experts} experts, micro batch {args.micro_batch_size} of {args.shards or 'the bundled sample'}; peak RSS {peak:,.0f} MiB")
    print()
    print("| step | s/step | tokens/s | GFLOP/s counted | / matmul rate | " + " | ".join(PARTS) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(PARTS))
    base = None
    for name, run in runs.items():
        seconds, tokens, flops = run.seconds, run.tokens, run.flops
        total = sum(seconds.values())
        base = base or tokens / total
        shares = " | ".join(f"{seconds[p] / total:.0%}" for p in PARTS)
        print(f"| {name} | {total / args.steps:.2f} | {tokens / total:,.0f} ({tokens / total / base:.2f}x) | "
              f"{flops / total / 1e9:.1f} | {flops / total / rate:.2f} | {shares} |")


if __name__ == "__main__":
    main()
