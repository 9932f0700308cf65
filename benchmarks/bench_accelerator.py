"""Distillation on an accelerator: sequences/s, MFU, memory, and the bf16 loss against the fp32 one.

    python benchmarks/bench_accelerator.py [--teacher DIR | --tokenizer DIR] [--shards DIR ...] [--seq-lens 128 512]
        [--micro-batch-sizes 256 64] [--student 6L384H] [--experts 4] [--steps 20] [--peak-tflops F]
        [--deepspeed-config ds_configs/zero2-bf16.json]

The step of `minimoe-distill` (pipeline.distill.train_step on the DeepSpeed engine, one rank) for each shard dir
(--shards; by default the bundled Wikipedia sample built at each --seq-lens). The teacher: --teacher, or by
default a BERT-base-shaped BertModel (12L;768H, 12 heads, 3072 inner) with random weights and --tokenizer's
vocabulary (speed does not depend on the weights). Useful FLOPs are counted as in bench_step.py (teacher forward to
the distilled layer, student forward + backward, relation products; padded tokens) and divided by the step time
and the device's dense bf16 peak (--peak-tflops; known for H100/H200/A100, else the measured fp32 2048^2 matmul
rate, e.g. on a CPU). Then, on one batch of each length, the relation loss of the same weights in bf16 and in fp32
(dropout off): both must be finite, and their relative difference is printed. Prints Markdown.

The GPU check of issue 13 runs this through benchmarks/gpu.sh.
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_step import matmul_rate, step_flops  # noqa: E402
from minimoe_common.tokenizer import load_tokenizer, packaged_teacher_dir  # noqa: E402
from pipeline import distill  # noqa: E402
from pipeline.data import ShardDataset, ShardLoader  # noqa: E402
from pipeline.objectives import minilm_relation_loss  # noqa: E402
from pipeline.optim import LinearSchedule, build_engine, init_distributed, init_single_process  # noqa: E402

# Dense bf16 peaks (NVIDIA's datasheets, SXM parts, without sparsity), TFLOP/s.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def random_bert_base(tokenizer_dir: str, out: Path) -> str:
    """A BERT-base-shaped teacher dir with random weights and the tokenizer of `tokenizer_dir`."""
    from transformers import BertConfig, BertModel

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def build_shards(length: int, tokenizer: str, out: Path) -> str:
    """The bundled Wikipedia sample as shards of `length` tokens at most."""
    subprocess.run([sys.executable, "-m", "data_prep", "build", "--input", str(REPO / "examples/data/wiki_sample"),
                    "--output", str(out), "--max-seq-length", str(length), "--tokenizer", tokenizer],
                   check=True, capture_output=True, cwd=REPO)
    return str(out)


def peak_flops(args) -> tuple[float, str]:
    if args.peak_tflops:
        return args.peak_tflops * 1e12, f"--peak-tflops {args.peak_tflops}"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for part, tflops in BF16_PEAK_TFLOPS.items():
            if part in name:
                return tflops * 1e12, f"{name}: dense bf16 peak {tflops} TFLOP/s"
        raise SystemExit(f"error: no known bf16 peak for {name}; pass --peak-tflops")
    rate = matmul_rate()
    return rate, f"measured fp32 2048^2 torch.mm: {rate / 1e12:.3f} TFLOP/s"


def throughput(cfg: distill.DistillConfig, teacher, steps: int, warmup: int) -> dict[str, float]:
    """Time `steps` engine steps after `warmup` ones -> sequences/s, tokens/s, counted FLOP/s, peak memory."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    shards = ShardDataset(cfg.shards)
    student = distill.build_student(distill.student_config(cfg, teacher.tokenizer), cfg.seed)
    engine = build_engine(student, distill.deepspeed_config(cfg, 1), cfg.lr, cfg.weight_decay,
                          LinearSchedule(0, 10**6), eps=1e-6)
    router = distill.RouterStats(engine.module, engine.device)
    loader = ShardLoader(shards, cfg.micro_batch_size, 0, 1, cfg.seed)
    batches, next_batch = [], loader.next_batch

    def kept_batch() -> dict[str, torch.Tensor]:  # each timed batch is kept for its FLOPs
        batches.append(next_batch())
        return batches[-1]

    for _ in range(warmup):
        distill.train_step(engine, teacher, loader, cfg, router)
    accelerator.synchronize()
    accelerator.reset_peak_memory_stats()
    loader.next_batch = kept_batch
    start, tokens, loss = time.perf_counter(), 0.0, 0.0
    for _ in range(steps):
        stats = distill.train_step(engine, teacher, loader, cfg, router)
        tokens += float(stats["tokens"])
        loss = float(stats["parts"][0])
    accelerator.synchronize()
    seconds = time.perf_counter() - start
    flops = sum(step_flops(batch, teacher, engine.module) for batch in batches)
    return {"sequences_per_s": len(batches) * cfg.micro_batch_size / seconds, "tokens_per_s": tokens / seconds,
            "flops_per_s": flops / seconds, "memory_gib": accelerator.max_memory_allocated() / 2**30, "loss": loss}


