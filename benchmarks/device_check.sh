#!/usr/bin/env bash
# A call on a GPU machine: GPU tests, cold/warm process start (disk cache), compute-sanitizer memcheck and racecheck
# on the kernels, then the benchmarks. Logs and tables go to $OUT.
# Usage (repository root): CT_COMMIT=<hash> [PARTS="tests cache memcheck racecheck bench"] [KERNEL_CACHE=file.tgz]
#   bash benchmarks/device_check.sh [bench...]
# with the hash written in from the local checkout (the device's copy of the repository reports a stale HEAD).
# PARTS: which parts run (default all; all of them take longer than one 600-s call, with the tests on 8 workers
# about 250 s). KERNEL_CACHE: a tarball of CuPy's kernel cache brought back from an earlier call ($OUT/kernel-
# cache.tgz, carried in an ignored folder): unpacked first, so kernels whose source did not change load instead of
# compiling (NVRTC takes about 85 s of CPU for every family, in every process that starts cold); packed again last.
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}
PARTS=${PARTS:-tests cache memcheck racecheck bench}
part() { [[ " $PARTS " == *" $1 "* ]]; }
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-$HOME/.cupy/kernel_cache}
mkdir -p "$CUPY_CACHE_DIR"
[ -n "${KERNEL_CACHE:-}" ] && [ -f "$KERNEL_CACHE" ] && tar xzf "$KERNEL_CACHE" -C "$CUPY_CACHE_DIR"
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)" | tee -a "$OUT/gpu.txt"

part tests && python3 -m pytest -m gpu -q -rs -n 8 -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log" | tail -15

# A fresh cache: the first process compiles, the second must load from disk.
part cache && CUPY_CACHE_DIR=$(mktemp -d) bash -c 'TIMEFORMAT="process wall time %R s"; for i in 1 2; do
    time python3 -m cupy_transformer.cli info | grep -E "ready|GPU 0"; done' 2>&1 | tee "$OUT/cache.log"

# memcheck: every kernel family on its small shapes (the large ones only cost time under the checker).
small="(gpu_matches and not 8192 and not 4095) or misaligned or pre_add or (bias_act and gpu and not 4104)"
small+=" or (residual_add and test_gpu and not 4104 and not 512) or (test_gemv and gpu and not 11008 and not 8192)"
small+=" or (softmax_context and (prompt_then_decode or padded or rank or captured))"
small+=" or (prefill_attention and prefill_kernel_after_a_past) or (decode_attention and (additive or cuda_core))"
small+=" or (softmax and gpu and not context and not 70001) or (test_sampling and kernel and not 128256)"
small+=" or (test_sampling and greedy and not 128256) or (test_embedding and gpu) or (test_decode_state and gpu)"
part memcheck && compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -m gpu -q -p no:cacheprovider \
    tests/ops -k "$small" 2>&1 | tail -4 | tee "$OUT/memcheck.log"
# The decode kernels launched programmatically in captured graphs (each waits for the kernel before).
part memcheck && compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -m gpu -q -p no:cacheprovider \
    tests/runtime/test_programmatic.py tests/test_generation.py -k "programmatic or captured" 2>&1 | tail -4 \
    | tee -a "$OUT/memcheck.log"
# racecheck: our kernels with shared memory (norm, the GEMV and its norm prologue, decode and prefill attention, the softmax's named
# barriers, the sampler's histograms, greedy's block maximum). The matmul tests also run cuBLAS, whose nvjet kernels
# synchronise through TMA barriers that racecheck does not model and reports (and its --kernel-name-exclude crashes
# the sanitizer on module load), so the races are counted outside them.
shared="gpu_matches and (384 or 1001 or 70001)"
shared+=" or (test_gemv and (gpu_epilogue or (gpu_shapes and 1600 and 6400)) and not float32)"
shared+=" or (test_gemv and norm_prologue and 776 and not bfloat16)"
shared+=" or (softmax_context and prompt_then_decode and float16)"
shared+=" or (prefill_attention and prefill_kernel_after_a_past and float16) or (decode_attention and additive)"
shared+=" or (softmax and gpu and not context and (long or short) and not 70001)"
shared+=" or (test_sampling and kernel and not 128256 and not strided) or (test_sampling and greedy_ties)"
if part racecheck; then
    compute-sanitizer --tool racecheck --print-limit 10000 python3 -m pytest -m gpu -q -p no:cacheprovider tests/ops \
        -k "$shared" > "$OUT/racecheck-full.log" 2>&1
    tail -2 "$OUT/racecheck-full.log" | tee "$OUT/racecheck.log"
    ours=$(grep -A1 "Race reported" "$OUT/racecheck-full.log" | grep "access at" | grep -vc nvjet)
    echo "races outside cuBLAS's nvjet kernels: $ours" | tee -a "$OUT/racecheck.log"
fi

if part bench; then
    for bench in "${@:-bench_norm}"; do
        python3 "benchmarks/$bench.py" 2>&1 | tee "$OUT/$bench.log"
    done
fi
tar czf "$OUT/kernel-cache.tgz" -C "$CUPY_CACHE_DIR" .
