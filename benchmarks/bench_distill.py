"""Distillation throughput (tokens/s, real tokens) with the packaged teacher on real shards.

1. In one process, alternating rounds on the same batches: MiniMoE 3L;384H vs MiniLM 3L;384H, each on
   the DeepSpeed engine (pipeline.distill.train_step, ZeRO-2 fp32) and in a plain PyTorch loop doing
   the same math (teacher, student, relation loss, AdamW, clipping, schedule); the teacher's share of
   the plain loop's step time.
2. Through ./launch.sh: MiniMoE 3L;384H on 1 process, 2 processes and 2 processes with ep_size 2
   (tokens/s of the second half of the run, from metrics.jsonl).

usage: python benchmarks/bench_distill.py --shards DIR [--teacher DIR] [--steps 10] [--rounds 3] [--part ...]
Prints a markdown table; the ratios are the figures to read on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import distill  # noqa: E402
from pipeline.data import ShardDataset, ShardLoader  # noqa: E402
from pipeline.optim import LinearSchedule, build_engine  # noqa: E402


def synchronize() -> None:
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EngineRun:
    """The engine path of pipeline.distill for one student, in this (single-rank) process."""

    def __init__(self, cfg: distill.DistillConfig, teacher, shards: ShardDataset):
        self.cfg, self.teacher = cfg, teacher
        student = distill.build_student(distill.student_config(cfg, teacher.tokenizer), cfg.seed)
        self.engine = build_engine(student, distill.deepspeed_config(cfg, 1), cfg.lr, cfg.weight_decay,
                                   LinearSchedule(0, 10**6), eps=1e-6)
        self.router = distill.RouterStats(self.engine.module, self.engine.device)
        self.loader = ShardLoader(shards, cfg.micro_batch_size, 0, 1, cfg.seed)

    def steps(self, n: int) -> tuple[float, float, float]:
        """-> (tokens, seconds, teacher seconds: not measured here)."""
        start, tokens = time.perf_counter(), 0.0
        for _ in range(n):
            tokens += float(distill.train_step(self.engine, self.teacher, self.loader, self.cfg, self.router)["tokens"])
        return tokens, time.perf_counter() - start, float("nan")


class PlainRun:
    """The same math without DeepSpeed: one process, torch AdamW, clip_grad_norm_, LambdaLR."""

    def __init__(self, cfg: distill.DistillConfig, teacher, shards: ShardDataset):
        self.cfg, self.teacher = cfg, teacher
        self.device = next(teacher.parameters()).device
        student = distill.build_student(distill.student_config(cfg, teacher.tokenizer), cfg.seed)
        self.student = student.to(self.device).train()
        decay = [p for p in self.student.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.student.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, eps=1e-6, fused=True)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, LinearSchedule(0, 10**6).factor)
        self.loader = ShardLoader(shards, cfg.micro_batch_size, 0, 1, cfg.seed)

    def steps(self, n: int) -> tuple[float, float, float]:
        from pipeline.objectives import minilm_relation_loss

        start, tokens, in_teacher = time.perf_counter(), 0.0, 0.0
        for _ in range(n):
            batch = {k: v.to(self.device) for k, v in self.loader.next_batch().items()}
            synchronize()
            t0 = time.perf_counter()
            teacher_qkv = self.teacher(**batch)
            synchronize()
            in_teacher += time.perf_counter() - t0
            out = self.student(**batch)
            loss, _ = minilm_relation_loss(out.relation_qkv, teacher_qkv, batch["attention_mask"], self.cfg.relation_heads,
                                           aux_loss=out.aux_loss)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.max_grad_norm)
            self.optimizer.step()
            self.schedule.step()
            self.optimizer.zero_grad(set_to_none=True)
            tokens += float(batch["attention_mask"].sum())  # (a device sync, as the engine's all-reduce)
        return tokens, time.perf_counter() - start, in_teacher


def in_process(args) -> dict[str, dict[str, float]]:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from pipeline.models.teacher import Teacher

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    teacher = Teacher.from_pretrained(args.teacher).to(get_accelerator().current_device_name())
    shards = ShardDataset(args.shards)
    runs = {}
    for name, experts in (("MiniLM 3L;384H", 1), ("MiniMoE 3L;384H", 4)):
        cfg = distill.DistillConfig(teacher=args.teacher, shards=args.shards, student="3L384H", experts=experts,
                                    micro_batch_size=args.micro_batch_size,
                                    global_batch_size=args.micro_batch_size, max_steps=1,
                                    deepspeed_config=args.deepspeed_config)
        runs[f"{name} engine"] = EngineRun(cfg, teacher, shards)
        runs[f"{name} plain"] = PlainRun(cfg, teacher, shards)
    totals = {name: [0.0, 0.0, 0.0] for name in runs}
    for name, run in runs.items():
        run.steps(args.warmup_steps)
    for round_index in range(args.rounds):  # alternate, so that load changes hit every variant alike
        for name, run in runs.items():
            measured = run.steps(args.steps)
            totals[name] = [a + b for a, b in zip(totals[name], measured)]
            print(f"round {round_index}: {name}: {measured[0] / measured[1]:.0f} tokens/s", file=sys.stderr)
    return {name: {"tokens_per_s": t / s, "teacher_share": tt / s} for name, (t, s, tt) in totals.items()}


def launched(args, procs: int, ep_size: int) -> float:
    """tokens/s of MiniMoE 3L;384H through ./launch.sh, mean of the second half of the run's records."""
    with tempfile.TemporaryDirectory() as out:
        steps = args.warmup_steps + args.steps * args.rounds
        cmd = ["bash", str(REPO / "launch.sh"), "distill", "--num-procs", str(procs), "--master-port", str(free_port()),
               "--teacher", args.teacher, "--shards", args.shards, "--student", "3L384H", "--experts", "4",
               "--ep-size", str(ep_size), "--micro-batch-size", str(args.micro_batch_size),
               "--global-batch-size", str(args.micro_batch_size * procs), "--max-steps", str(steps),
               "--log-every", "1", "--save-every", str(10**9), "--output", out]
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHON": sys.executable}, stdout=subprocess.DEVNULL)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        tail = records[len(records) // 2:]
        return sum(r["tokens_per_s"] for r in tail) / len(tail)


