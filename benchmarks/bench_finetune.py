"""Finetune step benchmark: the DeepSpeed engine step of pipeline.finetune vs a plain PyTorch step
(same model, same real SST-2 batches, AdamW), and 1 vs 2 OpenMP threads.

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
from data_prep.tokenizer import load_tokenizer, packaged_teacher_dir  # noqa: E402
from pipeline.finetune import collate, deepspeed_config, encode, init_single_process, task_loss  # noqa: E402
from pipeline.model import StudentConfig, StudentForSequenceClassification  # noqa: E402
from pipeline.optim import param_groups  # noqa: E402
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
    model = StudentForSequenceClassification(config, num_labels=2)
    plain_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    init_single_process()
    deepspeed.init_distributed(dist_backend="gloo")
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(param_groups(model, 0.01), lr=1e-5),
                                      config=deepspeed_config(None, args.batch_size))

    def plain_step():
        out = model(**batch)
        (task_loss(task, out.logits, labels) + out.aux_loss).backward()
        plain_optimizer.step()
        plain_optimizer.zero_grad()

    def engine_step():
        out = engine(**batch)
        engine.backward(task_loss(task, out.logits, labels) + out.aux_loss)
        engine.step()

    variants = {("plain PyTorch step", 1): plain_step, ("DeepSpeed engine step", 1): engine_step,
                ("plain PyTorch step", 2): plain_step, ("DeepSpeed engine step", 2): engine_step}
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
    print("| step | threads | s/step | examples/s | ratio vs plain, same threads |\n|---|---:|---:|---:|---:|")
    for (name, threads), values in times.items():
        seconds = median(values)
        baseline = median(times[("plain PyTorch step", threads)])
        print(f"| {name} | {threads} | {seconds:.3f} | {args.batch_size / seconds:.1f} | {seconds / baseline:.2f} |")


if __name__ == "__main__":
    main()
