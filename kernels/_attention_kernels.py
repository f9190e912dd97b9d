"""Triton kernels of the fused attention family (flash-attention-2 schedule), forward and backward.

Every operand is addressed with strides, so one kernel serves ``flash_attn_func`` (B, N, H, D),
``self_attention`` (q/k/v read straight out of the qkv Linear output, spatial or temporal order) and
``cross_attention`` (queries (B, N, C), keys/values packed (sum(kv_lens), 2C) with cu_seqlens).
Sequence ``z`` of an operand starts at ``(z // Z2) * s1 + (z % Z2) * s2``; row ``l`` of head ``h`` sits
``l * sm + h * sh`` further; head columns are contiguous. With ``varlen`` the keys of sequence ``z``
are rows ``CU_K[z] .. CU_K[z+1]`` of the packed operand instead.

head_dim split: the head is processed as two column pieces, a power-of-two piece of BD0 columns and,
when D is not a power of two, a second piece of BD1 >= 16 columns (masked beyond D), and every product
issues one ``tl.dot`` per piece. For the model's D = 72 that is 64 + 16 (8 real): useful MMA fraction
72 / 80 = 90% (one padded block would be 72 / 128 = 56%). Other D: 40 -> 32 + 16 (83%), 96 -> 64 + 32
(100%), 120 -> 64 + 64 (94%), powers of two 100%.

q/k prologue: per-head RMSNorm with fp32 statistics over the whole head (both pieces), cast back to
the input dtype, times the (D,) weight; with RoPE then interleaved-pair rotary embedding
x * cos + rotate_half(x) * sin, where rotate_half reads the pair-swapped columns with a second strided
load (cols ^ 1, an L1 hit) and a sign vector. The forward fuses RMSNorm into its q prologue and its K
loop (``NORM``: spatial attention). With RoPE (temporal attention) the transform runs in the
``_qk_norm_rope_fwd_kernel`` pre-pass into contiguous q/k scratch and the forward reads that:
fusing RoPE into the K loop spilled registers on sm_90 for every tile shape tried (64-1336 B stack).
Backward: the pre-pass writes transformed q/k scratch, the dK/dV and dQ kernels (plain, no prologue)
write the gradients w.r.t. the transformed q/k, and ``_qk_norm_rope_bwd_kernel`` maps them through
RoPE^T (in registers: reshape + split/join) and the RMSNorm backward into dqkv, with per-program
partial norm-weight gradients summed on the host (deterministic, no atomics).

Temporal attention with T' <= 128 (head_dim 64 or 72) does not come here: it runs the packed schedule of
``_attention_temporal.py`` (whole sequences per program, RMSNorm and RoPE fused, no scratch). Longer
temporal sequences, other head dims and unaligned qkv run these kernels with the RMSNorm + RoPE pre-pass.

Softmax statistics are fp32 and kept in log2 units (``qk_scale = softmax_scale * log2(e)``); the
forward stores lse2 = m + log2(l) per row (+inf for a row that sees no key, whose output is 0).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _z_offset(z, Z2, s1, s2):
    return (z // Z2).to(tl.int64) * s1 + (z % Z2).to(tl.int64) * s2


@triton.jit
def _tile_ptrs(base, rows, stride_m, col0, BD: tl.constexpr):
    cols = col0 + tl.arange(0, BD)
    return base + rows.to(tl.int64)[:, None] * stride_m + cols[None, :]


@triton.jit
def _load_piece(base, rows, stride_m, row_ok, col0, D, BD: tl.constexpr):
    cols = col0 + tl.arange(0, BD)
    mask = row_ok[:, None] & (cols < D)[None, :]
    return tl.load(_tile_ptrs(base, rows, stride_m, col0, BD), mask=mask, other=0.0)


@triton.jit
def _store_piece(base, rows, stride_m, row_ok, col0, D, x, BD: tl.constexpr):
    cols = col0 + tl.arange(0, BD)
    mask = row_ok[:, None] & (cols < D)[None, :]
    tl.store(_tile_ptrs(base, rows, stride_m, col0, BD), x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _rot_t(y, BM: tl.constexpr, BD: tl.constexpr):
    """Transpose of rotate_half over interleaved pairs ((x0, x1) -> (-x1, x0)): (y0, y1) -> (y1, -y0),
    in registers by a (.., BD/2, 2) reshape + split/join."""
    a, b = tl.split(tl.reshape(y, (BM, BD // 2, 2)))
    return tl.reshape(tl.join(b, -a), (BM, BD))


@triton.jit
def _cos_sin(COS, SIN, pos, pos_ok, stride_cs, col0, D, BD: tl.constexpr):
    cols = col0 + tl.arange(0, BD)
    mask = pos_ok[:, None] & (cols < D)[None, :]
    off = pos.to(tl.int64)[:, None] * stride_cs + cols[None, :]
    c = tl.load(COS + off, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + off, mask=mask, other=0.0).to(tl.float32)
    return c, s


@triton.jit
def _norm_piece(x, rstd, W, col0, D, BD: tl.constexpr, COLS_XOR: tl.constexpr):
    """RMSNorm of one piece: fp32 statistics, cast back to x's dtype, times the weight (columns
    ``cols ^ COLS_XOR``: 1 gives the pair-swapped copy used by RoPE)."""
    cols = (col0 + tl.arange(0, BD)) ^ COLS_XOR
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(x.dtype).to(tl.float32)
    h = (x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32) * w[None, :]
    return h.to(x.dtype).to(tl.float32)


@triton.jit
def _norm_rope_piece(x, xs, rstd, W, COS, SIN, pos, pos_ok, stride_cs, col0, D, ROPE: tl.constexpr,
                     BM: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    """RMSNorm then optional RoPE of one piece; xs is the raw piece loaded at pair-swapped columns,
    so rotate_half needs no register shuffle: rot(h)[d] = -h[d+1] (d even), h[d-1] (d odd)."""
    h = _norm_piece(x, rstd, W, col0, D, BD, 0)
    if ROPE:
        c, s = _cos_sin(COS, SIN, pos, pos_ok, stride_cs, col0, D, BD)
        sign = tl.where((tl.arange(0, BD) % 2) == 0, -1.0, 1.0)
        hs = _norm_piece(xs, rstd, W, col0, D, BD, 1)
        h = h * c + hs * (s * sign[None, :])
    return h.to(x.dtype)


@triton.jit
def _load_swapped(base, rows, stride_m, row_ok, col0, D, BD: tl.constexpr):
    cols = (col0 + tl.arange(0, BD)) ^ 1
    mask = row_ok[:, None] & (cols < D)[None, :]
    return tl.load(base + rows.to(tl.int64)[:, None] * stride_m + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _load_qk(base, rows, stride_m, row_ok, pos, W, COS, SIN, stride_cs, D, eps,
             NORM: tl.constexpr, ROPE: tl.constexpr, BM: tl.constexpr, BD0: tl.constexpr,
             BD1: tl.constexpr, HAS_D1: tl.constexpr):  # fmt: skip
    """Load a (BM, D) q or k tile as pieces and apply the prologue. Returns (t0, t1, x0, x1, rstd):
    transformed pieces, raw pieces, fp32 inverse RMS (t1/x1 are dummies without HAS_D1). Row i sits at
    base + rows[i] * stride_m; pos[i] is its sequence position (the RoPE table row)."""
    x0 = _load_piece(base, rows, stride_m, row_ok, 0, D, BD0)
    x1 = x0
    if HAS_D1:
        x1 = _load_piece(base, rows, stride_m, row_ok, BD0, D, BD1)
    t0 = x0
    t1 = x1
    rstd = tl.zeros([BM], dtype=tl.float32)
    if NORM:
        xf = x0.to(tl.float32)
        ss = tl.sum(xf * xf, 1)
        if HAS_D1:
            xf1 = x1.to(tl.float32)
            ss += tl.sum(xf1 * xf1, 1)
        rstd = tl.rsqrt(ss / D + eps)
        xs0 = x0
        if ROPE:
            xs0 = _load_swapped(base, rows, stride_m, row_ok, 0, D, BD0)
        t0 = _norm_rope_piece(x0, xs0, rstd, W, COS, SIN, pos, row_ok, stride_cs, 0, D, ROPE, BM, BD0)
        if HAS_D1:
            xs1 = x1
            if ROPE:
                xs1 = _load_swapped(base, rows, stride_m, row_ok, BD0, D, BD1)
            t1 = _norm_rope_piece(x1, xs1, rstd, W, COS, SIN, pos, row_ok, stride_cs, BD0, D, ROPE, BM, BD1)
    return t0, t1, x0, x1, rstd


@triton.jit
def _norm_rope_bwd_a(g, x, rstd, W, COS, SIN, pos, pos_ok, stride_cs, col0, D, ROPE: tl.constexpr,
                     BM: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    """First half of the prologue's backward for one piece: g (fp32) is the gradient w.r.t. the
    transformed tile. Returns (dh, xhat, dw partial (BD,), rowsum(dh * xhat))."""
    cols = col0 + tl.arange(0, BD)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(x.dtype).to(tl.float32)
    if ROPE:
        c, s = _cos_sin(COS, SIN, pos, pos_ok, stride_cs, col0, D, BD)
        g = g * c + _rot_t(g * s, BM, BD)
    xhat = x.to(tl.float32) * rstd[:, None]
    hc = xhat.to(x.dtype).to(tl.float32)
    dw = tl.sum(g * hc, 0)
    dh = g * w[None, :]
    return dh, xhat, dw, tl.sum(dh * xhat, 1)


@triton.jit
def _key_range(z, Z2, sk1, sk2, skm, sv1, sv2, svm, CU_K, Lk, varlen):
    """(k offset, v offset, number of keys) of sequence z."""
    k_off = _z_offset(z, Z2, sk1, sk2)
    v_off = _z_offset(z, Z2, sv1, sv2)
    n_k = Lk
    if varlen != 0:
        start = tl.load(CU_K + z)
        n_k = tl.load(CU_K + z + 1) - start
        k_off = start.to(tl.int64) * skm
        v_off = start.to(tl.int64) * svm
    return k_off, v_off, n_k


@triton.jit
def _attention_fwd_kernel(
    Q,  # (Z, Lq, H, D) through (sq1, sq2, sqm, sqh)
    K,  # (Z, Lk, H, D) through (sk1, sk2, skm, skh); packed (sum n_k, H, D) rows when varlen
    V,  # like K
    O,  # (Z, Lq, H, D) through (so1, so2, som, soh)
    LSE,  # (Z * H, Lq) fp32, log2 units
    QW,  # (D,) q RMSNorm weight (NORM)
    KW,  # (D,) k RMSNorm weight (NORM)
    CU_K,  # (Z + 1,) int32 cumulative key counts (varlen)
    Z2, sq1, sq2, sqm, sqh, sk1, sk2, skm, skh, sv1, sv2, svm, svh, so1, so2, som, soh,
    H, Lq, Lk, D: tl.constexpr, causal, varlen, qk_scale, eps,
    NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BD0: tl.constexpr, BD1: tl.constexpr, HAS_D1: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    zh = tl.program_id(1)
    z = zh // H
    h = zh % H
    k_off, v_off, n_k = _key_range(z, Z2, sk1, sk2, skm, sv1, sv2, svm, CU_K, Lk, varlen)
    shift = n_k - Lq + (1 - causal) * (1 << 30)  # key j visible from query i iff j <= i + shift

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    q_base = Q + _z_offset(z, Z2, sq1, sq2) + h * sqh
    q0, q1, _x0, _x1, _r = _load_qk(q_base, rows, sqm, row_ok, rows, QW, QW, QW, 0, D, eps,
                                    NORM, False, BLOCK_M, BD0, BD1, HAS_D1)  # fmt: skip
    k_base = K + k_off + h * skh
    v_base = V + v_off + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, BD0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BD1], dtype=tl.float32)
    hi = tl.maximum(tl.minimum(n_k, (pid_m + 1) * BLOCK_M + shift), 0)
    for start_n in range(0, hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < n_k
        k0, k1, _y0, _y1, _rk = _load_qk(k_base, keys, skm, key_ok, keys, KW, KW, KW, 0, D, eps,
                                         NORM, False, BLOCK_N, BD0, BD1, HAS_D1)  # fmt: skip
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        if HAS_D1:
            s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        ok = key_ok[None, :] & (keys[None, :] <= rows[:, None] + shift)
        s = tl.where(ok, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = p.to(V.dtype.element_ty)
        v0 = _load_piece(v_base, keys, svm, key_ok, 0, D, BD0)
        acc0 = acc0 * alpha[:, None] + tl.dot(pv, v0, input_precision=DOT_PREC)
        if HAS_D1:
            v1 = _load_piece(v_base, keys, svm, key_ok, BD0, D, BD1)
            acc1 = acc1 * alpha[:, None] + tl.dot(pv, v1, input_precision=DOT_PREC)
        m_i = m_new

    seen = l_i > 0.0
    inv = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    o_base = O + _z_offset(z, Z2, so1, so2) + h * soh
    _store_piece(o_base, rows, som, row_ok, 0, D, acc0 * inv[:, None], BD0)
    if HAS_D1:
        _store_piece(o_base, rows, som, row_ok, BD0, D, acc1 * inv[:, None], BD1)
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(LSE + zh.to(tl.int64) * Lq + rows, lse, mask=row_ok)


@triton.jit
def _attention_bwd_preprocess_kernel(
    O,  # (Z, Lq, H, D) through (so1, so2, som, soh)
    DO,  # (Z, Lq, H, D) through (sd1, sd2, sdm, sdh)
    DELTA,  # (Z * H, Lq) fp32: rowsum(dO * O)
    Z2, so1, so2, som, soh, sd1, sd2, sdm, sdh, H, Lq, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, HAS_D1: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    zh = tl.program_id(1)
    z = zh // H
    h = zh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    o_base = O + _z_offset(z, Z2, so1, so2) + h * soh
    do_base = DO + _z_offset(z, Z2, sd1, sd2) + h * sdh
    o = _load_piece(o_base, rows, som, row_ok, 0, D, BD0).to(tl.float32)
    do = _load_piece(do_base, rows, sdm, row_ok, 0, D, BD0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_D1:
        o1 = _load_piece(o_base, rows, som, row_ok, BD0, D, BD1).to(tl.float32)
        do1 = _load_piece(do_base, rows, sdm, row_ok, BD0, D, BD1).to(tl.float32)
        delta += tl.sum(o1 * do1, 1)
    tl.store(DELTA + zh.to(tl.int64) * Lq + rows, delta, mask=row_ok)


@triton.jit
def _qk_norm_rope_fwd_kernel(
    QX,  # (Z, L, H, D) raw q through (sq1, sq2, sqm, sqh)
    KX,  # (Z, L, H, D) raw k through (sk1, sk2, skm, skh)
    QT,  # (Z, L, H, D) contiguous: transformed q
    KT,  # (Z, L, H, D) contiguous: transformed k
    QW,  # (D,)
    KW,  # (D,)
    COS,  # (L, D) rows strided by stride_cs (ROPE)
    SIN,  # (L, D) (ROPE)
    Z2, sq1, sq2, sqm, sqh, sk1, sk2, skm, skh, H, L, D: tl.constexpr, stride_cs, eps,
    ROPE: tl.constexpr, BLOCK_M: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, HAS_D1: tl.constexpr,
):  # fmt: skip
    """RMSNorm (+ RoPE) of q and k into contiguous scratch: the q/k every backward kernel reads, and the
    forward's input when RoPE is on (RoPE inside the attention loop spilled registers on sm_90)."""
    pid_m = tl.program_id(0)
    zh = tl.program_id(1)
    z = zh // H
    h = zh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < L
    t_base = z.to(tl.int64) * L * H * D + h * D
    qx_base = QX + _z_offset(z, Z2, sq1, sq2) + h * sqh
    q0, q1, _a, _b, _c = _load_qk(qx_base, rows, sqm, row_ok, rows, QW, COS, SIN, stride_cs, D, eps, True,
                                  ROPE, BLOCK_M, BD0, BD1, HAS_D1)  # fmt: skip
    _store_piece(QT + t_base, rows, H * D, row_ok, 0, D, q0, BD0)
    if HAS_D1:
        _store_piece(QT + t_base, rows, H * D, row_ok, BD0, D, q1, BD1)
    kx_base = KX + _z_offset(z, Z2, sk1, sk2) + h * skh
    k0, k1, _d, _e, _f = _load_qk(kx_base, rows, skm, row_ok, rows, KW, COS, SIN, stride_cs, D, eps, True,
                                  ROPE, BLOCK_M, BD0, BD1, HAS_D1)  # fmt: skip
    _store_piece(KT + t_base, rows, H * D, row_ok, 0, D, k0, BD0)
    if HAS_D1:
        _store_piece(KT + t_base, rows, H * D, row_ok, BD0, D, k1, BD1)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q,  # (Z, Lq, H, D) through (sq1, sq2, sqm, sqh): q as attended (transformed when NORM)
    K,  # (Z, Lk, H, D) through (sk1, sk2, skm, skh): k as attended (packed rows when varlen)
    V,  # like K through (sv1, sv2, svm, svh)
    DO,  # (Z, Lq, H, D) through (sd1, sd2, sdm, sdh)
    DK,  # like K through (sdk1, sdk2, sdkm, sdkh): gradient w.r.t. k as attended
    DV,  # like V through (sdv1, sdv2, sdvm, sdvh)
    LSE,  # (Z * H, Lq) fp32 log2 units
    DELTA,  # (Z * H, Lq) fp32
    CU_K,  # (Z + 1,) int32 (varlen)
    Z2, sq1, sq2, sqm, sqh, sk1, sk2, skm, skh, sv1, sv2, svm, svh, sd1, sd2, sdm, sdh,
    sdk1, sdk2, sdkm, sdkh, sdv1, sdv2, sdvm, sdvh,
    H, Lq, Lk, D: tl.constexpr, causal, varlen, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BD0: tl.constexpr, BD1: tl.constexpr, HAS_D1: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    zh = tl.program_id(1)
    z = zh // H
    h = zh % H
    k_off, v_off, n_k = _key_range(z, Z2, sk1, sk2, skm, sv1, sv2, svm, CU_K, Lk, varlen)
    shift = n_k - Lq + (1 - causal) * (1 << 30)
    start_n = pid_n * BLOCK_N
    keys = start_n + tl.arange(0, BLOCK_N)
    key_ok = keys < n_k
    k_base = K + k_off + h * skh
    v_base = V + v_off + h * svh
    k0 = _load_piece(k_base, keys, skm, key_ok, 0, D, BD0)
    v0 = _load_piece(v_base, keys, svm, key_ok, 0, D, BD0)
    k1 = k0
    v1 = v0
    if HAS_D1:
        k1 = _load_piece(k_base, keys, skm, key_ok, BD0, D, BD1)
        v1 = _load_piece(v_base, keys, svm, key_ok, BD0, D, BD1)
    q_base = Q + _z_offset(z, Z2, sq1, sq2) + h * sqh
    do_base = DO + _z_offset(z, Z2, sd1, sd2) + h * sdh
    dk0 = tl.zeros([BLOCK_N, BD0], dtype=tl.float32)
    dk1 = tl.zeros([BLOCK_N, BD1], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, BD0], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, BD1], dtype=tl.float32)
    lo = (tl.maximum(start_n - shift, 0) // BLOCK_M) * BLOCK_M
    hi = tl.where(start_n < n_k, Lq, 0)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < Lq
        q0 = _load_piece(q_base, rows, sqm, row_ok, 0, D, BD0)
        do0 = _load_piece(do_base, rows, sdm, row_ok, 0, D, BD0)
        lse = tl.load(LSE + zh.to(tl.int64) * Lq + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + zh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)
        if HAS_D1:
            q1 = _load_piece(q_base, rows, sqm, row_ok, BD0, D, BD1)
            s_t += tl.dot(k1, tl.trans(q1), input_precision=DOT_PREC)
        ok = key_ok[:, None] & row_ok[None, :] & (keys[:, None] <= rows[None, :] + shift)
        p_t = tl.where(ok, tl.exp2(s_t * qk_scale - lse[None, :]), 0.0)
        pl = p_t.to(DO.dtype.element_ty)
        dv0 += tl.dot(pl, do0, input_precision=DOT_PREC)
        dp_t = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)
        if HAS_D1:
            do1 = _load_piece(do_base, rows, sdm, row_ok, BD0, D, BD1)
            dv1 += tl.dot(pl, do1, input_precision=DOT_PREC)
            dp_t += tl.dot(v1, tl.trans(do1), input_precision=DOT_PREC)
        ds_t = (p_t * (dp_t - delta[None, :])).to(Q.dtype.element_ty)
        dk0 += tl.dot(ds_t, q0, input_precision=DOT_PREC)
        if HAS_D1:
            dk1 += tl.dot(ds_t, q1, input_precision=DOT_PREC)

    dv_base = DV + _z_offset(z, Z2, sdv1, sdv2) + h * sdvh
    dk_base = DK + _z_offset(z, Z2, sdk1, sdk2) + h * sdkh
    if varlen != 0:
        dv_base = DV + (v_off // svm) * sdvm + h * sdvh
        dk_base = DK + (k_off // skm) * sdkm + h * sdkh
    _store_piece(dv_base, keys, sdvm, key_ok, 0, D, dv0, BD0)
    _store_piece(dk_base, keys, sdkm, key_ok, 0, D, dk0 * sm_scale, BD0)
    if HAS_D1:
        _store_piece(dv_base, keys, sdvm, key_ok, BD0, D, dv1, BD1)
        _store_piece(dk_base, keys, sdkm, key_ok, BD0, D, dk1 * sm_scale, BD1)


@triton.jit
def _attention_bwd_dq_kernel(
    Q,  # (Z, Lq, H, D) through (sq1, sq2, sqm, sqh): q as attended (transformed when NORM)
    K,  # (Z, Lk, H, D) through (sk1, sk2, skm, skh): k as attended (packed rows when varlen)
    V,  # like K through (sv1, sv2, svm, svh)
    DO,  # (Z, Lq, H, D) through (sd1, sd2, sdm, sdh)
    DQ,  # like Q through (sdq1, sdq2, sdqm, sdqh): gradient w.r.t. q as attended
    LSE,  # (Z * H, Lq) fp32 log2 units
    DELTA,  # (Z * H, Lq) fp32
    CU_K,  # (Z + 1,) int32 (varlen)
    Z2, sq1, sq2, sqm, sqh, sk1, sk2, skm, skh, sv1, sv2, svm, svh, sd1, sd2, sdm, sdh,
    sdq1, sdq2, sdqm, sdqh,
    H, Lq, Lk, D: tl.constexpr, causal, varlen, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BD0: tl.constexpr, BD1: tl.constexpr, HAS_D1: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    zh = tl.program_id(1)
    z = zh // H
    h = zh % H
    k_off, v_off, n_k = _key_range(z, Z2, sk1, sk2, skm, sv1, sv2, svm, CU_K, Lk, varlen)
    shift = n_k - Lq + (1 - causal) * (1 << 30)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    q_base = Q + _z_offset(z, Z2, sq1, sq2) + h * sqh
    do_base = DO + _z_offset(z, Z2, sd1, sd2) + h * sdh
    q0 = _load_piece(q_base, rows, sqm, row_ok, 0, D, BD0)
    do0 = _load_piece(do_base, rows, sdm, row_ok, 0, D, BD0)
    q1 = q0
    do1 = do0
    if HAS_D1:
        q1 = _load_piece(q_base, rows, sqm, row_ok, BD0, D, BD1)
        do1 = _load_piece(do_base, rows, sdm, row_ok, BD0, D, BD1)
    lse = tl.load(LSE + zh.to(tl.int64) * Lq + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + zh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
    k_base = K + k_off + h * skh
    v_base = V + v_off + h * svh
    dq0 = tl.zeros([BLOCK_M, BD0], dtype=tl.float32)
    dq1 = tl.zeros([BLOCK_M, BD1], dtype=tl.float32)
    hi = tl.maximum(tl.minimum(n_k, (pid_m + 1) * BLOCK_M + shift), 0)
    for start_n in range(0, hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < n_k
        k0 = _load_piece(k_base, keys, skm, key_ok, 0, D, BD0)
        v0 = _load_piece(v_base, keys, svm, key_ok, 0, D, BD0)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
        if HAS_D1:
            k1 = _load_piece(k_base, keys, skm, key_ok, BD0, D, BD1)
            v1 = _load_piece(v_base, keys, svm, key_ok, BD0, D, BD1)
            s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
            dp += tl.dot(do1, tl.trans(v1), input_precision=DOT_PREC)
        ok = key_ok[None, :] & row_ok[:, None] & (keys[None, :] <= rows[:, None] + shift)
        p = tl.where(ok, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds = (p * (dp - delta[:, None])).to(K.dtype.element_ty)
        dq0 += tl.dot(ds, k0, input_precision=DOT_PREC)
        if HAS_D1:
            dq1 += tl.dot(ds, k1, input_precision=DOT_PREC)

    dq_base = DQ + _z_offset(z, Z2, sdq1, sdq2) + h * sdqh
    _store_piece(dq_base, rows, sdqm, row_ok, 0, D, dq0 * sm_scale, BD0)
    if HAS_D1:
        _store_piece(dq_base, rows, sdqm, row_ok, BD0, D, dq1 * sm_scale, BD1)


@triton.jit
def _qk_norm_rope_bwd_kernel(
    X,  # (Z, L, H, D) raw q or k through (sx1, sx2, sxm, sxh)
    G,  # (Z, L, H, D) contiguous: gradient w.r.t. the transformed q or k
    DX,  # (Z, L, H, D) through (sdx1, sdx2, sdxm, sdxh): gradient w.r.t. the raw x
    DWP,  # (num_programs, D) fp32 per-program partial norm-weight gradients (summed on the host)
    W,  # (D,) RMSNorm weight
    COS,  # (L, D) (ROPE)
    SIN,  # (L, D) (ROPE)
    Z2, sx1, sx2, sxm, sxh, sdx1, sdx2, sdxm, sdxh, H, L, D: tl.constexpr, n_rows, stride_cs, eps,
    ROPE: tl.constexpr, BLOCK_M: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, HAS_D1: tl.constexpr,
):  # fmt: skip
    """Backward of the q/k prologue (RoPE^T then RMSNorm backward) over head-rows r = (z * L + l) * H + h;
    program p takes row blocks p, p + P, ... and writes one (D,) partial weight gradient."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    c0 = tl.arange(0, BD0)
    c1 = BD0 + tl.arange(0, BD1)
    dw0 = tl.zeros([BD0], dtype=tl.float32)
    dw1 = tl.zeros([BD1], dtype=tl.float32)
    for blk in range(pid, tl.cdiv(n_rows, BLOCK_M), n_prog):
        r = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = r < n_rows
        h = r % H
        l = (r // H) % L
        z = r // (H * L)
        x_row = _z_offset(z, Z2, sx1, sx2) + l.to(tl.int64) * sxm + h * sxh
        dx_row = _z_offset(z, Z2, sdx1, sdx2) + l.to(tl.int64) * sdxm + h * sdxh
        g_row = r.to(tl.int64) * D
        m0 = ok[:, None] & (c0 < D)[None, :]
        x0 = tl.load(X + x_row[:, None] + c0[None, :], mask=m0, other=0.0)
        g0 = tl.load(G + g_row[:, None] + c0[None, :], mask=m0, other=0.0).to(tl.float32)
        xf = x0.to(tl.float32)
        ss = tl.sum(xf * xf, 1)
        if HAS_D1:
            m1 = ok[:, None] & (c1 < D)[None, :]
            x1 = tl.load(X + x_row[:, None] + c1[None, :], mask=m1, other=0.0)
            g1 = tl.load(G + g_row[:, None] + c1[None, :], mask=m1, other=0.0).to(tl.float32)
            xf1 = x1.to(tl.float32)
            ss += tl.sum(xf1 * xf1, 1)
        rstd = tl.rsqrt(ss / D + eps)
        dh0, xh0, pw0, dot = _norm_rope_bwd_a(g0, x0, rstd, W, COS, SIN, l, ok, stride_cs, 0, D, ROPE,
                                              BLOCK_M, BD0)  # fmt: skip
        dw0 += pw0
        if HAS_D1:
            dh1, xh1, pw1, dot1 = _norm_rope_bwd_a(g1, x1, rstd, W, COS, SIN, l, ok, stride_cs, BD0, D, ROPE,
                                                   BLOCK_M, BD1)  # fmt: skip
            dw1 += pw1
            dot += dot1
        mean = dot / D
        dx0 = rstd[:, None] * (dh0 - xh0 * mean[:, None])
        tl.store(DX + dx_row[:, None] + c0[None, :], dx0.to(DX.dtype.element_ty), mask=m0)
        if HAS_D1:
            dx1 = rstd[:, None] * (dh1 - xh1 * mean[:, None])
            tl.store(DX + dx_row[:, None] + c1[None, :], dx1.to(DX.dtype.element_ty), mask=m1)
    tl.store(DWP + pid * D + c0, dw0, mask=c0 < D)
    if HAS_D1:
        tl.store(DWP + pid * D + c1, dw1, mask=c1 < D)
