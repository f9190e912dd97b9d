"""Triton kernels of the fused attention family (flash-attention-2 schedule), forward and backward.

Every operand is addressed with strides, so one kernel serves ``flash_attn_func`` (B, N, H, D),
``self_attention`` (q/k/v read straight out of the qkv Linear output, spatial or temporal order) and
``cross_attention`` (queries (B, N, C), keys/values packed (sum(kv_lens), 2C) with cu_seqlens).
Sequence ``z`` of an operand starts at ``(z // Z2) * s1 + (z % Z2) * s2``; row ``l`` of head ``h`` sits
``l * sm + h * sh`` further; head columns are contiguous. With ``VARLEN`` (a constexpr) the keys of
sequence ``z`` are rows ``CU_K[z] .. CU_K[z+1]`` of the packed operand instead (CU_K int32).

Grids are one-dimensional (program ``pid`` -> (sequence-head ``zh``, block)), so no launch passes CUDA's
65,535 limit on grid y/z; the host checks x < 2^31.

head_dim split: the head is processed as two column pieces, a power-of-two piece of BD0 columns and,
when D is not a power of two, a second piece of BD1 >= 16 columns (masked beyond D), and every product
issues one ``tl.dot`` per piece. For the model's D = 72 that is 64 + 16 (8 real): useful MMA fraction
72 / 80 = 90% (one padded block would be 72 / 128 = 56%). Other D: 40 -> 32 + 16 (83%), 96 -> 64 + 32
(100%), 120 -> 64 + 64 (94%), powers of two 100%.

Alignment (``ALIGNED``, a constexpr the host sets when every operand is 16-byte aligned and all its
strides are multiples of 8 elements): the sequence/head base offsets and row offsets carry
``tl.multiple_of(.., 8)``, so a tile row is 16-byte vectors (``LDG.E.128``, and ``LDGSTS.E.BYPASS.128``
async copies in the pipelined K loops) instead of 2-byte accesses: ``h * 72`` is not provably 16-byte
aligned otherwise. Without it the same kernels run correctly on 2-byte accesses.

q/k prologue (self-attention): ``_qk_norm_rope_fwd_kernel`` normalises q and k once (per-head RMSNorm,
fp32 statistics, cast back, times the (D,) weight; then, with RoPE, interleaved-pair rotary embedding
x * cos + rotate_half(x) * sin, the pair swap done in registers) into contiguous scratch, and the
attention kernels read that: each k row is normalised once instead of once per query block.
Backward: the pre-pass writes the same scratch, the attention backward writes the gradients w.r.t. the
transformed q/k, and ``_qk_norm_rope_bwd_kernel`` maps them through RoPE^T and the RMSNorm backward into
dqkv, with per-program partial norm-weight gradients summed on the host (deterministic, no atomics).

Backward, two designs (``attention.BWD_DESIGN``; both deterministic, no atomics, and no kernel reads memory
it writes in the same launch except a program's own dQ partial rows):
- "split" (the default, every op and head dim; varlen keys from CU_K): ``_attention_bwd_dkdv_kernel``, one
  program per (sequence-head, key block of 64) over every visible query block (S^T = K Q^T, dV += P^T dO,
  dP^T = V dO^T, dK += dS^T Q), then ``_attention_bwd_dq_kernel``, one program per (sequence-head, query block
  of 64) over every visible key block (S = Q K^T, dP = dO V^T, dQ += dS K): seven matmuls per tile pair, each
  a 64-row wgmma over its whole N on one warpgroup (4 warps); the programs of one sequence-head are adjacent,
  so those resident together share its q / dO (resp. k / v) in L2, and dQ is written once, in the output
  dtype (no fp32 partials, no reduction kernel).
- "fused" (``BWD_DESIGN = "fused"``, kept for comparison): one kernel per (sequence-head, key-split) program,
  five matmuls per (key block, query block) pair as in FA2: S^T = K Q^T, dV += P^T dO, dP^T = V dO^T,
  dK += dS^T Q, dQ_part += dS K. Program ``sp`` of ``n_split`` takes the key blocks sp, sp + n_split, ... and
  owns its own fp32 dQ partial (n_split, Z*H, Lq, D), which it overwrites on its first key block
  (read-modify-write after), so a launch repeated by the autotuner gives the same result;
  ``_dq_reduce_kernel`` sums the partials in split order. At 8 warps over 128 keys x 64 queries its dQ
  (M = 64 queries) is split over the two warpgroups into N = 32 pieces; each program streams its whole
  sequence's q, dO and dQ partial once per key block.

Softmax statistics are fp32 and kept in log2 units (``qk_scale = softmax_scale * log2(e)``); the
forward stores lse2 = m + log2(l) per row (+inf for a row that sees no key, whose output is 0).

Temporal attention with T' <= 128 (head_dim 64 or 72) does not come here: it runs the packed schedule of
``_attention_temporal.py`` (whole sequences per program, RMSNorm and RoPE fused, no scratch).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _hint(off, ALIGNED: tl.constexpr):
    """off (elements) is a multiple of 8 when ALIGNED (host-checked): 16-byte vectors for 2-byte types.
    Written as (off // 8) * 8, which the compiler's alignment analysis sees through (a tl.multiple_of on
    an integer offset did not survive canonicalisation in the prologue-backward kernel)."""
    if ALIGNED:
        off = (off // 8) * 8
    return off


@triton.jit
def _z_offset(z, Z2, s1, s2):
    return (z // Z2).to(tl.int64) * s1 + (z % Z2).to(tl.int64) * s2


@triton.jit
def _base(P, z, Z2, s1, s2, h, sh, ALIGNED: tl.constexpr):
    """Pointer to head h of sequence z's first row."""
    return P + _hint(_z_offset(z, Z2, s1, s2) + h.to(tl.int64) * sh, ALIGNED)


