#!/usr/bin/env bash
# Nsight Systems timeline of STDiT3 denoising steps with the model's NVTX ranges (one per block and per
# step). Needs CUDA and nsys on PATH. Run from the repository root:
#
#   profiling/nsys_stdit3.sh [OUT_DIR] [profile_stdit3.py options...]
#   profiling/nsys_stdit3.sh profiling/out/nsys-720p --res 720p --length 2s --steps 2
#
# Only the profiled steps are captured (cudaProfilerStart/Stop around them: warm-up, Triton compilation
# and autotuning stay out of the timeline). Writes OUT_DIR/stdit3.nsys-rep (open in nsys-ui) and
# OUT_DIR/stats.txt (per-kernel GPU time and per-NVTX-range summaries).
set -euo pipefail

OUT="${1:-profiling/out/nsys}"
if [[ $# -gt 0 ]]; then shift; fi
command -v nsys >/dev/null || { echo "nsys (Nsight Systems) is not on PATH" >&2; exit 1; }
mkdir -p "$OUT"

nsys profile \
  --trace=cuda,nvtx \
  --sample=none --cpuctxsw=none \
  --capture-range=cudaProfilerApi --capture-range-end=stop \
  --force-overwrite=true \
  --output="$OUT/stdit3" \
  python -m profiling.profile_stdit3 --profiler none --nvtx --out "$OUT" "$@"

nsys stats --force-export=true --report cuda_gpu_kern_sum,nvtx_sum --format column \
  "$OUT/stdit3.nsys-rep" >"$OUT/stats.txt"
echo "wrote $OUT/stdit3.nsys-rep and $OUT/stats.txt"
