"""Per-head RMSNorm of q and k followed by interleaved RoPE (opensora-v1.2.md §1.6, §1.7).

For each head row x (D values): n = w * cast(x * rsqrt(mean(x^2) + eps)) with fp32 statistics, the cast back
to x's dtype before the weight (LlamaRMSNorm); then, when cos/sin are given, out = n * cos + rot(n) * sin
with rot pairing (n[2i], n[2i+1]) -> (-n[2i+1], n[2i]) over the whole head (rotary_embedding_torch).

The pair partner of column j is column j ^ 1, read with a second (cache-resident) load, so any even D
(72 included) works without reshaping pairs. The attention kernels fuse this prologue; this standalone op
is their reference point and serves models that need normalised q/k on their own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from opensora_fast.kernels import reference
from opensora_fast.kernels._utils import autotune_configs, check_tensor, empty, next_pow2, use_triton
from opensora_fast.kernels.layernorm_modulate import needs_int64, sm_count

_CONFIGS = [
    triton.Config({"BLOCK_R": 8}, num_warps=4),
    triton.Config({"BLOCK_R": 16}, num_warps=4),
    triton.Config({"BLOCK_R": 32}, num_warps=8),
]


@triton.jit
def _qk_norm_rope_fwd_kernel(
    X,  # (B, L, H, D) q or k, strides stride_xb / stride_xl / stride_xh, unit stride along D
    W,  # (D,) RMSNorm weight
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
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < head_dim
    partner = cols ^ 1  # interleaved pair partner
    sign = tl.where(cols % 2 == 0, -1.0, 1.0)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    wp = tl.load(W + partner, mask=cmask, other=0.0).to(tl.float32)
    row_lo = pid * rows_per_prog
    row_hi = tl.minimum(row_lo + rows_per_prog, n_rows)
    for start in range(row_lo, row_hi, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        if I64:
            rows = rows.to(tl.int64)
        rmask = rows < row_hi
        m2 = rmask[:, None] & cmask[None, :]
        h = rows % n_heads
        pos = (rows // n_heads) % seq_len
        b = rows // (n_heads * seq_len)
        base = X + b * stride_xb + pos * stride_xl + h * stride_xh
        x = tl.load(base[:, None] + cols[None, :], mask=m2, other=0.0)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / head_dim + eps)
        # LlamaRMSNorm: normalise in fp32, cast back to the input dtype, then times the weight
        n = (xf * rstd[:, None]).to(x.dtype).to(tl.float32) * w[None, :]
        if HAS_ROPE:
            xp = tl.load(base[:, None] + partner[None, :], mask=m2, other=0.0)
            npart = (xp.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32) * wp[None, :]
            c = tl.load(Cos + pos[:, None] * stride_cl + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            s = tl.load(Sin + pos[:, None] * stride_sl + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            n = n * c + sign[None, :] * npart * s
        tl.store(Out + rows[:, None] * head_dim + cols[None, :], n.to(Out.dtype.element_ty), mask=m2)
        tl.store(Rstd + rows, rstd, mask=rmask)


@triton.jit
def _qk_norm_rope_bwd_kernel(
    DOut,  # (B, L, H, D) contiguous grad of the output
    X,  # (B, L, H, D) the forward input, strides as in the forward
    W,  # (D,) RMSNorm weight
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
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < head_dim
    partner = cols ^ 1
    sign = tl.where(cols % 2 == 0, 1.0, -1.0)  # transpose of the forward rotation
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), tl.float32)
    row_lo = pid * rows_per_prog
    row_hi = tl.minimum(row_lo + rows_per_prog, n_rows)
    for start in range(row_lo, row_hi, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        if I64:
            rows = rows.to(tl.int64)
        rmask = rows < row_hi
        m2 = rmask[:, None] & cmask[None, :]
        h = rows % n_heads
        pos = (rows // n_heads) % seq_len
        b = rows // (n_heads * seq_len)
        go = DOut + rows[:, None] * head_dim
        dn = tl.load(go + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_ROPE:
            c = tl.load(Cos + pos[:, None] * stride_cl + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            sp = tl.load(Sin + pos[:, None] * stride_sl + partner[None, :], mask=m2, other=0.0).to(tl.float32)
            dp = tl.load(go + partner[None, :], mask=m2, other=0.0).to(tl.float32)
            dn = dn * c + sign[None, :] * dp * sp
        x = tl.load(X + (b * stride_xb + pos * stride_xl + h * stride_xh)[:, None] + cols[None, :], mask=m2, other=0.0)
        rstd = tl.load(Rstd + rows, mask=rmask, other=0.0)
        xhat = x.to(tl.float32) * rstd[:, None]
        dw += tl.sum(dn * xhat, axis=0)
        g = dn * w[None, :]
        c2 = tl.sum(g * xhat, axis=1) / head_dim
        dx = (g - xhat * c2[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * head_dim + cols[None, :], dx.to(DX.dtype.element_ty), mask=m2)
    tl.store(DWPart + pid * head_dim + cols, dw, mask=cmask)


_fwd = triton.autotune(autotune_configs(_CONFIGS), key=["head_dim", "HAS_ROPE"])(_qk_norm_rope_fwd_kernel)
_bwd = triton.autotune(autotune_configs(_CONFIGS), key=["head_dim", "HAS_ROPE"])(_qk_norm_rope_bwd_kernel)


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
        eps, HAS_ROPE=has_rope, I64=needs_int64(x, out), BLOCK_D=next_pow2(D),
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
        HAS_ROPE=has_rope, I64=needs_int64(dout, x, dx), BLOCK_D=next_pow2(D),
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
