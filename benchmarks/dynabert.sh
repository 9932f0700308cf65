#!/usr/bin/env bash
# DynaBERT, CPU scale (BENCHMARKS.md, "DynaBERT, CPU scale"), on RTE from ../shared/data. The teacher is
# benchmarks/prune.sh's all-MiniLM-L6-v2 (6L;384H) finetuned on RTE (out/prune/teacher/model); minimoe-dynabert
# train rewires it and trains DynaBERT_W (widths 0.25, 0.5, 0.75, 1.0) on the first 640 training examples for one
# epoch (20 steps of 32: the CPU budget; the authors: all of it, 3 epochs) at lr 1e-4 (the teacher's CPU-scale
# rate; theirs 2e-5 moves 20 steps too little), then exports widths 0.5 and 0.25, reports their shapes and
# compute, and finetunes each with task KD from the teacher on the same 640 examples (DynaBERT's optional final
# finetuning is on the labels; KD here, as the KD_x% rows). Then DynaBERT's depth stage from DynaBERT_W (depths 0.5,
# 0.75, 1.0 x the four widths: 12 sub-networks a step, the same 640 rows and epoch, lr 1e-4) and the export of
# width 0.5 at depth 0.5. A finished step is not rerun.
#   OUT=out/dynabert DATA=../shared/data/glue bash benchmarks/dynabert.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/dynabert}
DATA=${DATA:-../shared/data/glue}
TEACHER=${TEACHER:-out/prune/teacher/model}
recipe=(--task rte --data-dir "$DATA" --epochs 1 --lr 1e-4 --batch-size 32)
mkdir -p "$OUT"
[[ -d $OUT/dynabert_w ]] || python -m pipeline.baselines.dynabert train "$TEACHER" "$OUT/dynabert_w" "${recipe[@]}" --max-examples 640
for width in 0.5 0.25; do
  [[ -d $OUT/w$width ]] || python -m pipeline.baselines.dynabert export "$OUT/dynabert_w" "$OUT/w$width" --width "$width"
  [[ -f $OUT/kd_w$width/results.json ]] || python -m pipeline.finetune --output "$OUT/kd_w$width" "${recipe[@]}" \
    --max-train-examples 640 --model "$OUT/w$width" --teacher "$TEACHER"
done
[[ -d $OUT/dynabert ]] || python -m pipeline.baselines.dynabert train "$OUT/dynabert_w" "$OUT/dynabert" "${recipe[@]}" \
  --max-examples 640 --depths 0.5,0.75,1.0
[[ -d $OUT/w0.5_d0.5 ]] || python -m pipeline.baselines.dynabert export "$OUT/dynabert" "$OUT/w0.5_d0.5" --width 0.5 --depth 0.5
python -m pipeline.report compute "$TEACHER" "$OUT/w0.5" "$OUT/w0.25" "$OUT/w0.5_d0.5" --no-throughput
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = json.loads((out / "dynabert_w" / "dynabert.json").read_text())
for name in summary["dev_after"]:
    print(f"{name}: dev acc {summary['dev_before'][name]:.1f} rewired, untrained -> {summary['dev_after'][name]:.1f} "
          f"after DynaBERT_W")
for width in ("0.5", "0.25"):
    record = json.loads((out / f"w{width}" / "dynabert.json").read_text())
    kd = json.loads((out / f"kd_w{width}" / "results.json").read_text())["metrics"]["rte"]["acc"]
    print(f"w{width}: heads {record['layer_heads']}, FFN {record['layer_intermediate_sizes']}, {record['params']:,} "
          f"params; after KD finetuning {kd:.1f}")
summary = json.loads((out / "dynabert" / "dynabert.json").read_text())
print("DynaBERT (depth stage), dev acc before -> after: " + ", ".join(
    f"{name} {summary['dev_before'][name]:.1f} -> {summary['dev_after'][name]:.1f}" for name in summary["dev_after"]))
PY
