"""Attention at STDiT3's shapes: spatial / temporal self-attention from the raw qkv Linear output and
varlen cross-attention, forward and forward+backward.

Providers: opensora_fast (fused kernels); eager = Open-Sora 1.2's path (rearrange, RMSNorm, RoPE
for temporal, then SDPA for spatial / the explicit fp32-softmax matmul for temporal / a key-masked
SDPA for cross, rearrange back); sdpa-flash / sdpa-cudnn / sdpa-efficient = the same eager
prologue with the attention forced onto one SDPA backend; flash-attn (if importable); torch.compile
of the eager path. flops = useful head_dim-72 work, 4 * B * H * Nq * Nk * D forward (x 2.5 for
fwd+bwd); bytes = fewest bytes (read qkv, write the output; backward also reads out and dout and
writes dqkv), the number that matters for the memory-bound temporal case.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from opensora_fast.kernels import cross_attention, reference, self_attention

from bench.harness import Case, compiled, fwd_bwd, ours, run_case_with_benchmark, suite_params

H, D = 16, 72
REAL_SPATIAL = [(30, 3600), (30, 1590)]  # (T, S) with B = 1: B*T = 30 sequences of S tokens
REAL_TEMPORAL = [(15, 3600), (30, 3600), (60, 3600), (120, 3600)]  # (T, S): B*S = 3600 sequences of T
REAL_CROSS = [(15 * 3600, [300, 173])]  # (N, kv_lens): mixed text lengths
TINY_SPATIAL, TINY_TEMPORAL, TINY_CROSS = [(2, 5)], [(3, 4)], [(6, [3, 2])]
TINY_HD = (2, 16)

try:  # optional vendor library
    import flash_attn as _flash_attn
except ImportError:  # pragma: no cover - depends on the machine
    _flash_attn = None


def _sdpa_backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
         "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}[name]  # fmt: skip
    return sdpa_kernel(b)


def _explicit(q, k, v, scale):
    """Open-Sora's non-flash path: (q * scale) @ k^T in the input dtype, fp32 softmax, cast back, @ v."""
    s = (q * scale) @ k.transpose(-2, -1)
    return s.float().softmax(-1).to(v.dtype) @ v


def _core(provider, layout):
    """attention(q, k, v, scale) on (B*, H, L, D) for one provider."""
    if provider == "flash-attn":
        return lambda q, k, v, scale: _flash_attn.flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale
        ).transpose(1, 2)
    if provider.startswith("sdpa-"):

        def run(q, k, v, scale):
            with _sdpa_backend(provider):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)

        return run
    if layout == "temporal":
        return _explicit
    return lambda q, k, v, scale: F.scaled_dot_product_attention(q, k, v, scale=scale)


def _eager_self(core, heads, T, layout, rope):
    def fn(qkv, qw, kw, cos, sin):
        B, N, C3 = qkv.shape
        C = C3 // 3
        hd = C // heads
        S = N // T
        x = qkv.view(B, T, S, 3, heads, hd)
        if layout == "temporal":
            x = x.transpose(1, 2)  # B (T S) -> (B S) T: a copy in the reshape below
        x = x.reshape(-1, x.shape[2], 3, heads, hd).permute(2, 0, 3, 1, 4)  # 3, B*, H, L, D
        q, k, v = x.unbind(0)
        q, k = reference.rms_norm_ref(q, qw), reference.rms_norm_ref(k, kw)
        if rope:
            c, s = cos.to(q.dtype), sin.to(q.dtype)
            q = q * c + reference.rotate_half_interleaved(q) * s
            k = k * c + reference.rotate_half_interleaved(k) * s
        o = core(q, k, v, hd**-0.5)  # B*, H, L, D
        o = o.transpose(1, 2).reshape(B, -1, o.shape[2], C)  # (B, T, S, C) or (B, S, T, C)
        if layout == "temporal":
            o = o.transpose(1, 2)
        return o.reshape(B, N, C)

    return fn


def _ours_self(heads, T, layout, rope):
    def fn(qkv, qw, kw, cos, sin):
        return self_attention(
            qkv, qw, kw, num_heads=heads, num_frames=T, layout=layout, rope=(cos, sin) if rope else None
        )

    return ours(fn)


def _self_maker(provider, heads, hd, T, S, layout, mode, device, dtype):
    rope = layout == "temporal"

    def make():
        C = heads * hd
        qkv = torch.randn(1, T * S, 3 * C, device=device, dtype=dtype)
        qw, kw = (1 + 0.1 * torch.randn(hd, device=device, dtype=dtype) for _ in range(2))
        cos, sin = reference.rope_cos_sin(T if rope else S, hd, device=device)
        if provider == "opensora_fast":
            fn = _ours_self(heads, T, layout, rope)
        else:
            base = provider.replace("torch.compile", "eager")
            fn = _eager_self(_core(base, layout), heads, T, layout, rope)
            if provider == "torch.compile":
                fn = compiled(fn)
        call = lambda: fn(qkv, qw, kw, cos, sin)
        if mode == "fwd":
            return call
        for t in (qkv, qw, kw):
            t.requires_grad_()
        return fwd_bwd(call, [qkv, qw, kw])

    return make


