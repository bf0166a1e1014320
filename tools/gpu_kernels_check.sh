#!/usr/bin/env bash
# GPU calls that settle the SSD kernels' numbers (issue #4): the benchmark against mamba_ssm at
# the shapes (N = 256 first) and the GPU kernel tests in a first 10-minute call, the
# per-kernel sweeps at N = 256 in a second (STAGES=tune). Logs go to $OUT (or ./gpu-out); the
# ratio table is printed last.
#
# On the CPU machine first (once): bash ../shared/device/prepare-wheels.sh   (fills .whl/)
# Then, on the GPU machine (device tool, carry [".whl"]):  bash tools/gpu_kernels_check.sh
# and, in a second call:                                  STAGES=tune bash tools/gpu_kernels_check.sh
#
# Stage limits (seconds) fit one 10-minute call; first-use tuning compiles every launch
# candidate (1-3 minutes at the first shape).
set -o pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:$PWD/kernels:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
STAGES=${STAGES-bench tests}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

SHAPES=("2,8192,256,64,8,256" "4,4096,64,64,1,128" "8,2048,64,64,8,128" "1,16384,64,64,1,128"
        "16,1024,64,64,1,128")
if [[ " $STAGES " == *" bench "* ]]; then
    args=()
    for s in "${SHAPES[@]}"; do args+=(--shape "$s"); done
    timeout "${BENCH_S:-280}" python3 tools/bench_kernels.py --no-reference --verbose \
        "${args[@]}" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" \
        | grep -v "^hybrid_kernels: .*every candidate\|DEBUG"
fi
if [[ " $STAGES " == *" tests "* ]]; then
    timeout "${TESTS_S:-290}" python3 -m pytest -q -m gpu tests/kernels -p no:cacheprovider \
        2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
fi
if [[ " $STAGES " == *" tune "* ]]; then
    timeout "${TUNE_S:-540}" python3 tools/tune_ssd.py --shape 2,8192,256,64,8,256 \
        --only "split y,dx+dB dC,bwd states,dstates" 2>&1 | tee "$OUT/tune.log" | grep -v "^  _"
fi
if [[ -s "$OUT/bench.log" ]]; then  # the ratio table again, last
    sed -n '/ours \/ mamba_ssm best/,$p' "$OUT/bench.log"
fi
