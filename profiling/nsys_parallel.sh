#!/usr/bin/env bash
# Nsight Systems timelines of sequence-parallel STDiT3 training steps under torchrun + NCCL, one report per
# rank, with NVTX ranges per overlapped chunk (opensora_fast.parallel: "ulysses.qkv[k]", "ulysses.attn[k]",
# "ulysses.proj[k]", "fastseq.qkv[j]", "fastseq.dW", "dsp.block[k]") and NVTX marks where each collective
# is issued and waited on ("issue ulysses.qkv_a2a[1]", "wait ..."), beside NCCL's own kernels, so the
# overlap shows on the timeline: a chunk's compute on the compute stream while the next chunk's
# ncclDevKernel_AllToAll / SendRecv / Broadcast / ReduceScatter runs on NCCL's stream.
# Needs >= 2 CUDA GPUs and nsys on PATH. Run from the repository root:
#
#   profiling/nsys_parallel.sh [OUT_DIR] [NPROC] [bench_parallel options...]
#   profiling/nsys_parallel.sh profiling/out/nsys-sp 8 --model xl --size 30,30,54 --dtype bf16 --modes ulysses
#
# Only the timed steps are captured (bench_parallel --cuda-profile: cudaProfilerStart/Stop around them).
# Writes OUT_DIR/rank<R>.nsys-rep (open several in nsys-ui: File > Open, "multiple reports" aligns them on
# one timeline), OUT_DIR/stats-rank0.txt (NCCL / compute kernel and NVTX summaries) and OUT_DIR/bench.jsonl
# (bench_parallel's byte counts and overlap %).
set -euo pipefail

OUT="${1:-profiling/out/nsys-parallel}"
NPROC="${2:-2}"
if [[ $# -gt 0 ]]; then shift; fi
if [[ $# -gt 0 ]]; then shift; fi
command -v nsys >/dev/null || { echo "nsys (Nsight Systems) is not on PATH" >&2; exit 1; }
mkdir -p "$OUT"

# NCCL_NVTX_DISABLE=0: NCCL's own NVTX ranges (collective name and size) on the timeline as well
NCCL_NVTX_DISABLE=0 torchrun --nproc_per_node "$NPROC" --no-python \
  nsys profile \
    --trace=cuda,nvtx,osrt \
    --sample=none --cpuctxsw=none \
    --capture-range=cudaProfilerApi --capture-range-end=stop \
    --force-overwrite=true \
    --output="$OUT/rank%q{RANK}" \
  python -m bench.bench_parallel --cuda-profile --out "$OUT/bench.jsonl" "$@"

nsys stats --force-export=true --report cuda_gpu_kern_sum,nvtx_sum --format column \
  "$OUT/rank0.nsys-rep" >"$OUT/stats-rank0.txt"
echo "wrote $OUT/rank*.nsys-rep, $OUT/stats-rank0.txt and $OUT/bench.jsonl"
