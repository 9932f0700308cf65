#!/usr/bin/env bash
# MiniDisc, CPU scale (BENCHMARKS.md, "MiniDisc, CPU scale"), on RTE from ../shared/data. The teacher is
# benchmarks/prune.sh's all-MiniLM-L6-v2 (6L;384H) finetuned on RTE (out/prune/teacher/model), and the student
# keeps 5% of its transformer-layer parameters (sparsity 95: the size of prune.sh's KD_5% row). minimoe-minidisc
# trains the sandwich of sparsities 50-95 for one epoch of all of RTE's training set (156 steps of 16; the
# authors: 10 epochs, patience 5), picks the TA by the lambda-tradeoff, then distils the TA into the student
# for another epoch: the two iterations see the batches of KD_5%'s two epochs. For reference the same with
# --iterations 1 (no TA: the sandwich distilled from the teacher straight to 95%). The two run side by side, one
# core each; dev every 20 steps (theirs 10). Then KD_5% as the authors ran it: one level, 95, distilled from the
# teacher for two epochs with SparseBertCls's loss (their run_distillation_cls.py --model_type sparsebert_cls
# --layer_or_sparsity 95S). A finished run is not rerun, an interrupted one resumes.
#   OUT=out/minidisc DATA=../shared/data/glue bash benchmarks/minidisc.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
OUT=${OUT:-out/minidisc}
DATA=${DATA:-../shared/data/glue}
TEACHER=${TEACHER:-out/prune/teacher/model}
recipe=(--model "$TEACHER" --task rte --data-dir "$DATA" --target-sparsity 95 --epochs 1 --eval-every 20)
mkdir -p "$OUT"
python -m pipeline.baselines.minidisc "${recipe[@]}" --output "$OUT/minidisc" > "$OUT/minidisc.log" 2>&1 &
first=$!
python -m pipeline.baselines.minidisc "${recipe[@]}" --output "$OUT/direct" --iterations 1 > "$OUT/direct.log" 2>&1 &
second=$!
wait "$first"; wait "$second"
OMP_NUM_THREADS=2 python -m pipeline.baselines.minidisc "${recipe[@]}" --output "$OUT/kd95" --sparsities 95 \
    --iterations 1 --epochs 2 > "$OUT/kd95.log" 2>&1
python -m pipeline.report compute "$TEACHER" "$OUT/minidisc/iteration2" --no-throughput
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for run in ("minidisc", "direct", "kd95"):
    summary = json.loads((out / run / "minidisc.json").read_text())
    chosen = []
    for iteration in range(1, len(summary["schedule"])):
        record = json.loads((out / run / f"iteration{iteration}" / "minidisc.json").read_text())
        dev = json.dumps({s: round(v, 1) for s, v in record["dev_by_sparsity"].items()})
        chosen.append(f"iteration {iteration}: {record['sparsity']}% at step {record['step']} of {record['steps']}, "
                      f"dev by sparsity {dev}")
    print(f"{run}: schedule {summary['schedule']}, student dev {summary['dev']:.1f} (teacher "
          f"{summary['teacher_dev']:.1f}), {summary['layer_params']:,} layer params; " + "; ".join(chosen))
PY
