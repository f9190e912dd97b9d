"""Temporal self-attention as block-diagonal packed tiles, q/k RMSNorm + RoPE fused, forward and backward.

STDiT3's temporal attention runs B*S sequences (one per spatial position) of T frames each, read straight
out of the qkv Linear output (B, T*S, 3C): frame t of sequence (b, s) is row ``b * T*S + t*S + s``.
T is small (1..64 here), so one program holds whole sequences: T is padded to TP = next_pow2(T) (>= 16)
and a tile of BLOCK rows holds G = BLOCK // TP sequences (b, s0 .. s0+G-1) of one head, row
``r -> (g = r // TP, frame p = r % TP)``. The G sequences of a tile are adjacent spatial positions, so at
every frame the tile reads a contiguous run of G rows.

Forward, per tile: q, k, v are loaded once (head_dim as a power-of-two piece BD0 plus an optional masked
piece BD1, as in ``_attention_kernels``), RMSNorm (fp32 statistics, cast back, times the weight) and
interleaved RoPE (position = frame p) are applied to q and k in registers, S = q k^T is one
(BLOCK, BLOCK) tile masked to the block diagonal (same sequence) and to frames < T, and the softmax is
exact (no K loop, no online rescaling). O = P V is stored in token order. No lse is kept: the backward
recomputes P from the same tile.

Backward, per tile (one kernel, no atomics: a key is only ever seen by its own tile): the same prologue
and P, dP = dO V^T, delta = rowsum(P * dP) (= rowsum(dO * O) without reading O), dS = P (dP - delta),
dv = P^T dO, and the gradients w.r.t. the normalised/rotated q and k (dS k, dS^T q, times the scale)
mapped through RoPE^T and the RMSNorm backward in registers, written straight into dqkv; the norm
weights get one fp32 (D,) partial per program, summed on the host (deterministic).

Useful MMA fraction of the padding: per full tile the S / PV / backward products do BLOCK^2 (x D) work
of which G T^2 is useful, i.e. ``T^2 / (TP * BLOCK)`` with BLOCK = 64: T = 64: 100%, T = 30: 44%,
T = 16: 25%, T = 8: 6%, T = 1: 0.1%. The kernels are memory-bound (the forward reads q, k, v once and
writes o once; the backward reads q, k, v, dO once, re-reads q and k from cache, and writes dqkv once),
so the wasted MMA is hidden behind the loads.

Alignment: the q/k/v/o/dO/dqkv tile pointers carry ``tl.multiple_of`` / ``tl.max_contiguous`` hints
(every row starts 16-byte aligned; the host routes here only when qkv satisfies it and copies an
unaligned incoming gradient), so a tile loads as 16-byte vectors; without them each element was its
own 64-bit pointer and the backward spilled on sm_90.
RoPE's pair swap is done in registers (reshape + split/join), not with a second load at columns ``^ 1``
(whose addresses are not contiguous and therefore not vectorised).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rows(base, tok, stride):
    """(base, row offsets) of a tile whose rows start 16-byte aligned (checked on the host)."""
    return base, tok.to(tl.int64) * stride


@triton.jit
def _ptrs(base, ro, col0, BD: tl.constexpr):
    """Row starts are 16-byte aligned and col0 is a multiple of 8 (host-checked: 16-byte aligned
    tensors, row strides and head offsets multiples of 8 elements), so 8 consecutive columns are one
    16-byte vector; the hint carries that to the compiler."""
    ptrs = base + ro[:, None] + (col0 + tl.arange(0, BD))[None, :]
    return tl.max_contiguous(tl.multiple_of(ptrs, [16, 16]), [1, 8])


@triton.jit
def _load(base, ro, ok, col0, D, BD: tl.constexpr):
    cols = col0 + tl.arange(0, BD)
    return tl.load(_ptrs(base, ro, col0, BD), mask=ok[:, None] & (cols < D)[None, :], other=0.0)


@triton.jit
def _store(base, ro, ok, col0, D, x, BD: tl.constexpr):
    cols = col0 + tl.arange(0, BD)
    mask = ok[:, None] & (cols < D)[None, :]
    tl.store(_ptrs(base, ro, col0, BD), x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _pair_swap(y, BM: tl.constexpr, BD: tl.constexpr):
    """(y0, y1) -> (y1, y0) over interleaved column pairs, in registers."""
    a, b = tl.split(tl.reshape(y, (BM, BD // 2, 2)))
    return tl.reshape(tl.join(b, a), (BM, BD))


@triton.jit
def _cos_sin(COS, SIN, co, ok, col0, D, BD: tl.constexpr):
    cols = col0 + tl.arange(0, BD)
    mask = ok[:, None] & (cols < D)[None, :]
    c = tl.load(COS + co[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + co[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return c, s


@triton.jit
def _weight(W, col0, D, dtype, BD: tl.constexpr):
    cols = col0 + tl.arange(0, BD)
    return tl.load(W + cols, mask=cols < D, other=0.0).to(dtype).to(tl.float32)


@triton.jit
def _rstd(x0, x1, D, eps, HAS_D1: tl.constexpr):
    xf = x0.to(tl.float32)
    ss = tl.sum(xf * xf, 1)
    if HAS_D1:
        xf1 = x1.to(tl.float32)
        ss += tl.sum(xf1 * xf1, 1)
    return tl.rsqrt(ss / D + eps)


@triton.jit
def _norm_rope(x, rstd, W, COS, SIN, co, ok, col0, D, ROPE: tl.constexpr, BM: tl.constexpr,
               BD: tl.constexpr):  # fmt: skip
    """RMSNorm (fp32 statistics, cast back, times the weight, cast back) then interleaved RoPE
    h * cos + rotate_half(h) * sin, rotate_half(h)[2i] = -h[2i+1], [2i+1] = h[2i]."""
    w = _weight(W, col0, D, x.dtype, BD)
    h = ((x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32) * w[None, :]).to(x.dtype)
    if ROPE:
        c, s = _cos_sin(COS, SIN, co, ok, col0, D, BD)
        hf = h.to(tl.float32)
        sign = tl.where((tl.arange(0, BD) % 2) == 0, -1.0, 1.0)
        h = (hf * c + _pair_swap(hf, BM, BD) * (s * sign[None, :])).to(x.dtype)
    return h


@triton.jit
def _load_qk(base, ro, ok, W, COS, SIN, co, D, eps, ROPE: tl.constexpr, BM: tl.constexpr,
             BD0: tl.constexpr, BD1: tl.constexpr, HAS_D1: tl.constexpr):  # fmt: skip
    """The normalised (+ rotated) pieces of a q or k tile (t1 a dummy without HAS_D1)."""
    x0 = _load(base, ro, ok, 0, D, BD0)
    x1 = x0
    if HAS_D1:
        x1 = _load(base, ro, ok, BD0, D, BD1)
    rstd = _rstd(x0, x1, D, eps, HAS_D1)
    t0 = _norm_rope(x0, rstd, W, COS, SIN, co, ok, 0, D, ROPE, BM, BD0)
    t1 = t0
    if HAS_D1:
        t1 = _norm_rope(x1, rstd, W, COS, SIN, co, ok, BD0, D, ROPE, BM, BD1)
    return t0, t1


@triton.jit
def _tile_rows(tile, S, T, n_stiles, stride_cs, TP: tl.constexpr, BLOCK: tl.constexpr):
    """(b, token row within sample b, RoPE table row offset, sequence slot g, valid) of a tile's rows."""
    b = tile // n_stiles
    s0 = (tile % n_stiles) * (BLOCK // TP)
    r = tl.arange(0, BLOCK)
    g = r // TP
    p = r % TP
    s = s0 + g
    ok = (p < T) & (s < S)
    return b, p * S + s, p.to(tl.int64) * stride_cs, g, ok


@triton.jit
def _scores(q0, q1, k0, k1, g, ok, qk_scale, HAS_D1: tl.constexpr, DOT_PREC: tl.constexpr):
    """Exact softmax (fp32, log2 units) of the block-diagonal masked q k^T tile: P (BLOCK, BLOCK)
    normalised; rows that see no key (padding) are all zeros."""
    s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
    if HAS_D1:
        s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
    vis = (g[:, None] == g[None, :]) & ok[None, :]
    s = tl.where(vis, s * qk_scale, float("-inf"))
    m = tl.max(s, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp2(s - m[:, None])
    den = tl.sum(p, 1)
    inv = tl.where(den > 0.0, 1.0 / tl.where(den > 0.0, den, 1.0), 0.0)
    return p * inv[:, None]


@triton.jit
def _temporal_attention_fwd_kernel(
    QKV,  # (B, T*S, 3C) through (sqb, sqn); columns [q heads | k heads | v heads], head h at h*D
    O,  # (B, T*S, C) through (sob, son)
    QW,  # (D,) q RMSNorm weight
    KW,  # (D,) k RMSNorm weight
    COS,  # (T, D) rows strided by stride_cs (ROPE)
    SIN,  # (T, D) (ROPE)
    sqb, sqn, sob, son, S, T, C, H, n_stiles, stride_cs, qk_scale, eps,
    D: tl.constexpr, ROPE: tl.constexpr, TP: tl.constexpr, BLOCK: tl.constexpr,
    BD0: tl.constexpr, BD1: tl.constexpr, HAS_D1: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    h = pid % H
    b, tok, co, g, ok = _tile_rows(pid // H, S, T, n_stiles, stride_cs, TP, BLOCK)
    qb, ro = _rows(QKV + b.to(tl.int64) * sqb + h * D, tok, sqn)
    q0, q1 = _load_qk(qb, ro, ok, QW, COS, SIN, co, D, eps, ROPE, BLOCK, BD0, BD1, HAS_D1)
    k0, k1 = _load_qk(qb + C, ro, ok, KW, COS, SIN, co, D, eps, ROPE, BLOCK, BD0, BD1, HAS_D1)
    p = _scores(q0, q1, k0, k1, g, ok, qk_scale, HAS_D1, DOT_PREC).to(QKV.dtype.element_ty)
    ob, roo = _rows(O + b.to(tl.int64) * sob + h * D, tok, son)
    v0 = _load(qb + 2 * C, ro, ok, 0, D, BD0)
    _store(ob, roo, ok, 0, D, tl.dot(p, v0, input_precision=DOT_PREC), BD0)
    if HAS_D1:
        v1 = _load(qb + 2 * C, ro, ok, BD0, D, BD1)
        _store(ob, roo, ok, BD0, D, tl.dot(p, v1, input_precision=DOT_PREC), BD1)


@triton.jit
def _norm_rope_bwd(gt, x, rstd, W, COS, SIN, co, ok, col0, D, ROPE: tl.constexpr, BM: tl.constexpr,
                   BD: tl.constexpr):  # fmt: skip
    """One piece: gt (fp32) is the gradient w.r.t. the transformed piece. RoPE^T:
    g = gt * cos + rotate_half^T(gt * sin), rotate_half^T(y)[2i] = y[2i+1], [2i+1] = -y[2i].
    Returns (dh = g * w, xhat, weight-gradient partial (BD,), rowsum(dh * xhat))."""
    w = _weight(W, col0, D, x.dtype, BD)
    g = gt
    if ROPE:
        c, s = _cos_sin(COS, SIN, co, ok, col0, D, BD)
        sign = tl.where((tl.arange(0, BD) % 2) == 0, 1.0, -1.0)
        g = gt * c + _pair_swap(gt * s, BM, BD) * sign[None, :]
    xhat = x.to(tl.float32) * rstd[:, None]
    dw = tl.sum(g * xhat.to(x.dtype).to(tl.float32), 0)
    dh = g * w[None, :]
    return dh, xhat, dw, tl.sum(dh * xhat, 1)


@triton.jit
def _prologue_bwd(gt0, gt1, X, ro, W, COS, SIN, co, ok, DX, rdo, DWP, pid, D, eps,
                  ROPE: tl.constexpr, BLOCK: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr,
                  HAS_D1: tl.constexpr):  # fmt: skip
    """RoPE^T then RMSNorm backward of one (BLOCK, D) q or k tile: gt* (fp32) are the gradients w.r.t.
    the transformed pieces; the raw tile is re-read from X (a cache hit: this program loaded it at the
    start; keeping it live through the attention part costs registers). Writes the dx rows and this
    program's (D,) weight-gradient partial."""
    x0 = _load(X, ro, ok, 0, D, BD0)
    x1 = x0
    if HAS_D1:
        x1 = _load(X, ro, ok, BD0, D, BD1)
    rstd = _rstd(x0, x1, D, eps, HAS_D1)
    dh0, xh0, pw0, dot = _norm_rope_bwd(gt0, x0, rstd, W, COS, SIN, co, ok, 0, D, ROPE, BLOCK, BD0)
    c0 = tl.arange(0, BD0)
    tl.store(DWP + pid.to(tl.int64) * D + c0, pw0, mask=c0 < D)
    if HAS_D1:
        dh1, xh1, pw1, dot1 = _norm_rope_bwd(gt1, x1, rstd, W, COS, SIN, co, ok, BD0, D, ROPE, BLOCK, BD1)
        dot += dot1
        c1 = BD0 + tl.arange(0, BD1)
        tl.store(DWP + pid.to(tl.int64) * D + c1, pw1, mask=c1 < D)
    mean = dot / D
    _store(DX, rdo, ok, 0, D, rstd[:, None] * (dh0 - xh0 * mean[:, None]), BD0)
    if HAS_D1:
        _store(DX, rdo, ok, BD0, D, rstd[:, None] * (dh1 - xh1 * mean[:, None]), BD1)


@triton.jit
def _temporal_attention_bwd_kernel(
    QKV,  # (B, T*S, 3C) through (sqb, sqn)
    DO,  # (B, T*S, C) through (sdb, sdn)
    DQKV,  # (B, T*S, 3C) through (sgb, sgn)
    DWQ,  # (num_programs, D) fp32 per-program partial q-norm weight gradients
    DWK,  # (num_programs, D) fp32 per-program partial k-norm weight gradients
    QW,  # (D,)
    KW,  # (D,)
    COS,  # (T, D) rows strided by stride_cs (ROPE)
    SIN,  # (T, D) (ROPE)
    sqb, sqn, sdb, sdn, sgb, sgn, S, T, C, H, n_stiles, stride_cs, qk_scale, sm_scale, eps,
    D: tl.constexpr, ROPE: tl.constexpr, TP: tl.constexpr, BLOCK: tl.constexpr,
    BD0: tl.constexpr, BD1: tl.constexpr, HAS_D1: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    h = pid % H
    b, tok, co, g, ok = _tile_rows(pid // H, S, T, n_stiles, stride_cs, TP, BLOCK)
    qb, ro = _rows(QKV + b.to(tl.int64) * sqb + h * D, tok, sqn)
    q0, q1 = _load_qk(qb, ro, ok, QW, COS, SIN, co, D, eps, ROPE, BLOCK, BD0, BD1, HAS_D1)
    k0, k1 = _load_qk(qb + C, ro, ok, KW, COS, SIN, co, D, eps, ROPE, BLOCK, BD0, BD1, HAS_D1)
    p = _scores(q0, q1, k0, k1, g, ok, qk_scale, HAS_D1, DOT_PREC)
    dob, rdo = _rows(DO + b.to(tl.int64) * sdb + h * D, tok, sdn)
    gb, rg = _rows(DQKV + b.to(tl.int64) * sgb + h * D, tok, sgn)
    do0 = _load(dob, rdo, ok, 0, D, BD0)
    v0 = _load(qb + 2 * C, ro, ok, 0, D, BD0)
    dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
    pt = tl.trans(p.to(QKV.dtype.element_ty))
    _store(gb + 2 * C, rg, ok, 0, D, tl.dot(pt, do0, input_precision=DOT_PREC), BD0)
    if HAS_D1:
        do1 = _load(dob, rdo, ok, BD0, D, BD1)
        v1 = _load(qb + 2 * C, ro, ok, BD0, D, BD1)
        dp += tl.dot(do1, tl.trans(v1), input_precision=DOT_PREC)
        _store(gb + 2 * C, rg, ok, BD0, D, tl.dot(pt, do1, input_precision=DOT_PREC), BD1)
    delta = tl.sum(p * dp, 1)
    ds = (p * (dp - delta[:, None])).to(QKV.dtype.element_ty)
    dst = tl.trans(ds)
    gq0 = tl.dot(ds, k0, input_precision=DOT_PREC) * sm_scale
    gk0 = tl.dot(dst, q0, input_precision=DOT_PREC) * sm_scale
    gq1 = gq0
    gk1 = gk0
    if HAS_D1:
        gq1 = tl.dot(ds, k1, input_precision=DOT_PREC) * sm_scale
        gk1 = tl.dot(dst, q1, input_precision=DOT_PREC) * sm_scale
    _prologue_bwd(gq0, gq1, qb, ro, QW, COS, SIN, co, ok, gb, rg, DWQ, pid, D, eps, ROPE, BLOCK, BD0, BD1,
                  HAS_D1)  # fmt: skip
    _prologue_bwd(gk0, gk1, qb + C, ro, KW, COS, SIN, co, ok, gb + C, rg, DWK, pid, D, eps, ROPE, BLOCK, BD0,
                  BD1, HAS_D1)  # fmt: skip
