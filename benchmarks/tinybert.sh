#!/usr/bin/env bash
# TinyBERT 4L;312H, general distillation at CPU scale (BENCHMARKS.md, "TinyBERT 4L;312H, general distillation"):
# TinyBERT's recipe (--objective tinybert: attention scores + hidden states of every mapped layer through one W_h,
# plus the embeddings') and, with the same budget and student, MiniLM's (the last layer's Q/K/V relations), both
# from the packaged all-MiniLM-L6-v2 on the bundled Wikipedia sample; exported, then finetuned on the bundled SST-2
# slice next to the same student at its random initialisation. Two lanes of one core each (OMP_NUM_THREADS=1).
# A finished step is not rerun (finetune suites reuse results.json), except a half-done distillation (delete its dir).
#   OUT=out/tinybert STEPS=200 bash benchmarks/tinybert.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/tinybert}
STEPS=${STEPS:-200}
export OMP_NUM_THREADS=1
lanes() {  # run two functions side by side; stop if either fails
  "$1" > "$OUT/$1.log" 2>&1 & local first=$!
  "$2" > "$OUT/$2.log" 2>&1 & local second=$!
  wait "$first"; wait "$second"
}
mkdir -p "$OUT"

# 1. Shards: the bundled sample, 128-token pairs, the packaged teacher's tokenizer (data prep's default).
[[ -f $OUT/shards/manifest.json ]] || python -m data_prep build --input examples/data/wiki_sample --output "$OUT/shards"

# 2. TinyBERT_4's shape (4L;312H, FFN 1200, 12 heads), dense, STEPS x 32 samples, the project's recipe otherwise
# (lr 3e-4, 1% warmup, clipping 5). MiniLM needs relation heads that divide 312 and 384: 12.
distill() {  # name flags...
  local name=$1; shift
  [[ -d $OUT/model-$name ]] && return
  python -m pipeline.distill --shards "$OUT/shards" --output "$OUT/distill-$name" --student 4L312H --experts 1 \
    --deepspeed-config ds_configs/zero0.json --micro-batch-size 32 --global-batch-size 32 --max-steps "$STEPS" \
    --save-every 100 --log-every 10 "$@"
  python -m pipeline.export "$OUT/distill-$name" "$OUT/model-$name"
}
distill_tinybert() { distill tinybert --objective tinybert; }
distill_minilm() { distill minilm --objective minilm --relation-heads 12; }
lanes distill_tinybert distill_minilm
[[ -d $OUT/model-random ]] || python -m pipeline.export "$OUT/distill-tinybert" "$OUT/model-random" --random-init

# 3. The quality bar's finetuning recipe on the SST-2 slice (3,000 training rows, the 872-row dev set): 3 epochs,
# dev every 25 steps, the best evaluation kept; seeds 1 and 2.
students() {  # seed
  python -m pipeline.finetune suite --data-dir examples/data --output "$OUT/students" --tasks sst2 --epochs 3 \
    --eval-every 25 --lr 1e-4 --batch-size 32 --seed "$1" --model "TinyBERT s$1=$OUT/model-tinybert" \
    "MiniLM s$1=$OUT/model-minilm" "random-init s$1=$OUT/model-random"
}
seed1() { students 1; }
seed2() { students 2; }
lanes seed1 seed2

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("tinybert", "minilm"):
    last = json.loads((out / f"distill-{name}" / "metrics.jsonl").read_text().splitlines()[-1])
    print(name, {k: round(v, 4) for k, v in last.items() if isinstance(v, float)})
acc = lambda run: json.loads((out / "students" / run / "sst2" / "results.json").read_text())["metrics"]["sst2"]["acc"]
for model in ("TinyBERT", "MiniLM", "random-init"):
    seeds = [acc(f"{model} s{seed}") for seed in (1, 2)]
    print(f"{model}: SST-2 acc {sum(seeds) / 2:.1f} ({' / '.join(f'{s:.1f}' for s in seeds)})")
PY
