"""qk_norm_rope: per-head RMSNorm + interleaved RoPE of q and k at temporal attention's shape
(B*S, T, 16 heads, 72) vs eager (the reference: Open-Sora's LlamaRMSNorm + rotary_embedding_torch math) and
torch.compile of it. Memory-bound: bytes = read q, k + write q, k (+ the same again and dq, dk for backward)."""

from __future__ import annotations

import torch
from opensora_fast.kernels import qk_norm_rope, reference

from bench.harness import Case, compiled, fwd_bwd, ours, run_case_with_benchmark, suite_params

REAL = [(3600, 30, 16, 72), (3600, 120, 16, 72), (30, 3600, 16, 72)]  # (batch, L, heads, D)
TINY = [(2, 5, 2, 24)]

_compiled = []


def _eager(q, k, wq, wk, cos, sin):
    return reference.qk_norm_rope_ref(q, k, wq, wk, 1e-6, cos, sin)


def _torch_compile(*args):
    if not _compiled:
        _compiled.append(compiled(_eager))
    return _compiled[0](*args)


PROVIDERS = {
    "opensora_fast": (ours(lambda q, k, wq, wk, cos, sin: qk_norm_rope(q, k, wq, wk, cos=cos, sin=sin)), False),
    "eager": (_eager, False),
    "torch.compile": (_torch_compile, True),
}


def _maker(fn, shape, mode, device, dtype):
    def make():
        q, k = (torch.randn(shape, device=device, dtype=dtype) for _ in range(2))
        wq, wk = (torch.randn(shape[-1], device=device, dtype=dtype) for _ in range(2))
        cos, sin = reference.rope_cos_sin(shape[1], shape[-1], dtype=dtype, device=device)
        if mode == "fwd":
            return lambda: fn(q, k, wq, wk, cos, sin)
        for t in (q, k, wq, wk):
            t.requires_grad_()
        return fwd_bwd(lambda: fn(q, k, wq, wk, cos, sin), [q, k, wq, wk])

    return make


def cases(device, dtype, tiny) -> list[Case]:
    elem = torch.finfo(dtype).bits // 8
    out = []
    for shape in TINY if tiny else REAL:
        numel = shape[0] * shape[1] * shape[2] * shape[3]
        for name, (fn, gpu_only) in PROVIDERS.items():
            for mode, units in (("fwd", 4), ("fwd+bwd", 10)):
                out.append(
                    Case(
                        op="qk_norm_rope", shape="x".join(map(str, shape)), provider=name, mode=mode,
                        make=_maker(fn, shape, mode, device, dtype), bytes=units * numel * elem,
                        dtype=str(dtype).replace("torch.", ""), gpu_only=gpu_only,
                    )
                )  # fmt: skip
    return out


@suite_params(cases)
def test_bench(benchmark, case):
    run_case_with_benchmark(benchmark, case)