@triton.jit
def _ptrs(base, rows, stride_m, col0, BD: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointers of a (rows, BD columns from col0) tile. With ALIGNED every row starts 16-byte aligned and
    col0 is a multiple of 8, so each run of 8 columns is one 16-byte vector: the hint on the pointer
    tensor says so (hints on the integer offsets do not survive Triton's canonicalisation)."""
    ptrs = base + _hint(rows.to(tl.int64) * stride_m, ALIGNED)[:, None] + (col0 + tl.arange(0, BD))[None, :]
    if ALIGNED:
        ptrs = tl.max_contiguous(tl.multiple_of(ptrs, [16, 16]), [1, 8])
    return ptrs


@triton.jit
def _vec(ptrs, ALIGNED: tl.constexpr):
    if ALIGNED:
        ptrs = tl.max_contiguous(tl.multiple_of(ptrs, [16, 16]), [1, 8])
    return ptrs


@triton.jit
def _load_piece(base, rows, stride_m, row_ok, col0, D, BD: tl.constexpr, ALIGNED: tl.constexpr):
    cols = col0 + tl.arange(0, BD)
    mask = row_ok[:, None] & (cols < D)[None, :]
    return tl.load(_ptrs(base, rows, stride_m, col0, BD, ALIGNED), mask=mask, other=0.0)


@triton.jit
def _store_piece(base, rows, stride_m, row_ok, col0, D, x, BD: tl.constexpr, ALIGNED: tl.constexpr):
    cols = col0 + tl.arange(0, BD)
    mask = row_ok[:, None] & (cols < D)[None, :]
    tl.store(_ptrs(base, rows, stride_m, col0, BD, ALIGNED), x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _pair_swap(y, BM: tl.constexpr, BD: tl.constexpr):
    """(y0, y1) -> (y1, y0) over interleaved column pairs, in registers (reshape + split/join)."""
    a, b = tl.split(tl.reshape(y, (BM, BD // 2, 2)))
    return tl.reshape(tl.join(b, a), (BM, BD))


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
    """RMSNorm (fp32 statistics, cast back, times the weight, cast back) then optional interleaved RoPE
    h * cos + rotate_half(h) * sin, rotate_half(h)[2i] = -h[2i+1], [2i+1] = h[2i]."""
    cols = col0 + tl.arange(0, BD)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(x.dtype).to(tl.float32)
    h = ((x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32) * w[None, :]).to(x.dtype)
    if ROPE:
        c, s = _cos_sin(COS, SIN, pos, pos_ok, stride_cs, col0, D, BD)
        hf = h.to(tl.float32)
        sign = tl.where((tl.arange(0, BD) % 2) == 0, -1.0, 1.0)
        h = (hf * c + _pair_swap(hf, BM, BD) * (s * sign[None, :])).to(x.dtype)
    return h


@triton.jit
def _norm_rope_bwd_a(g, x, rstd, W, COS, SIN, pos, pos_ok, stride_cs, col0, D, ROPE: tl.constexpr,
                     BM: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    """First half of the prologue's backward for one piece: g (fp32) is the gradient w.r.t. the
    transformed tile. RoPE^T: g * cos + rotate_half^T(g * sin), rotate_half^T(y)[2i] = y[2i+1],
    [2i+1] = -y[2i]. Returns (dh, xhat, dw partial (BD,), rowsum(dh * xhat))."""
    cols = col0 + tl.arange(0, BD)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(x.dtype).to(tl.float32)
    if ROPE:
        c, s = _cos_sin(COS, SIN, pos, pos_ok, stride_cs, col0, D, BD)
        sign = tl.where((tl.arange(0, BD) % 2) == 0, 1.0, -1.0)
        g = g * c + _pair_swap(g * s, BM, BD) * sign[None, :]
    xhat = x.to(tl.float32) * rstd[:, None]
    hc = xhat.to(x.dtype).to(tl.float32)
    dw = tl.sum(g * hc, 0)
    dh = g * w[None, :]
    return dh, xhat, dw, tl.sum(dh * xhat, 1)


@triton.jit
def _key_range(z, Z2, sk1, sk2, sv1, sv2, CU_K, Lk, VARLEN: tl.constexpr):
    """(k offset, v offset, first packed row, number of keys) of sequence z; the offsets exclude the
    row stride (the caller adds ``first * row stride`` when VARLEN)."""
    k_off = _z_offset(z, Z2, sk1, sk2)
    v_off = _z_offset(z, Z2, sv1, sv2)
    start = (z * 0).to(tl.int64)
    n_k = Lk
    if VARLEN:
        start = tl.load(CU_K + z).to(tl.int64)
        n_k = tl.load(CU_K + z + 1) - tl.load(CU_K + z)
        k_off = start * 0
        v_off = start * 0
    return k_off, v_off, start, n_k


@triton.jit
def _attention_fwd_kernel(
    Q,  # (Z, Lq, H, D) through (sq1, sq2, sqm, sqh)
    K,  # (Z, Lk, H, D) through (sk1, sk2, skm, skh); packed (sum n_k, H, D) rows when VARLEN
    V,  # like K through (sv1, sv2, svm, svh)
    O,  # (Z, Lq, H, D) through (so1, so2, som, soh)
    LSE,  # (Z * H, Lq) fp32, log2 units
    CU_K,  # (Z + 1,) int32 cumulative key counts (read only when VARLEN)
    Z2, sq1, sq2, sqm, sqh, sk1, sk2, skm, skh, sv1, sv2, svm, svh, so1, so2, som, soh,
    H, Lq, Lk, qk_scale,
    D: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, HAS_D1: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    n_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    zh = pid // n_m
    pid_m = pid % n_m
    z = zh // H
    h = zh % H
    k_off, v_off, start, n_k = _key_range(z, Z2, sk1, sk2, sv1, sv2, CU_K, Lk, VARLEN)
    shift = n_k - Lq  # CAUSAL (bottom-right): key j visible from query i iff j <= i + shift

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    q_base = _base(Q, z, Z2, sq1, sq2, h, sqh, ALIGNED)
    q0 = _load_piece(q_base, rows, sqm, row_ok, 0, D, BD0, ALIGNED)
    q1 = q0
    if HAS_D1:
        q1 = _load_piece(q_base, rows, sqm, row_ok, BD0, D, BD1, ALIGNED)
    k_base = K + _hint(k_off + start * skm + h * skh, ALIGNED)
    v_base = V + _hint(v_off + start * svm + h * svh, ALIGNED)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, BD0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BD1], dtype=tl.float32)
    hi = n_k
    if CAUSAL:
        hi = tl.maximum(tl.minimum(n_k, (pid_m + 1) * BLOCK_M + shift), 0)
    for start_n in range(0, hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < n_k
        k0 = _load_piece(k_base, keys, skm, key_ok, 0, D, BD0, ALIGNED)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        if HAS_D1:
            k1 = _load_piece(k_base, keys, skm, key_ok, BD0, D, BD1, ALIGNED)
            s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        ok = key_ok[None, :]
        if CAUSAL:
            ok = ok & (keys[None, :] <= rows[:, None] + shift)
        s = tl.where(ok, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = p.to(V.dtype.element_ty)
        v0 = _load_piece(v_base, keys, svm, key_ok, 0, D, BD0, ALIGNED)
        acc0 = tl.dot(pv, v0, acc0 * alpha[:, None], input_precision=DOT_PREC)
        if HAS_D1:
            v1 = _load_piece(v_base, keys, svm, key_ok, BD0, D, BD1, ALIGNED)
            acc1 = tl.dot(pv, v1, acc1 * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

    seen = l_i > 0.0
    inv = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    o_base = _base(O, z, Z2, so1, so2, h, soh, ALIGNED)
    _store_piece(o_base, rows, som, row_ok, 0, D, acc0 * inv[:, None], BD0, ALIGNED)
    if HAS_D1:
        _store_piece(o_base, rows, som, row_ok, BD0, D, acc1 * inv[:, None], BD1, ALIGNED)
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(LSE + zh.to(tl.int64) * Lq + rows, lse, mask=row_ok)


@triton.jit
def _attention_bwd_preprocess_kernel(
    O,  # (Z, Lq, H, D) through (so1, so2, som, soh)
    DO,  # (Z, Lq, H, D) through (sd1, sd2, sdm, sdh)
    DELTA,  # (Z * H, Lq) fp32: rowsum(dO * O)
    Z2, so1, so2, som, soh, sd1, sd2, sdm, sdh, H, Lq, D: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, HAS_D1: tl.constexpr,
):  # fmt: skip
    n_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    zh = pid // n_m
    pid_m = pid % n_m
    z = zh // H
    h = zh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    o_base = _base(O, z, Z2, so1, so2, h, soh, ALIGNED)
    do_base = _base(DO, z, Z2, sd1, sd2, h, sdh, ALIGNED)
    o = _load_piece(o_base, rows, som, row_ok, 0, D, BD0, ALIGNED).to(tl.float32)
    do = _load_piece(do_base, rows, sdm, row_ok, 0, D, BD0, ALIGNED).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_D1:
        o1 = _load_piece(o_base, rows, som, row_ok, BD0, D, BD1, ALIGNED).to(tl.float32)
        do1 = _load_piece(do_base, rows, sdm, row_ok, BD0, D, BD1, ALIGNED).to(tl.float32)
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
    ROPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr,
    HAS_D1: tl.constexpr,
):  # fmt: skip
    """RMSNorm (+ RoPE) of q and k into contiguous scratch: the q/k every attention kernel of
    self-attention reads (each row normalised once)."""
    n_m = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    zh = pid // n_m
    pid_m = pid % n_m
    z = zh // H
    h = zh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < L
    t_base = z.to(tl.int64) * L * H * D + h * D
    for which in tl.static_range(2):
        if which == 0:
            xb = _base(QX, z, Z2, sq1, sq2, h, sqh, ALIGNED)
            sm = sqm
            W = QW
            tb = QT + t_base
        else:
            xb = _base(KX, z, Z2, sk1, sk2, h, skh, ALIGNED)
            sm = skm
            W = KW
            tb = KT + t_base
        x0 = _load_piece(xb, rows, sm, row_ok, 0, D, BD0, ALIGNED)
        xf = x0.to(tl.float32)
        ss = tl.sum(xf * xf, 1)
        x1 = x0
        if HAS_D1:
            x1 = _load_piece(xb, rows, sm, row_ok, BD0, D, BD1, ALIGNED)
            xf1 = x1.to(tl.float32)
            ss += tl.sum(xf1 * xf1, 1)
        rstd = tl.rsqrt(ss / D + eps)
        t0 = _norm_rope_piece(x0, rstd, W, COS, SIN, rows, row_ok, stride_cs, 0, D, ROPE, BLOCK_M, BD0)
        _store_piece(tb, rows, H * D, row_ok, 0, D, t0, BD0, True)
        if HAS_D1:
            t1 = _norm_rope_piece(x1, rstd, W, COS, SIN, rows, row_ok, stride_cs, BD0, D, ROPE, BLOCK_M, BD1)
            _store_piece(tb, rows, H * D, row_ok, BD0, D, t1, BD1, True)


@triton.jit
def _bwd_bases(zh, Q, K, V, DO, CU_K, Z2, sq1, sq2, sqh, sk1, sk2, skm, skh, sv1, sv2, svm, svh, sd1, sd2, sdh,
               H, Lq, Lk, causal, VARLEN: tl.constexpr, ALIGNED: tl.constexpr):  # fmt: skip
    """Of sequence-head zh: (sequence z, head h, first packed key row, key count, causal shift (key j is
    visible from query i iff j <= i + shift), q / dO / k / v head bases, its first LSE / DELTA index)."""
    z = zh // H
    h = zh % H
    k_off, v_off, start, n_k = _key_range(z, Z2, sk1, sk2, sv1, sv2, CU_K, Lk, VARLEN)
    shift = n_k - Lq + (1 - causal) * (1 << 30)
    q_base = _base(Q, z, Z2, sq1, sq2, h, sqh, ALIGNED)
    do_base = _base(DO, z, Z2, sd1, sd2, h, sdh, ALIGNED)
    k_base = K + _hint(k_off + start * skm + h * skh, ALIGNED)
    v_base = V + _hint(v_off + start * svm + h * svh, ALIGNED)
    return z, h, start, n_k, shift, q_base, do_base, k_base, v_base, zh.to(tl.int64) * Lq


@triton.jit
def _load_two(a_base, b_base, rows, sa, sb, ok, D, BD0: tl.constexpr, BD1: tl.constexpr, HAS_D1: tl.constexpr,
              ALIGNED: tl.constexpr):  # fmt: skip
    """Both head-dim pieces of two tiles with the same rows (k and v, or q and dO): (a0, b0, a1, b1); the
    second pieces are dummies without HAS_D1."""
    a0 = _load_piece(a_base, rows, sa, ok, 0, D, BD0, ALIGNED)
    b0 = _load_piece(b_base, rows, sb, ok, 0, D, BD0, ALIGNED)
    a1 = a0
    b1 = b0
    if HAS_D1:
        a1 = _load_piece(a_base, rows, sa, ok, BD0, D, BD1, ALIGNED)
        b1 = _load_piece(b_base, rows, sb, ok, BD0, D, BD1, ALIGNED)
    return a0, b0, a1, b1


@triton.jit
def _attention_bwd_kernel(
    Q,  # (Z, Lq, H, D) through (sq1, sq2, sqm, sqh): q as attended (transformed for self-attention)
    K,  # (Z, Lk, H, D) through (sk1, sk2, skm, skh): k as attended (packed rows when VARLEN)
    V,  # like K through (sv1, sv2, svm, svh)
    DO,  # (Z, Lq, H, D) through (sd1, sd2, sdm, sdh)
    DK,  # like K through (sdk1, sdk2, sdkm, sdkh): gradient w.r.t. k as attended
    DV,  # like V through (sdv1, sdv2, sdvm, sdvh)
    DQP,  # (n_split, Z * H, Lq, D) fp32 contiguous: this program's dQ partial (unscaled)
    LSE,  # (Z * H, Lq) fp32 log2 units
    DELTA,  # (Z * H, Lq) fp32
    CU_K,  # (Z + 1,) int32 (read only when VARLEN)
    Z2, sq1, sq2, sqm, sqh, sk1, sk2, skm, skh, sv1, sv2, svm, svh, sd1, sd2, sdm, sdh,
    sdk1, sdk2, sdkm, sdkh, sdv1, sdv2, sdvm, sdvh,
    H, Lq, Lk, causal, qk_scale, sm_scale, n_split,
    D: tl.constexpr, VARLEN: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr, HAS_D1: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """dK, dV of key blocks sp, sp + n_split, ... of one (sequence, head) and this split's dQ partial."""
    pid = tl.program_id(0)
    n_zh = tl.num_programs(0) // n_split
    zh = pid // n_split
    sp = pid % n_split
    z, h, start, n_k, shift, q_base, do_base, k_base, v_base, stat = _bwd_bases(
        zh, Q, K, V, DO, CU_K, Z2, sq1, sq2, sqh, sk1, sk2, skm, skh, sv1, sv2, svm, svh, sd1, sd2, sdh, H, Lq, Lk,
        causal, VARLEN, ALIGNED)  # fmt: skip
    if VARLEN:
        dk_base = DK + _hint(start * sdkm + h * sdkh, ALIGNED)
        dv_base = DV + _hint(start * sdvm + h * sdvh, ALIGNED)
    else:
        dk_base = _base(DK, z, Z2, sdk1, sdk2, h, sdkh, ALIGNED)
        dv_base = _base(DV, z, Z2, sdv1, sdv2, h, sdvh, ALIGNED)
    dq_base = DQP + (sp * n_zh + zh).to(tl.int64) * Lq * D
    first_n = sp * BLOCK_N
    for start_n in range(first_n, n_k, n_split * BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < n_k
        k0, v0, k1, v1 = _load_two(k_base, v_base, keys, skm, svm, key_ok, D, BD0, BD1, HAS_D1, ALIGNED)
        dk0 = tl.zeros([BLOCK_N, BD0], dtype=tl.float32)
        dk1 = tl.zeros([BLOCK_N, BD1], dtype=tl.float32)
        dv0 = tl.zeros([BLOCK_N, BD0], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, BD1], dtype=tl.float32)
        lo = tl.minimum((tl.maximum(start_n - shift, 0) // BLOCK_M) * BLOCK_M, Lq)
        # the split's first key block owns its dQ partial rows: query blocks it skips (causal) are zeroed
        for start_m in range(0, tl.where(start_n == first_n, lo, 0), BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            _store_piece(dq_base, rows, D, rows < Lq, 0, D, tl.zeros([BLOCK_M, BD0], tl.float32), BD0, True)
            if HAS_D1:
                z1 = tl.zeros([BLOCK_M, BD1], tl.float32)
                _store_piece(dq_base, rows, D, rows < Lq, BD0, D, z1, BD1, True)
        for start_m in range(lo, Lq, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            row_ok = rows < Lq
            q0 = _load_piece(q_base, rows, sqm, row_ok, 0, D, BD0, ALIGNED)
            do0 = _load_piece(do_base, rows, sdm, row_ok, 0, D, BD0, ALIGNED)
            lse = tl.load(LSE + stat + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + stat + rows, mask=row_ok, other=0.0)
            s_t = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)  # 1: S^T = K Q^T
            if HAS_D1:
                q1 = _load_piece(q_base, rows, sqm, row_ok, BD0, D, BD1, ALIGNED)
                s_t += tl.dot(k1, tl.trans(q1), input_precision=DOT_PREC)
            # key j is seen by query row r iff j <= min(r + shift, n_k - 1); rows past Lq have lse = +inf
            last = tl.minimum(rows + shift, n_k - 1)
            p_t = tl.where(keys[:, None] <= last[None, :], tl.exp2(s_t * qk_scale - lse[None, :]), 0.0)
            pl = p_t.to(DO.dtype.element_ty)
            dv0 = tl.dot(pl, do0, dv0, input_precision=DOT_PREC)  # 2: dV += P^T dO
            dp_t = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)  # 3: dP^T = V dO^T
            if HAS_D1:
                do1 = _load_piece(do_base, rows, sdm, row_ok, BD0, D, BD1, ALIGNED)
                dv1 = tl.dot(pl, do1, dv1, input_precision=DOT_PREC)
                dp_t += tl.dot(v1, tl.trans(do1), input_precision=DOT_PREC)
            ds_t = (p_t * (dp_t - delta[None, :])).to(Q.dtype.element_ty)
            dk0 = tl.dot(ds_t, q0, dk0, input_precision=DOT_PREC)  # 4: dK += dS^T Q
            if HAS_D1:
                dk1 = tl.dot(ds_t, q1, dk1, input_precision=DOT_PREC)
            ds = tl.trans(ds_t)
            again = row_ok & (start_n != first_n)  # read-modify-write after the split's first key block
            prev0 = _load_piece(dq_base, rows, D, again, 0, D, BD0, True)
            dq0 = tl.dot(ds, k0, prev0, input_precision=DOT_PREC)  # 5: dQ += dS K
            _store_piece(dq_base, rows, D, row_ok, 0, D, dq0, BD0, True)
            if HAS_D1:
                prev1 = _load_piece(dq_base, rows, D, again, BD0, D, BD1, True)
                dq1 = tl.dot(ds, k1, prev1, input_precision=DOT_PREC)
                _store_piece(dq_base, rows, D, row_ok, BD0, D, dq1, BD1, True)
        _store_piece(dv_base, keys, sdvm, key_ok, 0, D, dv0, BD0, ALIGNED)
        _store_piece(dk_base, keys, sdkm, key_ok, 0, D, dk0 * sm_scale, BD0, ALIGNED)
        if HAS_D1:
            _store_piece(dv_base, keys, sdvm, key_ok, BD0, D, dv1, BD1, ALIGNED)
            _store_piece(dk_base, keys, sdkm, key_ok, BD0, D, dk1 * sm_scale, BD1, ALIGNED)
    # a split without any key block (n_k <= sp * BLOCK_N) still owns zeros in its dQ partial
    for start_m in range(0, tl.where(first_n < n_k, 0, Lq), BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        _store_piece(dq_base, rows, D, rows < Lq, 0, D, tl.zeros([BLOCK_M, BD0], tl.float32), BD0, True)
        if HAS_D1:
            _store_piece(dq_base, rows, D, rows < Lq, BD0, D, tl.zeros([BLOCK_M, BD1], tl.float32), BD1, True)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q,  # (Z, Lq, H, D) through (sq1, sq2, sqm, sqh): q as attended
    K,  # (Z, Lk, H, D) through (sk1, sk2, skm, skh): k as attended
    V,  # like K through (sv1, sv2, svm, svh)
    DO,  # (Z, Lq, H, D) through (sd1, sd2, sdm, sdh)
    DK,  # like K through (sdk1, sdk2, sdkm, sdkh): gradient w.r.t. k as attended
    DV,  # like V through (sdv1, sdv2, sdvm, sdvh)
    LSE,  # (Z * H, Lq) fp32 log2 units
    DELTA,  # (Z * H, Lq) fp32
    CU_K,  # (Z + 1,) int32 (read only when VARLEN)
    Z2, sq1, sq2, sqm, sqh, sk1, sk2, skm, skh, sv1, sv2, svm, svh, sd1, sd2, sdm, sdh,
    sdk1, sdk2, sdkm, sdkh, sdv1, sdv2, sdvm, sdvh,
    H, Lq, Lk, Lkb, causal, qk_scale, sm_scale,
    D: tl.constexpr, VARLEN: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BD0: tl.constexpr, BD1: tl.constexpr, HAS_D1: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """dK, dV of one key block of one (sequence, head) over all its query blocks (four matmuls per pair:
    S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q). The key blocks of one (sequence, head) are
    adjacent program ids, so the programs that run at the same time read the same q, dO, lse and delta
    (from L2 after the first). Lkb: the keys the grid's key blocks cover per sequence (varlen: the longest
    sequence's; Lk is the autotune bucket)."""
    n_kb = tl.cdiv(Lkb, BLOCK_N)
    pid = tl.program_id(0)
    zh = pid // n_kb
    start_n = (pid % n_kb) * BLOCK_N
    z, h, start, n_k, shift, q_base, do_base, k_base, v_base, stat = _bwd_bases(
        zh, Q, K, V, DO, CU_K, Z2, sq1, sq2, sqh, sk1, sk2, skm, skh, sv1, sv2, svm, svh, sd1, sd2, sdh, H, Lq, Lk,
        causal, VARLEN, ALIGNED)  # fmt: skip
    keys = start_n + tl.arange(0, BLOCK_N)
    key_ok = keys < n_k
    k0, v0, k1, v1 = _load_two(k_base, v_base, keys, skm, svm, key_ok, D, BD0, BD1, HAS_D1, ALIGNED)
    dk0 = tl.zeros([BLOCK_N, BD0], dtype=tl.float32)
    dk1 = tl.zeros([BLOCK_N, BD1], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, BD0], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, BD1], dtype=tl.float32)
    lo = tl.minimum((tl.maximum(start_n - shift, 0) // BLOCK_M) * BLOCK_M, Lq)
    # varlen: the grid has the key blocks of the longest sequence; a block past this one's keys has no work
    for start_m in range(lo, tl.where(start_n < n_k, Lq, lo), BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < Lq
        q0 = _load_piece(q_base, rows, sqm, row_ok, 0, D, BD0, ALIGNED)
        do0 = _load_piece(do_base, rows, sdm, row_ok, 0, D, BD0, ALIGNED)
        lse = tl.load(LSE + stat + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + stat + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)  # S^T = K Q^T
        if HAS_D1:
            q1 = _load_piece(q_base, rows, sqm, row_ok, BD0, D, BD1, ALIGNED)
            s_t += tl.dot(k1, tl.trans(q1), input_precision=DOT_PREC)
        last = tl.minimum(rows + shift, n_k - 1)
        p_t = tl.where(keys[:, None] <= last[None, :], tl.exp2(s_t * qk_scale - lse[None, :]), 0.0)
        pl = p_t.to(DO.dtype.element_ty)
        dv0 = tl.dot(pl, do0, dv0, input_precision=DOT_PREC)  # dV += P^T dO
        dp_t = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)  # dP^T = V dO^T
        if HAS_D1:
            do1 = _load_piece(do_base, rows, sdm, row_ok, BD0, D, BD1, ALIGNED)
            dv1 = tl.dot(pl, do1, dv1, input_precision=DOT_PREC)
            dp_t += tl.dot(v1, tl.trans(do1), input_precision=DOT_PREC)
        ds_t = (p_t * (dp_t - delta[None, :])).to(Q.dtype.element_ty)
        dk0 = tl.dot(ds_t, q0, dk0, input_precision=DOT_PREC)  # dK += dS^T Q
        if HAS_D1:
            dk1 = tl.dot(ds_t, q1, dk1, input_precision=DOT_PREC)
    if VARLEN:
        dk_base = DK + _hint(start * sdkm + h * sdkh, ALIGNED)
        dv_base = DV + _hint(start * sdvm + h * sdvh, ALIGNED)
    else:
        dk_base = _base(DK, z, Z2, sdk1, sdk2, h, sdkh, ALIGNED)
        dv_base = _base(DV, z, Z2, sdv1, sdv2, h, sdvh, ALIGNED)
    _store_piece(dv_base, keys, sdvm, key_ok, 0, D, dv0, BD0, ALIGNED)
    _store_piece(dk_base, keys, sdkm, key_ok, 0, D, dk0 * sm_scale, BD0, ALIGNED)
    if HAS_D1:
        _store_piece(dv_base, keys, sdvm, key_ok, BD0, D, dv1, BD1, ALIGNED)
        _store_piece(dk_base, keys, sdkm, key_ok, BD0, D, dk1 * sm_scale, BD1, ALIGNED)


@triton.jit
def _attention_bwd_dq_kernel(
    Q,  # (Z, Lq, H, D) through (sq1, sq2, sqm, sqh): q as attended
    K,  # (Z, Lk, H, D) through (sk1, sk2, skm, skh): k as attended
    V,  # like K through (sv1, sv2, svm, svh)
    DO,  # (Z, Lq, H, D) through (sd1, sd2, sdm, sdh)
    DQ,  # like Q through (sdq1, sdq2, sdqm, sdqh): gradient w.r.t. q as attended
    LSE,  # (Z * H, Lq) fp32 log2 units
    DELTA,  # (Z * H, Lq) fp32
    CU_K,  # (Z + 1,) int32 (read only when VARLEN)
    Z2, sq1, sq2, sqm, sqh, sk1, sk2, skm, skh, sv1, sv2, svm, svh, sd1, sd2, sdm, sdh,
    sdq1, sdq2, sdqm, sdqh,
    H, Lq, Lk, causal, qk_scale, sm_scale,
    D: tl.constexpr, VARLEN: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BD0: tl.constexpr, BD1: tl.constexpr, HAS_D1: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """dQ of one query block of one (sequence, head) over its visible key blocks (three matmuls per pair:
    S = Q K^T, dP = dO V^T, dQ += dS K), written once: no partials, no atomics. The query blocks of one
    (sequence, head) are adjacent program ids (k and v shared in L2)."""
    n_mb = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    zh = pid // n_mb
    start_m = (pid % n_mb) * BLOCK_M
    z, h, start, n_k, shift, q_base, do_base, k_base, v_base, stat = _bwd_bases(
        zh, Q, K, V, DO, CU_K, Z2, sq1, sq2, sqh, sk1, sk2, skm, skh, sv1, sv2, svm, svh, sd1, sd2, sdh, H, Lq, Lk,
        causal, VARLEN, ALIGNED)  # fmt: skip
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    q0, do0, q1, do1 = _load_two(q_base, do_base, rows, sqm, sdm, row_ok, D, BD0, BD1, HAS_D1, ALIGNED)
    lse = tl.load(LSE + stat + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + stat + rows, mask=row_ok, other=0.0)
    last = tl.minimum(rows + shift, n_k - 1)  # key j is seen by query row r iff j <= last[r]
    hi = tl.minimum(tl.maximum(start_m + BLOCK_M + shift, 0), n_k)
    dq0 = tl.zeros([BLOCK_M, BD0], dtype=tl.float32)
    dq1 = tl.zeros([BLOCK_M, BD1], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < n_k
        k0, v0, k1, v1 = _load_two(k_base, v_base, keys, skm, svm, key_ok, D, BD0, BD1, HAS_D1, ALIGNED)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)  # S = Q K^T
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)  # dP = dO V^T
        if HAS_D1:
            s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
            dp += tl.dot(do1, tl.trans(v1), input_precision=DOT_PREC)
        p = tl.where(keys[None, :] <= last[:, None], tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds = (p * (dp - delta[:, None])).to(Q.dtype.element_ty)
        dq0 = tl.dot(ds, k0, dq0, input_precision=DOT_PREC)  # dQ += dS K
        if HAS_D1:
            dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PREC)
    dq_base = _base(DQ, z, Z2, sdq1, sdq2, h, sdqh, ALIGNED)
    _store_piece(dq_base, rows, sdqm, row_ok, 0, D, dq0 * sm_scale, BD0, ALIGNED)
    if HAS_D1:
        _store_piece(dq_base, rows, sdqm, row_ok, BD0, D, dq1 * sm_scale, BD1, ALIGNED)


@triton.jit
def _dq_reduce_kernel(
    DQP,  # (n_split, Z * H, Lq, D) fp32 partials
    DQ,  # (Z, Lq, H, D) through (sdq1, sdq2, sdqm, sdqh)
    Z2, sdq1, sdq2, sdqm, sdqh, H, Lq, n_zh, n_split, sm_scale,
    D: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr,
    HAS_D1: tl.constexpr,
):  # fmt: skip
    """dq = sm_scale * sum over splits (in split order) of the dQ partials."""
    n_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    zh = pid // n_m
    pid_m = pid % n_m
    z = zh // H
    h = zh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    acc0 = tl.zeros([BLOCK_M, BD0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BD1], dtype=tl.float32)
    for sp in range(n_split):
        pb = DQP + (sp * n_zh + zh).to(tl.int64) * Lq * D
        acc0 += _load_piece(pb, rows, D, row_ok, 0, D, BD0, True)
        if HAS_D1:
            acc1 += _load_piece(pb, rows, D, row_ok, BD0, D, BD1, True)
    dq_base = _base(DQ, z, Z2, sdq1, sdq2, h, sdqh, ALIGNED)
    _store_piece(dq_base, rows, sdqm, row_ok, 0, D, acc0 * sm_scale, BD0, ALIGNED)
    if HAS_D1:
        _store_piece(dq_base, rows, sdqm, row_ok, BD0, D, acc1 * sm_scale, BD1, ALIGNED)


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
    ROPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr,
    HAS_D1: tl.constexpr,
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
        x_row = _hint(_z_offset(z, Z2, sx1, sx2) + l.to(tl.int64) * sxm + h * sxh, ALIGNED)
        dx_row = _hint(_z_offset(z, Z2, sdx1, sdx2) + l.to(tl.int64) * sdxm + h * sdxh, ALIGNED)
        g_row = tl.multiple_of(r.to(tl.int64) * D, 8)
        m0 = ok[:, None] & (c0 < D)[None, :]
        x0 = tl.load(_vec(X + x_row[:, None] + c0[None, :], ALIGNED), mask=m0, other=0.0)
        g0 = tl.load(_vec(G + g_row[:, None] + c0[None, :], True), mask=m0, other=0.0).to(tl.float32)
        xf = x0.to(tl.float32)
        ss = tl.sum(xf * xf, 1)
        if HAS_D1:
            m1 = ok[:, None] & (c1 < D)[None, :]
            x1 = tl.load(_vec(X + x_row[:, None] + c1[None, :], ALIGNED), mask=m1, other=0.0)
            g1 = tl.load(_vec(G + g_row[:, None] + c1[None, :], True), mask=m1, other=0.0).to(tl.float32)
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
        tl.store(_vec(DX + dx_row[:, None] + c0[None, :], ALIGNED), dx0.to(DX.dtype.element_ty), mask=m0)
        if HAS_D1:
            dx1 = rstd[:, None] * (dh1 - xh1 * mean[:, None])
            tl.store(_vec(DX + dx_row[:, None] + c1[None, :], ALIGNED), dx1.to(DX.dtype.element_ty), mask=m1)
    tl.store(DWP + pid * D + c0, dw0, mask=c0 < D)
    if HAS_D1:
        tl.store(DWP + pid * D + c1, dw1, mask=c1 < D)
