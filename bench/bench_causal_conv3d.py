"""causal_conv3d at the temporal VAE's shapes (opensora-v1.2.md §3.3): Triton implicit GEMM with the
causal padding fused into its loads, on channels_last_3d tensors as the temporal VAE runs it (FAST path:
C_in, C_out multiples of 128), vs cuDNN (F.pad + F.conv3d, channels_last_3d) and eager contiguous.
flops = 2*M*N*K (x3 for forward + backward: dx and dweight are GEMMs of the same size).
``test_peak_memory`` reports the forward's extra memory above inputs and output (on GPU): the
padded copy F.pad makes is the difference this kernel removes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from opensora_fast.kernels import causal_conv3d, reference
from opensora_fast.kernels.reference import causal_pad_amounts

from bench.harness import HAS_CUDA, Case, fwd_bwd, ours, run_case_with_benchmark, suite_params

# (B, C_in, C_out, T, H, W, k, stride_t)
REAL_SHAPES = [
    (1, 128, 128, 17, 90, 160, 3, 1),
    (1, 256, 256, 17, 90, 160, 3, 1),
    (1, 256, 256, 17, 90, 160, 3, 2),
    (1, 512, 512, 5, 90, 160, 3, 1),
    (1, 512, 512, 5, 45, 80, 3, 1),
    (1, 128, 128, 17, 45, 80, 3, 1),
]
TINY_SHAPES = [(1, 4, 8, 3, 4, 5, 3, 1), (1, 4, 8, 4, 3, 3, 3, 2)]


def _cudnn(x, w, b, stride):
    tp, hp, wp = causal_pad_amounts(w.shape[2:], stride[0])
    return F.conv3d(F.pad(x, (wp, wp, hp, hp, tp, 0)), w, b, stride=stride)


PROVIDERS = {
    "opensora_fast": (ours(lambda x, w, b, s: causal_conv3d(x, w, b, stride=s)), True, False),
    "cudnn": (_cudnn, True, True),  # channels_last_3d, vendor path
    "eager": (reference.causal_conv3d_ref, False, False),  # contiguous NCDHW
}


def _maker(shape, provider, mode, device, dtype):
    B, Ci, Co, T, H, W, k, st = shape
    fn, channels_last, _ = PROVIDERS[provider]

    def make():
        x = torch.randn(B, Ci, T, H, W, device=device, dtype=dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last_3d)
        w = torch.randn(Co, Ci, k, k, k, device=device, dtype=dtype) * (Ci * k**3) ** -0.5
        b = torch.randn(Co, device=device, dtype=dtype)
        if mode == "fwd":
            return lambda: fn(x, w, b, (st, 1, 1))
        for t in (x, w, b):
            t.requires_grad_()
        return fwd_bwd(lambda: fn(x, w, b, (st, 1, 1)), [x, w, b])

    return make


def _sizes(shape, elem):
    B, Ci, Co, T, H, W, k, st = shape
    T_out = T // st
    M, N, K = B * T_out * H * W, Co, Ci * k**3
    fwd_bytes = (B * Ci * T * H * W + Co * Ci * k**3 + Co + M * N) * elem
    return M, N, K, fwd_bytes


def cases(device, dtype, tiny) -> list[Case]:
    elem = torch.finfo(dtype).bits // 8
    out = []
    for shape in TINY_SHAPES if tiny else REAL_SHAPES:
        B, Ci, Co, T, H, W, k, st = shape
        M, N, K, fwd_bytes = _sizes(shape, elem)
        name = f"B={B} C={Ci}->{Co} T={T} {H}x{W} k={k} st={st}"
        for provider, (_, _, gpu_only) in PROVIDERS.items():
            for mode in ("fwd", "fwd+bwd"):
                # backward: read dy, x, w; write dx, dw (+ db)
                bwd_bytes = (M * N + B * Ci * T * H * W + 2 * Co * Ci * k**3 + B * Ci * T * H * W) * elem
                out.append(
                    Case(
                        op="causal_conv3d",
                        shape=name,
                        provider=provider,
                        mode=mode,
                        make=_maker(shape, provider, mode, device, dtype),
                        bytes=fwd_bytes + (bwd_bytes if mode == "fwd+bwd" else 0),
                        flops=2 * M * N * K * (3 if mode == "fwd+bwd" else 1),
                        dtype=str(dtype).removeprefix("torch."),
                        gpu_only=gpu_only,
                    )
                )
    return out


@suite_params(cases)
def test_bench(benchmark, case):
    run_case_with_benchmark(benchmark, case)


MEMORY_PARAMS = [(shape, p) for shape in REAL_SHAPES for p in ("opensora_fast", "cudnn")]


@pytest.mark.skipif(not HAS_CUDA, reason="peak memory needs a CUDA GPU")
@pytest.mark.parametrize(
    "shape, provider", MEMORY_PARAMS, ids=[f"{p}-{'x'.join(map(str, s))}" for s, p in MEMORY_PARAMS]
)
def test_peak_memory(shape, provider, record_property):
    """Forward peak memory above inputs + output. cuDNN's path holds a padded copy of x; the Triton
    kernel's only scratch is the packed weight (C_out * C_in * k^3 elements)."""
    B, Ci, Co, T, H, W, k, st = shape
    fn = _maker(shape, provider, "fwd", "cuda", torch.bfloat16)()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - y.numel() * y.element_size()
    record_property("extra_peak_bytes", extra)
    print(f"{provider} {shape}: extra peak {extra / 2**20:.1f} MiB")
    if provider == "opensora_fast":
        weight_bytes = Co * Ci * k**3 * y.element_size()
        assert extra <= weight_bytes + (1 << 20), f"causal_conv3d allocated {extra} B beyond its output"
