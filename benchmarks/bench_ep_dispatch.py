"""Expert parallelism: the exact-count exchange vs DeepSpeed's capacity-padded all-to-all, one MoE FFN.

Run under the launcher, one rank per expert-parallel rank:
    deepspeed --num_gpus 2 benchmarks/bench_ep_dispatch.py [--tokens 4096] [--skew 1.6] [--reps 10]
Each rank routes --tokens tokens of width 384 to 4 experts of MiniMoE 3L;384H's FFN (384 -> 1536 -> 384), a
router bias of --skew on expert 0 giving the uneven split of an untrained router; forward + backward of both
paths on the same weights and inputs, alternating. Rank 0 prints a markdown table: the rows the experts
compute, the rows each rank sends, ms per forward + backward and the ratio.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import deepspeed
import torch
from deepspeed.moe.layer import MoE

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.models import StudentConfig  # noqa: E402
from pipeline.models.moe import moe_feed_forward  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank (32 x 128 by default)")
    parser.add_argument("--skew", type=float, default=0.9, help="router bias added to expert 0's logit")
    parser.add_argument("--reps", type=int, default=10, help="timed forward + backward passes per path")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # from the launcher
    args = parser.parse_args()

    deepspeed.init_distributed()
    ranks, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    config = StudentConfig(hidden_size=384, num_experts=4, dropout=0.0)
    torch.manual_seed(rank)
    block = moe_feed_forward(config, deepspeed_moe=True, ep_size=ranks)
    block.set_deepspeed_parallelism()
    with torch.no_grad():
        block.deepspeed_moe.gate.wg.bias[0] += args.skew
    for param in block.deepspeed_moe.gate.parameters():
        torch.distributed.broadcast(param.data, 0)
    x = torch.randn(1, args.tokens, 384)

    paths = {"DeepSpeed, capacity-padded": lambda h: MoE.forward(block, h), "exact-count exchange": block}
    times = {name: [] for name in paths}
    for rep in range(args.reps + 1):  # the first round warms up
        for name, forward in paths.items():
            torch.distributed.barrier()
            start = time.perf_counter()
            y, l_aux, counts = forward(x.requires_grad_(True))
            (y.sum() + l_aux).backward()
            torch.distributed.barrier()
            if rep:
                times[name].append(time.perf_counter() - start)
    total = counts.clone()
    torch.distributed.all_reduce(total)
    capacity = torch.tensor(int(counts.max()))
    torch.distributed.all_reduce(capacity, op=torch.distributed.ReduceOp.MAX)
    if rank == 0:
        real = int(total.sum())
        rows = {"DeepSpeed, capacity-padded": (4 * int(capacity) * ranks, 4 * int(capacity)),
                "exact-count exchange": (real, args.tokens)}
        base = sorted(times["DeepSpeed, capacity-padded"])[args.reps // 2]
        print(f"{ranks} ranks, {args.tokens} tokens each, tokens per expert over the group {total.tolist()}")
        print("| dispatch | expert rows computed (all ranks) | rows sent per rank | ms fwd+bwd (median) | ratio |")
        print("|---|---|---|---|---|")
        for name in paths:
            median = sorted(times[name])[args.reps // 2]
            print(f"| {name} | {rows[name][0]:,} | {rows[name][1]:,} | {1e3 * median:.1f} | {base / median:.2f}x |")


if __name__ == "__main__":
    main()
