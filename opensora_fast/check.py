"""``opensora-fast check``: every kernel against its PyTorch reference, forward and backward.

On a GPU it runs the Triton kernels in bf16 at model-like shapes; without one it runs them through the
Triton interpreter in fp32 at small shapes. Each error is measured against an fp64 run of the reference and
judged as flash-attention does: at most 2x the error of the same-precision PyTorch reference plus a small
atol. Prints a table and exits non-zero when anything fails.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class CheckCase:
    name: str
    shape: str
    make: Callable[[torch.dtype, str], tuple[Callable, list[torch.Tensor]]]  # -> (fn(*inputs), inputs)
    ref64: Callable | None = None  # fp64 oracle with fn's signature, where the public op rejects fp64


def _randn(*shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def _cases(gpu: bool) -> list[CheckCase]:
    from opensora_fast import kernels as K
    from opensora_fast.kernels import reference as R

    # (B, T, S, C, heads, D): small under the interpreter, model-like on a GPU
    B, T, S, C, H = (2, 8, 1024, 1152, 16) if gpu else (2, 3, 5, 48, 2)
    D = C // H if gpu else 24
    C = H * D
    N = T * S
    cases = []

    def mods(n, dtype, device):
        return [_randn(B, 1, C, dtype=dtype, device=device, scale=0.5) for _ in range(n)]

    def lnm(dtype, dev):
        x = _randn(B, N, C, dtype=dtype, device=dev)
        mask = (torch.arange(T) % 2 == 0).expand(B, T).to(dev)
        return (lambda x, a, b, a0, b0: K.layernorm_modulate(x, a, b, x_mask=mask, shift0=a0, scale0=b0)), [
            x,
            *mods(4, dtype, dev),
        ]

    def gres(dtype, dev):
        return K.gated_residual, [_randn(B, N, C, dtype=dtype, device=dev), _randn(B, N, C, dtype=dtype, device=dev),
                                  *mods(1, dtype, dev)]  # fmt: skip

    def aln(dtype, dev):
        x, y = _randn(B, N, C, dtype=dtype, device=dev), _randn(B, N, C, dtype=dtype, device=dev)
        return (lambda x, y, a, b, g: K.add_layernorm_modulate(x, y, a, b, gate=g)), [x, y, *mods(3, dtype, dev)]

    def qkn(dtype, dev):
        q, k = _randn(B * S, T, H, D, dtype=dtype, device=dev), _randn(B * S, T, H, D, dtype=dtype, device=dev)
        cos, sin = R.rope_cos_sin(T, D, dtype=dtype, device=dev)
        w = [_randn(D, dtype=dtype, device=dev) for _ in range(2)]
        return (lambda q, k, a, b: K.qk_norm_rope(q, k, a, b, cos=cos, sin=sin)), [q, k, *w]

    cases += [
        CheckCase("layernorm_modulate (x_mask)", f"({B},{N},{C})", lnm),
        CheckCase("gated_residual", f"({B},{N},{C})", gres),
        CheckCase("add_layernorm_modulate", f"({B},{N},{C})", aln),
        CheckCase("qk_norm_rope", f"({B * S},{T},{H},{D})", qkn),
    ]

    def attn(layout):
        def make(dtype, dev):
            qkv = _randn(B, N, 3 * C, dtype=dtype, device=dev)
            w = [_randn(D, dtype=dtype, device=dev) for _ in range(2)]
            L = S if layout == "spatial" else T
            rope = R.rope_cos_sin(L, D, dtype=dtype, device=dev) if layout == "temporal" else None
            return (lambda qkv, a, b: K.self_attention(qkv, a, b, num_heads=H, num_frames=T, layout=layout,
                                                        rope=rope)), [qkv, *w]  # fmt: skip

        return make

    def attn_ref(layout):
        def ref(qkv, a, b):
            L = S if layout == "spatial" else T
            rope = R.rope_cos_sin(L, D, dtype=torch.float64) if layout == "temporal" else None
            return R.self_attention_ref(qkv, a, b, H, T, layout, rope=rope)

        return ref

    # temporal sequences of 65..128 frames take their own packed kernels (head_dim 64/72 only)
    Tl, Sl, Hl, Dl = (120, 256, 16, 72) if gpu else (67, 2, 2, 72)

    def long_temporal(dtype, dev):
        qkv = _randn(1, Tl * Sl, 3 * Hl * Dl, dtype=dtype, device=dev)
        w = [_randn(Dl, dtype=dtype, device=dev) for _ in range(2)]
        rope = R.rope_cos_sin(Tl, Dl, dtype=dtype, device=dev)
        return (lambda qkv, a, b: K.self_attention(qkv, a, b, num_heads=Hl, num_frames=Tl, layout="temporal",
                                                    rope=rope)), [qkv, *w]  # fmt: skip

    def long_temporal_ref(qkv, a, b):
        return R.self_attention_ref(qkv, a, b, Hl, Tl, "temporal", rope=R.rope_cos_sin(Tl, Dl, dtype=torch.float64))

    cross_lens = [300, 120] if gpu else [5, 0]

    def flash(dtype, dev):
        Lq, Lk = (1590, 1200) if gpu else (9, 7)
        qkv = [_randn(B, n, H, D, dtype=dtype, device=dev) for n in (Lq, Lk, Lk)]
        return (lambda q, k, v: K.flash_attn_func(q, k, v, causal=True)), qkv

    def cross(dtype, dev):
        q = _randn(B, N, C, dtype=dtype, device=dev)
        kv = _randn(sum(cross_lens), 2 * C, dtype=dtype, device=dev)
        return (lambda q, kv: K.cross_attention(q, kv, cross_lens, num_heads=H)), [q, kv]

    cases += [
        CheckCase("self_attention spatial", f"qkv ({B},{N},{3 * C}) T={T}", attn("spatial"), attn_ref("spatial")),
        CheckCase("self_attention temporal+rope", f"qkv ({B},{N},{3 * C}) T={T}", attn("temporal"),
                  attn_ref("temporal")),
        CheckCase("self_attention temporal, long", f"qkv (1,{Tl * Sl},{3 * Hl * Dl}) T={Tl}", long_temporal,
                  long_temporal_ref),
        CheckCase("flash_attn_func causal", f"D={D} Nq!=Nk", flash,
                  lambda q, k, v: R.flash_attn_func_ref(q, k, v, causal=True)),
        CheckCase("cross_attention varlen", f"q ({B},{N},{C})", cross,
                  lambda q, kv: R.cross_attention_ref(q, kv, cross_lens, H)),
    ]

    Cin, Cout, Tv, Hv, Wv = (128, 128, 17, 32, 48) if gpu else (5, 4, 5, 5, 6)

    def conv(k, st):
        def make(dtype, dev):
            x = _randn(1, Cin, Tv, Hv, Wv, dtype=dtype, device=dev).to(memory_format=torch.channels_last_3d)
            w = _randn(Cout, Cin, k, k, k, dtype=dtype, device=dev, scale=(Cin * k**3) ** -0.5)
            b = _randn(Cout, dtype=dtype, device=dev)
            return (lambda x, w, b: K.causal_conv3d(x, w, b, stride=(st, 1, 1))), [x, w, b]

        return make

    def gn(dtype, dev):
        G = 32 if gpu else 2
        x = _randn(2, Cin if gpu else 6, Tv, Hv, Wv, dtype=dtype, device=dev)
        w, b = _randn(x.shape[1], dtype=dtype, device=dev), _randn(x.shape[1], dtype=dtype, device=dev)
        return (lambda x, w, b: K.group_norm_silu(x, w, b, G)), [x, w, b]

    cases += [
        CheckCase("causal_conv3d 3x3x3", f"({Cin}->{Cout}, T={Tv}, {Hv}x{Wv}) NDHWC", conv(3, 1)),
        CheckCase("causal_conv3d 3x3x3 t-stride 2", f"({Cin}->{Cout}, T={Tv}, {Hv}x{Wv}) NDHWC", conv(3, 2)),
        CheckCase("causal_conv3d 1x1x1", f"({Cin}->{Cout}, T={Tv}, {Hv}x{Wv}) NDHWC", conv(1, 1)),
        CheckCase("group_norm_silu", f"(2,{Cin if gpu else 6},{Tv},{Hv},{Wv})", gn),
    ]
    return cases


def _run(fn, inputs, dtype, grads_out=None):
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    if grads_out is None:
        grads_out = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, leaves, [g.to(o.dtype) for g, o in zip(grads_out, outs)], allow_unused=True)
    return outs, grads, grads_out


def _err(a, ref):
    return (a.double() - ref.double()).abs().max().item() if a is not None else float("nan")


def run_check(verbose: bool = True) -> bool:
    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32
    device = "cuda" if gpu else "cpu"
    atol = 1.6e-2 if gpu else 1e-5
    where = torch.cuda.get_device_name() if gpu else "CPU, Triton interpreter, small shapes"
    print(f"opensora-fast kernel self-check on {where}; dtype {str(dtype).replace('torch.', '')}")
    print(f"{'kernel':32s} {'shape':34s} {'fwd err':>9s} {'ref err':>9s} {'bwd err':>9s} {'ref err':>9s} {'s':>5s}  ok")
    all_ok = True
    prev = os.environ.get("OPENSORA_FAST_BACKEND")
    try:
        for case in _cases(gpu):
            t0 = time.perf_counter()
            torch.manual_seed(0)
            try:
                fn, inputs = case.make(dtype, device)
                os.environ["OPENSORA_FAST_BACKEND"] = "triton"
                outs, grads, gout = _run(fn, inputs, dtype)
                os.environ["OPENSORA_FAST_BACKEND"] = "reference"
                outs_lp, grads_lp, _ = _run(fn, inputs, dtype, gout)
                fn64 = case.ref64 or fn
                outs_64, grads_64, _ = _run(fn64, [t.cpu() for t in inputs], torch.float64, [g.cpu() for g in gout])
            except Exception as exc:  # report, keep checking the others
                print(f"{case.name:32s} {case.shape:34s} ERROR {type(exc).__name__}: {exc}")
                all_ok = False
                continue
            fe = max(_err(o.cpu(), r) for o, r in zip(outs, outs_64))
            fb = max(_err(o.cpu(), r) for o, r in zip(outs_lp, outs_64))
            pairs = [(g, lp, r) for g, lp, r in zip(grads, grads_lp, grads_64) if r is not None]
            be = max(_err(g.cpu() if g is not None else None, r) for g, _, r in pairs)
            bb = max(_err(lp.cpu(), r) for _, lp, r in pairs)
            scale_f = max(r.abs().max().item() for r in outs_64)
            scale_b = max(r.abs().max().item() for _, _, r in pairs)
            nan = any(torch.isnan(o).any().item() for o in outs) or any(
                g is None or torch.isnan(g).any().item() for g, _, _ in pairs
            )
            ok = (not nan) and fe <= 2 * fb + atol * max(1, scale_f) and be <= 2 * bb + atol * max(1, scale_b)
            all_ok &= ok
            dt = time.perf_counter() - t0
            print(
                f"{case.name:32s} {case.shape:34s} {fe:9.2e} {fb:9.2e} {be:9.2e} {bb:9.2e} {dt:5.1f}  "
                f"{'PASS' if ok else 'FAIL'}",
                flush=True,
            )
    finally:
        if prev is None:
            os.environ.pop("OPENSORA_FAST_BACKEND", None)
        else:
            os.environ["OPENSORA_FAST_BACKEND"] = prev
    print("all kernels PASS" if all_ok else "some kernels FAILED")
    return all_ok


def main(argv=None) -> int:
    if not torch.cuda.is_available():
        if "opensora_fast.kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("opensora_fast.kernels was imported before the interpreter could be enabled")
        os.environ["TRITON_INTERPRET"] = "1"
    return 0 if run_check() else 1
