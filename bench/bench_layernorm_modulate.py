"""layernorm_modulate / gated_residual / add_layernorm_modulate at STDiT3's width (C=1152), 32k-512k rows.

Providers: opensora_fast (Triton), eager (the PyTorch reference), torch.compile of the reference, and apex's
FusedLayerNorm + eager modulation where apex is importable. Memory-bound: bytes are the minimum (each
activation read once, each output written once), so GB/s against the measured copy ceiling is the figure.
Goals (H200, bf16): forward >= 85% of copy bandwidth; fwd+bwd >= 1.3x torch.compile and >= 2x eager.
"""

from __future__ import annotations

import torch
from opensora_fast.kernels import add_layernorm_modulate, gated_residual, layernorm_modulate, reference

from bench.harness import HAS_CUDA, Case, compiled, fwd_bwd, ours, run_case_with_benchmark, suite_params

C = 1152
REAL_ROWS = [32768, 131072, 524288]
TINY = (2, 8, 64)  # B, N, C

# activations moved per row: (forward, forward + backward), in units of C elements
TRAFFIC = {
    "layernorm_modulate": (2, 5),  # x -> h ; dh, x -> dx
    "gated_residual": (3, 7),  # x, y -> r ; dr, y -> dx, dy
    "add_layernorm_modulate": (4, 10),  # x, y -> r, h ; dh, dr, r, y -> dx, dy
}


def _apex_layernorm_modulate():
    try:
        from apex.normalization import FusedLayerNorm
    except ImportError:
        return None
    ln = FusedLayerNorm(C, eps=1e-6, elementwise_affine=False).cuda()

    def fn(x, shift, scale):
        return ln(x) * (1 + scale) + shift

    return fn


_compiled = {}


def _ref_fn(op):
    return {
        "layernorm_modulate": lambda x, y, sh, sc, g: reference.layernorm_modulate_ref(x, sh, sc),
        "gated_residual": lambda x, y, sh, sc, g: reference.gated_residual_ref(x, y, g),
        "add_layernorm_modulate": lambda x, y, sh, sc, g: reference.add_layernorm_modulate_ref(x, y, sh, sc, g),
    }[op]


def _providers(op):
    kernel = {
        "layernorm_modulate": lambda x, y, sh, sc, g: layernorm_modulate(x, sh, sc),
        "gated_residual": lambda x, y, sh, sc, g: gated_residual(x, y, g),
        "add_layernorm_modulate": lambda x, y, sh, sc, g: add_layernorm_modulate(x, y, sh, sc, gate=g),
    }[op]

    def torch_compile(*args):
        if op not in _compiled:
            _compiled[op] = compiled(_ref_fn(op))
        return _compiled[op](*args)

    provs = {
        "opensora_fast": (ours(kernel), False),
        "eager": (_ref_fn(op), False),
        "torch.compile": (torch_compile, True),
    }
    if op == "layernorm_modulate" and HAS_CUDA:
        apex = _apex_layernorm_modulate()
        if apex is not None:
            provs["apex"] = (lambda x, y, sh, sc, g: apex(x, sh, sc), True)
    return provs


def _maker(op, fn, B, N, Cc, mode, device, dtype):
    def make():
        x = torch.randn(B, N, Cc, device=device, dtype=dtype)
        y = torch.randn(B, N, Cc, device=device, dtype=dtype)
        mods = [0.5 * torch.randn(B, 1, Cc, device=device, dtype=dtype) for _ in range(3)]
        if mode == "fwd":
            return lambda: fn(x, y, *mods)
        leaves = [x, y, *mods] if op != "layernorm_modulate" else [x, *mods]
        for t in leaves:
            t.requires_grad_()
        return fwd_bwd(lambda: fn(x, y, *mods), leaves)

    return make


def cases(device, dtype, tiny) -> list[Case]:
    elem = torch.finfo(dtype).bits // 8
    shapes = [TINY] if tiny else [(2, rows // 2, C) for rows in REAL_ROWS]
    out = []
    for op, (fwd_units, fb_units) in TRAFFIC.items():
        for name, (fn, gpu_only) in _providers(op).items():
            for B, N, Cc in shapes:
                for mode, units in (("fwd", fwd_units), ("fwd+bwd", fb_units)):
                    out.append(
                        Case(
                            op=op, shape=f"rows={B * N} C={Cc}", provider=name, mode=mode,
                            make=_maker(op, fn, B, N, Cc, mode, device, dtype),
                            bytes=units * B * N * Cc * elem, dtype=str(dtype).replace("torch.", ""),
                            gpu_only=gpu_only,
                        )
                    )  # fmt: skip
    return out


@suite_params(cases)
def test_bench(benchmark, case):
    run_case_with_benchmark(benchmark, case)
