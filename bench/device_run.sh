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
# ORDER=unmeasured and ORDER=unmeasured_bench (one call each) run what no GPU has run to completion yet;
# ORDER=next_call what the 2026-12-04 session left unmeasured.
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
unmeasured() {
    # the checks that no GPU has run to completion yet (each bounded; ~9 minutes), each logged to its own file as
    # it goes: the GPU non-finite KDA test on the current intra kernel (97 s alone before it changed), the
    # in-place decode op (kimi::kda_decode_) and generate(backend="compile") that now uses it, the MoE op with its
    # combine kernel, the attn_res tests with the partial source, the per-sublayer read (stacked vs partial
    # apart) and the AttnRes overhead of the 9-layer model
    export PYTHONPATH=$PYTHONPATH:$REPO/tests
    timeout -k 5 150 python3 -m pytest -q -rfE -m cuda -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" \
        "$REPO/tests/test_kda_triton.py" -k "gpu_chunked_nonfinite or gpu_decode_in_place" > "$OUTDIR/kda_tests.log" 2>&1
    tail -3 "$OUTDIR/kda_tests.log"
    timeout -k 5 120 python3 -m pytest -q -rfE -m cuda -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" \
        "$REPO/tests/test_model_cuda.py" "$REPO/tests/test_moe.py" > "$OUTDIR/model_moe_cuda.log" 2>&1
    tail -3 "$OUTDIR/model_moe_cuda.log"
    timeout -k 5 60 python3 -m pytest -q -rfE -m cuda -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" \
        "$REPO/tests/test_attn_res.py" > "$OUTDIR/attn_res_tests.log" 2>&1; tail -3 "$OUTDIR/attn_res_tests.log"
    timeout -k 5 60 python3 "$REPO/bench/bench_attn_res.py" --sublayer-read > "$OUTDIR/attn_res_read.log" 2>&1
    grep sublayer "$OUTDIR/attn_res_read.log"
    timeout -k 10 170 python3 "$REPO/bench/bench_full_model.py" --skip-hf --attn-res 6 --layers 9 --prefill 4096 \
        --decode-batch 1 --row-seconds 120 --json "$OUTDIR/attn_res.json" > "$OUTDIR/attn_res.log" 2>&1
    tail -4 "$OUTDIR/attn_res.log"
}
unmeasured_bench() {
    # the rows no GPU has measured yet (~9 minutes): full-depth prefill with the MoE combine kernel and its kernel
    # profile, decode B=32 / 256 with the in-place KDA state and the MoE decode kernels up to 256 slots, and where
    # the compiled training step's time goes (ours 218 ms vs transformers + FLA 99.7 ms, cause unknown)
    export PYTHONPATH=$PYTHONPATH:$REPO/tests
    timeout -k 10 300 python3 "$REPO/bench/bench_full_model.py" --skip-hf --skip-generate --prefill 4096 \
        --decode-batch 32 256 --profile --json "$OUTDIR/full_decode.json" > "$OUTDIR/full_decode.log" 2>&1
    tail -8 "$OUTDIR/full_decode.log"
    timeout -k 5 200 python3 "$REPO/bench/bench_train.py" --rows ours_compiled --in-process --warmup 1 --iters 2 \
        --profile 30 --json "$OUTDIR/train.json" > "$OUTDIR/train_profile.log" 2>&1; tail -45 "$OUTDIR/train_profile.log"
}
probe() {
    # the measurements behind the next changes (~9 minutes): the MoE prefill kernels against torch._grouped_mm
    # (and their tiles), the MLA prompt attention backends, the AttnRes read's launch configurations, decode B=32
    # with the MoE decode kernels up to 256 slots vs 64, then the CUDA tests of the new kernels
    export PYTHONPATH=$PYTHONPATH:$REPO/tests
    timeout -k 5 150 python3 "$REPO/bench/bench_moe.py" --prefill --sweep --json "$OUTDIR/moe_prefill.json" \
        > "$OUTDIR/moe_prefill.log" 2>&1; tail -16 "$OUTDIR/moe_prefill.log"
    timeout -k 5 60 python3 "$REPO/bench/bench_mla_attention.py" > "$OUTDIR/mla_attention.log" 2>&1
    tail -12 "$OUTDIR/mla_attention.log"
    timeout -k 5 100 python3 "$REPO/bench/bench_attn_res.py" --sublayer-read > "$OUTDIR/attn_res_read.log" 2>&1
    grep -E "best|model's|launcher, partial|plain" "$OUTDIR/attn_res_read.log"
    timeout -k 10 150 python3 "$REPO/bench/bench_full_model.py" --skip-hf --skip-generate --prefill \
        --decode-batch 32 --moe-decode-slots 256 64 --json "$OUTDIR/b32.json" > "$OUTDIR/b32.log" 2>&1
    grep "decode B" "$OUTDIR/b32.log" | tail -2
    timeout -k 5 130 python3 -m pytest -q -rfE -m cuda -n 3 -p no:cacheprovider --rootdir "$REPO" \
        -c "$REPO/pyproject.toml" "$REPO/tests/test_moe.py" "$REPO/tests/test_model_cuda.py" \
        -k "prefill or cuda_paths or generate_compile" > "$OUTDIR/probe_tests.log" 2>&1
    tail -4 "$OUTDIR/probe_tests.log"
}
final() {
    # the session's changes measured (~8 minutes): their CUDA tests (bf16 prompt attention through cuDNN and flash,
    # the MoE dispatch, the AttnRes kernels), the full-depth rows (prefill T=4096 with its kernel profile, T=32768,
    # decode B=1 and B=32 in CUDA graphs), then the AttnRes overhead of the 9-layer model
    export PYTHONPATH=$PYTHONPATH:$REPO/tests
    timeout -k 5 90 python3 -m pytest -q -rfE -m cuda -n 3 -p no:cacheprovider --rootdir "$REPO" \
        -c "$REPO/pyproject.toml" "$REPO/tests/test_model_cuda.py" "$REPO/tests/test_moe.py" "$REPO/tests/test_attn_res.py" \
        -k "bf16_prompt or dispatch or attn_res" > "$OUTDIR/final_tests.log" 2>&1
    tail -4 "$OUTDIR/final_tests.log"
    timeout -k 10 260 python3 "$REPO/bench/bench_full_model.py" --skip-hf --skip-generate --prefill 4096 32768 \
        --decode-batch 1 32 --profile --json "$OUTDIR/full.json" > "$OUTDIR/full.log" 2>&1
    grep -E "^\| (ours|ceilings)" "$OUTDIR/full.log"
    timeout -k 10 100 python3 "$REPO/bench/bench_full_model.py" --skip-hf --attn-res 6 --layers 9 --prefill 4096 \
        --decode-batch 1 --row-seconds 90 --json "$OUTDIR/attn_res.json" > "$OUTDIR/attn_res.log" 2>&1
    grep -E "^\| attn_res" "$OUTDIR/attn_res.log"
}
next_call() {
    # what this session could not run (~8 minutes): the sync-free MoE backward's CUDA test, the training step with
    # the per-expert loop and with grouped GEMMs (host side profiled: the GPU idled half of the 181 ms step), and
    # the AttnRes model's kernel counts per variant (its overhead is not in the read op) and its reads inline
    # (KimiModel.attn_res_inline) against the op
    export PYTHONPATH=$PYTHONPATH:$REPO/tests
    timeout -k 5 90 python3 -m pytest -q -rfE -m cuda -p no:cacheprovider --rootdir "$REPO" \
        -c "$REPO/pyproject.toml" "$REPO/tests/test_moe.py" -k "backward_grouped_mm" > "$OUTDIR/bwd_test.log" 2>&1
    tail -3 "$OUTDIR/bwd_test.log"
    for bwd in loop grouped_mm; do
        timeout -k 5 150 python3 "$REPO/bench/bench_train.py" --rows ours_compiled --in-process --warmup 1 \
            --iters 3 --moe-backward $bwd --profile 25 > "$OUTDIR/train_$bwd.log" 2>&1
        grep -E "^## profile|^ours_compiled " "$OUTDIR/train_$bwd.log"
    done
    timeout -k 10 170 python3 "$REPO/bench/bench_full_model.py" --skip-hf --attn-res 6 --layers 9 --prefill 4096 \
        --decode-batch 1 --row-seconds 150 --profile --attn-res-inline all --json "$OUTDIR/attn_res.json" \
        > "$OUTDIR/attn_res.log" 2>&1
    grep -E "^\| attn_res" "$OUTDIR/attn_res.log"
}
fp32_parity() {
    # transformers' own fp32 error next to ours (FLA autotunes its fp32 kernels for minutes: its own call)
    export PYTHONPATH=$PYTHONPATH:$REPO/tests
    timeout -k 5 "${FP32_S:-400}" python3 -m pytest -q -s -rA -m cuda -p no:cacheprovider --rootdir "$REPO" \
        -c "$REPO/pyproject.toml" "$REPO/tests/test_fp32_parity_cuda.py" > "$OUTDIR/fp32.log" 2>&1
    grep -E "rel|passed|failed" "$OUTDIR/fp32.log"
}
for step in ${ORDER:-bench tests}; do "$step"; done
