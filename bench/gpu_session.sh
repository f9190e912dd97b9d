#!/usr/bin/env bash
# One device-tool call on the lent H200: install, GPU tests in bf16, kernel self-check, benchmark report.
# Prepare here first (the GPU image lacks av, diffusers, nvtx; it has torch 2.11 / triton 3.6):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl av diffusers nvtx
# then call the device tool with carry [".whl"] and the command `bash bench/gpu_session.sh`.
# Results land in $OUT (tests log, check table, report md/json/png): copy them into bench/results/ and commit.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 900 python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -30
timeout 300 opensora-fast check 2>&1 | tee "$OUT/check.txt"
timeout 1500 python3 -m bench.report --out "$OUT" ${BENCH_SUITES:-} 2>&1 | tail -20
