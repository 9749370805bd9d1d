#!/usr/bin/env bash
# One full GPU call: install the carried fla-core wheel (.whl/, the benchmark peer), expose the package without
# installing it, print the GPU, run the benchmark table and the CUDA tests. Logs go to $OUT (or the first arg).
#   bash bench/device_run.sh [OUTDIR]        BENCH_S / TEST_S bound each part in seconds.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUTDIR=${1:-${OUT:-/tmp/kimi_out}}
mkdir -p "$OUTDIR"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$REPO"/.whl/*.whl
# pyproject maps ops/, lowering/, export/ to kimi_compile.*; this copy of the tree is the device's own, so
# mirror the mapping with links inside it (bench scripts put the repo root first on sys.path)
for sub in ops lowering export; do ln -sfn "$REPO/$sub" "$REPO/kimi_compile/$sub"; done
export PYTHONPATH=/tmp/site:$REPO:$REPO/bench PYTHONUNBUFFERED=1
cd /tmp
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUTDIR/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUTDIR/gpu.txt"
timeout "${BENCH_S:-270}" python3 "$REPO/bench/run_all.py" --json "$OUTDIR/bench.json" 2>&1 | tee "$OUTDIR/bench.log"
timeout "${TEST_S:-150}" python3 -m pytest -m cuda -q -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" \
    "$REPO/tests/test_kda_triton.py" "$REPO/tests/test_short_conv_triton.py" "$REPO/tests/test_attn_res.py" \
    "$REPO/tests/test_moe.py" 2>&1 | tee "$OUTDIR/pytest_cuda.log"
