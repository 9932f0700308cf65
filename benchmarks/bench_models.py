"""Model benchmarks: MiniMoE vs MiniLM inference and training step, MoE FFN dispatch variants, teacher memory.

Every comparison runs its variants interleaved, round after round, in one process, and reports the
median per variant and the ratio to the baseline of the same run (the machine is shared and noisy).

    python benchmarks/bench_models.py                       # everything, torch's default threads
    python benchmarks/bench_models.py --only inference ffn --threads 2 --rounds 7
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.models import Student, StudentConfig  # noqa: E402
from pipeline.models.layers import FeedForward  # noqa: E402
from pipeline.objectives import minilm_relation_loss  # noqa: E402
from pipeline.models.teacher import Teacher  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def interleaved(variants: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call of each variant, timed round-robin after one warm-up call each."""
    times = {name: [] for name in variants}
    for r in range(rounds + 1):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - start)
    return {name: median(t) for name, t in times.items()}


def deepspeed_dispatch(model: Student) -> Student:
    """The same model running DeepSpeed's own capacity-padded dispatch (MoE.forward) instead of the sort."""
    from deepspeed.moe.layer import MoE

    for layer in model.layers:
        layer.ffn.forward = MoE.forward.__get__(layer.ffn)
    return model


def student(num_experts: int, preset: str = "3L384H") -> Student:
    """The engine's student (DeepSpeed's MoE layer, whose one-rank forward is the sorted dispatch)."""
    torch.manual_seed(0)
    return Student(StudentConfig.from_preset(preset, num_experts=num_experts), deepspeed_moe=True)


def table(title: str, seconds: dict[str, float], tokens: int, baseline: str) -> list[str]:
    lines = [f"{title}", "| variant | ms/call | tokens/ms | speed vs " + baseline + " |", "|---|---|---|---|"]
    for name, s in seconds.items():
        lines.append(f"| {name} | {s * 1000:.0f} | {tokens / (s * 1000):.2f} | {seconds[baseline] / s:.2f} |")
    return lines


def bench_inference(args) -> list[str]:
    ids = torch.randint(1000, 2000, (args.batch_size, args.seq_len))
    mask = torch.ones_like(ids)
    models = {"MiniLM 3L;384H": student(1).eval(), "MiniMoE 3L;384H (sorted dispatch)": student(4).eval(),
              "MiniMoE 3L;384H (DeepSpeed dispatch)": deepspeed_dispatch(student(4).eval())}
    with torch.inference_mode():
        seconds = interleaved({name: (lambda m=m: m(ids, mask)) for name, m in models.items()}, args.rounds)
    return table(f"Inference, batch {args.batch_size}x{args.seq_len}, fp32", seconds, ids.numel(), "MiniLM 3L;384H")


def bench_ffn(args) -> list[str]:
    """One FFN block on 32x128 tokens: dense, DeepSpeed MoE, our sorted dispatch, an AutoEP-style block."""
    from deepspeed.moe.ep_experts import GroupedExperts
    from deepspeed.moe.ep_router import TokenChoiceTopKRouter

    config = StudentConfig.from_preset("3L384H", num_experts=4)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size * args.seq_len, config.hidden_size)
    used = torch.ones(x.size(0), dtype=torch.long)
    dense = FeedForward(config)
    moe = student(4).layers[0].ffn
    classic = deepspeed_dispatch(student(4)).layers[0].ffn
    # AutoEP's experts are gated (GLU, 3 matrices, no biases): hidden 1024 matches the dense FFN's FLOPs.
    router = TokenChoiceTopKRouter(config.hidden_size, 4, None, None, 1, "softmax", False, 1.0, False)
    grouped = GroupedExperts(config.hidden_size, 1024, 4, use_grouped_mm=True, activation="geglu_tanh")
    for w in (grouped.w1, grouped.w2, grouped.w3):
        torch.nn.init.normal_(w, std=0.02)

    def autoep_block():
        scores, experts, counts = router(x)
        order = torch.argsort(experts[:, 0], stable=True)
        out = grouped(x.index_select(0, order), counts)
        return torch.empty_like(out).index_copy_(0, order, out) * scores

    variants = {"dense FFN": lambda: dense(x), "MoE, sorted dispatch (ours)": lambda: moe(x, used),
                "MoE, DeepSpeed dispatch": lambda: classic(x, used), "AutoEP router + GroupedExperts": autoep_block}
    with torch.inference_mode():
        seconds = interleaved(variants, args.rounds)
    return table(f"FFN block forward, {x.size(0)} tokens", seconds, x.size(0), "dense FFN")


