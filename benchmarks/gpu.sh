#!/usr/bin/env bash
# The GPU check (issue 13) as one device call: benchmarks/bench_accelerator.py (bf16, random BERT-base teacher ->
# MiniMoE 6L;384H x4, T = 128 and 512), then the default test suite on the GPU.
#
#   bash benchmarks/gpu.sh prepare   # here, once: .gpu/ gets the wheels the device image lacks, the packaged
#                                    # teacher's tokenizer and the two shard dirs (about 63 MB; .git/info/exclude)
#   bash benchmarks/gpu.sh           # there: run(command="bash benchmarks/gpu.sh", carry=[".gpu"], timeout_s=590)
#
# The device image has its own CUDA torch, tokenizers and most of the rest; the packaged teacher (an 83 MB wheel)
# does not fit the 64 MiB a call carries, so the tests that need it skip there. Results land in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=.gpu

if [[ "${1:-run}" == prepare ]]; then
    grep -qx "/$GPU/" .git/info/exclude 2>/dev/null || echo "/$GPU/" >> .git/info/exclude
    rm -rf "$GPU" && mkdir -p "$GPU/wheels"
    platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$GPU/wheels" transformers==5.24.0 datasets==5.2.0 blingfire==0.1.8 hjson==3.1.0 \
        dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 pydantic_core==2.50.5 typing-inspection==0.4.5 \
        annotated-types==0.8.0
    python3 -m pip wheel -q --no-deps -w "$GPU/wheels" deepspeed==0.19.8 seqeval==1.2.2  # sdists only on PyPI
    PY=${PY:-.venv/bin/python}
    tokenizer=$("$PY" -c "from minimoe_common.tokenizer import packaged_teacher_dir as d; print(d())")
    mkdir -p "$GPU/tokenizer" && cp "$tokenizer"/{vocab.txt,tokenizer.json,tokenizer_config.json,special_tokens_map.json} "$GPU/tokenizer/"
    for n in 128 512; do
        "$PY" -m data_prep build --input examples/data/wiki_sample --output "$GPU/shards$n" --max-seq-length $n \
            --tokenizer "$GPU/tokenizer" > /dev/null
    done
    du -sh "$GPU"
    exit 0
fi

OUT=${OUT:-$(mktemp -d)}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$GPU"/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, deepspeed, transformers; print(torch.__version__, deepspeed.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 240 python3 benchmarks/bench_accelerator.py --tokenizer "$GPU/tokenizer" --shards "$GPU"/shards128 "$GPU"/shards512 \
    2>&1 | tee "$OUT/bench_accelerator.md" || echo "bench_accelerator: exit $?" | tee -a "$OUT/bench_accelerator.md"
# pytest-xdist is in the image; the tests pick free ports, so they can run side by side.
timeout 240 python3 -m pytest -m "not slow" -q -rfE -p no:cacheprovider -n 8 --timeout 200 tests > "$OUT/tests.txt" 2>&1 \
    || true
tail -15 "$OUT/tests.txt"
