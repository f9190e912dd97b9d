"""Temporal self-attention as block-diagonal packed tiles, q/k RMSNorm + RoPE fused, forward and backward.

STDiT3's temporal attention runs B*S sequences (one per spatial position) of T frames each, read straight
out of the qkv Linear output (B, T*S, 3C): frame t of sequence (b, s) is row ``b * T*S + t*S + s``.
T is small (1..128 here), so one program holds whole sequences: T is padded to TP = next_pow2(T) (>= 16)
and a key tile of BLOCK = max(64, TP) rows holds G = BLOCK // TP sequences (b, s0 .. s0+G-1) of one head,
row ``r -> (g = r // TP, frame p = r % TP)``. The G sequences of a tile are adjacent spatial positions,
so at every frame the tile reads a contiguous run of G rows. The queries of a tile are taken BLOCK_M
rows at a time (BLOCK_M = BLOCK up to 64 frames; 64 for 65..128 frames, where G = 1).

Forward, per tile: k is loaded once (head_dim as a power-of-two piece BD0 plus an optional masked
piece BD1, as in ``_attention_kernels``) and RMSNorm (fp32 statistics, cast back, times the weight) and
interleaved RoPE (position = frame p) are applied in registers; then per query step the same for q,
S = q k^T (BLOCK_M, BLOCK) masked to the block diagonal (same sequence) and to frames < T, and an exact
softmax (every key of the row is in the tile: no K loop, no online rescaling). O = P V is stored in
token order. Up to 64 frames no lse is kept: the backward recomputes P.

Backward up to 64 frames, per tile, no atomics (a key is only ever seen by its own tile): the same k, then P,
dP = dO V^T, delta = rowsum(P * dP) (= rowsum(dO * O) without reading O), dS = P (dP - delta); in one step
(``_bwd_one_step``, 4 warps: every product 64-row wgmma over the whole N) dV = P^T dO, dK = dS^T q and
dQ = dS k are computed and stored one after the other, so
that only one gradient accumulator is live at a time. The gradients w.r.t. the normalised/rotated q and k are
mapped through RoPE^T and the RMSNorm backward in registers and written straight into dqkv; the norm weights
get fp32 (D,) partials per program, summed on the host (deterministic).

65..128 frames (TP = BLOCK = 128, one sequence per tile): the forward stores each row's lse (log2 units), and
the backward is split like FA2's, in two launches of two programs per tile, 4 warps each, so that every
product is a 64-row wgmma over its whole N: ``_temporal_attention_bwd_q_kernel`` (per 64 query rows) computes
delta = rowsum(dO * O) from the saved output, dQ = sum over the two 64-key blocks of dS k with P = exp2(s - lse)
(each key block normalised in its loop), maps dQ through RoPE^T and the RMSNorm backward into dqkv, and writes
delta and the rows' normalised queries (a scratch of q's size: 1.06 GB at 720p 16 s, batch 1);
``_temporal_attention_bwd_kv_kernel`` (per 64 keys, normalised once) then takes the two 64-query blocks
(unrolled; async copies of the scratch cost a 40 B spill) for dV += P^T dO and dK += dS^T q.

Useful MMA fraction of the padding: per full tile the S / PV / backward products do BLOCK^2 (x D) work
of which G T^2 is useful, i.e. ``T^2 / (TP * BLOCK)``: T = 64: 100%, T = 30: 44%, T = 16: 25%,
T = 8: 6%, T = 1: 0.1%, T = 120: 88%, T = 65: 26%. The kernels are memory-bound (the forward reads q, k,
v once and writes o once; the backward reads q, k, v, dO once, re-reads them from cache, and writes dqkv
once), so the wasted MMA is hidden behind the loads.

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
def _load_pieces(base, ro, ok, D, BD0: tl.constexpr, BD1: tl.constexpr, HAS_D1: tl.constexpr):
    """Both head-dim pieces of a tile (the second a dummy without HAS_D1)."""
    x0 = _load(base, ro, ok, 0, D, BD0)
    x1 = x0
    if HAS_D1:
        x1 = _load(base, ro, ok, BD0, D, BD1)
    return x0, x1


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
    """The RoPE table rows of a tile: 16-byte aligned like the q/k rows (the host copies a table that is
    not), so they load as 16-byte vectors too (as scalars they were 75-80% of the global loads)."""
    c = _load(COS, co, ok, col0, D, BD).to(tl.float32)
    s = _load(SIN, co, ok, col0, D, BD).to(tl.float32)
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
    x0, x1 = _load_pieces(base, ro, ok, D, BD0, BD1, HAS_D1)
    rstd = _rstd(x0, x1, D, eps, HAS_D1)
    t0 = _norm_rope(x0, rstd, W, COS, SIN, co, ok, 0, D, ROPE, BM, BD0)
    t1 = t0
    if HAS_D1:
        t1 = _norm_rope(x1, rstd, W, COS, SIN, co, ok, BD0, D, ROPE, BM, BD1)
    return t0, t1


@triton.jit
def _tile_rows(tile, row0, S, T, n_stiles, stride_cs, TP: tl.constexpr, BLOCK: tl.constexpr,
               NR: tl.constexpr):  # fmt: skip
    """(b, token row within sample b, RoPE table row offset, sequence slot g, valid) of the NR tile rows
    row0 .. row0 + NR - 1."""
    b = tile // n_stiles
    s0 = (tile % n_stiles) * (BLOCK // TP)
    r = row0 + tl.arange(0, NR)
    g = r // TP
    p = r % TP
    s = s0 + g
    ok = (p < T) & (s < S)
    return b, p * S + s, p.to(tl.int64) * stride_cs, g, ok


@triton.jit
def _scores(q0, q1, k0, k1, gq, gk, okk, qk_scale, HAS_D1: tl.constexpr, DOT_PREC: tl.constexpr):
    """Exact softmax (fp32, log2 units) of the block-diagonal masked q k^T tile: P (BLOCK_M, BLOCK)
    normalised, rows that see no key (padding) all zeros; and each row's log2-sum-exp2 (m + log2(den),
    0 for a row that sees no key)."""
    s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
    if HAS_D1:
        s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
    vis = (gq[:, None] == gk[None, :]) & okk[None, :]
    s = tl.where(vis, s * qk_scale, float("-inf"))
    m = tl.max(s, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp2(s - m[:, None])
    den = tl.sum(p, 1)
    pos = den > 0.0
    inv = tl.where(pos, 1.0 / tl.where(pos, den, 1.0), 0.0)
    return p * inv[:, None], m + tl.log2(tl.where(pos, den, 1.0))


@triton.jit
def _temporal_attention_fwd_kernel(
    QKV,  # (B, T*S, 3C) through (sqb, sqn); columns [q heads | k heads | v heads], head h at h*D
    O,  # (B, T*S, C) through (sob, son)
    QW,  # (D,) q RMSNorm weight
    KW,  # (D,) k RMSNorm weight
    COS,  # (T, D) rows strided by stride_cs (ROPE)
    SIN,  # (T, D) (ROPE)
    LSE,  # (num_programs, BLOCK) fp32 out: each tile row's log2-sum-exp2 of its scaled scores (STATS)
    sqb, sqn, sob, son, S, T, C, H, n_stiles, stride_cs, qk_scale, eps,
    D: tl.constexpr, ROPE: tl.constexpr, TP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BD0: tl.constexpr, BD1: tl.constexpr, HAS_D1: tl.constexpr, DOT_PREC: tl.constexpr, STATS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    h = pid % H
    tile = pid // H
    b, tokk, cok, gk, okk = _tile_rows(tile, 0, S, T, n_stiles, stride_cs, TP, BLOCK, BLOCK)
    qb, rok = _rows(QKV + b.to(tl.int64) * sqb + h * D, tokk, sqn)
    k0, k1 = _load_qk(qb + C, rok, okk, KW, COS, SIN, cok, D, eps, ROPE, BLOCK, BD0, BD1, HAS_D1)
    ob = O + b.to(tl.int64) * sob + h * D
    for m in tl.static_range(BLOCK // BLOCK_M):
        _, tok, co, g, ok = _tile_rows(tile, m * BLOCK_M, S, T, n_stiles, stride_cs, TP, BLOCK, BLOCK_M)
        ro = tok.to(tl.int64) * sqn
        q0, q1 = _load_qk(qb, ro, ok, QW, COS, SIN, co, D, eps, ROPE, BLOCK_M, BD0, BD1, HAS_D1)
        p, lse = _scores(q0, q1, k0, k1, g, gk, okk, qk_scale, HAS_D1, DOT_PREC)
        if STATS:  # for the split backward (65..128 frames)
            tl.store(LSE + pid.to(tl.int64) * BLOCK + m * BLOCK_M + tl.arange(0, BLOCK_M), lse)
        p = p.to(QKV.dtype.element_ty)
        roo = tok.to(tl.int64) * son
        v0 = _load(qb + 2 * C, rok, okk, 0, D, BD0)
        _store(ob, roo, ok, 0, D, tl.dot(p, v0, input_precision=DOT_PREC), BD0)
        if HAS_D1:
            v1 = _load(qb + 2 * C, rok, okk, BD0, D, BD1)
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
    x0, x1 = _load_pieces(X, ro, ok, D, BD0, BD1, HAS_D1)
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
def _bwd_one_step(qb, rok, tok, co, g, ok, k0, k1, dob, gb, rg, DWQ, DWK, QW, KW, COS, SIN, pid, sqn, sdn, sgn, C, D,
                  qk_scale, sm_scale, eps, ROPE: tl.constexpr, BLOCK: tl.constexpr, BD0: tl.constexpr,
                  BD1: tl.constexpr, HAS_D1: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """The backward of a tile whose queries are its keys (up to 64 frames): dV, then dK, then dQ, each
    written as soon as it is complete so that its accumulator is dead before the next one lives."""
    dt = k0.dtype
    q0, q1 = _load_qk(qb, rok, ok, QW, COS, SIN, co, D, eps, ROPE, BLOCK, BD0, BD1, HAS_D1)
    rdo = tok.to(tl.int64) * sdn
    do0, do1 = _load_pieces(dob, rdo, ok, D, BD0, BD1, HAS_D1)
    p, _ = _scores(q0, q1, k0, k1, g, g, ok, qk_scale, HAS_D1, DOT_PREC)
    pt = tl.trans(p.to(dt))
    _store(gb + 2 * C, rg, ok, 0, D, tl.dot(pt, do0, input_precision=DOT_PREC), BD0)
    if HAS_D1:
        _store(gb + 2 * C, rg, ok, BD0, D, tl.dot(pt, do1, input_precision=DOT_PREC), BD1)
    v0 = _load(qb + 2 * C, rok, ok, 0, D, BD0)
    dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
    if HAS_D1:
        v1 = _load(qb + 2 * C, rok, ok, BD0, D, BD1)
        dp += tl.dot(do1, tl.trans(v1), input_precision=DOT_PREC)
    delta = tl.sum(p * dp, 1)
    ds = (p * (dp - delta[:, None])).to(dt)
    dst = tl.trans(ds)
    gk0 = tl.dot(dst, q0, input_precision=DOT_PREC) * sm_scale
    gk1 = gk0
    if HAS_D1:
        gk1 = tl.dot(dst, q1, input_precision=DOT_PREC) * sm_scale
    _prologue_bwd(gk0, gk1, qb + C, rok, KW, COS, SIN, co, ok, gb + C, rg, DWK, pid, D, eps, ROPE, BLOCK, BD0, BD1,
                  HAS_D1)  # fmt: skip
    gq0 = tl.dot(ds, k0, input_precision=DOT_PREC) * sm_scale
    gq1 = gq0
    if HAS_D1:
        gq1 = tl.dot(ds, k1, input_precision=DOT_PREC) * sm_scale
    _prologue_bwd(gq0, gq1, qb, rok, QW, COS, SIN, co, ok, gb, rg, DWQ, pid, D, eps, ROPE, BLOCK, BD0, BD1,
                  HAS_D1)  # fmt: skip


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
    """dV, dK and dQ of one tile of whole sequences of up to 64 frames (its queries are its keys), in one
    step (``_bwd_one_step``)."""
    pid = tl.program_id(0)
    h = pid % H
    tile = pid // H
    b, tokk, cok, gk, okk = _tile_rows(tile, 0, S, T, n_stiles, stride_cs, TP, BLOCK, BLOCK)
    qb, rok = _rows(QKV + b.to(tl.int64) * sqb + h * D, tokk, sqn)
    k0, k1 = _load_qk(qb + C, rok, okk, KW, COS, SIN, cok, D, eps, ROPE, BLOCK, BD0, BD1, HAS_D1)
    dob = DO + b.to(tl.int64) * sdb + h * D
    gb, rgk = _rows(DQKV + b.to(tl.int64) * sgb + h * D, tokk, sgn)
    _bwd_one_step(qb, rok, tokk, cok, gk, okk, k0, k1, dob, gb, rgk, DWQ, DWK, QW, KW, COS, SIN, pid, sqn, sdn,
                  sgn, C, D, qk_scale, sm_scale, eps, ROPE, BLOCK, BD0, BD1, HAS_D1, DOT_PREC)  # fmt: skip


@triton.jit
def _temporal_attention_bwd_q_kernel(
    QKV,  # (B, T*S, 3C) through (sqb, sqn)
    O,  # (B, T*S, C) through (sob, son): the forward's output
    DO,  # (B, T*S, C) through (sdb, sdn)
    DQKV,  # (B, T*S, 3C) through (sgb, sgn): the q columns are written
    DWQ,  # (num_programs, D) fp32 partial q-norm weight gradients, one per program
    QW,  # (D,)
    KW,  # (D,)
    COS,  # (T, D) rows strided by stride_cs (ROPE)
    SIN,  # (T, D) (ROPE)
    LSE,  # (n_tiles, BLOCK) fp32 from the forward (STATS)
    DELTA,  # (n_tiles, BLOCK) fp32 out: rowsum(dO * O) of each tile row
    QN,  # (n_tiles, BLOCK, D) like QKV, out: the tile's normalised (+ rotated) queries
    sqb, sqn, sob, son, sdb, sdn, sgb, sgn, S, T, C, H, n_stiles, stride_cs, qk_scale, sm_scale, eps,
    D: tl.constexpr, ROPE: tl.constexpr, TP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BD0: tl.constexpr, BD1: tl.constexpr, HAS_D1: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """The split backward of one sequence of 65..128 frames (one per tile, TP = BLOCK = 128), first launch:
    dQ of BLOCK_M (64) query rows, the keys BLOCK_M at a time (normalised in the loop: each key block is
    seen by two programs), P = exp2(s - lse) from the forward's lse. Also writes delta = rowsum(dO * O) and
    the rows' normalised queries for ``_temporal_attention_bwd_kv_kernel``. One warpgroup: every product
    is 64-row wgmma over its whole N."""
    NM: tl.constexpr = BLOCK // BLOCK_M
    dt = QKV.dtype.element_ty
    qid = tl.program_id(0)
    tid = qid // NM  # the tile (sequence-head)
    m = qid % NM
    h = tid % H
    tile = tid // H
    b, tok, co, g, ok = _tile_rows(tile, m * BLOCK_M, S, T, n_stiles, stride_cs, TP, BLOCK, BLOCK_M)
    qb, ro = _rows(QKV + b.to(tl.int64) * sqb + h * D, tok, sqn)
    q0, q1 = _load_qk(qb, ro, ok, QW, COS, SIN, co, D, eps, ROPE, BLOCK_M, BD0, BD1, HAS_D1)
    qn, rqn = _rows(QN + tid.to(tl.int64) * BLOCK * D, m * BLOCK_M + tl.arange(0, BLOCK_M), D)
    every = tl.arange(0, BLOCK_M) >= 0
    _store(qn, rqn, every, 0, D, q0, BD0)
    if HAS_D1:
        _store(qn, rqn, every, BD0, D, q1, BD1)
    dob, rdo = _rows(DO + b.to(tl.int64) * sdb + h * D, tok, sdn)
    do0, do1 = _load_pieces(dob, rdo, ok, D, BD0, BD1, HAS_D1)
    ob, roo = _rows(O + b.to(tl.int64) * sob + h * D, tok, son)
    o0, o1 = _load_pieces(ob, roo, ok, D, BD0, BD1, HAS_D1)
    delta = tl.sum(do0.to(tl.float32) * o0.to(tl.float32), 1)
    if HAS_D1:
        delta += tl.sum(do1.to(tl.float32) * o1.to(tl.float32), 1)
    rows = tid.to(tl.int64) * BLOCK + m * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(DELTA + rows, delta)
    lse = tl.load(LSE + rows)
    gq0 = tl.zeros((BLOCK_M, BD0), tl.float32)
    gq1 = tl.zeros((BLOCK_M, BD1), tl.float32)
    for n in range(NM):
        _, tokk, cok, _, okk = _tile_rows(tile, n * BLOCK_M, S, T, n_stiles, stride_cs, TP, BLOCK, BLOCK_M)
        rok = tokk.to(tl.int64) * sqn
        k0, k1 = _load_qk(qb + C, rok, okk, KW, COS, SIN, cok, D, eps, ROPE, BLOCK_M, BD0, BD1, HAS_D1)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        v0 = _load(qb + 2 * C, rok, okk, 0, D, BD0)
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
        if HAS_D1:
            s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
            v1 = _load(qb + 2 * C, rok, okk, BD0, D, BD1)
            dp += tl.dot(do1, tl.trans(v1), input_precision=DOT_PREC)
        vis = okk[None, :] & ok[:, None]
        p = tl.where(vis, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds = (p * (dp - delta[:, None])).to(dt)
        gq0 = tl.dot(ds, k0, gq0, input_precision=DOT_PREC)
        if HAS_D1:
            gq1 = tl.dot(ds, k1, gq1, input_precision=DOT_PREC)
    gb, rg = _rows(DQKV + b.to(tl.int64) * sgb + h * D, tok, sgn)
    _prologue_bwd(gq0 * sm_scale, gq1 * sm_scale, qb, ro, QW, COS, SIN, co, ok, gb, rg, DWQ, qid, D, eps, ROPE,
                  BLOCK_M, BD0, BD1, HAS_D1)  # fmt: skip


@triton.jit
def _temporal_attention_bwd_kv_kernel(
    QKV,  # (B, T*S, 3C) through (sqb, sqn)
    DO,  # (B, T*S, C) through (sdb, sdn)
    DQKV,  # (B, T*S, 3C) through (sgb, sgn): the k and v columns are written
    DWK,  # (num_programs, D) fp32 partial k-norm weight gradients, one per program
    KW,  # (D,)
    COS,  # (T, D) rows strided by stride_cs (ROPE)
    SIN,  # (T, D) (ROPE)
    LSE,  # (n_tiles, BLOCK) fp32 from the forward
    DELTA,  # (n_tiles, BLOCK) fp32 from _temporal_attention_bwd_q_kernel
    QN,  # (n_tiles, BLOCK, D) the tiles' normalised (+ rotated) queries from _temporal_attention_bwd_q_kernel
    sqb, sqn, sdb, sdn, sgb, sgn, S, T, C, H, n_stiles, stride_cs, qk_scale, sm_scale, eps,
    D: tl.constexpr, ROPE: tl.constexpr, TP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BD0: tl.constexpr, BD1: tl.constexpr, HAS_D1: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """The split backward's second launch: dK, dV of BLOCK_M (64) keys of one sequence, its queries BLOCK_M
    at a time as plain (async-copied) operands from QN (S^T = k q^T, dV += P^T dO, dP^T = v dO^T,
    dK += dS^T q); the keys are normalised once, and dK is mapped through RoPE^T and the RMSNorm backward
    into dqkv at the end."""
    NM: tl.constexpr = BLOCK // BLOCK_M
    dt = QKV.dtype.element_ty
    kid = tl.program_id(0)
    tid = kid // NM
    n = kid % NM
    h = tid % H
    tile = tid // H
    b, tokk, cok, _, okk = _tile_rows(tile, n * BLOCK_M, S, T, n_stiles, stride_cs, TP, BLOCK, BLOCK_M)
    qb, rok = _rows(QKV + b.to(tl.int64) * sqb + h * D, tokk, sqn)
    k0, k1 = _load_qk(qb + C, rok, okk, KW, COS, SIN, cok, D, eps, ROPE, BLOCK_M, BD0, BD1, HAS_D1)
    v0, v1 = _load_pieces(qb + 2 * C, rok, okk, D, BD0, BD1, HAS_D1)
    dob = DO + b.to(tl.int64) * sdb + h * D
    dk0 = tl.zeros((BLOCK_M, BD0), tl.float32)
    dv0 = tl.zeros((BLOCK_M, BD0), tl.float32)
    dk1 = tl.zeros((BLOCK_M, BD1), tl.float32)
    dv1 = tl.zeros((BLOCK_M, BD1), tl.float32)
    every = tl.arange(0, BLOCK_M) >= 0
    for m in tl.static_range(NM):
        _, tok, _, _, ok = _tile_rows(tile, m * BLOCK_M, S, T, n_stiles, stride_cs, TP, BLOCK, BLOCK_M)
        qn, rqn = _rows(QN + tid.to(tl.int64) * BLOCK * D, m * BLOCK_M + tl.arange(0, BLOCK_M), D)
        q0, q1 = _load_pieces(qn, rqn, every, D, BD0, BD1, HAS_D1)
        rdo = tok.to(tl.int64) * sdn
        do0, do1 = _load_pieces(dob, rdo, ok, D, BD0, BD1, HAS_D1)
        rows = tid.to(tl.int64) * BLOCK + m * BLOCK_M + tl.arange(0, BLOCK_M)
        lse = tl.load(LSE + rows)
        delta = tl.load(DELTA + rows)
        st = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)
        dpt = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)
        if HAS_D1:
            st += tl.dot(k1, tl.trans(q1), input_precision=DOT_PREC)
            dpt += tl.dot(v1, tl.trans(do1), input_precision=DOT_PREC)
        vis = okk[:, None] & ok[None, :]
        pt = tl.where(vis, tl.exp2(st * qk_scale - lse[None, :]), 0.0)
        ptl = pt.to(dt)
        dv0 = tl.dot(ptl, do0, dv0, input_precision=DOT_PREC)
        if HAS_D1:
            dv1 = tl.dot(ptl, do1, dv1, input_precision=DOT_PREC)
        dst = (pt * (dpt - delta[None, :])).to(dt)
        dk0 = tl.dot(dst, q0, dk0, input_precision=DOT_PREC)
        if HAS_D1:
            dk1 = tl.dot(dst, q1, dk1, input_precision=DOT_PREC)
    gb, rgk = _rows(DQKV + b.to(tl.int64) * sgb + h * D, tokk, sgn)
    _store(gb + 2 * C, rgk, okk, 0, D, dv0, BD0)
    if HAS_D1:
        _store(gb + 2 * C, rgk, okk, BD0, D, dv1, BD1)
    _prologue_bwd(dk0 * sm_scale, dk1 * sm_scale, qb + C, rok, KW, COS, SIN, cok, okk, gb + C, rgk, DWK, kid, D,
                  eps, ROPE, BLOCK_M, BD0, BD1, HAS_D1)  # fmt: skip