def loss_in(dtype: torch.dtype, cfg: distill.DistillConfig, batch: dict[str, torch.Tensor], device) -> float:
    """The relation loss of the seeded student and the teacher, both in `dtype`, dropout off."""
    teacher = distill.load_teacher(cfg, dtype).to(device)
    student = distill.build_student(distill.student_config(cfg, teacher.tokenizer), cfg.seed).to(device, dtype).eval()
    with torch.no_grad():
        out = student(**batch)
        loss, _ = minilm_relation_loss(out.relation_qkv, teacher(**batch), batch["attention_mask"], cfg.relation_heads)
    return float(loss)


def main() -> None:
    from deepspeed.accelerator import get_accelerator

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="teacher dir (default: a random BERT-base-shaped BertModel, built here)")
    parser.add_argument("--tokenizer", default=str(packaged_teacher_dir()),
                        help="the random teacher's tokenizer dir (default: the packaged teacher's)")
    parser.add_argument("--shards", nargs="+", help="shard dirs built with the teacher's tokenizer, one per timed run "
                                                    "(default: the bundled sample built at each --seq-lens)")
    parser.add_argument("--student", default="6L384H", help="student preset (default 6L384H)")
    parser.add_argument("--experts", type=int, default=4, help="experts per FFN (default 4: MiniMoE; 1: MiniLM)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512],
                        help="sample lengths of the default shards (default 128 512)")
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[256, 64],
                        help="sequences per step, one per shard dir or --seq-lens value (default 256 64)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per length (default 20)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--deepspeed-config", default=str(REPO / "ds_configs/zero2-bf16.json"),
                        help="DeepSpeed config of the timed runs (default ds_configs/zero2-bf16.json)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak for the MFU (default: known GPUs' "
                                                          "bf16 peak; on a CPU the measured fp32 matmul rate)")
    args = parser.parse_args()
    if len(args.micro_batch_sizes) != len(args.shards or args.seq_lens):
        parser.error("give one --micro-batch-sizes value per shard dir (--shards) or --seq-lens value")

    init_single_process()
    init_distributed()
    device = get_accelerator().current_device_name()
    peak, peak_source = peak_flops(args)
    rows, checks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir = args.teacher or random_bert_base(args.tokenizer, Path(tmp) / "teacher")
        shard_dirs = args.shards or [build_shards(n, teacher_dir, Path(tmp) / f"shards{n}") for n in args.seq_lens]
        for shards, batch_size in zip(shard_dirs, args.micro_batch_sizes):
            cfg = distill.DistillConfig(teacher=teacher_dir, shards=shards, student=args.student, experts=args.experts,
                                        micro_batch_size=batch_size, global_batch_size=batch_size,
                                        deepspeed_config=args.deepspeed_config)
            length = ShardDataset(shards).manifest["max_seq_length"]
            dtype = distill.compute_dtype(distill.deepspeed_config(cfg, 1))
            teacher = distill.load_teacher(cfg, dtype).to(device)
            rows.append((length, batch_size, throughput(cfg, teacher, args.steps, args.warmup_steps)))
            del teacher
            batch = {k: v.to(device) for k, v in ShardLoader(ShardDataset(cfg.shards), 8, 0, 1, 0).next_batch().items()}
            checks.append((length, loss_in(torch.float32, cfg, batch, device), loss_in(torch.bfloat16, cfg, batch, device)))

    print(f"{device} ({torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}), torch "
          f"{torch.__version__}; {Path(args.deepspeed_config).name}; teacher {args.teacher or 'random BERT-base'} -> "
          f"{args.student} x{args.experts} experts; peak: {peak_source}")
    print()
    print("| T | micro batch | sequences/s | tokens/s | TFLOP/s counted | MFU | peak memory GiB | last loss |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for length, batch_size, r in rows:
        print(f"| {length} | {batch_size} | {r['sequences_per_s']:,.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['flops_per_s'] / 1e12:.2f} | {r['flops_per_s'] / peak:.1%} | {r['memory_gib']:.1f} | {r['loss']:.4f} |")
    print()
    print("| T | fp32 loss | bf16 loss | relative difference | both finite |")
    print("|---:|---:|---:|---:|---|")
    for length, fp32, bf16 in checks:
        finite = math.isfinite(fp32) and math.isfinite(bf16)
        print(f"| {length} | {fp32:.6f} | {bf16:.6f} | {abs(bf16 - fp32) / abs(fp32):.2e} | {'yes' if finite else 'NO'} |")


if __name__ == "__main__":
    main()
