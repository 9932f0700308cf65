"""Training nested sub-networks (MiniDisc's sandwich, DynaBERT's widths): prefix views of the shared weights vs masks
on the full width, in one run.

    python benchmarks/bench_subnetworks.py [--batch-size 16] [--seq-len 128] [--repeats 3]

The packaged teacher (all-MiniLM-L6-v2, 6L;384H) as a task model, in training mode (dropout on); for each
sub-network of a sandwich, forward + backward of a loss on its logits, either through prune.prefix_call (the
sub-network at its own size, as minimoe-minidisc and minimoe-dynabert train) or with prune.masked's masks (the
full width computed, the pruned units' outputs zeroed: the same gradients, tests/test_minidisc.py). Prints
milliseconds per sandwich (median of --repeats) and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from minimoe_common.tokenizer import packaged_teacher_dir
from pipeline.baselines.dynabert import WIDTHS, kept_units
from pipeline.baselines.minidisc import SPARSITIES, levels
from pipeline.baselines.prune import Importance, masked, prefix_call, sub_network
from pipeline.models.heads import StudentForSequenceClassification
from pipeline.models.hf_export import load_student_head


def sandwiches(model: StudentForSequenceClassification) -> dict[str, list[tuple[list[int], list[int]]]]:
    """(heads, neurons) per layer of each sub-network: MiniDisc's 7 sparsities (by random importance), DynaBERT's 4
    widths."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    scores = Importance([torch.rand(config.num_heads, generator=generator) for _ in range(config.num_layers)],
                        [torch.rand(config.intermediate_size, generator=generator) for _ in range(config.num_layers)])
    minidisc = [(level.heads, level.neurons) for level in levels(model, scores, SPARSITIES)]
    dynabert = []
    for width in WIDTHS:
        heads, neurons = kept_units(config.num_heads, config.intermediate_size, width)
        dynabert.append(([heads] * config.num_layers, [neurons] * config.num_layers))
    return {"MiniDisc sparsities 50-95 (7)": minidisc, "DynaBERT widths 0.25-1.0 (4)": dynabert}


def timed(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per batch (default 16, MiniDisc's)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed sandwiches per variant (default 3)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_student_head(str(packaged_teacher_dir()), token=False).train()  # a new 2-label head on BERT
    ids = torch.randint(1000, 20000, (args.batch_size, args.seq_len))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    print(f"threads {torch.get_num_threads()}, batch {args.batch_size} x {args.seq_len}, fp32")
    print("| sandwich | masks on the full width (ms) | prefix views (ms) | ratio |")
    print("|---|---:|---:|---:|")
    for name, shapes in sandwiches(model).items():
        skeletons = [sub_network(model, heads, neurons) for heads, neurons in shapes]

        def prefix_step():
            for skeleton in skeletons:
                prefix_call(model, skeleton, **inputs).logits.square().mean().backward()
            model.zero_grad()

        masks, handles = masked(model)

        def masked_step():
            for heads, neurons in shapes:
                with torch.no_grad():
                    for mask, kept in zip([*masks.heads, *masks.neurons], [*heads, *neurons]):
                        mask.copy_(torch.arange(len(mask)) < kept)
                model(**inputs).logits.square().mean().backward()
            model.zero_grad()

        with_masks = timed(masked_step, args.repeats)
        for handle in handles:
            handle.remove()
        with_views = timed(prefix_step, args.repeats)
        print(f"| {name} | {with_masks:.0f} | {with_views:.0f} | {with_masks / with_views:.2f}x |")


if __name__ == "__main__":
    main()
