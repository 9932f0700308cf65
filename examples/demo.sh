#!/usr/bin/env bash
# The whole pipeline on the bundled sample: data prep -> MiniMoE distillation (2 processes, expert
# parallel) -> export -> finetune on an SST-2 slice -> results table (printed by the suite).
# About 9 minutes on 2 CPU cores (7 min with STEPS=60; the distillation is ~5 s per step of 2 x 16 samples).
# Settings: OUT (output dir), PROCS (processes), STEPS (distillation steps).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/demo}
PROCS=${PROCS:-2}
STEPS=${STEPS:-90}

echo "== 1/4 data prep: examples/data/wiki_sample -> $OUT/shards"
python -m data_prep build --input examples/data/wiki_sample --output "$OUT/shards"  # the teacher's tokenizer

echo "== 2/4 distill a MiniMoE 3L;384H student (4 experts, ep_size $PROCS) from all-MiniLM-L6-v2 (the default teacher)"
./launch.sh distill --num-procs "$PROCS" --shards "$OUT/shards" \
    --output "$OUT/distill" --student 3L384H --experts 4 --ep-size "$PROCS" \
    --max-steps "$STEPS" --micro-batch-size 16 --global-batch-size $((16 * PROCS)) --warmup 0.05 --log-every 10 --save-every 45

echo "== 3/4 export the checkpoint to a plain model dir"
python -m pipeline.export "$OUT/distill" "$OUT/model"

echo "== 4/4 finetune on the bundled SST-2 slice"
python -m pipeline.finetune suite --model "MiniMoE-3L384H=$OUT/model" --data-dir examples/data --output "$OUT/finetune" \
    --epochs 1 --lr 1e-4

echo "Results: $OUT/finetune/results.md   TensorBoard: tensorboard --logdir $OUT"