def _eager_cross(core_name, heads):
    def fn(q, kv, lens):
        B, N, C = q.shape
        hd = C // heads
        Lm = max(lens)
        kvp = kv.new_zeros(B, Lm, 2 * C)
        mask = torch.zeros(B, 1, 1, Lm, dtype=torch.bool, device=q.device)
        start = 0
        for b, n in enumerate(lens):  # pad the packed text per sample (Open-Sora uses xformers' block mask)
            kvp[b, :n] = kv[start : start + n]
            mask[b, ..., :n] = True
            start += n
        k, v = kvp.view(B, Lm, 2, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        qh = q.view(B, N, heads, hd).transpose(1, 2)
        ctx = _sdpa_backend(core_name) if core_name.startswith("sdpa-") else contextlib.nullcontext()
        with ctx:
            o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask)
        return o.transpose(1, 2).reshape(B, N, C)

    return fn


def _flash_cross(heads):
    def fn(q, kv, lens):
        B, N, C = q.shape
        hd = C // heads
        k, v = kv.view(-1, 2, heads, hd).unbind(1)
        cu_q = torch.arange(0, (B + 1) * N, N, dtype=torch.int32, device=q.device)
        cu_k = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=q.device)
        o = _flash_attn.flash_attn_varlen_func(q.reshape(B * N, heads, hd), k, v, cu_q, cu_k, N, max(lens))
        return o.reshape(B, N, C)

    return fn


def _cross_maker(provider, heads, hd, N, lens, mode, device, dtype):
    def make():
        C = heads * hd
        q = torch.randn(len(lens), N, C, device=device, dtype=dtype)
        kv = torch.randn(sum(lens), 2 * C, device=device, dtype=dtype)
        if provider == "opensora_fast":
            fn = ours(lambda q, kv, lens: cross_attention(q, kv, lens, num_heads=heads))
        elif provider == "flash-attn":
            fn = _flash_cross(heads)
        else:
            fn = _eager_cross(provider.replace("torch.compile", "eager"), heads)
            if provider == "torch.compile":
                fn = compiled(fn)
        call = lambda: fn(q, kv, lens)
        if mode == "fwd":
            return call
        for t in (q, kv):
            t.requires_grad_()
        return fwd_bwd(call, [q, kv])

    return make


def _providers(kind):
    """(name, gpu_only) for one attention kind."""
    out = [("opensora_fast", False), ("eager", False)]
    sdpa = ["sdpa-efficient"] if kind == "cross" else ["sdpa-flash", "sdpa-cudnn", "sdpa-efficient"]
    out += [(s, True) for s in sdpa]
    if _flash_attn is not None:
        out.append(("flash-attn", True))
    out.append(("torch.compile", True))
    return out


def cases(device, dtype, tiny) -> list[Case]:
    heads, hd = TINY_HD if tiny else (H, D)
    C = heads * hd
    elem = torch.finfo(dtype).bits // 8
    dt = str(dtype).replace("torch.", "")
    out = []
    for layout, shapes in (("spatial", TINY_SPATIAL if tiny else REAL_SPATIAL),
                           ("temporal", TINY_TEMPORAL if tiny else REAL_TEMPORAL)):  # fmt: skip
        for T, S in shapes:
            L, nseq = (S, T) if layout == "spatial" else (T, S)
            fl = 4 * nseq * heads * L * L * hd
            io = T * S * C * elem  # one (B, T*S, C) tensor
            for prov, gpu_only in _providers(layout):
                for mode, f_mult, b_units in (("fwd", 1.0, 4), ("fwd+bwd", 2.5, 12)):
                    out.append(
                        Case(
                            op=f"attention_{layout}", shape=f"T={T} S={S} H={heads} D={hd}", provider=prov,
                            mode=mode, make=_self_maker(prov, heads, hd, T, S, layout, mode, device, dtype),
                            bytes=b_units * io, flops=int(f_mult * fl), dtype=dt, gpu_only=gpu_only,
                        )
                    )  # fmt: skip
    for N, lens in TINY_CROSS if tiny else REAL_CROSS:
        fl = sum(4 * heads * N * n * hd for n in lens)
        q_bytes = len(lens) * N * C * elem
        kv_bytes = sum(lens) * 2 * C * elem
        shape = f"N={N} lens={'/'.join(map(str, lens))} H={heads} D={hd}"
        for prov, gpu_only in _providers("cross"):
            make = lambda mode, prov=prov, N=N, lens=lens: _cross_maker(
                prov, heads, hd, N, lens, mode, device, dtype
            )
            for mode, f_mult, nbytes in (("fwd", 1.0, 2 * q_bytes + kv_bytes),
                                         ("fwd+bwd", 2.5, 6 * q_bytes + 3 * kv_bytes)):  # fmt: skip
                out.append(
                    Case(
                        op="attention_cross", shape=shape, provider=prov, mode=mode, make=make(mode),
                        bytes=nbytes, flops=int(f_mult * fl), dtype=dt, gpu_only=gpu_only,
                    )
                )  # fmt: skip
    return out


@suite_params(cases)
def test_bench(benchmark, case):
    run_case_with_benchmark(benchmark, case)
