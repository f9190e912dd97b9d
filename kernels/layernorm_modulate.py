"""Fused LayerNorm + adaLN modulation + gated residual (STDiT3 block glue, opensora-v1.2.md §1.3).

Three public ops share one forward and one backward kernel, specialised by constexpr flags:

- ``layernorm_modulate``:     h = LN(x) * (1 + scale) + shift
- ``gated_residual``:         r = x + gate * y
- ``add_layernorm_modulate``: r = x + gate * y (or x + y),  h = LN(r) * (1 + scale) + shift

x is (B, N, C) with N = T * S tokens, frame-major. shift/scale/gate are per sample, (B, C) or (B, 1, C).
With ``x_mask`` (B, T) bool, the frames where it is False take ``shift0/scale0/gate0`` (the t0 modulation).
LayerNorm has no affine and its statistics are fp32; every output is rounded once to x's dtype.
The forward's row loop uses the plain two-pass statistics and flags a row whose variance is not finite
(|r| >= ~1e19 overflows it; inf / NaN inputs); only then does the program redo its rows, one at a time, with
statistics on r scaled by a power of two from the row's max |r| (exact; fp32 |r| up to ~1e37 gives the
fp64 result). Ordinary rows pay one compare and a flag, not the max|r| reduction and scaling (issue 9).

Schedule: the grid is (row chunks, B); a program owns ``rows_per_prog`` consecutive tokens of one sample,
loads that sample's modulation rows once, and walks its tokens BLOCK_M at a time. The backward keeps the
per-sample parameter gradients (two accumulators: x_mask True / False) in registers and writes one fp32
partial per program, summed on the host: no atomics, so the kernels are deterministic and autotune-safe.
Bytes moved are the minimum: forward reads x (and y) once and writes h (and r); backward reads dh (dr),
r (y) and writes dx (dy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from opensora_fast.kernels import reference
from opensora_fast.kernels._utils import autotune_configs, check_tensor, empty, next_pow2, use_triton

_CONFIGS = [
    triton.Config({"BLOCK_M": 1}, num_warps=8),
    triton.Config({"BLOCK_M": 2}, num_warps=8),
    triton.Config({"BLOCK_M": 4}, num_warps=8),
]
# The backward keeps up to six (BLOCK_C,) fp32 accumulators live: BLOCK_M=4 spills with x_mask.
_BWD_CONFIGS = _CONFIGS[:2]
_KEY = ["n_ch", "HAS_Y", "HAS_GATE", "HAS_LN", "HAS_MASK"]


@triton.jit
def _load_mod(P, P0, b, stride_p, stride_p0, cols, cmask, HAS_MASK: tl.constexpr):
    """Modulation rows of sample b for x_mask True (P) and False (P0), fp32, each (BLOCK_C,)."""
    p = tl.load(P + b * stride_p + cols, mask=cmask, other=0.0).to(tl.float32)
    p0 = p
    if HAS_MASK:
        p0 = tl.load(P0 + b * stride_p0 + cols, mask=cmask, other=0.0).to(tl.float32)
    return p, p0


@triton.jit
def _row_block(start, row_hi, cmask, XMask, b, stride_mb, stride_mt, frame_len, I64: tl.constexpr,
               HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """Rows start .. start + BLOCK_M - 1 of sample b: (rows, row mask, (BLOCK_M, BLOCK_C) mask, sel: per row
    (BLOCK_M, 1) whether its frame's x_mask is True (every valid row without HAS_MASK))."""
    rows = start + tl.arange(0, BLOCK_M)
    if I64:
        rows = rows.to(tl.int64)
    rmask = rows < row_hi
    m2 = rmask[:, None] & cmask[None, :]
    sel = rmask[:, None]
    if HAS_MASK:
        sel = tl.load(XMask + b * stride_mb + (rows // frame_len) * stride_mt, mask=rmask, other=0)[:, None] != 0
    return rows, rmask, m2, sel


@triton.jit
def _pick(p, p0, sel, HAS_MASK: tl.constexpr):
    """Per-row modulation (BLOCK_M, BLOCK_C): p where sel (BLOCK_M, 1) is True, else p0."""
    if HAS_MASK:
        out = tl.where(sel, p[None, :], p0[None, :])
    else:
        out = p[None, :]
    return out


@triton.jit
def _max_sum(a_max, a_sum, b_max, b_sum):
    """Combine of the fused (max, sum) row reduction."""
    return tl.maximum(a_max, b_max), a_sum + b_sum


@triton.jit
def _inv_pow2_le(amax):
    """2**-e with e = floor(log2(amax)) clamped to [0, 126], from amax's exponent bits (amax >= 0 or NaN): no
    log2 / exp2. amax < 1 gives 1; inf gives 2**-126 (the row's sums are then inf - inf = NaN, as they should)."""
    e = (amax.to(tl.int32, bitcast=True) >> 23) - 127
    e = tl.minimum(tl.maximum(e, 0), 126)
    return ((127 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _row_stats(r, m2, n_ch, n_p, p_scale, eps):
    """LayerNorm statistics of the rows of r (BLOCK_M, BLOCK_C) fp32 (m2: valid elements, r is 0 elsewhere):
    (mean, rstd, xhat = (r - mean) * rstd).

    One fused reduction gives each row's max|r| and sum(r * p_scale) (p_scale = 2**-p with 2**p >= n_ch, so
    the sum cannot overflow; mean = that sum / n_p with n_p = n_ch * p_scale, the same rounding as sum / n_ch);
    the variance is then summed on (r - mean) * 2**-e with 2**e <= max|r| (rows with max|r| < 1 unscaled).
    Scaling by a power of two is exact, so the results equal the unscaled two-pass formula, but the sums
    cannot overflow before r itself does (unscaled, |r| >= ~1e19 overflowed the variance, rstd became 0 and
    the output silently equalled shift). Per element: max, 3 FMAs and a select (2 cross-warp reductions)."""
    amax, sum_p = tl.reduce((tl.abs(r), r * p_scale), 1, _max_sum)
    mean = sum_p / n_p
    s = _inv_pow2_le(amax)
    mean_s = mean * s
    ds = tl.where(m2, r * s[:, None] - mean_s[:, None], 0.0)
    var_s = tl.sum(ds * ds, axis=1) / n_ch
    # 1 / sqrt(var + eps) in scaled units; capped so a constant huge row (eps * s^2 underflows) stays finite
    inv_s = tl.minimum(1.0 / tl.sqrt(var_s + eps * s * s), 3.0e38)
    rstd = tl.minimum(inv_s * s, 1.0 / tl.sqrt(eps))
    return mean, rstd, ds * inv_s[:, None]


@triton.jit
def _fwd_rows(
    start, row_hi, b, cols, cmask,  # rows [start, start + BLOCK_M) below row_hi of sample b; (BLOCK_C,) columns
    X, Y, R, H, Mean, Rstd, XMask,  # the kernel's tensors (see _layernorm_modulate_fwd_kernel)
    shift, shift0, scale, scale0, gate, gate0,  # (BLOCK_C,) fp32 modulation rows of sample b
    n_tok, n_ch, frame_len, stride_xb, stride_xn, stride_yb, stride_yn, stride_mb, stride_mt, eps,
    HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, HAS_LN: tl.constexpr, HAS_MASK: tl.constexpr, I64: tl.constexpr,
    SCALED: tl.constexpr,  # overflow-proof statistics (the fix-up pass; r is not stored again)
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One block of rows of the forward. Returns 1 (int32) when a row's plain statistics were not finite."""
    rows, rmask, m2, sel = _row_block(start, row_hi, cmask, XMask, b, stride_mb, stride_mt, frame_len, I64,
                                      HAS_MASK, BLOCK_M)  # fmt: skip
    x = tl.load(X + b * stride_xb + rows[:, None] * stride_xn + cols[None, :], mask=m2, other=0.0)
    r = x.to(tl.float32)
    out_off = (b * n_tok + rows)[:, None] * n_ch + cols[None, :]
    if HAS_Y:
        y = tl.load(Y + b * stride_yb + rows[:, None] * stride_yn + cols[None, :], mask=m2, other=0.0)
        if HAS_GATE:
            r += _pick(gate, gate0, sel, HAS_MASK) * y.to(tl.float32)
        else:
            r += y.to(tl.float32)
        if not SCALED:
            tl.store(R + out_off, r.to(R.dtype.element_ty), mask=m2)
    bad = tl.zeros((), tl.int32)
    if HAS_LN:
        if SCALED:
            mean, rstd, xhat = _row_stats(r, m2, n_ch, n_ch * (1.0 / BLOCK_C), 1.0 / BLOCK_C, eps)
        else:
            mean = tl.sum(r, axis=1) / n_ch
            xhat = tl.where(m2, r - mean[:, None], 0.0)
            var = tl.sum(xhat * xhat, axis=1) / n_ch
            rstd = 1.0 / tl.sqrt(var + eps)
            xhat = xhat * rstd[:, None]
            # not finite (inf, or NaN from inf - inf / a NaN input): the caller redoes these rows with SCALED
            bad = tl.max(tl.where(var <= 3.4028234663852886e38, 0, 1), axis=0)
        h = xhat * (1.0 + _pick(scale, scale0, sel, HAS_MASK)) + _pick(shift, shift0, sel, HAS_MASK)
        tl.store(H + out_off, h.to(H.dtype.element_ty), mask=m2)
        tl.store(Mean + b * n_tok + rows, mean, mask=rmask)
        tl.store(Rstd + b * n_tok + rows, rstd, mask=rmask)
    return bad


@triton.jit
def _layernorm_modulate_fwd_kernel(
    X,  # (B, N, C) input x
    Y,  # (B, N, C) branch output y (HAS_Y)
    R,  # (B, N, C) out: r = x + gate * y (HAS_Y, or the only output when not HAS_LN)
    H,  # (B, N, C) out: h = LN(r) * (1 + scale) + shift (HAS_LN)
    Shift,
    Scale,
    Gate,  # (B, C) rows with batch stride stride_shift / stride_scale / stride_gate
    Shift0,
    Scale0,
    Gate0,  # (B, C) t0 rows (HAS_MASK)
    XMask,  # (B, T) bool (HAS_MASK)
    Mean,
    Rstd,  # (B * N,) fp32 out: LayerNorm statistics of r (HAS_LN)
    n_tok,
    n_ch,
    frame_len,
    rows_per_prog,  # tokens per sample, channels, tokens per frame, tokens per program
    stride_xb,
    stride_xn,
    stride_yb,
    stride_yn,  # x / y strides (channel stride is 1)
    stride_shift,
    stride_scale,
    stride_gate,
    stride_shift0,
    stride_scale0,
    stride_gate0,
    stride_mb,
    stride_mt,  # x_mask strides
    eps,
    HAS_Y: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_LN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    I64: tl.constexpr,  # int64 element offsets (some tensor spans >= 2**31 elements)
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    if I64:
        b = b.to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < n_ch
    zero = tl.zeros((BLOCK_C,), tl.float32)
    shift, shift0, scale, scale0, gate, gate0 = zero, zero, zero, zero, zero, zero  # placeholders where unused
    if HAS_LN:
        shift, shift0 = _load_mod(Shift, Shift0, b, stride_shift, stride_shift0, cols, cmask, HAS_MASK)
        scale, scale0 = _load_mod(Scale, Scale0, b, stride_scale, stride_scale0, cols, cmask, HAS_MASK)
    if HAS_GATE:
        gate, gate0 = _load_mod(Gate, Gate0, b, stride_gate, stride_gate0, cols, cmask, HAS_MASK)
    row_lo = chunk * rows_per_prog
    row_hi = tl.minimum(row_lo + rows_per_prog, n_tok)
    bad = tl.zeros((), tl.int32)
    for start in range(row_lo, row_hi, BLOCK_M):
        bad |= _fwd_rows(
            start, row_hi, b, cols, cmask, X, Y, R, H, Mean, Rstd, XMask,
            shift, shift0, scale, scale0, gate, gate0, n_tok, n_ch, frame_len,
            stride_xb, stride_xn, stride_yb, stride_yn, stride_mb, stride_mt, eps,
            HAS_Y, HAS_GATE, HAS_LN, HAS_MASK, I64, False, BLOCK_M, BLOCK_C,
        )  # fmt: skip
    if HAS_LN:
        if bad != 0:  # rare: some row's plain statistics overflowed (|r| >= ~1e19) or r holds inf / NaN
            for row in range(row_lo, row_hi):
                _fwd_rows(
                    row, row_hi, b, cols, cmask, X, Y, R, H, Mean, Rstd, XMask,
                    shift, shift0, scale, scale0, gate, gate0, n_tok, n_ch, frame_len,
                    stride_xb, stride_xn, stride_yb, stride_yn, stride_mb, stride_mt, eps,
                    HAS_Y, HAS_GATE, HAS_LN, HAS_MASK, I64, True, 1, BLOCK_C,
                )  # fmt: skip


@triton.jit
def _layernorm_modulate_bwd_kernel(
    DH,  # (B, N, C) grad of h (HAS_LN), contiguous
    DR,  # (B, N, C) grad of r (HAS_DR), contiguous
    R,  # (B, N, C) r saved by the forward (x itself when there is no y)
    Y,  # (B, N, C) y (HAS_Y)
    Scale,
    Gate,  # (B, C) rows, batch strides stride_scale / stride_gate
    Scale0,
    Gate0,  # (B, C) t0 rows (HAS_MASK)
    XMask,  # (B, T) bool (HAS_MASK)
    Mean,
    Rstd,  # (B * N,) fp32 statistics from the forward (HAS_LN)
    DX,  # (B, N, C) out: grad of x
    DY,  # (B, N, C) out: grad of y (HAS_Y)
    DPart,  # (B, n_chunks, 6, n_ch) fp32 out: per-program partial sums of d{shift,scale,gate}{,0}
    n_tok,
    n_ch,
    frame_len,
    rows_per_prog,
    n_chunks,
    stride_rb,
    stride_rn,
    stride_yb,
    stride_yn,
    stride_scale,
    stride_gate,
    stride_scale0,
    stride_gate0,
    stride_mb,
    stride_mt,
    HAS_Y: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_LN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_DR: tl.constexpr,
    I64: tl.constexpr,  # int64 element offsets (some tensor spans >= 2**31 elements)
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    if I64:
        b = b.to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < n_ch
    if HAS_LN:
        scale, scale0 = _load_mod(Scale, Scale0, b, stride_scale, stride_scale0, cols, cmask, HAS_MASK)
    if HAS_GATE:
        gate, gate0 = _load_mod(Gate, Gate0, b, stride_gate, stride_gate0, cols, cmask, HAS_MASK)
    acc_shift = tl.zeros((BLOCK_C,), tl.float32)
    acc_scale = tl.zeros((BLOCK_C,), tl.float32)
    acc_gate = tl.zeros((BLOCK_C,), tl.float32)
    acc_shift0 = tl.zeros((BLOCK_C,), tl.float32)
    acc_scale0 = tl.zeros((BLOCK_C,), tl.float32)
    acc_gate0 = tl.zeros((BLOCK_C,), tl.float32)
    row_lo = chunk * rows_per_prog
    row_hi = tl.minimum(row_lo + rows_per_prog, n_tok)
    for start in range(row_lo, row_hi, BLOCK_M):
        rows, rmask, m2, sel = _row_block(start, row_hi, cmask, XMask, b, stride_mb, stride_mt, frame_len, I64,
                                          HAS_MASK, BLOCK_M)  # fmt: skip
        off = (b * n_tok + rows)[:, None] * n_ch + cols[None, :]
        dr = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
        if HAS_DR:
            dr = tl.load(DR + off, mask=m2, other=0.0).to(tl.float32)
        if HAS_LN:
            r = tl.load(R + b * stride_rb + rows[:, None] * stride_rn + cols[None, :], mask=m2, other=0.0)
            mean = tl.load(Mean + b * n_tok + rows, mask=rmask, other=0.0)
            rstd = tl.load(Rstd + b * n_tok + rows, mask=rmask, other=0.0)
            xhat = tl.where(m2, (r.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
            dh = tl.load(DH + off, mask=m2, other=0.0).to(tl.float32)
            g = dh * (1.0 + _pick(scale, scale0, sel, HAS_MASK))
            c1 = tl.sum(g, axis=1) / n_ch
            c2 = tl.sum(g * xhat, axis=1) / n_ch
            dr += tl.where(m2, (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None], 0.0)
            if HAS_MASK:
                acc_shift += tl.sum(tl.where(sel, dh, 0.0), axis=0)
                acc_scale += tl.sum(tl.where(sel, dh * xhat, 0.0), axis=0)
                acc_shift0 += tl.sum(tl.where(sel, 0.0, dh), axis=0)
                acc_scale0 += tl.sum(tl.where(sel, 0.0, dh * xhat), axis=0)
            else:
                acc_shift += tl.sum(dh, axis=0)
                acc_scale += tl.sum(dh * xhat, axis=0)
        tl.store(DX + off, dr.to(DX.dtype.element_ty), mask=m2)
        if HAS_Y:
            if HAS_GATE:
                y = tl.load(Y + b * stride_yb + rows[:, None] * stride_yn + cols[None, :], mask=m2, other=0.0)
                dgy = dr * y.to(tl.float32)
                if HAS_MASK:
                    acc_gate += tl.sum(tl.where(sel, dgy, 0.0), axis=0)
                    acc_gate0 += tl.sum(tl.where(sel, 0.0, dgy), axis=0)
                else:
                    acc_gate += tl.sum(dgy, axis=0)
                tl.store(DY + off, (dr * _pick(gate, gate0, sel, HAS_MASK)).to(DY.dtype.element_ty), mask=m2)
            else:
                tl.store(DY + off, dr.to(DY.dtype.element_ty), mask=m2)
    part = DPart + ((b * n_chunks + chunk) * 6) * n_ch + cols
    tl.store(part + 0 * n_ch, acc_shift, mask=cmask)
    tl.store(part + 1 * n_ch, acc_scale, mask=cmask)
    tl.store(part + 2 * n_ch, acc_gate, mask=cmask)
    tl.store(part + 3 * n_ch, acc_shift0, mask=cmask)
    tl.store(part + 4 * n_ch, acc_scale0, mask=cmask)
    tl.store(part + 5 * n_ch, acc_gate0, mask=cmask)


_fwd = triton.autotune(autotune_configs(_CONFIGS), key=_KEY)(_layernorm_modulate_fwd_kernel)
_bwd = triton.autotune(autotune_configs(_BWD_CONFIGS), key=_KEY + ["HAS_DR"])(_layernorm_modulate_bwd_kernel)


# --------------------------------------------------------------------------------------------
# host launchers as torch custom ops


INT32_LIMIT = 2**31  # element offsets at or past this need the int64 kernel variants (tests lower it)


def max_offset(t: torch.Tensor | None) -> int:
    """Largest element offset a kernel can form in t (from its sizes and strides), 0 for None/empty."""
    if t is None or t.numel() == 0:
        return 0
    return sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))


def needs_int64(*tensors: torch.Tensor | None) -> bool:
    """True when an offset into one of the tensors may not fit in int32: the kernels' I64 constexpr.

    Kernels index with int32 (cheaper address math) unless this holds for one of their tensors."""
    return any(max_offset(t) + 1 >= INT32_LIMIT for t in tensors)


def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device (of the recorded target while kernels._record records),
    None elsewhere (tests patch it to size GPU grids)."""
    from opensora_fast.kernels._record import sm_count as _sms

    return _sms(device)


def _rows_per_prog(B: int, N: int, device: torch.device) -> int:
    """Tokens per program: enough programs to fill the GPU (~8 per SM), few under the interpreter."""
    sms = sm_count(device)
    if sms is None:
        return max(N, 1)
    chunks = max(1, min(N, (8 * sms + B - 1) // B))
    return max(1, triton.cdiv(N, chunks))


def _bstride(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.stride(0)


def _none(t: torch.Tensor) -> torch.Tensor | None:
    return None if t.numel() == 0 else t


def _fwd_impl(
    x: torch.Tensor,
    y: torch.Tensor | None,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    gate: torch.Tensor | None,
    shift0: torch.Tensor | None,
    scale0: torch.Tensor | None,
    gate0: torch.Tensor | None,
    x_mask: torch.Tensor | None,
    eps: float,
    has_ln: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (r, h, mean, rstd); r is empty when there is no y, h/mean/rstd empty without LN."""
    B, N, C = x.shape
    dev = x.device
    has_y = y is not None
    r = empty((B, N, C), x.dtype, dev) if has_y else x.new_empty(0)
    h = empty((B, N, C), x.dtype, dev) if has_ln else x.new_empty(0)
    mean = empty((B * N,), torch.float32, dev) if has_ln else x.new_empty(0, dtype=torch.float32)
    rstd = empty((B * N,), torch.float32, dev) if has_ln else x.new_empty(0, dtype=torch.float32)
    if B * N == 0:
        return r, h, mean, rstd
    rpp = _rows_per_prog(B, N, dev)
    T = x_mask.shape[1] if x_mask is not None else 1
    grid = (triton.cdiv(N, rpp), B)
    d = x  # placeholder for pointers a specialisation does not read
    _fwd[grid](
        x, y if has_y else d, r if has_y else d, h if has_ln else d,
        shift if shift is not None else d, scale if scale is not None else d, gate if gate is not None else d,
        shift0 if shift0 is not None else d, scale0 if scale0 is not None else d,
        gate0 if gate0 is not None else d, x_mask if x_mask is not None else d,
        mean if has_ln else d, rstd if has_ln else d,
        N, C, N // T, rpp,
        x.stride(0), x.stride(1), y.stride(0) if has_y else 0, y.stride(1) if has_y else 0,
        _bstride(shift), _bstride(scale), _bstride(gate), _bstride(shift0), _bstride(scale0), _bstride(gate0),
        x_mask.stride(0) if x_mask is not None else 0, x_mask.stride(1) if x_mask is not None else 0,
        eps,
        HAS_Y=has_y, HAS_GATE=gate is not None, HAS_LN=has_ln, HAS_MASK=x_mask is not None,
        I64=needs_int64(x, y, r, h), BLOCK_C=next_pow2(C),
    )  # fmt: skip
    return r, h, mean, rstd


_fwd_op = torch.library.custom_op("opensora_fast::layernorm_modulate_fwd", _fwd_impl, mutates_args=())


@_fwd_op.register_fake
def _(x, y, shift, scale, gate, shift0, scale0, gate0, x_mask, eps, has_ln):
    B, N, C = x.shape
    r = torch.empty_like(x, memory_format=torch.contiguous_format) if y is not None else x.new_empty(0)
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if has_ln else x.new_empty(0)
    st = x.new_empty(B * N if has_ln else 0, dtype=torch.float32)
    return r, h, st, torch.empty_like(st)


def _bwd_impl(
    dh: torch.Tensor | None,
    dr: torch.Tensor | None,
    r: torch.Tensor,
    y: torch.Tensor | None,
    scale: torch.Tensor | None,
    gate: torch.Tensor | None,
    scale0: torch.Tensor | None,
    gate0: torch.Tensor | None,
    x_mask: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    has_ln: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dy, dparams) with dparams (6, B, C) fp32 = d{shift, scale, gate, shift0, scale0, gate0}."""
    B, N, C = r.shape
    dev = r.device
    has_y = y is not None
    dx = empty((B, N, C), r.dtype, dev)
    dy = empty((B, N, C), r.dtype, dev) if has_y else r.new_empty(0)
    rpp = _rows_per_prog(B, N, dev)
    n_chunks = triton.cdiv(N, rpp) if N else 0
    part = empty((B, n_chunks, 6, C), torch.float32, dev)
    if B * N == 0:
        return dx, dy, torch.zeros(6, B, C, device=dev)
    T = x_mask.shape[1] if x_mask is not None else 1
    d = r
    dh = dh.contiguous() if dh is not None else None  # grads from autograd are almost always contiguous
    dr = dr.contiguous() if dr is not None else None
    _bwd[(n_chunks, B)](
        dh if dh is not None else d, dr if dr is not None else d, r, y if has_y else d,
        scale if scale is not None else d, gate if gate is not None else d,
        scale0 if scale0 is not None else d, gate0 if gate0 is not None else d,
        x_mask if x_mask is not None else d, mean if has_ln else d, rstd if has_ln else d,
        dx, dy if has_y else d, part,
        N, C, N // T, rpp, n_chunks,
        r.stride(0), r.stride(1), y.stride(0) if has_y else 0, y.stride(1) if has_y else 0,
        _bstride(scale), _bstride(gate), _bstride(scale0), _bstride(gate0),
        x_mask.stride(0) if x_mask is not None else 0, x_mask.stride(1) if x_mask is not None else 0,
        HAS_Y=has_y, HAS_GATE=gate is not None, HAS_LN=has_ln, HAS_MASK=x_mask is not None,
        HAS_DR=dr is not None, I64=needs_int64(dh, dr, r, y, dx, dy), BLOCK_C=next_pow2(C),
    )  # fmt: skip
    return dx, dy, part.sum(1).permute(1, 0, 2).contiguous()


_bwd_op = torch.library.custom_op("opensora_fast::layernorm_modulate_bwd", _bwd_impl, mutates_args=())


@_bwd_op.register_fake
def _(dh, dr, r, y, scale, gate, scale0, gate0, x_mask, mean, rstd, has_ln):
    B, N, C = r.shape
    dy = torch.empty_like(r, memory_format=torch.contiguous_format) if y is not None else r.new_empty(0)
    dp = r.new_empty((6, B, C), dtype=torch.float32)
    return torch.empty_like(r, memory_format=torch.contiguous_format), dy, dp


class LayerNormModulateFunction(torch.autograd.Function):
    """Autograd for all three ops. Outputs: h (layernorm_modulate), r (gated_residual), (r, h) (add_...)."""

    @staticmethod
    def forward(ctx, x, y, shift, scale, gate, shift0, scale0, gate0, x_mask, eps, has_ln):
        r, h, mean, rstd = torch.ops.opensora_fast.layernorm_modulate_fwd(
            x, y, shift, scale, gate, shift0, scale0, gate0, x_mask, eps, has_ln
        )
        saved = r if (has_ln and y is not None) else x
        ctx.save_for_backward(saved, y, scale, gate, scale0, gate0, x_mask, mean, rstd)
        ctx.has_ln = has_ln
        ctx.shapes = [None if t is None else (t.shape, t.dtype) for t in (shift, scale, gate, shift0, scale0, gate0)]
        ctx.set_materialize_grads(False)
        if not has_ln:
            return r
        return (r, h) if y is not None else h

    @staticmethod
    def backward(ctx, *grads):
        saved, y, scale, gate, scale0, gate0, x_mask, mean, rstd = ctx.saved_tensors
        if not ctx.has_ln:
            dr, dh = grads[0], None
        elif y is not None:
            dr, dh = grads
        else:
            dr, dh = None, grads[0]
        if dr is None and dh is None:
            return (None,) * 11
        dx, dy, dp = torch.ops.opensora_fast.layernorm_modulate_bwd(
            dh, dr, saved, y, scale, gate, scale0, gate0, x_mask, mean, rstd, ctx.has_ln
        )
        dparams = [None if s is None else dp[i].reshape(s[0]).to(s[1]) for i, s in enumerate(ctx.shapes)]
        return (dx, _none(dy), *dparams, None, None, None)


# --------------------------------------------------------------------------------------------
# public functions


def _check(x, y=None, x_mask=None, **mods) -> None:
    check_tensor(x, "x", ndim=3)
    B, N, C = x.shape
    if y is not None:
        check_tensor(y, "y", shape=(B, N, C), like=x)
    if x.stride(-1) != 1 or (y is not None and y.stride(-1) != 1):
        raise ValueError("x and y must have unit stride along C (the last dimension)")
    for name, t in mods.items():
        if t is None:
            continue
        check_tensor(t, name, like=x)
        if tuple(t.shape) not in ((B, C), (B, 1, C)) or t.stride(-1) != 1:
            raise ValueError(
                f"{name} must have shape ({B}, {C}) or ({B}, 1, {C}) with unit stride along C, "
                f"got shape {tuple(t.shape)}"
            )
    if x_mask is not None:
        check_tensor(x_mask, "x_mask", ndim=2, floating=False, like=x)
        if x_mask.dtype != torch.bool or x_mask.shape[0] != B or x_mask.shape[1] == 0 or N % x_mask.shape[1] != 0:
            raise ValueError(
                f"x_mask must be a bool tensor of shape ({B}, T) with T >= 1 dividing N={N}, "
                f"got {x_mask.dtype} {tuple(x_mask.shape)}"
            )
        for name, t in mods.items():
            if name.endswith("0") and t is None and mods.get(name[:-1]) is not None:
                raise ValueError(f"x_mask is given but {name} is None: the t0 modulation needs {name}")


def _as_rows(t):
    return None if t is None else t.reshape(t.shape[0], t.shape[-1])


def layernorm_modulate(x, shift, scale, *, eps=1e-6, x_mask=None, shift0=None, scale0=None):
    """LN(x) * (1 + scale) + shift; x (B, N, C), shift/scale (B, C) or (B, 1, C); see module doc."""
    _check(x, None, x_mask, shift=shift, scale=scale, shift0=shift0, scale0=scale0)
    if not use_triton(x):
        return reference.layernorm_modulate_ref(x, shift, scale, eps, x_mask, shift0, scale0)
    m = x_mask
    return LayerNormModulateFunction.apply(
        x, None, _as_rows(shift), _as_rows(scale), None,
        _as_rows(shift0) if m is not None else None, _as_rows(scale0) if m is not None else None, None,
        m, eps, True,
    )  # fmt: skip


def gated_residual(x, y, gate, *, x_mask=None, gate0=None):
    """x + gate * y; x, y (B, N, C), gate (B, C) or (B, 1, C); see module doc."""
    _check(x, y, x_mask, gate=gate, gate0=gate0)
    if not use_triton(x, y):
        return reference.gated_residual_ref(x, y, gate, x_mask, gate0)
    g0 = _as_rows(gate0) if x_mask is not None else None
    return LayerNormModulateFunction.apply(x, y, None, None, _as_rows(gate), None, None, g0, x_mask, 0.0, False)


def add_layernorm_modulate(
    x, y, shift, scale, *, gate=None, eps=1e-6, x_mask=None, shift0=None, scale0=None, gate0=None
):
    """(r, h): r = x + gate * y (x + y without gate), h = LN(r) * (1 + scale) + shift, in one pass."""
    mods = dict(shift=shift, scale=scale, gate=gate, shift0=shift0, scale0=scale0)
    if gate is not None:
        mods["gate0"] = gate0
    _check(x, y, x_mask, **mods)
    if not use_triton(x, y):
        return reference.add_layernorm_modulate_ref(x, y, shift, scale, gate, eps, x_mask, shift0, scale0, gate0)
    m = x_mask is not None
    return LayerNormModulateFunction.apply(
        x, y, _as_rows(shift), _as_rows(scale), _as_rows(gate),
        _as_rows(shift0) if m else None, _as_rows(scale0) if m else None,
        _as_rows(gate0) if (m and gate is not None) else None, x_mask, eps, True,
    )  # fmt: skip
