#!/usr/bin/env bash
# MoEBERT at CPU scale (BENCHMARKS.md, "MoEBERT, CPU scale"), on RTE from ../shared/data. The teacher is the
# packaged all-MiniLM-L6-v2 (6L;384H, FFN 1536) finetuned on RTE by benchmarks/prune.sh (reused; trained here with
# that script's recipe when absent). minimoe-moebert splits each FFN into 4 experts of 384 neurons (256 shared),
# scored on all of RTE's training set; the student is then trained with MoEBERT's distillation (--moebert-distill 5)
# and, for reference, on the task loss alone, both with the authors' MNLI recipe but the epochs (lr 5e-5, batch 64,
# warmup 0, weight decay 0; 2 epochs here, 5 there; dev after each epoch). Then the same split behind the
# authors' default hash-random routing (--routing hash), distilled the same way. A finished step is not rerun.
#   OUT=out/moebert DATA=../shared/data/glue bash benchmarks/moebert.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/moebert}
DATA=${DATA:-../shared/data/glue}
TEACHER_RUN=${TEACHER_RUN:-out/prune/teacher}
PACKAGED=$(python -c "from minimoe_common.tokenizer import packaged_teacher_dir; print(packaged_teacher_dir())")
recipe=(--task rte --data-dir "$DATA" --epochs 2 --lr 5e-5 --batch-size 64 --warmup 0 --weight-decay 0)
mkdir -p "$OUT"
[[ -f $TEACHER_RUN/results.json ]] || python -m pipeline.finetune --model "$PACKAGED" --output "$TEACHER_RUN" \
  --task rte --data-dir "$DATA" --epochs 2 --lr 1e-4 --batch-size 32
once() {  # OUTPUT FLAGS...: one finetune, unless OUTPUT holds its results
  local output=$1; shift
  [[ -f $output/results.json ]] || python -m pipeline.finetune --output "$output" "${recipe[@]}" "$@"
}
if [[ ! -d $OUT/student ]]; then
  start=$SECONDS
  python -m pipeline.baselines.moebert "$TEACHER_RUN/model" "$OUT/student" --task rte --data-dir "$DATA" \
    --experts 4 --expert-size 384 --shared 256
  echo "conversion: $((SECONDS - start)) s"
fi
once "$OUT/distil" --model "$OUT/student" --teacher "$TEACHER_RUN/model" --moebert-distill 5
once "$OUT/plain" --model "$OUT/student"
[[ -d $OUT/student_hash ]] || python -m pipeline.baselines.moebert "$TEACHER_RUN/model" "$OUT/student_hash" \
  --task rte --data-dir "$DATA" --experts 4 --expert-size 384 --shared 256 --routing hash
once "$OUT/distil_hash" --model "$OUT/student_hash" --teacher "$TEACHER_RUN/model" --moebert-distill 5
python -m pipeline.report compute "$TEACHER_RUN/model" "$OUT/student" --no-throughput
python - "$OUT" "$TEACHER_RUN" <<'PY'
import json, sys
from pathlib import Path
out, teacher = Path(sys.argv[1]), Path(sys.argv[2])
results = lambda run: json.loads((run / "results.json").read_text())
acc = lambda run: results(run)["metrics"]["rte"]["acc"]
summary = json.loads((out / "student" / "moebert.json").read_text())
print(f"teacher {acc(teacher):.1f}; converted, untrained {summary['dev_after']:.1f} (teacher re-scored "
      f"{summary['dev_before']:.1f}); MoEBERT distilled {acc(out / 'distil'):.1f} "
      f"({results(out / 'distil')['seconds']:.0f} s); task loss only {acc(out / 'plain'):.1f} "
      f"({results(out / 'plain')['seconds']:.0f} s)")
hashed = json.loads((out / "student_hash" / "moebert.json").read_text())
print(f"hash routing: converted, untrained {hashed['dev_after']:.1f}; MoEBERT distilled {acc(out / 'distil_hash'):.1f} "
      f"({results(out / 'distil_hash')['seconds']:.0f} s)")
PY
