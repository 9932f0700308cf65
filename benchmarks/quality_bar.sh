#!/usr/bin/env bash
# The quality bar of BENCHMARKS.md ("Quality bar: ..."), end to end on real data: about 2 h 30 min on
# 2 CPU cores. Every step runs in two lanes of one core each (OMP_NUM_THREADS=1): on 2 cores two
# 1-thread processes get more done than one 2-thread process. A step that finished is not rerun
# (finetune suites reuse results.json), so the script resumes after an interruption, except for a
# half-done distillation (delete its run dir).
#   OUT=out/quality DATA=../shared/data bash benchmarks/quality_bar.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/quality}
DATA=${DATA:-../shared/data}
export OMP_NUM_THREADS=1
TEACHER=$(python -c "from data_prep.tokenizer import packaged_teacher_dir; print(packaged_teacher_dir())")
lanes() {  # run two functions side by side; stop if either fails
  "$1" > "$OUT/$1.log" 2>&1 & local first=$!
  "$2" > "$OUT/$2.log" 2>&1 & local second=$!
  wait "$first"; wait "$second"
}

# 1. Shards: the first 10 files of the real Wikipedia dump (23,420 samples of 128 tokens).
[[ -f $OUT/shards/manifest.json ]] || python -m data_prep build --input "$DATA"/wikipedia/AA/wiki_0[0-9] \
  --output "$OUT/shards" --workers 2

# 2. MiniMoE and MiniLM 3L;384H distilled side by side, 280 steps x 32 samples each (45 min), then exported.
distill() {  # name experts port
  [[ -d $OUT/model-$1 ]] && return
  ./launch.sh distill --num-procs 1 --master-port "$3" --teacher "$TEACHER" --shards "$OUT/shards" \
    --output "$OUT/distill-$1" --student 3L384H --experts "$2" --deepspeed-config ds_configs/zero0.json \
    --max-steps 280 --save-every 100 --log-every 10
  python -m pipeline.export "$OUT/distill-$1" "$OUT/model-$1"
}
distill_minimoe() { distill minimoe 4 29611; }
distill_minilm() { distill minilm 1 29612; }
lanes distill_minimoe distill_minilm

# Random init: the exact weights the MiniMoE distillation started from. The SVD-compressed MiniMoE.
python - "$OUT" <<'PY'
import sys
from pathlib import Path
from data_prep.tokenizer import load_tokenizer
from pipeline.distill import build_student
from pipeline.model import StudentConfig
source, out = Path(sys.argv[1]) / "model-minimoe", Path(sys.argv[1]) / "model-random"
build_student(StudentConfig.load(source / "config.json"), seed=42).save_pretrained(out, tokenizer=load_tokenizer(str(source)))
PY
python -m pipeline.compress "$OUT/model-minimoe" "$OUT/model-minimoe-svd" --threshold 0.5

# 3. The students, one recipe: MRPC, STS-B, RTE (GLUE) and the bundled 3000-row SST-2 slice.
mkdir -p "$OUT/data"  # the four tasks in one folder
for task in MRPC STS-B RTE; do ln -sfn "$(realpath "$DATA/glue/$task")" "$OUT/data/$task"; done
ln -sfn "$(realpath examples/data/SST-2)" "$OUT/data/SST-2"
students() { python -m pipeline.finetune suite --data-dir "$OUT/data" --output "$OUT/students" --epochs 2 \
  --lr 1e-4 --batch-size 32 "$@"; }
lane_a() { students --model MiniMoE="$OUT/model-minimoe" --tasks sst2 mrpc stsb rte
           students --model random-init="$OUT/model-random" --tasks rte sst2
           students --model MiniMoE-svd0.5="$OUT/model-minimoe-svd" --tasks mrpc; }
lane_b() { students --model MiniLM="$OUT/model-minilm" --tasks sst2 mrpc stsb rte
           students --model random-init="$OUT/model-random" --tasks mrpc stsb; }
lanes lane_a lane_b

# 4. The reference row: the packaged teacher on six tasks (SST-2: the first 20K training examples).
teacher() { python -m pipeline.finetune suite --data-dir "$DATA" --output "$OUT/teacher" --epochs 2 --lr 5e-5 \
  --batch-size 32 --max-train-examples 20000 --model teacher="$TEACHER" "$@"; }
lane_c() { teacher --tasks rte stsb sst2; }
lane_d() { teacher --tasks mrpc cola conll2003; }
lanes lane_c lane_d

# The tables (every run above is reused from its results.json).
students --model MiniMoE="$OUT/model-minimoe" MiniLM="$OUT/model-minilm" random-init="$OUT/model-random" \
  --tasks sst2 mrpc stsb rte
teacher --tasks sst2 mrpc stsb rte conll2003 cola
