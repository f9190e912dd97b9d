"""Small kernels with known machine-code properties, launched under ``kernels._record.recording()`` and
judged by the sm_90 gate: proves that the gate sees what it claims to see. Run as a script (without
``TRITON_INTERPRET``) by tests/test_sm90_gate.py; prints one JSON object."""

from __future__ import annotations

import json
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def _probe_varlen_kernel(
    X,  # (n,) float
    CU,  # (2,) lengths; read only when varlen != 0
    Out,  # (n,) float
    n,
    varlen,
    BLOCK: tl.constexpr,
):
    n_k = n
    if varlen != 0:
        n_k = tl.load(CU + 1) - tl.load(CU)
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n_k, other=0.0)
    tl.store(Out + offs, x * 2, mask=offs < n_k)


@triton.jit
def _probe_rows_kernel(
    X,  # (rows, 72) bf16, row stride stride_r
    Out,  # (rows, 72) bf16, same strides
    stride_r,
    HINT: tl.constexpr,  # promise 16-byte aligned rows (stride a multiple of 8 elements)
    BLOCK_R: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row = r * stride_r
    if HINT:
        row = tl.multiple_of(row, 8)
    c = tl.arange(0, 64)
    x = tl.load(X + row[:, None] + c[None, :])
    tl.store(Out + row[:, None] + c[None, :], x + 1)


@triton.jit
def _probe_matmul_kernel(
    A,  # (M, K) bf16 contiguous
    B,  # (K, N) bf16 contiguous
    C,  # (M, N) fp32 contiguous
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pm, pn = tl.program_id(0), tl.program_id(1)
    rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(A + rm[:, None] * K + (k0 + rk)[None, :])
        b = tl.load(B + (k0 + rk)[:, None] * N + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(C + rm[:, None] * N + rn[None, :], acc)


def _launch_all():
    meta = {"device": "meta"}
    x = torch.empty(1024, dtype=torch.float32, **meta)
    out = torch.empty_like(x)
    # an fp32 dummy where the kernel loads integers: the runtime types it *fp32 (the attention CU_K bug)
    _probe_varlen_kernel[(1,)](x, torch.empty(2, dtype=torch.float32, **meta), out, 1000, 0, BLOCK=1024)
    _probe_varlen_kernel[(1,)](x, torch.empty(2, dtype=torch.int32, **meta), out, 1000, 0, BLOCK=1024)
    rows = torch.empty(4096, 72, dtype=torch.bfloat16, **meta)
    for hint in (False, True):
        _probe_rows_kernel[(4096 // 32,)](rows, torch.empty_like(rows), 72, HINT=hint, BLOCK_R=32)
    M = N = K = 4096
    a = torch.empty(M, K, dtype=torch.bfloat16, **meta)
    b = torch.empty(K, N, dtype=torch.bfloat16, **meta)
    c = torch.empty(M, N, dtype=torch.float32, **meta)
    for bn, stages in ((128, 3), (128, 1), (16, 3)):
        grid = (M // 128, N // bn)
        _probe_matmul_kernel[grid](a, b, c, M, N, K, BLOCK_M=128, BLOCK_N=bn, BLOCK_K=64, num_warps=8,
                                   num_stages=stages)  # fmt: skip


def main() -> None:
    from opensora_fast.kernels import _sm90
    from opensora_fast.kernels._record import recording

    with recording() as rec:
        _launch_all()
    out = []
    for launch in rec.launches:
        res = _sm90.compile_launch(launch)
        est = _sm90.estimate_launch(launch, res)
        out.append(
            {
                "kernel": launch.kernel,
                "signature": launch.signature,
                "constexprs": {k: v for k, v in launch.constexpr_by_name().items() if not callable(v)},
                "num_stages": launch.options.get("num_stages"),
                "failures": res.failures,
                "error": res.error,
                "widths": res.sass.global_widths,
                "hgmma": res.sass.hgmma,
                "async_copies": res.sass.async_copies,
                "est_s": est["s"],
                "trips": est.get("trips"),
            }
        )
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