def bench_train(args) -> list[str]:
    teacher = Teacher.from_pretrained(args.teacher)
    ids = torch.randint(1000, 2000, (args.train_batch_size, args.seq_len))
    mask = torch.ones_like(ids)
    mask[::2, args.seq_len // 2:] = 0  # half the sequences half padded, as real pairs are

    def step_fn(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            qkv = teacher(ids, mask)
            out = model(ids, mask)
            loss, _ = minilm_relation_loss(out.relation_qkv, qkv, mask, aux_loss=out.aux_loss)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    variants = {"MiniLM 3L;384H": step_fn(student(1).train()),
                "MiniMoE 3L;384H (sorted dispatch)": step_fn(student(4).train()),
                "MiniMoE 3L;384H (DeepSpeed dispatch)": step_fn(deepspeed_dispatch(student(4).train()))}
    seconds = interleaved(variants, args.rounds)
    return table(f"Training step (teacher fwd + student fwd/bwd + AdamW), batch {args.train_batch_size}x{args.seq_len}",
                 seconds, ids.numel(), "MiniLM 3L;384H")


MEMORY_PROBE = """
import resource, sys, torch
from transformers import AutoModel
from pipeline.models.teacher import Teacher
mode, path, batch, seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ids = torch.randint(1000, 2000, (batch, seq)); mask = torch.ones_like(ids)
if mode == "teacher":
    model = Teacher.from_pretrained(path)
    run = lambda: model(ids, mask)
else:  # the whole HF encoder with every hidden state kept, Q/K/V of the last layer caught by hooks
    model = AutoModel.from_pretrained(path).eval()
    caught = []
    attn = model.encoder.layer[-1].attention.self
    for m in (attn.query, attn.key, attn.value):
        m.register_forward_hook(lambda m, i, o: caught.append(o))
    def run():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, output_hidden_states=True), caught
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kept = run()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def bench_memory(args) -> list[str]:
    """Peak RSS growth of one teacher forward (each variant in a fresh process)."""
    rows = ["Teacher forward memory (peak RSS growth, MiB), batch " f"{args.memory_batch_size}x{args.seq_len}",
            "| variant | MiB |", "|---|---|"]
    for mode, name in (("teacher", "Teacher (stops at the distilled layer's Q/K/V)"),
                       ("full", "HF model, output_hidden_states=True")):
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, mode, str(args.teacher), str(args.memory_batch_size),
                              str(args.seq_len)], cwd=REPO, capture_output=True, text=True, check=True)
        rows.append(f"| {name} | {float(out.stdout.strip().splitlines()[-1]):.0f} |")
    return rows


BENCHES = {"inference": bench_inference, "ffn": bench_ffn, "train": bench_train, "memory": bench_memory}


def main() -> None:
    from minimoe_common.tokenizer import packaged_teacher_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), default=list(BENCHES), help="benchmarks to run")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per variant (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--batch-size", type=int, default=32, help="inference/FFN batch (paper: 32)")
    parser.add_argument("--seq-len", type=int, default=128, help="sequence length (paper: 128)")
    parser.add_argument("--train-batch-size", type=int, default=16, help="training-step batch")
    parser.add_argument("--memory-batch-size", type=int, default=64, help="teacher-memory batch")
    parser.add_argument("--teacher", type=Path, default=packaged_teacher_dir(), help="teacher dir (default: packaged)")
    parser.add_argument("--json", type=Path, default=None, help="also write the tables to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {open('/proc/loadavg').read().split()[:3]}")
    tables = {}
    for name in args.only:
        tables[name] = BENCHES[name](args)
        print("\n".join(tables[name]) + "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(tables, indent=2))


if __name__ == "__main__":
    main()
