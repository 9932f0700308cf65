#!/usr/bin/env bash
# The whole pipeline on the bundled sample: data prep -> MiniMoE distillation (2 processes, expert
# parallel) -> export -> finetune on an SST-2 slice, next to the same student at its random initialisation ->
# results table (printed by the suite) and the run's curves (loss, expert shares) as a PNG.
# About 10 minutes on 2 CPU cores (8 min with STEPS=90; the distillation is ~3.7 s per step of 2 x 16 samples).
# Settings: OUT (output dir), PROCS (processes), STEPS (distillation steps).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/demo}
PROCS=${PROCS:-2}
STEPS=${STEPS:-120}

echo "== 1/4 data prep: examples/data/wiki_sample -> $OUT/shards"
python -m data_prep build --input examples/data/wiki_sample --output "$OUT/shards"  # the teacher's tokenizer

echo "== 2/4 distill a MiniMoE 3L;384H student (4 experts, ep_size $PROCS) from all-MiniLM-L6-v2 (the default teacher)"
./launch.sh distill --num-procs "$PROCS" --shards "$OUT/shards" \
    --output "$OUT/distill" --student 3L384H --experts 4 --ep-size "$PROCS" \
    --max-steps "$STEPS" --micro-batch-size 16 --global-batch-size $((16 * PROCS)) --warmup 0.05 --log-every 10 --save-every 60

echo "== 3/4 export the checkpoint to a model dir, and the weights the run started from (the baseline)"
python -m pipeline.export "$OUT/distill" "$OUT/model"
python -m pipeline.export "$OUT/distill" "$OUT/model-random-init" --random-init

echo "== 4/4 finetune both on the bundled SST-2 slice"
python -m pipeline.finetune suite --model "MiniMoE-3L384H distilled=$OUT/model" \
    "MiniMoE-3L384H random init=$OUT/model-random-init" --data-dir examples/data --output "$OUT/finetune" \
    --epochs 1 --lr 1e-4

echo "Results: $OUT/finetune/results.md   Curves: $OUT/distill/curves.png   TensorBoard: tensorboard --logdir $OUT"
