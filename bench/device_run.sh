#!/usr/bin/env bash
# GPU call(s): install the carried fla-core wheel (.whl/, the benchmark peer), expose the package without
# installing it, print the GPU, run the benchmark table and the CUDA tests. Logs go to $OUT (or the first arg).
#   bash bench/device_run.sh [OUTDIR]
# BENCH_S / TEST_S bound each part in seconds; PARTS picks the bench parts (run_all.py --parts; default: all but
# the correctness "checks" rows, which the CUDA tests cover); ORDER="tests" or "bench" runs one half; TESTS
# overrides the CUDA test files; ORDER="ncu_profile" profiles the forward's kernels with Nsight Compute (NCU_S
# bounds it); TEST_WORKERS sets pytest-xdist workers (default 4: most test time is Triton
# compiling on the CPU). On the H200 the bench parts take about 5 minutes (train up to 3 on a cold machine: FLA's
# backward autotunes) and the CUDA tests about 8 on one worker, so the whole does not fit one 10-minute
# call: run ORDER=bench and ORDER=tests as two calls. MODEL_LAYERS=0 benchmarks the full 27-layer model.
# ORDER="full_table pack" runs every row of issue 19 in one process, ours and transformers + FLA (~4 minutes
# with a warm Inductor cache, more cold; FULL_S bounds it); "same_run" the prefill rows alone; "model_tests
# short_conv_sweep ours_profile" the CUDA model tests, the short conv's tiles and our rows with the decode step's
# kernels by op and shape; decode_profile that profile with and without the SwiGLU inline; moe_prefill_sweep the
# MoE prefill tiles and the layout alone (SWEEP_S bounds it); fp32_parity transformers' fp32 error beside ours
# (~3 minutes); prefill_32k the T=32768 prefill profile and MoE tiles; compile_cache a cold generate that saves
# its compiled graphs and a fresh process that loads them. A last "pack" step archives the outputs
# (the device returns 8 files at most). The one-off plans of earlier calls are in git (docs/benchmarks.md names
# their trees).
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
bench() {
    # shellcheck disable=SC2086
    timeout -k 10 "${BENCH_S:-270}" python3 "$REPO/bench/run_all.py" --json "$OUTDIR/bench.json" \
        --parts ${PARTS:-kda attn_res model train} ${MODEL_LAYERS:+--model-layers "$MODEL_LAYERS"} 2>&1 | tee "$OUTDIR/bench.log"
}
tests() {
    # cheap files first; test_kda_triton compiles the most kernels
    local files=${TESTS:-"tests/test_short_conv_triton.py tests/test_attn_res.py tests/test_moe.py tests/test_kda_triton.py"}
    local paths=()
    for f in $files; do paths+=("$REPO/$f"); done
    timeout -k 10 "${TEST_S:-150}" python3 -m pytest -m cuda -n "${TEST_WORKERS:-4}" -v -rfE --durations=15 -p no:cacheprovider \
        --rootdir "$REPO" -c "$REPO/pyproject.toml" "${paths[@]}" 2>&1 | tee "$OUTDIR/pytest_cuda.log"
}
ncu_profile() {
    # hardware counters + per-instruction stall samples of the forward's kernels at T=16384 (bench_kda's ncu job);
    # NCU_KERNELS is a regex of kernel names, NCU_COUNT how many launches (default 3: the intra kernel, its SLOW
    # relaunch, the pass). Exports: details (text) and the SASS / source pages (csv; each source line's row is
    # followed by its SASS rows, so sum the line rows or the SASS rows, not both).
    local rep="$OUTDIR/fwd_t16384"
    timeout -k 10 "${NCU_S:-240}" ncu --clock-control none --set full --import-source yes -f -o "$rep" \
        -k "regex:${NCU_KERNELS:-_kda_intra_kernel|_kda_pass_kernel}" -c "${NCU_COUNT:-3}" \
        python3 "$REPO/bench/bench_kda.py" --only ncu > "$OUTDIR/ncu_run.log" 2>&1
    ncu -i "$rep.ncu-rep" --page details > "$OUTDIR/ncu_details.txt" 2>&1
    ncu -i "$rep.ncu-rep" --page source --csv --print-source sass > "$OUTDIR/ncu_sass.csv" 2>&1
    ncu -i "$rep.ncu-rep" --page source --csv --print-source cuda,sass > "$OUTDIR/ncu_src_sass.csv" 2>&1
    tail -3 "$OUTDIR/ncu_run.log"; grep -E "Duration|Registers Per|Achieved Occupancy|Issue Slots Busy|Compute \(SM\) Throughput|Memory Throughput" "$OUTDIR/ncu_details.txt"
}
decode_profile() {
    # where the full-depth decode B=1 step's 4.65 ms of kernels go, by op and input shape (which projection each
    # small GEMM is: cuBLAS ran ~300 of them at 5-14 us each, 2.25 ms for ~0.8 ms of bytes), with the MLPs' GEMVs
    # as cuBLAS calls and as fused reductions (SwiGLU.inline_one_row); ~4 minutes
    export PYTHONPATH=$PYTHONPATH:$REPO/tests
    timeout -k 10 "${PROFILE_S:-330}" python3 "$REPO/bench/bench_full_model.py" --skip-hf --skip-generate --prefill 4096 --decode-batch 1 \
        --swiglu-inline 0 1 --profile --json "$OUTDIR/decode_profile.json" > "$OUTDIR/decode_profile.log" 2>&1
    grep -E "^\| ours|^## compile phases" "$OUTDIR/decode_profile.log"
}
moe_prefill_sweep() {
    # the MoE prefill kernels' tiles at T=4096 against torch._grouped_mm (~2 minutes; the default streams the
    # weights at ~half the copy rate, its down kernel at 1.9 TB/s)
    timeout -k 5 "${SWEEP_S:-180}" python3 "$REPO/bench/bench_moe.py" --prefill --sweep --json "$OUTDIR/moe_prefill.json" \
        > "$OUTDIR/moe_prefill.log" 2>&1; tail -20 "$OUTDIR/moe_prefill.log"
}
fp32_parity() {
    # transformers' own fp32 error next to ours (FLA autotunes its fp32 kernels for minutes: its own call)
    export PYTHONPATH=$PYTHONPATH:$REPO/tests
    timeout -k 5 "${FP32_S:-400}" python3 -m pytest -q -s -rA -m cuda -p no:cacheprovider --rootdir "$REPO" \
        -c "$REPO/pyproject.toml" "$REPO/tests/test_fp32_parity_cuda.py" > "$OUTDIR/fp32.log" 2>&1
    grep -E "rel|passed|failed" "$OUTDIR/fp32.log"
}
same_run() {
    # ours and transformers + FLA in one process, the issue's same-run ratios: prefill B=1 T=4096 and 32768
    # (~7 minutes: two cold compiles, then FLA's autotuning); the decode rows' transformers times are ~115 ms a
    # step, far from the ratios' bounds, so they stay out of this call
    export PYTHONPATH=$PYTHONPATH:$REPO/tests
    timeout -k 10 "${SAME_RUN_S:-540}" python3 "$REPO/bench/bench_full_model.py" --prefill 4096 32768 --decode-batch \
        --skip-generate --json "$OUTDIR/same_run.json" > "$OUTDIR/same_run.log" 2>&1
    grep -E "^\| (ours|transformers)" "$OUTDIR/same_run.log"
}
prefill_32k() {
    # where the T=32768 prefill's time goes (kernels by name), then the MoE op and its tiles at T=32768 (1024 rows
    # an expert: compute-bound, where T=4096's tiles were picked for streaming weights); ~6 minutes
    export PYTHONPATH=$PYTHONPATH:$REPO/tests
    timeout -k 10 200 python3 "$REPO/bench/bench_full_model.py" --skip-hf --skip-generate --prefill 32768 \
        --decode-batch --profile --json "$OUTDIR/prefill_32k.json" > "$OUTDIR/prefill_32k.log" 2>&1
    grep -E "^\| ours" "$OUTDIR/prefill_32k.log"
    timeout -k 5 "${SWEEP_S:-240}" python3 "$REPO/bench/bench_moe.py" --prefill --tokens 32768 --sweep \
        --sweep-tokens 32768 --json "$OUTDIR/moe_prefill_32k.json" > "$OUTDIR/moe_prefill_32k.log" 2>&1
    tail -20 "$OUTDIR/moe_prefill_32k.log"
}
short_conv_sweep() {
    # the q|k|v conv at T=4096 / 32768 against its bytes floor, and its tiles (~1 minute)
    timeout -k 5 "${SWEEP_S:-120}" python3 "$REPO/bench/bench_short_conv.py" --sweep --json "$OUTDIR/short_conv.json" \
        > "$OUTDIR/short_conv.log" 2>&1; grep "^|" "$OUTDIR/short_conv.log"
}
model_tests() {
    # the CUDA model (static decode step through the layer regions) and the short conv kernel (~2 minutes)
    TESTS="tests/test_model_cuda.py tests/test_short_conv_triton.py" TEST_S=${MODEL_TEST_S:-170} tests \
        | grep -E "passed|failed|error" | tail -5
}
ours_profile() {
    # our rows alone (prefill T=4096 / 32768, decode B=1), the T=4096 prefill's and the decode step's kernels (~4 min)
    export PYTHONPATH=$PYTHONPATH:$REPO/tests
    timeout -k 10 "${PROFILE_S:-300}" python3 "$REPO/bench/bench_full_model.py" --skip-hf --skip-generate \
        --prefill 4096 32768 --decode-batch 1 --profile --json "$OUTDIR/ours_profile.json" \
        > "$OUTDIR/ours_profile.log" 2>&1
    grep -E "^\| ours" "$OUTDIR/ours_profile.log"
}
full_table() {
    # every row of issue 19 in one process: ours, then transformers + FLA (prefill T=4096 / 32768, decode B=1 / 32
    # / 256 in CUDA graphs, a cold generate, transformers' rows); FULL_S bounds it
    export PYTHONPATH=$PYTHONPATH:$REPO/tests
    timeout -k 10 "${FULL_S:-560}" python3 "$REPO/bench/bench_full_model.py" --json "$OUTDIR/full_table.json" \
        > "$OUTDIR/full_table.log" 2>&1
    grep -E "^\| (ours|transformers)" "$OUTDIR/full_table.log"
}
compile_cache() {
    # a cold generate(backend="compile") that saves its compiled graphs (save_compile_cache), then a fresh process
    # with empty Inductor and Triton caches that loads them before its first call: a second machine of a
    # deployment (~3 minutes)
    export PYTHONPATH=$PYTHONPATH:$REPO/tests
    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_a TRITON_CACHE_DIR=/tmp/triton_a timeout -k 5 "${CACHE_SAVE_S:-150}" \
        python3 "$REPO/bench/bench_full_model.py" --skip-hf --prefill --decode-batch \
        --save-compile-cache /tmp/graphs.bin --json "$OUTDIR/cache_save.json" > "$OUTDIR/cache_save.log" 2>&1
    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_b TRITON_CACHE_DIR=/tmp/triton_b timeout -k 5 "${CACHE_LOAD_S:-110}" \
        python3 "$REPO/bench/bench_full_model.py" --skip-hf --prefill --decode-batch \
        --load-compile-cache /tmp/graphs.bin --json "$OUTDIR/cache_load.json" > "$OUTDIR/cache_load.log" 2>&1
    grep -hE "^\| (ours gen|compile)" "$OUTDIR/cache_save.log" "$OUTDIR/cache_load.log"
}
pack() {
    # the device returns at most 8 files: everything but the driver's log in one archive
    (cd "$OUTDIR" && tar czf /tmp/outputs.tgz --exclude=driver.log . \
        && find . -mindepth 1 -maxdepth 1 ! -name driver.log -exec rm -rf {} + && mv /tmp/outputs.tgz .)
}
for step in ${ORDER:-bench tests}; do "$step"; done
