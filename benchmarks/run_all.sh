#!/usr/bin/env bash
# Every benchmark of BENCHMARKS.md, one after the other (they must not share the cores).
# Prints markdown tables; takes about 35 minutes on 2 CPU cores; benchmarks/gpu.sh is the accelerator check.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/bench}
python benchmarks/bench_data_prep.py
python benchmarks/bench_models.py
python -m data_prep build --input ../shared/data/wikipedia/AA/wiki_0[0-4] --output "$OUT/shards"
python benchmarks/bench_distill.py --shards "$OUT/shards"
python benchmarks/bench_step.py --shards "$OUT/shards"
python benchmarks/bench_finetune.py
