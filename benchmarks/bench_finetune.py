"""Finetune step benchmark: the DeepSpeed engine step of pipeline.finetune.run (pipeline.optim.build_engine:
fused AdamW, clipping, no all-reduce on one ZeRO-0 rank) vs plain PyTorch steps with torch's default
AdamW (the baseline) and with fused AdamW (same model, same real SST-2 batch), at 1 and 2 OpenMP threads.

Variants run interleaved, round after round, in one process; medians and the ratio to the plain
PyTorch step of the same run are printed (the machine is shared and noisy).

    python benchmarks/bench_finetune.py --rounds 5
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimoe_common.tokenizer import load_tokenizer, packaged_teacher_dir  # noqa: E402
from pipeline.finetune.config import FinetuneConfig, deepspeed_config  # noqa: E402
from pipeline.finetune.data import collate, encode  # noqa: E402
from pipeline.models import StudentConfig, StudentForSequenceClassification  # noqa: E402
from pipeline.objectives import task_loss  # noqa: E402
from pipeline.optim import LinearSchedule, build_engine, init_single_process  # noqa: E402
from pipeline.tasks import get_task, read_split  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per variant (median reported)")
    parser.add_argument("--preset", default="3L384H", help="student size preset")
    parser.add_argument("--experts", type=int, default=4, help="experts per FFN (1 = dense MiniLM)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step")
    args = parser.parse_args()

    import deepspeed

    task = get_task("sst2")
    tokenizer = load_tokenizer(str(packaged_teacher_dir()))
    examples = read_split(task, REPO / "examples/data/SST-2/dev.tsv")[: args.batch_size]  # full sentences
    batch = collate(encode(task, examples, tokenizer, 128), tokenizer.pad_token_id)
    labels = batch.pop("labels")
    config = StudentConfig.from_preset(args.preset, tokenizer=tokenizer, num_experts=args.experts)
    model = StudentForSequenceClassification(config)  # num_labels 2
    default_adamw = torch.optim.AdamW(model.parameters(), lr=1e-5)
    fused_adamw = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    init_single_process()
    deepspeed.init_distributed(dist_backend="gloo")
    engine = build_engine(model, deepspeed_config(None, args.batch_size, FinetuneConfig.max_grad_norm), 1e-5, 0.01,
                          LinearSchedule(1, 10**6))

    def plain_step(optimizer):
        out = model(**batch)
        (task_loss(out.logits, labels) + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad()

    def engine_step():
        out = engine(**batch)
        engine.backward(task_loss(out.logits, labels) + out.aux_loss)
        engine.step()

    steps = {"plain PyTorch step, default AdamW": lambda: plain_step(default_adamw),
             "plain PyTorch step, fused AdamW": lambda: plain_step(fused_adamw),
             "DeepSpeed engine step (pipeline.finetune)": engine_step}
    variants = {(name, threads): step for threads in (1, 2) for name, step in steps.items()}
    times = {name: [] for name in variants}
    for r in range(args.rounds + 1):
        for (name, threads), step in variants.items():
            torch.set_num_threads(threads)
            start = time.perf_counter()
            step()
            if r:  # round 0 warms up
                times[(name, threads)].append(time.perf_counter() - start)
    tokens = int(batch["attention_mask"].sum())
    print(f"{args.preset} experts={args.experts}, batch {args.batch_size} SST-2 dev sentences ({tokens} tokens), "
          f"{args.rounds} rounds, median seconds per step")
    print("| step | threads | s/step | examples/s | ratio vs plain default AdamW, same threads |\n|---|---:|---:|---:|---:|")
    for (name, threads), values in times.items():
        seconds = median(values)
        baseline = median(times[("plain PyTorch step, default AdamW", threads)])
        print(f"| {name} | {threads} | {seconds:.3f} | {args.batch_size / seconds:.1f} | {seconds / baseline:.2f} |")


if __name__ == "__main__":
    main()
