#!/usr/bin/env bash
# Pruned students, KD_x% (BENCHMARKS.md, "Pruned students, KD_x%"), on RTE from ../shared/data. The packaged
# all-MiniLM-L6-v2 (6L;384H) finetuned on RTE is the teacher; minimoe-prune cuts it to 15% and 5% of its
# transformer-layer parameters (scored on all of RTE's training set); each pruned student is then finetuned with
# task KD from the teacher (minimoe-finetune --teacher: alpha 0.5, T 1, the KD defaults) and, for reference,
# without it, all with the teacher's recipe (2 epochs, lr 1e-4, batch 32, dev after each epoch). The two
# shares run side by side, one core each. A finished step is not rerun.
#   OUT=out/prune DATA=../shared/data/glue bash benchmarks/prune.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
OUT=${OUT:-out/prune}
DATA=${DATA:-../shared/data/glue}
TEACHER=$(python -c "from minimoe_common.tokenizer import packaged_teacher_dir; print(packaged_teacher_dir())")
recipe=(--task rte --data-dir "$DATA" --epochs 2 --lr 1e-4 --batch-size 32)
mkdir -p "$OUT"
once() {  # OUTPUT FLAGS...: one finetune, unless OUTPUT holds its results
  local output=$1; shift
  [[ -f $output/results.json ]] || python -m pipeline.finetune --output "$output" "${recipe[@]}" "$@"
}
once "$OUT/teacher" --model "$TEACHER"
students() {  # KEEP: prune to KEEP%, then finetune with and without KD
  [[ -d $OUT/pruned$1 ]] || python -m pipeline.baselines.prune "$OUT/teacher/model" "$OUT/pruned$1" --task rte \
    --data-dir "$DATA" --keep "$1"
  once "$OUT/kd$1" --model "$OUT/pruned$1" --teacher "$OUT/teacher/model"
  once "$OUT/ft$1" --model "$OUT/pruned$1"
}
students 15 > "$OUT/keep15.log" 2>&1 & first=$!
students 5 > "$OUT/keep5.log" 2>&1 & second=$!
wait "$first"; wait "$second"
python -m pipeline.report compute "$TEACHER" "$OUT/pruned15" "$OUT/pruned5" --no-throughput
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
acc = lambda run: json.loads((out / run / "results.json").read_text())["metrics"]["rte"]["acc"]
print(f"teacher: {acc('teacher'):.1f}")
for keep in (15, 5):
    pruning = json.loads((out / f"pruned{keep}" / "pruning.json").read_text())
    print(f"{keep}%: layers {pruning['layer_params_after']:,} of {pruning['layer_params_before']:,}, heads "
          f"{pruning['layer_heads']}, FFN {pruning['layer_intermediate_sizes']}; untrained {pruning['dev_after']:.1f}, "
          f"KD {acc(f'kd{keep}'):.1f}, no KD {acc(f'ft{keep}'):.1f}")
PY
