"""Per-head RMSNorm of q and k followed by interleaved RoPE (opensora-v1.2.md §1.6, §1.7).

For each head row x (D values): n = w * cast(x * rsqrt(mean(x^2) + eps)) with fp32 statistics, the cast back
to x's dtype before the weight (LlamaRMSNorm); then, when cos/sin are given, out = n * cos + rot(n) * sin
with rot pairing (n[2i], n[2i+1]) -> (-n[2i+1], n[2i]) over the whole head (rotary_embedding_torch).

Tiles: a head row of D columns is a power-of-two head chunk (64 of D = 72) plus a tail chunk (8 of 72,
padded to a power of two and masked only when D - 64 is not one), so the head has no column mask and
loads / stores in 16-byte vectors; the host checks that every row start is 16-byte aligned (ALIGNED) before
the kernels claim it with multiple_of hints, and unaligned views run the same code without them. RoPE pairs
are rotated in registers (tl.split / tl.join of the (.., D/2, 2) view), no second load of the partner.
The attention kernels fuse this prologue; this standalone op is their reference point and serves models
that need normalised q/k on their own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from opensora_fast.kernels import reference
from opensora_fast.kernels._utils import autotune_configs, check_tensor, empty, next_pow2, use_triton
from opensora_fast.kernels.layernorm_modulate import needs_int64, sm_count

# BLOCK_R >= 8 * num_warps: the (BLOCK_R, 8) tail tile of D = 72 gives each thread >= 2 bf16 (no 2-byte accesses)
_CONFIGS = [
    triton.Config({"BLOCK_R": 16}, num_warps=2),
    triton.Config({"BLOCK_R": 32}, num_warps=4),
    triton.Config({"BLOCK_R": 64}, num_warps=4),
    triton.Config({"BLOCK_R": 64}, num_warps=8),
]


@triton.jit
def _pair_rotate(n, c, s, BLOCK_R: tl.constexpr, BD: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Interleaved RoPE of a (BLOCK_R, BD) fp32 tile in registers: pairs (2i, 2i+1) split, rotated, joined.

    forward: out[2i] = n[2i] c[2i] - n[2i+1] s[2i],  out[2i+1] = n[2i+1] c[2i+1] + n[2i] s[2i+1];
    TRANSPOSE (backward): out[2i] = n[2i] c[2i] + n[2i+1] s[2i+1],  out[2i+1] = n[2i+1] c[2i+1] - n[2i] s[2i].
    """
    ne, no = tl.split(tl.reshape(n, (BLOCK_R, BD // 2, 2)))
    ce, co = tl.split(tl.reshape(c, (BLOCK_R, BD // 2, 2)))
    se, so = tl.split(tl.reshape(s, (BLOCK_R, BD // 2, 2)))
    if TRANSPOSE:
        oe = ne * ce + no * so
        oo = no * co - ne * se
    else:
        oe = ne * ce - no * se
        oo = no * co + ne * so
    return tl.reshape(tl.join(oe, oo), (BLOCK_R, BD))


@triton.jit
def _row_offsets(rows, n_heads, seq_len, stride_xb, stride_xl, stride_xh, head_dim, stride_cl, stride_sl,
                 ALIGNED: tl.constexpr, VEC_X: tl.constexpr, VEC_C: tl.constexpr):  # fmt: skip
    """Element offsets of rows (b, l, h) flattened: into X (strided), into the contiguous output / gradient,
    and into the Cos / Sin tables (position l); 16-byte multiples when ALIGNED (host-checked)."""
    pos = (rows // n_heads) % seq_len
    xoff = (rows // (n_heads * seq_len)) * stride_xb + pos * stride_xl + (rows % n_heads) * stride_xh
    ooff = rows * head_dim
    coff = pos * stride_cl
    soff = pos * stride_sl
    if ALIGNED:
        xoff = tl.multiple_of(xoff, VEC_X)
        ooff = tl.multiple_of(ooff, VEC_X)
        coff = tl.multiple_of(coff, VEC_C)
        soff = tl.multiple_of(soff, VEC_C)
    return xoff, ooff, coff, soff


@triton.jit
def _qk_norm_rope_fwd_kernel(
    X,  # (B, L, H, D) q or k, strides stride_xb / stride_xl / stride_xh, unit stride along D
    W,  # (D,) RMSNorm weight, contiguous
    Cos,
    Sin,  # (L, D) RoPE tables, row strides stride_cl / stride_sl (0 when broadcast), unit stride along D
    Out,  # (B, L, H, D) contiguous out
    Rstd,  # (B * L * H,) fp32 out: 1 / rms of each head row
    n_rows,
    seq_len,
    n_heads,
    head_dim,
    rows_per_prog,
    stride_xb,
    stride_xl,
    stride_xh,
    stride_cl,
    stride_sl,
    eps,
    HAS_ROPE: tl.constexpr,
    I64: tl.constexpr,  # int64 element offsets (some tensor spans >= 2**31 elements)
    ALIGNED: tl.constexpr,  # host checked: every row start of X/Out/Cos/Sin is 16-byte aligned
    VEC_X: tl.constexpr,  # elements of X per 16 bytes
    VEC_C: tl.constexpr,  # elements of Cos/Sin per 16 bytes
    BLOCK_R: tl.constexpr,
    BLOCK_D0: tl.constexpr,  # head columns [0, BLOCK_D0): all valid (largest power of two <= D)
    BLOCK_D1: tl.constexpr,  # tail columns [BLOCK_D0, D) padded to a power of two (HAS_TAIL)
    HAS_TAIL: tl.constexpr,
    TAIL_FULL: tl.constexpr,  # D - BLOCK_D0 == BLOCK_D1 (72 = 64 + 8): no column mask in the tail
):
    pid = tl.program_id(0)
    c0 = tl.arange(0, BLOCK_D0)
    c1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    if TAIL_FULL:  # constant per 16-byte vector: the tail stays vectorised
        m1 = c1 < BLOCK_D0 + BLOCK_D1
    else:
        m1 = c1 < head_dim
    w0 = tl.load(W + c0).to(tl.float32)
    w1 = tl.load(W + c1, mask=m1, other=0.0).to(tl.float32)
    row_lo = pid * rows_per_prog
    row_hi = tl.minimum(row_lo + rows_per_prog, n_rows)
    for start in range(row_lo, row_hi, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        if I64:
            rows = rows.to(tl.int64)
        rmask = rows < row_hi
        xoff, ooff, coff, soff = _row_offsets(rows, n_heads, seq_len, stride_xb, stride_xl, stride_xh, head_dim,
                                              stride_cl, stride_sl, ALIGNED, VEC_X, VEC_C)  # fmt: skip
        x0 = tl.load(X + xoff[:, None] + c0[None, :], mask=rmask[:, None], other=0.0)
        x0f = x0.to(tl.float32)
        ss = tl.sum(x0f * x0f, axis=1)
        if HAS_TAIL:
            m2 = rmask[:, None] & m1[None, :]
            x1f = tl.load(X + xoff[:, None] + c1[None, :], mask=m2, other=0.0).to(tl.float32)
            ss += tl.sum(x1f * x1f, axis=1)
        rstd = 1.0 / tl.sqrt(ss / head_dim + eps)
        # LlamaRMSNorm: normalise in fp32, cast back to the input dtype, then times the weight
        n0 = (x0f * rstd[:, None]).to(x0.dtype).to(tl.float32) * w0[None, :]
        if HAS_ROPE:
            cs0 = tl.load(Cos + coff[:, None] + c0[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
            sn0 = tl.load(Sin + soff[:, None] + c0[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
            n0 = _pair_rotate(n0, cs0, sn0, BLOCK_R, BLOCK_D0, False)
        tl.store(Out + ooff[:, None] + c0[None, :], n0.to(Out.dtype.element_ty), mask=rmask[:, None])
        if HAS_TAIL:
            n1 = (x1f * rstd[:, None]).to(x0.dtype).to(tl.float32) * w1[None, :]
            if HAS_ROPE:
                cs1 = tl.load(Cos + coff[:, None] + c1[None, :], mask=m2, other=0.0).to(tl.float32)
                sn1 = tl.load(Sin + soff[:, None] + c1[None, :], mask=m2, other=0.0).to(tl.float32)
                n1 = _pair_rotate(n1, cs1, sn1, BLOCK_R, BLOCK_D1, False)
            tl.store(Out + ooff[:, None] + c1[None, :], n1.to(Out.dtype.element_ty), mask=m2)
        tl.store(Rstd + rows, rstd, mask=rmask)


@triton.jit
def _dx_chunk(dn, x, w, rstd, c2):
    """One column chunk of dx = (dn w - xhat * mean(dn w xhat)) * rstd (xhat = x * rstd)."""
    return (dn * w[None, :] - x * rstd[:, None] * c2[:, None]) * rstd[:, None]


@triton.jit
def _qk_norm_rope_bwd_kernel(
    DOut,  # (B, L, H, D) contiguous grad of the output
    X,  # (B, L, H, D) the forward input, strides as in the forward
    W,  # (D,) RMSNorm weight, contiguous
    Cos,
    Sin,  # (L, D) RoPE tables, row strides stride_cl / stride_sl (HAS_ROPE)
    Rstd,  # (B * L * H,) fp32 from the forward
    DX,  # (B, L, H, D) contiguous out: grad of x
    DWPart,  # (n_progs, D) fp32 out: per-program partial grad of the weight
    n_rows,
    seq_len,
    n_heads,
    head_dim,
    rows_per_prog,
    stride_xb,
    stride_xl,
    stride_xh,
    stride_cl,
    stride_sl,
    HAS_ROPE: tl.constexpr,
    I64: tl.constexpr,  # int64 element offsets (some tensor spans >= 2**31 elements)
    ALIGNED: tl.constexpr,  # host checked: every row start of DOut/X/DX/Cos/Sin is 16-byte aligned
    VEC_X: tl.constexpr,
    VEC_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    TAIL_FULL: tl.constexpr,  # D - BLOCK_D0 == BLOCK_D1 (72 = 64 + 8): no column mask in the tail
):
    pid = tl.program_id(0)
    c0 = tl.arange(0, BLOCK_D0)
    c1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    if TAIL_FULL:  # constant per 16-byte vector: the tail stays vectorised
        m1 = c1 < BLOCK_D0 + BLOCK_D1
    else:
        m1 = c1 < head_dim
    w0 = tl.load(W + c0).to(tl.float32)
    w1 = tl.load(W + c1, mask=m1, other=0.0).to(tl.float32)
    dw0 = tl.zeros((BLOCK_D0,), tl.float32)
    dw1 = tl.zeros((BLOCK_D1,), tl.float32)
    row_lo = pid * rows_per_prog
    row_hi = tl.minimum(row_lo + rows_per_prog, n_rows)
    for start in range(row_lo, row_hi, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        if I64:
            rows = rows.to(tl.int64)
        rmask = rows < row_hi
        r2 = rmask[:, None]
        m2 = r2 & m1[None, :]
        xoff, ooff, coff, soff = _row_offsets(rows, n_heads, seq_len, stride_xb, stride_xl, stride_xh, head_dim,
                                              stride_cl, stride_sl, ALIGNED, VEC_X, VEC_C)  # fmt: skip
        rstd = tl.load(Rstd + rows, mask=rmask, other=0.0)
        dn0 = tl.load(DOut + ooff[:, None] + c0[None, :], mask=r2, other=0.0).to(tl.float32)
        x0 = tl.load(X + xoff[:, None] + c0[None, :], mask=r2, other=0.0).to(tl.float32)
        if HAS_ROPE:
            cs0 = tl.load(Cos + coff[:, None] + c0[None, :], mask=r2, other=0.0).to(tl.float32)
            sn0 = tl.load(Sin + soff[:, None] + c0[None, :], mask=r2, other=0.0).to(tl.float32)
            dn0 = _pair_rotate(dn0, cs0, sn0, BLOCK_R, BLOCK_D0, True)
        dw0 += tl.sum(dn0 * x0 * rstd[:, None], axis=0)
        c2 = tl.sum(dn0 * w0[None, :] * x0, axis=1)
        if HAS_TAIL:
            dn1 = tl.load(DOut + ooff[:, None] + c1[None, :], mask=m2, other=0.0).to(tl.float32)
            x1 = tl.load(X + xoff[:, None] + c1[None, :], mask=m2, other=0.0).to(tl.float32)
            if HAS_ROPE:
                cs1 = tl.load(Cos + coff[:, None] + c1[None, :], mask=m2, other=0.0).to(tl.float32)
                sn1 = tl.load(Sin + soff[:, None] + c1[None, :], mask=m2, other=0.0).to(tl.float32)
                dn1 = _pair_rotate(dn1, cs1, sn1, BLOCK_R, BLOCK_D1, True)
            dw1 += tl.sum(dn1 * x1 * rstd[:, None], axis=0)
            c2 += tl.sum(dn1 * w1[None, :] * x1, axis=1)
        c2 = c2 * rstd / head_dim  # mean over the row of dn * w * xhat
        tl.store(DX + ooff[:, None] + c0[None, :], _dx_chunk(dn0, x0, w0, rstd, c2).to(DX.dtype.element_ty), mask=r2)
        if HAS_TAIL:
            tl.store(
                DX + ooff[:, None] + c1[None, :], _dx_chunk(dn1, x1, w1, rstd, c2).to(DX.dtype.element_ty), mask=m2
            )
    tl.store(DWPart + pid * head_dim + c0, dw0)
    if HAS_TAIL:
        tl.store(DWPart + pid * head_dim + c1, dw1, mask=m1)


def _prune(configs, named_args, **kwargs):
    """Unaligned rows (element-wise loads) at BLOCK_R=64 x 4 warps spilled 128 B in the backward on sm_90
    (bf16, D=72): that config runs only on the ALIGNED path. One config (the interpreter) stays."""
    if len(configs) == 1 or kwargs.get("ALIGNED", named_args.get("ALIGNED")):
        return configs
    return [c for c in configs if (c.kwargs["BLOCK_R"], c.num_warps) != (64, 4)]


_KEY = ["head_dim", "HAS_ROPE", "ALIGNED"]
_PRUNE = {"early_config_prune": _prune}
_fwd = triton.autotune(autotune_configs(_CONFIGS), key=_KEY, prune_configs_by=_PRUNE)(_qk_norm_rope_fwd_kernel)
_bwd = triton.autotune(autotune_configs(_CONFIGS), key=_KEY, prune_configs_by=_PRUNE)(_qk_norm_rope_bwd_kernel)


def _aligned16(t: torch.Tensor, strides) -> bool:
    """Every row start t.data_ptr() + sum(i_k * strides[k]) elements is a multiple of 16 bytes."""
    vec = 16 // t.element_size()
    return t.data_ptr() % 16 == 0 and all(s % vec == 0 for s in strides)


def _tiling(x, cos, sin, rows_of) -> dict:
    """Column split and alignment constexprs: D as a power-of-two head (64 of 72) plus a padded tail
    (8 of 72), so no column mask breaks the head's 16-byte vectors; ALIGNED when the host has checked
    that every row start the kernel forms is 16-byte aligned (then the offsets carry multiple_of hints)."""
    D = x.shape[-1]
    d0 = 1 << (D.bit_length() - 1)
    aligned = all(_aligned16(t, list(t.stride()[:-1]) + [D]) for t in rows_of)
    if cos is not None:
        aligned = aligned and _aligned16(cos, [cos.stride(0)]) and _aligned16(sin, [sin.stride(0)])
        aligned = aligned and cos.element_size() == sin.element_size()
    return dict(
        ALIGNED=aligned,
        VEC_X=16 // x.element_size(),
        VEC_C=16 // (cos.element_size() if cos is not None else 4),
        BLOCK_D0=d0,
        BLOCK_D1=next_pow2(D - d0) if D > d0 else 1,
        HAS_TAIL=D > d0,
        TAIL_FULL=D - d0 == next_pow2(D - d0),
    )


def _rows_per_prog(n_rows: int, device: torch.device) -> int:
    sms = sm_count(device)
    if sms is None:
        return max(n_rows, 1)
    return max(64, triton.cdiv(n_rows, 8 * sms))


def _fwd_impl(
    x: torch.Tensor, w: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    B, L, H, D = x.shape
    out = empty((B, L, H, D), x.dtype, x.device)
    rstd = empty((B * L * H,), torch.float32, x.device)
    n_rows = B * L * H
    if n_rows == 0:
        return out, rstd
    rpp = _rows_per_prog(n_rows, x.device)
    has_rope = cos is not None
    _fwd[(triton.cdiv(n_rows, rpp),)](
        x, w, cos if has_rope else w, sin if has_rope else w, out, rstd,
        n_rows, L, H, D, rpp, x.stride(0), x.stride(1), x.stride(2), cos.stride(0) if has_rope else 0,
        sin.stride(0) if has_rope else 0,
        eps, HAS_ROPE=has_rope, I64=needs_int64(x, out), **_tiling(x, cos, sin, (x, out)),
    )  # fmt: skip
    return out, rstd


_fwd_op = torch.library.custom_op("opensora_fast::qk_norm_rope_fwd", _fwd_impl, mutates_args=())


@_fwd_op.register_fake
def _(x, w, cos, sin, eps):
    B, L, H, D = x.shape
    return x.new_empty((B, L, H, D)), x.new_empty((B * L * H,), dtype=torch.float32)


def _bwd_impl(
    dout: torch.Tensor, x: torch.Tensor, w: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    B, L, H, D = x.shape
    n_rows = B * L * H
    dx = empty((B, L, H, D), x.dtype, x.device)
    if n_rows == 0:
        return dx, torch.zeros_like(w)
    rpp = _rows_per_prog(n_rows, x.device)
    n_progs = triton.cdiv(n_rows, rpp)
    part = empty((n_progs, D), torch.float32, x.device)
    has_rope = cos is not None
    dout = dout.contiguous()
    _bwd[(n_progs,)](
        dout, x, w, cos if has_rope else w, sin if has_rope else w, rstd, dx, part,
        n_rows, L, H, D, rpp, x.stride(0), x.stride(1), x.stride(2), cos.stride(0) if has_rope else 0,
        sin.stride(0) if has_rope else 0,
        HAS_ROPE=has_rope, I64=needs_int64(dout, x, dx), **_tiling(x, cos, sin, (dout, x, dx)),
    )  # fmt: skip
    return dx, part.sum(0).to(w.dtype)


_bwd_op = torch.library.custom_op("opensora_fast::qk_norm_rope_bwd", _bwd_impl, mutates_args=())


@_bwd_op.register_fake
def _(dout, x, w, cos, sin, rstd):
    return x.new_empty(x.shape), torch.empty_like(w)


class QKNormRopeFunction(torch.autograd.Function):
    """Autograd of one tensor's RMSNorm + RoPE (q and k each go through it)."""

    @staticmethod
    def forward(ctx, x, w, cos, sin, eps):
        out, rstd = torch.ops.opensora_fast.qk_norm_rope_fwd(x, w, cos, sin, eps)
        ctx.save_for_backward(x, w, cos, sin, rstd)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w, cos, sin, rstd = ctx.saved_tensors
        dx, dw = torch.ops.opensora_fast.qk_norm_rope_bwd(dout, x, w, cos, sin, rstd)
        return dx, dw, None, None, None


def qk_norm_rope(q, k, q_weight, k_weight, *, eps=1e-6, cos=None, sin=None):
    """RMSNorm (fp32, weight after the cast back) then optional interleaved RoPE of q and k.

    q, k: (batch, N, heads, head_dim), unit stride along head_dim (head_dim even when RoPE is used);
    q_weight, k_weight: (head_dim,); cos, sin: (N, head_dim), each frequency repeated for its pair,
    broadcast over batch and heads, any strides. Returns (q_out, k_out), contiguous, each in its own
    input's dtype (q_out in q's, k_out in k's), on both backends.
    """
    check_tensor(q, "q", ndim=4)
    B, N, H, D = q.shape
    check_tensor(k, "k", ndim=4, like=q)
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must have shape ({B}, Nk, heads, {D}) to match q, got {tuple(k.shape)}")
    check_tensor(q_weight, "q_weight", shape=(D,), like=q)
    check_tensor(k_weight, "k_weight", shape=(D,), like=q)
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together")
    if cos is not None:
        if D % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {D}")
        for name, t in (("cos", cos), ("sin", sin)):
            check_tensor(t, name, shape=(N, D), like=q)
        if k.shape[1] != N:
            raise ValueError(f"with RoPE, k must have the same length N={N} as q, got {k.shape[1]}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k must have unit stride along head_dim (the last dimension)")
    if not use_triton(q, k):
        return reference.qk_norm_rope_ref(q, k, q_weight, k_weight, eps, cos, sin)
    # the kernels read the (D,) weights with unit stride and cos/sin through their own row strides
    # (0 for a broadcast table) with unit stride along D: small, so copy whatever else arrives (autograd
    # maps a weight's gradient back to its own shape and strides through the copy)
    q_weight, k_weight = q_weight.contiguous(), k_weight.contiguous()
    if cos is not None:
        cos = cos if cos.stride(-1) == 1 else cos.contiguous()
        sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    return (
        QKNormRopeFunction.apply(q, q_weight, cos, sin, eps),
        QKNormRopeFunction.apply(k, k_weight, cos, sin, eps),
    )