def main() -> None:
    from minimoe_common.tokenizer import packaged_teacher_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="shard dir built with the teacher's tokenizer")
    parser.add_argument("--teacher", default=str(packaged_teacher_dir()), help="teacher dir (default: the packaged one)")
    parser.add_argument("--micro-batch-size", type=int, default=32, help="samples per step (default: 32)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round (default: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: 3)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (default: 2)")
    parser.add_argument("--deepspeed-config", default=distill.DistillConfig.deepspeed_config,
                        help="DeepSpeed config of the engine runs (default: %(default)s)")
    parser.add_argument("--part", choices=("all", "in-process", "launcher"), default="all",
                        help="which comparison to run (default: all)")
    args = parser.parse_args()
    if args.part != "launcher":
        print_in_process(in_process(args))
    if args.part != "in-process":
        one = launched(args, 1, 1)
        print(f"\n| launched MiniMoE 3L;384H | tokens/s | vs 1 process |\n|---|---|---|\n| 1 process | {one:.0f} | 1.00 |")
        for procs, ep in ((2, 1), (2, 2)):
            rate = launched(args, procs, ep)
            print(f"| {procs} processes, ep_size {ep} | {rate:.0f} | {rate / one:.2f} |")


def print_in_process(results: dict[str, dict[str, float]]) -> None:
    moe, dense = results["MiniMoE 3L;384H engine"], results["MiniLM 3L;384H engine"]
    print("| run | tokens/s | ratio | teacher share of step time |\n|---|---|---|---|")
    for name, r in results.items():
        plain = results[name.replace("engine", "plain")]
        share = "-" if r["teacher_share"] != r["teacher_share"] else f"{r['teacher_share']:.0%}"  # NaN: not measured
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / plain['tokens_per_s']:.2f} of plain | {share} |")
    print(f"\nMiniMoE / MiniLM (engine): {moe['tokens_per_s'] / dense['tokens_per_s']:.2f} (target >= 0.85)")


if __name__ == "__main__":
    main()
