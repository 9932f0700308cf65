#!/usr/bin/env bash
# MiniLM w/ TA at CPU scale (BENCHMARKS.md, "Teacher assistant, CPU scale"): the packaged all-MiniLM-L6-v2 ->
# the paper's 12L;384H assistant -> MiniLM 4L;192H in one `minimoe-distill --assistant` command (one recipe for
# both stages: STEPS x 32 samples each, on the quality bar's 10 Wikipedia files), next to MiniLM 4L;192H distilled from the
# teacher directly with the student's budget; both finetuned with the quality bar's recipe (3 epochs, dev every 25
# steps, lr 1e-4, seed 1) on the bundled SST-2 slice and RTE. Two lanes of one core each; finished steps are not
# rerun and an interrupted distillation resumes.
#   OUT=out/assistant DATA=../shared/data STEPS=60 bash benchmarks/assistant.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/assistant}
DATA=${DATA:-../shared/data}
SHARDS=${SHARDS:-$OUT/shards}
STEPS=${STEPS:-60}
export OMP_NUM_THREADS=1
TEACHER=$(python -c "from minimoe_common.tokenizer import packaged_teacher_dir; print(packaged_teacher_dir())")
mkdir -p "$OUT"
[[ -f $SHARDS/manifest.json ]] || python -m data_prep build --input "$DATA"/wikipedia/AA/wiki_0[0-9] --output "$SHARDS" \
  --workers 2
distill() {  # name port flags...: distil a 4L;192H MiniLM with the shared recipe, then export it
  local name=$1 port=$2; shift 2
  [[ -d $OUT/model-$name ]] && return
  local resume=()  # an interrupted run (or its assistant stage) goes on
  [[ -e $OUT/distill-$name/checkpoints/latest || -d $OUT/distill-$name/assistant ]] && resume=(--resume)
  ./launch.sh distill --num-procs 1 --master-port "$port" --teacher "$TEACHER" --shards "$SHARDS" \
    --output "$OUT/distill-$name" --student 4L192H --experts 1 --deepspeed-config ds_configs/zero0.json \
    --micro-batch-size 32 --global-batch-size 32 --max-steps "$STEPS" --save-every 20 --log-every 10 "${resume[@]}" "$@"
  python -m pipeline.export "$OUT/distill-$name" "$OUT/model-$name"
}
mkdir -p "$OUT/data"
ln -sfn "$(realpath "$DATA/glue/RTE")" "$OUT/data/RTE"
ln -sfn "$(realpath examples/data/SST-2)" "$OUT/data/SST-2"
students() {  # NAME=DIR: the quality bar's finetuning recipe on SST-2 and RTE
  python -m pipeline.finetune suite --data-dir "$OUT/data" --output "$OUT/students" --tasks sst2 rte --epochs 3 \
    --eval-every 25 --lr 1e-4 --batch-size 32 --seed 1 --model "$1"
}
lane_ta() { distill ta 29631 --assistant 12L384H && students "MiniLM w/ TA=$OUT/model-ta"; }
lane_direct() { distill direct 29632 && students "MiniLM=$OUT/model-direct"; }
lane_ta > "$OUT/lane_ta.log" 2>&1 & first=$!
lane_direct > "$OUT/lane_direct.log" 2>&1 & second=$!
wait "$first"; wait "$second"
python -m pipeline.finetune suite --data-dir "$OUT/data" --output "$OUT/students" --tasks sst2 rte --epochs 3 \
  --eval-every 25 --lr 1e-4 --batch-size 32 --seed 1 --model "MiniLM w/ TA=$OUT/model-ta" "MiniLM=$OUT/model-direct"
