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

q/k prologue (``NORM``): per-head RMSNorm with fp32 statistics over the whole head (both pieces), cast
back to the input dtype, times the (D,) weight; with ``ROPE`` then interleaved-pair rotary embedding
x * cos + rotate_half(x) * sin, rotate_half done in registers by a (.., D/2, 2) reshape + split/join.
The backward runs the same transforms in reverse in the epilogue of the dK and dQ kernels, writes dx
into dqkv and accumulates the norm-weight gradients with fp32 atomics.

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
def _rot(x, BM: tl.constexpr, BD: tl.constexpr):
    """rotate_half over interleaved pairs: (x0, x1) -> (-x1, x0)."""
    a, b = tl.split(tl.reshape(x, (BM, BD // 2, 2)))
    return tl.reshape(tl.join(-b, a), (BM, BD))


@triton.jit
def _rot_t(y, BM: tl.constexpr, BD: tl.constexpr):
    """Transpose of _rot: (y0, y1) -> (y1, -y0)."""
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
def _norm_rope_piece(x, rstd, W, COS, SIN, pos, pos_ok, stride_cs, col0, D, ROPE: tl.constexpr,
                     BM: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    """RMSNorm (fp32 statistics, cast back, times the weight) then optional RoPE of one piece."""
    cols = col0 + tl.arange(0, BD)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(x.dtype).to(tl.float32)
    h = (x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32) * w[None, :]
    h = h.to(x.dtype)
    if ROPE:
        c, s = _cos_sin(COS, SIN, pos, pos_ok, stride_cs, col0, D, BD)
        hf = h.to(tl.float32)
        h = (hf * c + _rot(hf, BM, BD) * s).to(x.dtype)
    return h


@triton.jit
def _load_qk(base, rows, stride_m, row_ok, W, COS, SIN, stride_cs, D, eps,
             NORM: tl.constexpr, ROPE: tl.constexpr, BM: tl.constexpr, BD0: tl.constexpr,
             BD1: tl.constexpr, HAS_D1: tl.constexpr):  # fmt: skip
    """Load a (BM, D) q or k tile as pieces and apply the prologue. Returns (t0, t1, x0, x1, rstd):
    transformed pieces, raw pieces, fp32 inverse RMS (t1/x1 are dummies without HAS_D1)."""
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
        t0 = _norm_rope_piece(x0, rstd, W, COS, SIN, rows, row_ok, stride_cs, 0, D, ROPE, BM, BD0)
        if HAS_D1:
            t1 = _norm_rope_piece(x1, rstd, W, COS, SIN, rows, row_ok, stride_cs, BD0, D, ROPE, BM, BD1)
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
def _store_grad_qk(g0, g1, x0, x1, rstd, DX_base, rows, stride_m, row_ok, DW, W, COS, SIN, stride_cs, D,
                   NORM: tl.constexpr, ROPE: tl.constexpr, BM: tl.constexpr, BD0: tl.constexpr,
                   BD1: tl.constexpr, HAS_D1: tl.constexpr):  # fmt: skip
    """Backward of the prologue (when NORM) and store of dx; norm-weight grads via fp32 atomics."""
    if NORM:
        dh0, xh0, dw0, dot = _norm_rope_bwd_a(g0, x0, rstd, W, COS, SIN, rows, row_ok, stride_cs, 0, D, ROPE,
                                              BM, BD0)  # fmt: skip
        cols0 = tl.arange(0, BD0)
        tl.atomic_add(DW + cols0, dw0, mask=cols0 < D)
        if HAS_D1:
            dh1, xh1, dw1, dot1 = _norm_rope_bwd_a(g1, x1, rstd, W, COS, SIN, rows, row_ok, stride_cs, BD0, D,
                                                   ROPE, BM, BD1)  # fmt: skip
            dot += dot1
            cols1 = BD0 + tl.arange(0, BD1)
            tl.atomic_add(DW + cols1, dw1, mask=cols1 < D)
        mean = dot / D
        dx0 = rstd[:, None] * (dh0 - xh0 * mean[:, None])
        _store_piece(DX_base, rows, stride_m, row_ok, 0, D, dx0, BD0)
        if HAS_D1:
            dx1 = rstd[:, None] * (dh1 - xh1 * mean[:, None])
            _store_piece(DX_base, rows, stride_m, row_ok, BD0, D, dx1, BD1)
    else:
        _store_piece(DX_base, rows, stride_m, row_ok, 0, D, g0, BD0)
        if HAS_D1:
            _store_piece(DX_base, rows, stride_m, row_ok, BD0, D, g1, BD1)


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
    COS,  # (Lq, D) rows strided by stride_cs (ROPE)
    SIN,  # (Lq, D) (ROPE)
    CU_K,  # (Z + 1,) int32 cumulative key counts (varlen)
    Z2, sq1, sq2, sqm, sqh, sk1, sk2, skm, skh, sv1, sv2, svm, svh, so1, so2, som, soh,
    H, Lq, Lk, D, causal, varlen, stride_cs, qk_scale, eps,
    NORM: tl.constexpr, ROPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    q0, q1, _x0, _x1, _r = _load_qk(q_base, rows, sqm, row_ok, QW, COS, SIN, stride_cs, D, eps,
                                    NORM, ROPE, BLOCK_M, BD0, BD1, HAS_D1)  # fmt: skip
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
        k0, k1, _y0, _y1, _rk = _load_qk(k_base, keys, skm, key_ok, KW, COS, SIN, stride_cs, D, eps,
                                         NORM, ROPE, BLOCK_N, BD0, BD1, HAS_D1)  # fmt: skip
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
    Z2, so1, so2, som, soh, sd1, sd2, sdm, sdh, H, Lq, D,
    BLOCK_M: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    zh = tl.program_id(1)
    z = zh // H
    h = zh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    o = _load_piece(O + _z_offset(z, Z2, so1, so2) + h * soh, rows, som, row_ok, 0, D, BD)
    do = _load_piece(DO + _z_offset(z, Z2, sd1, sd2) + h * sdh, rows, sdm, row_ok, 0, D, BD)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + zh.to(tl.int64) * Lq + rows, delta, mask=row_ok)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q,  # (Z, Lq, H, D) through (sq1, sq2, sqm, sqh)
    K,  # (Z, Lk, H, D) through (sk1, sk2, skm, skh) (packed rows when varlen)
    V,  # like K through (sv1, sv2, svm, svh)
    DO,  # (Z, Lq, H, D) through (sd1, sd2, sdm, sdh)
    DK,  # like K through (sdk1, sdk2, sdkm, sdkh): gradient w.r.t. the raw k
    DV,  # like V through (sdv1, sdv2, sdvm, sdvh)
    LSE,  # (Z * H, Lq) fp32 log2 units
    DELTA,  # (Z * H, Lq) fp32
    DKW,  # (D,) fp32, k norm-weight gradient (atomics, NORM)
    QW,  # (D,)
    KW,  # (D,)
    COS,  # (L, D) (ROPE)
    SIN,  # (L, D) (ROPE)
    CU_K,  # (Z + 1,) int32 (varlen)
    Z2, sq1, sq2, sqm, sqh, sk1, sk2, skm, skh, sv1, sv2, svm, svh, sd1, sd2, sdm, sdh,
    sdk1, sdk2, sdkm, sdkh, sdv1, sdv2, sdvm, sdvh,
    H, Lq, Lk, D, causal, varlen, stride_cs, qk_scale, sm_scale, eps,
    NORM: tl.constexpr, ROPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    k0, k1, kx0, kx1, rstd_k = _load_qk(K + k_off + h * skh, keys, skm, key_ok, KW, COS, SIN, stride_cs, D,
                                        eps, NORM, ROPE, BLOCK_N, BD0, BD1, HAS_D1)  # fmt: skip
    v_base = V + v_off + h * svh
    v0 = _load_piece(v_base, keys, svm, key_ok, 0, D, BD0)
    v1 = v0
    if HAS_D1:
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
        q0, q1, _x0, _x1, _r = _load_qk(q_base, rows, sqm, row_ok, QW, COS, SIN, stride_cs, D, eps,
                                        NORM, ROPE, BLOCK_M, BD0, BD1, HAS_D1)  # fmt: skip
        do0 = _load_piece(do_base, rows, sdm, row_ok, 0, D, BD0)
        lse = tl.load(LSE + zh.to(tl.int64) * Lq + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + zh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)
        if HAS_D1:
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
    if HAS_D1:
        _store_piece(dv_base, keys, sdvm, key_ok, BD0, D, dv1, BD1)
    _store_grad_qk(dk0 * sm_scale, dk1 * sm_scale, kx0, kx1, rstd_k, dk_base, keys, sdkm, key_ok, DKW, KW,
                   COS, SIN, stride_cs, D, NORM, ROPE, BLOCK_N, BD0, BD1, HAS_D1)  # fmt: skip


@triton.jit
def _attention_bwd_dq_kernel(
    Q,  # (Z, Lq, H, D) through (sq1, sq2, sqm, sqh)
    K,  # (Z, Lk, H, D) through (sk1, sk2, skm, skh) (packed rows when varlen)
    V,  # like K through (sv1, sv2, svm, svh)
    DO,  # (Z, Lq, H, D) through (sd1, sd2, sdm, sdh)
    DQ,  # like Q through (sdq1, sdq2, sdqm, sdqh): gradient w.r.t. the raw q
    LSE,  # (Z * H, Lq) fp32 log2 units
    DELTA,  # (Z * H, Lq) fp32
    DQW,  # (D,) fp32, q norm-weight gradient (atomics, NORM)
    QW,  # (D,)
    KW,  # (D,)
    COS,  # (L, D) (ROPE)
    SIN,  # (L, D) (ROPE)
    CU_K,  # (Z + 1,) int32 (varlen)
    Z2, sq1, sq2, sqm, sqh, sk1, sk2, skm, skh, sv1, sv2, svm, svh, sd1, sd2, sdm, sdh,
    sdq1, sdq2, sdqm, sdqh,
    H, Lq, Lk, D, causal, varlen, stride_cs, qk_scale, sm_scale, eps,
    NORM: tl.constexpr, ROPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    q0, q1, qx0, qx1, rstd_q = _load_qk(Q + _z_offset(z, Z2, sq1, sq2) + h * sqh, rows, sqm, row_ok, QW, COS,
                                        SIN, stride_cs, D, eps, NORM, ROPE, BLOCK_M, BD0, BD1,
                                        HAS_D1)  # fmt: skip
    do_base = DO + _z_offset(z, Z2, sd1, sd2) + h * sdh
    do0 = _load_piece(do_base, rows, sdm, row_ok, 0, D, BD0)
    do1 = do0
    if HAS_D1:
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
        k0, k1, _y0, _y1, _rk = _load_qk(k_base, keys, skm, key_ok, KW, COS, SIN, stride_cs, D, eps,
                                         NORM, ROPE, BLOCK_N, BD0, BD1, HAS_D1)  # fmt: skip
        v0 = _load_piece(v_base, keys, svm, key_ok, 0, D, BD0)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
        if HAS_D1:
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
    _store_grad_qk(dq0 * sm_scale, dq1 * sm_scale, qx0, qx1, rstd_q, dq_base, rows, sdqm, row_ok, DQW, QW,
                   COS, SIN, stride_cs, D, NORM, ROPE, BLOCK_M, BD0, BD1, HAS_D1)  # fmt: skip
