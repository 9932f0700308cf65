#!/usr/bin/env bash
# The quality bar of BENCHMARKS.md ("Quality bar: ..."), end to end on real data: about 2 h on 2 CPU
# cores. Every step runs in two lanes of one core each (OMP_NUM_THREADS=1): on 2 cores two 1-thread
# processes get more done than one 2-thread process. A step that finished is not rerun (finetune
# suites reuse results.json), so the script resumes after an interruption, except for a half-done
# distillation (delete its run dir).
#   OUT=out/quality DATA=../shared/data STEPS=300 bash benchmarks/quality_bar.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/quality}
DATA=${DATA:-../shared/data}
STEPS=${STEPS:-300}
SEEDS="1 2"
export OMP_NUM_THREADS=1
TEACHER=$(python -c "from minimoe_common.tokenizer import packaged_teacher_dir; print(packaged_teacher_dir())")
lanes() {  # run two functions side by side; stop if either fails
  "$1" > "$OUT/$1.log" 2>&1 & local first=$!
  "$2" > "$OUT/$2.log" 2>&1 & local second=$!
  wait "$first"; wait "$second"
}
mkdir -p "$OUT"

# 1. Shards: the first 10 files of the real Wikipedia dump (23,420 samples of 128 tokens).
[[ -f $OUT/shards/manifest.json ]] || python -m data_prep build --input "$DATA"/wikipedia/AA/wiki_0[0-9] \
  --output "$OUT/shards" --workers 2

# 2. MiniMoE and MiniLM 4L;192H (the authors' MiniMoE: relation projection, logit-jitter router, moefy
# experts) distilled side by side with the same budget, STEPS x 32 samples each, then exported.
distill() {  # name experts port
  [[ -d $OUT/model-$1 ]] && return
  ./launch.sh distill --num-procs 1 --master-port "$3" --teacher "$TEACHER" --shards "$OUT/shards" \
    --output "$OUT/distill-$1" --student 4L192H --experts "$2" --deepspeed-config ds_configs/zero0.json \
    --micro-batch-size 32 --global-batch-size 32 --max-steps "$STEPS" --save-every 100 --log-every 10
  python -m pipeline.export "$OUT/distill-$1" "$OUT/model-$1"
}
distill_minimoe() { distill minimoe 4 29611; }
distill_minilm() { distill minilm 1 29612; }
lanes distill_minimoe distill_minilm

# Random init: the exact weights the MiniMoE distillation started from (without its relation projection).
[[ -d $OUT/model-random ]] || python -m pipeline.export "$OUT/distill-minimoe" "$OUT/model-random" --random-init

# 3. The students, one recipe, each seed its own run: MRPC, STS-B, RTE (GLUE) and the bundled
# 3000-row SST-2 slice; dev scored every 25 steps, the best evaluation kept (no early stop: the authors stop
# 5 epochs after the best evaluation, more than these 3 epochs).
mkdir -p "$OUT/data"  # the four tasks in one folder
for task in MRPC STS-B RTE; do ln -sfn "$(realpath "$DATA/glue/$task")" "$OUT/data/$task"; done
ln -sfn "$(realpath examples/data/SST-2)" "$OUT/data/SST-2"
students() {  # seed NAME=DIR ...
  local seed=$1; shift
  python -m pipeline.finetune suite --data-dir "$OUT/data" --output "$OUT/students" --tasks sst2 mrpc stsb rte \
    --epochs 3 --eval-every 25 --lr 1e-4 --batch-size 32 --seed "$seed" "$@"
}
lane_a() { for seed in $SEEDS; do students "$seed" --model "MiniMoE s$seed=$OUT/model-minimoe"; done
           students 1 --model "random-init s1=$OUT/model-random"; }
lane_b() { for seed in $SEEDS; do students "$seed" --model "MiniLM s$seed=$OUT/model-minilm"; done
           students 2 --model "random-init s2=$OUT/model-random"; }
lanes lane_a lane_b

# The table from every run's results.json: each cell the mean over the seeds (min-max).
python - "$OUT/students" $SEEDS <<'PY'
import json, statistics, sys
from pathlib import Path
from pipeline.finetune.suite import paper_numbers
root, seeds, columns = Path(sys.argv[1]), sys.argv[2:], ["sst2", "mrpc", "stsb", "rte"]
print("| Model | SST-2 Acc | MRPC F1 | STS-B Spearman | RTE Acc | mean of 4 |\n|---|" + "---:|" * 5)
for model in ("MiniMoE", "MiniLM", "random-init"):
    runs = [paper_numbers({t.name: json.loads((t / "results.json").read_text()) for t in (root / f"{model} s{s}").iterdir()})
            for s in seeds]
    cells = [[run[c] for run in runs] for c in columns] + [[statistics.mean(run[c] for c in columns) for run in runs]]
    print(f"| {model} ({len(runs)} seeds) | " + " | ".join(
        f"{statistics.mean(c):.1f} ({min(c):.1f}-{max(c):.1f})" for c in cells) + " |")
PY
