#!/usr/bin/env bash
# PKD vs KD vs plain finetuning at CPU scale (BENCHMARKS.md, "Task distillation: PKD vs KD vs plain finetuning"), on
# the bundled SST-2 slice. Teacher: the packaged all-MiniLM-L6-v2 (6L;384H) finetuned on the slice. Student: its
# first 3 layers (3L;384H, pretrained weights, as PKD's students start from BERT's first k layers). KD and PKD
# share alpha 0.7 and T 10 (the PKD authors'), so PKD differs by its patient term alone (beta 500, PKD-Skip:
# student layers 1, 2 <- teacher layers 2, 4). About 14 min of CPU: the two seeds run side by side, one core
# each. A finished run is not rerun.
#   OUT=out/pkd bash benchmarks/pkd.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/pkd}
export OMP_NUM_THREADS=1
TEACHER=$(python -c "from minimoe_common.tokenizer import packaged_teacher_dir; print(packaged_teacher_dir())")
mkdir -p "$OUT"
once() {  # OUTPUT FLAGS...: one finetune on the slice, unless OUTPUT holds its results
  local output=$1; shift
  [[ -f $output/results.json ]] || python -m pipeline.finetune --task sst2 --data-dir examples/data \
    --max-seq-length 64 --epochs 1 --lr 1e-4 --output "$output" "$@"
}
once "$OUT/teacher" --model "$TEACHER"
[[ -d $OUT/student ]] || python -c "import sys; from transformers import AutoModel
from minimoe_common.tokenizer import load_tokenizer
AutoModel.from_pretrained(sys.argv[1], num_hidden_layers=3).save_pretrained(sys.argv[2])  # layers 1-3 of 6
load_tokenizer(sys.argv[1]).save_pretrained(sys.argv[2])" "$TEACHER" "$OUT/student"
students() {  # SEED: the three methods, 1500 training rows (47 steps), dev scored at the end
  local common=(--model "$OUT/student" --max-train-examples 1500 --seed "$1")
  local teacher=(--teacher "$OUT/teacher/model" --kd-alpha 0.7 --temperature 10)
  once "$OUT/plain-s$1" "${common[@]}"
  once "$OUT/kd-s$1" "${common[@]}" "${teacher[@]}"
  once "$OUT/pkd-s$1" "${common[@]}" "${teacher[@]}" --pkd-beta 500 --pkd-strategy skip
}
students 1 > "$OUT/seed1.log" 2>&1 & first=$!
students 2 > "$OUT/seed2.log" 2>&1 & second=$!
wait "$first"; wait "$second"
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
acc = lambda run: json.loads((out / run / "results.json").read_text())["metrics"]["sst2"]["acc"]
print(f"teacher 6L;384H: {acc('teacher'):.1f}")
for method in ("plain", "kd", "pkd"):
    seeds = [acc(f"{method}-s{seed}") for seed in (1, 2)]
    print(f"{method}: {sum(seeds) / 2:.1f} ({' / '.join(f'{s:.1f}' for s in seeds)})")
EOF
