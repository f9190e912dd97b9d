"""GroupNorm (affine) with SiLU fused, forward and backward, on video tensors (B, C, T, H, W) or
images (B, C, H, W), in contiguous or channels-last memory format (outputs keep x's format).

Forward, two passes over x:
1. statistics: the S = T*H*W positions of every (b, group) are split into chunks, one program per (b, group
   block, chunk); over the chunk's whole tiles each tile element keeps a running (mean, M2) in fp32 (Welford:
   no cross-thread reduction inside the loop, no E[x^2] - E[x]^2 cancellation), merged per group after the
   loop and with the partial tail tile by Chan et al.'s parallel variance; each program writes its chunk's
   partial. Its tile loop uses plain moments; only when a group's M2 or mean ends non-finite (|x| >= ~1e19
   overflows the sum of squares; inf / NaN inputs) does the program redo its chunk with moments of x scaled by
   a power of two from the tile's max |x| (exact; fp32 |x| up to ~1e37 gives the fp64 result), in quarter
   tiles;
2. normalise: each program merges the chunk partials of its groups, then writes
   y = silu((x - mean) * rstd * weight + bias) for its chunk.
Backward likewise: a reduction pass (per tile element sums of dz * xhat and dz over the chunk; from them the
per-channel sums for dweight / dbias and the per-group sums of dxhat = dz * weight and dxhat * xhat), then dx
= rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat*xhat)).

A program's tile is (positions, groups, channels of a group): for channels-last x it spans several
groups so that each position's channels are one contiguous load; for contiguous x it is one group
and the positions are contiguous. All tensors are read through their strides.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from opensora_fast.kernels import reference
from opensora_fast.kernels._utils import autotune_configs, check_tensor, empty, next_pow2, use_triton
from opensora_fast.kernels.layernorm_modulate import needs_int64

# (TILE elements per loop step, num_warps): the first is the interpreter's.
_CONFIGS = ((4096, 8), (2048, 4))
_MAX_GROUP_CHANNELS = 1024  # C / num_groups handled by one tile row (Triton path)
_TARGET_PROGRAMS = 264  # two waves of 132 SMs


def _configs():
    return autotune_configs([triton.Config({"TILE": t}, num_warps=w) for t, w in _CONFIGS])


def _prune(configs, named_args, **kwargs):
    """Packed layouts autotune over _CONFIGS; any-strides (LAYOUT 0) runs the first only."""
    return configs if kwargs["LAYOUT"] else configs[:1]


_KEY = ["spatial", "num_ch", "num_groups", "GPP", "CG", "LAYOUT"]


@triton.jit
def _spatial_offset(s, height, width, sxt, sxh, sxw):
    """Element offset of flattened positions s = (t * H + h) * W + w."""
    w = s % width
    h = (s // width) % height
    t = s // (width * height)
    return t.to(tl.int64) * sxt + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw


@triton.jit
def _offsets(s, ch, height, width, sc, st, sh, sw, LAYOUT: tl.constexpr, I64: tl.constexpr):
    """Element offsets (within a sample) of positions s (BLOCK_S,) x channels ch (GPP, CG_P).

    LAYOUT 1: channels-last packed (channel stride 1, position stride sw); 2: contiguous packed
    (position stride 1, channel stride sc); both in int32 unless I64 (the host sets it when a tensor
    spans >= 2**31 elements). 0: any strides, positions decomposed into (t, h, w), int64."""
    if I64:
        s = s.to(tl.int64)
        ch = ch.to(tl.int64)
    if LAYOUT == 1:
        off = (s * sw)[:, None, None] + ch[None, :, :]
    elif LAYOUT == 2:
        off = s[:, None, None] + (ch * sc)[None, :, :]
    else:
        sp_off = _spatial_offset(s, height, width, st, sh, sw)
        off = sp_off[:, None, None] + (ch.to(tl.int64) * sc)[None, :, :]
    return off


@triton.jit
def _merge(n, mean, m2, e, cnt, tmean, tm2, te):
    """Chan's merge of running (n, mean, M2) with a part (cnt, tmean, tm2), M2s held in units of 4**e
    (power-of-two exponents e, te >= 0): the sum of squares of |x| >= ~1e19 no longer overflows fp32,
    and the scaling is exact, so ordinary inputs get the unscaled result bit for bit."""
    n_new = n + cnt
    e_new = tl.maximum(e, te)
    s = tl.exp2(-e_new)
    delta_s = tmean * s - mean * s
    mean = mean + (tmean - mean) * (cnt / n_new)
    m2 = m2 * tl.exp2(2.0 * (e - e_new)) + tm2 * tl.exp2(2.0 * (te - e_new)) + delta_s * delta_s * (n * cnt / n_new)
    return n_new, mean, m2, e_new


@triton.jit
def _tile_moments(x, mask, cnt):
    """(mean, M2 / 4**e, e) of a (BLOCK_S, GPP, CG_P) fp32 tile per group, with 2**e <= max|x| (e >= 0)."""
    amax = tl.max(tl.max(tl.where(mask, tl.abs(x), 0.0), axis=0), axis=1)
    e = tl.maximum(tl.floor(tl.log2(tl.maximum(amax, 1.0))), 0.0)
    s = tl.exp2(-e)  # 0 for an infinite tile: its statistics are NaN as they should be
    xs = x * s[None, :, None]
    mean_s = tl.sum(tl.sum(xs, axis=0), axis=1) / cnt
    d = tl.where(mask, xs - mean_s[None, :, None], 0.0)
    return mean_s / s, tl.sum(tl.sum(d * d, axis=0), axis=1), e


@triton.autotune(configs=_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _group_norm_silu_stats_kernel(
    X,  # (B, C, T, H, W), any strides (T = 1, sxt = 0 for 4-D input)
    Partial,  # (B, G, NSPLIT, 3) fp32: (mean, M2 / 4**e, e) of each chunk
    num_ch,
    num_groups,
    spatial,  # S = T * H * W
    height,
    width,
    s_chunk,  # positions per chunk
    nsplit,
    sxb,
    sxc,
    sxt,
    sxh,
    sxw,  # fmt: skip
    GPP: tl.constexpr,  # groups per program (power of 2)
    LAYOUT: tl.constexpr,  # 0 any strides, 1 channels-last packed, 2 contiguous packed (see _offsets)
    I64: tl.constexpr,  # int64 offsets (a tensor spans >= 2**31 elements)
    CG: tl.constexpr,  # channels per group
    CG_P: tl.constexpr,  # next_pow2(CG)
    TILE: tl.constexpr,
):
    BLOCK_S: tl.constexpr = TILE // (GPP * CG_P)
    FIX_S: tl.constexpr = BLOCK_S // 4 if BLOCK_S >= 4 else BLOCK_S
    b = tl.program_id(0)
    g = tl.program_id(1) * GPP + tl.arange(0, GPP)
    sp = tl.program_id(2)
    cc = tl.arange(0, CG_P)
    ch_ok = (g < num_groups)[:, None] & (cc < CG)[None, :]
    ch = g[:, None] * CG + cc[None, :]
    base = X + b.to(tl.int64) * sxb
    s_start = sp * s_chunk
    s_end = tl.minimum(s_start + s_chunk, spatial)
    # plain (unscaled) moments first. Over the chunk's whole tiles every tile element (position slot x channel)
    # keeps its own running (mean, M2) (Welford: no cross-thread reduction inside the loop); the slots are
    # merged per group after it (equal counts), then the partial tail tile joins by Chan's merge.
    n_full = tl.maximum(s_end - s_start, 0) // BLOCK_S
    s_tail = s_start + n_full * BLOCK_S
    smean = tl.zeros((BLOCK_S, GPP, CG_P), dtype=tl.float32)
    sm2 = tl.zeros((BLOCK_S, GPP, CG_P), dtype=tl.float32)
    k = 0.0
    for s0 in range(s_start, s_tail, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        off = _offsets(s, ch, height, width, sxc, sxt, sxh, sxw, LAYOUT, I64)
        x = tl.load(base + off, mask=ch_ok[None, :, :], other=0.0).to(tl.float32)
        k += 1.0
        d = x - smean
        smean += d * (1.0 / k)
        sm2 += d * (x - smean)
    slot_ok = ch_ok[None, :, :] & (tl.arange(0, BLOCK_S) >= 0)[:, None, None]
    per_tile = BLOCK_S * CG * 1.0
    mean = tl.sum(tl.sum(tl.where(slot_ok, smean, 0.0), axis=0), axis=1) / per_tile
    dm = tl.where(slot_ok, smean - mean[None, :, None], 0.0)
    m2 = tl.sum(tl.sum(tl.where(slot_ok, sm2, 0.0), axis=0), axis=1) + k * tl.sum(tl.sum(dm * dm, axis=0), axis=1)
    n = k * per_tile
    e = tl.zeros((GPP,), dtype=tl.float32)
    if s_tail < s_end:
        s = s_tail + tl.arange(0, BLOCK_S)
        mask = (s < s_end)[:, None, None] & ch_ok[None, :, :]
        off = _offsets(s, ch, height, width, sxc, sxt, sxh, sxw, LAYOUT, I64)
        x = tl.load(base + off, mask=mask, other=0.0).to(tl.float32)
        cnt = ((s_end - s_tail) * CG).to(tl.float32)
        tmean = tl.sum(tl.sum(x, axis=0), axis=1) / cnt
        d = tl.where(mask, x - tmean[None, :, None], 0.0)
        tm2 = tl.sum(tl.sum(d * d, axis=0), axis=1)
        n_new = n + cnt
        delta = tmean - mean
        mean = mean + delta * (cnt / n_new)
        m2 = m2 + tm2 + delta * delta * (n * cnt / n_new)
        n = n_new
    # an overflow (|x| >= ~1e19) or an inf / NaN input leaves m2 or mean non-finite for good: only then (rare)
    # redo the chunk with the power-of-two scaled moments (exact, cannot overflow before x itself does)
    fmax = 3.4028234663852886e38
    bad = tl.max(tl.where((m2 <= fmax) & (tl.abs(mean) <= fmax), 0, 1), axis=0)
    if bad != 0:
        n = 0.0
        mean = tl.zeros((GPP,), dtype=tl.float32)
        m2 = tl.zeros((GPP,), dtype=tl.float32)
        for s0 in range(s_start, s_end, FIX_S):  # a quarter tile: fewer live registers on this rare path
            s = s0 + tl.arange(0, FIX_S)
            mask = (s < s_end)[:, None, None] & ch_ok[None, :, :]
            off = _offsets(s, ch, height, width, sxc, sxt, sxh, sxw, LAYOUT, I64)
            x = tl.load(base + off, mask=mask, other=0.0).to(tl.float32)
            cnt = (tl.minimum(s_end - s0, FIX_S) * CG).to(tl.float32)
            tmean, tm2, te = _tile_moments(x, mask, cnt)
            n, mean, m2, e = _merge(n, mean, m2, e, cnt, tmean, tm2, te)
    out = Partial + ((b * num_groups + g) * nsplit + sp) * 3
    g_ok = g < num_groups
    tl.store(out, mean, mask=g_ok)
    tl.store(out + 1, m2, mask=g_ok)
    tl.store(out + 2, e, mask=g_ok)


@triton.jit
def _group_stats(Partial, b, g, num_groups, CG: tl.constexpr, spatial, s_chunk, nsplit, eps):
    """Merge the chunk partials of groups g of sample b -> (mean, rstd), each (GPP,)."""
    n = 0.0
    mean = tl.zeros(g.shape, dtype=tl.float32)
    m2 = tl.zeros(g.shape, dtype=tl.float32)
    e = tl.zeros(g.shape, dtype=tl.float32)
    g_ok = g < num_groups
    for p in range(nsplit):
        src = Partial + ((b * num_groups + g) * nsplit + p) * 3
        cnt = (tl.minimum(s_chunk, spatial - p * s_chunk) * CG).to(tl.float32)
        pm = tl.load(src, mask=g_ok, other=0.0)
        pm2 = tl.load(src + 1, mask=g_ok, other=0.0)
        pe = tl.load(src + 2, mask=g_ok, other=0.0)
        n, mean, m2, e = _merge(n, mean, m2, e, cnt, pm, pm2, pe)
    # rstd = 1 / sqrt(M2 / n + eps) with M2 in units of 4**e; capped like LayerNorm's (huge constant groups)
    s = tl.exp2(-e)
    inv_s = tl.minimum(1.0 / tl.sqrt(m2 / n + eps * s * s), 3.0e38)
    return mean, tl.minimum(inv_s * s, 1.0 / tl.sqrt(eps))


@triton.autotune(configs=_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _group_norm_silu_fwd_kernel(
    X,  # (B, C, T, H, W), any strides
    Wt,  # (C,)
    Bias,  # (C,)
    Y,  # (B, C, T, H, W), any strides
    Partial,  # (B, G, NSPLIT, 3) fp32 from the stats kernel
    Mean,  # (B, G) fp32, written by chunk 0
    Rstd,  # (B, G) fp32, written by chunk 0
    num_ch,
    num_groups,
    spatial,
    height,
    width,
    s_chunk,
    nsplit,
    eps,
    silu,  # 0 / 1
    sxb,
    sxc,
    sxt,
    sxh,
    sxw,  # fmt: skip
    syb,
    syc,
    syt,
    syh,
    syw,  # fmt: skip
    GPP: tl.constexpr,
    LAYOUT: tl.constexpr,
    I64: tl.constexpr,
    CG: tl.constexpr,
    CG_P: tl.constexpr,
    TILE: tl.constexpr,
):
    BLOCK_S: tl.constexpr = TILE // (GPP * CG_P)
    b = tl.program_id(0)
    g = tl.program_id(1) * GPP + tl.arange(0, GPP)
    sp = tl.program_id(2)
    g_ok = g < num_groups
    mean, rstd = _group_stats(Partial, b, g, num_groups, CG, spatial, s_chunk, nsplit, eps)
    if sp == 0:
        tl.store(Mean + b * num_groups + g, mean, mask=g_ok)
        tl.store(Rstd + b * num_groups + g, rstd, mask=g_ok)
    cc = tl.arange(0, CG_P)
    ch_ok = g_ok[:, None] & (cc < CG)[None, :]
    ch = g[:, None] * CG + cc[None, :]
    w = tl.load(Wt + ch, mask=ch_ok, other=0.0).to(X.dtype.element_ty).to(tl.float32)
    bias = tl.load(Bias + ch, mask=ch_ok, other=0.0).to(X.dtype.element_ty).to(tl.float32)
    scale = w * rstd[:, None]
    shift = bias - mean[:, None] * scale
    x_base = X + b.to(tl.int64) * sxb
    y_base = Y + b.to(tl.int64) * syb
    s_start = sp * s_chunk
    s_end = tl.minimum(s_start + s_chunk, spatial)
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < s_end)[:, None, None] & ch_ok[None, :, :]
        x_off = _offsets(s, ch, height, width, sxc, sxt, sxh, sxw, LAYOUT, I64)
        y_off = x_off  # packed layouts: every tensor has x's strides
        if LAYOUT == 0:
            y_off = _offsets(s, ch, height, width, syc, syt, syh, syw, LAYOUT, I64)
        x = tl.load(x_base + x_off, mask=mask, other=0.0).to(tl.float32)
        z = x * scale[None, :, :] + shift[None, :, :]
        if silu != 0:
            z = z * tl.sigmoid(z)
        tl.store(y_base + y_off, z.to(Y.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _group_norm_silu_bwd_reduce_kernel(
    X,  # (B, C, T, H, W), any strides
    DY,  # (B, C, T, H, W), any strides
    Wt,  # (C,)
    Bias,  # (C,)
    Mean,  # (B, G) fp32
    Rstd,  # (B, G) fp32
    PartialG,  # (B, G, NSPLIT, 2) fp32: sums of dxhat and dxhat * xhat per chunk
    PartialC,  # (B, NSPLIT, C, 2) fp32: sums of dz * xhat and dz per channel and chunk
    num_ch,
    num_groups,
    spatial,
    height,
    width,
    s_chunk,
    nsplit,
    silu,
    sxb,
    sxc,
    sxt,
    sxh,
    sxw,  # fmt: skip
    sdb,
    sdc,
    sdt,
    sdh,
    sdw,  # fmt: skip
    GPP: tl.constexpr,
    LAYOUT: tl.constexpr,
    I64: tl.constexpr,
    CG: tl.constexpr,
    CG_P: tl.constexpr,
    TILE: tl.constexpr,
):
    BLOCK_S: tl.constexpr = TILE // (GPP * CG_P)
    b = tl.program_id(0)
    g = tl.program_id(1) * GPP + tl.arange(0, GPP)
    sp = tl.program_id(2)
    g_ok = g < num_groups
    mean = tl.load(Mean + b * num_groups + g, mask=g_ok, other=0.0)
    rstd = tl.load(Rstd + b * num_groups + g, mask=g_ok, other=0.0)
    cc = tl.arange(0, CG_P)
    ch_ok = g_ok[:, None] & (cc < CG)[None, :]
    ch = g[:, None] * CG + cc[None, :]
    w = tl.load(Wt + ch, mask=ch_ok, other=0.0).to(X.dtype.element_ty).to(tl.float32)
    bias = tl.load(Bias + ch, mask=ch_ok, other=0.0).to(X.dtype.element_ty).to(tl.float32)
    x_base = X + b.to(tl.int64) * sxb
    d_base = DY + b.to(tl.int64) * sdb
    # per tile element sums of dz * xhat and dz (no cross-thread reduction inside the loop); after it the
    # per-channel sums, and the per-group ones of dxhat = dz * w as sum_c w_c * (per-channel sum)
    acc_dzx = tl.zeros((BLOCK_S, GPP, CG_P), dtype=tl.float32)
    acc_dz = tl.zeros((BLOCK_S, GPP, CG_P), dtype=tl.float32)
    s_start = sp * s_chunk
    s_end = tl.minimum(s_start + s_chunk, spatial)
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < s_end)[:, None, None] & ch_ok[None, :, :]
        x_off = _offsets(s, ch, height, width, sxc, sxt, sxh, sxw, LAYOUT, I64)
        d_off = x_off
        if LAYOUT == 0:
            d_off = _offsets(s, ch, height, width, sdc, sdt, sdh, sdw, LAYOUT, I64)
        x = tl.load(x_base + x_off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(d_base + d_off, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :, None]) * rstd[None, :, None]
        z = xhat * w[None, :, :] + bias[None, :, :]
        dz = dy
        if silu != 0:
            sg = tl.sigmoid(z)
            dz = dy * sg * (1.0 + z * (1.0 - sg))
        dz = tl.where(mask, dz, 0.0)
        acc_dzx += dz * xhat
        acc_dz += dz
    sum_dzx = tl.sum(acc_dzx, axis=0)
    sum_dz = tl.sum(acc_dz, axis=0)
    sum_g = tl.sum(sum_dz * w, axis=1)
    sum_gx = tl.sum(sum_dzx * w, axis=1)
    pg = PartialG + ((b * num_groups + g) * nsplit + sp) * 2
    tl.store(pg, sum_g, mask=g_ok)
    tl.store(pg + 1, sum_gx, mask=g_ok)
    pc = PartialC + ((b * nsplit + sp) * num_ch + ch) * 2
    tl.store(pc, sum_dzx, mask=ch_ok)
    tl.store(pc + 1, sum_dz, mask=ch_ok)


@triton.autotune(configs=_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _group_norm_silu_bwd_dx_kernel(
    X,  # (B, C, T, H, W), any strides
    DY,  # (B, C, T, H, W), any strides
    Wt,  # (C,)
    Bias,  # (C,)
    Mean,  # (B, G) fp32
    Rstd,  # (B, G) fp32
    PartialG,  # (B, G, NSPLIT, 2) fp32 from the reduce kernel
    DX,  # (B, C, T, H, W), any strides
    num_ch,
    num_groups,
    spatial,
    height,
    width,
    s_chunk,
    nsplit,
    silu,
    sxb,
    sxc,
    sxt,
    sxh,
    sxw,  # fmt: skip
    sdb,
    sdc,
    sdt,
    sdh,
    sdw,  # fmt: skip
    sob,
    soc,
    sot,
    soh,
    sow,  # fmt: skip
    GPP: tl.constexpr,
    LAYOUT: tl.constexpr,
    I64: tl.constexpr,
    CG: tl.constexpr,
    CG_P: tl.constexpr,
    TILE: tl.constexpr,
):
    BLOCK_S: tl.constexpr = TILE // (GPP * CG_P)
    b = tl.program_id(0)
    g = tl.program_id(1) * GPP + tl.arange(0, GPP)
    sp = tl.program_id(2)
    g_ok = g < num_groups
    mean = tl.load(Mean + b * num_groups + g, mask=g_ok, other=0.0)
    rstd = tl.load(Rstd + b * num_groups + g, mask=g_ok, other=0.0)
    sum_g = tl.zeros((GPP,), dtype=tl.float32)
    sum_gx = tl.zeros((GPP,), dtype=tl.float32)
    for p in range(nsplit):
        src = PartialG + ((b * num_groups + g) * nsplit + p) * 2
        sum_g += tl.load(src, mask=g_ok, other=0.0)
        sum_gx += tl.load(src + 1, mask=g_ok, other=0.0)
    inv_n = 1.0 / tl.maximum(spatial * CG, 1).to(tl.float32)
    c1 = sum_g * inv_n
    c2 = sum_gx * inv_n
    cc = tl.arange(0, CG_P)
    ch_ok = g_ok[:, None] & (cc < CG)[None, :]
    ch = g[:, None] * CG + cc[None, :]
    w = tl.load(Wt + ch, mask=ch_ok, other=0.0).to(X.dtype.element_ty).to(tl.float32)
    bias = tl.load(Bias + ch, mask=ch_ok, other=0.0).to(X.dtype.element_ty).to(tl.float32)
    x_base = X + b.to(tl.int64) * sxb
    d_base = DY + b.to(tl.int64) * sdb
    o_base = DX + b.to(tl.int64) * sob
    s_start = sp * s_chunk
    s_end = tl.minimum(s_start + s_chunk, spatial)
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < s_end)[:, None, None] & ch_ok[None, :, :]
        x_off = _offsets(s, ch, height, width, sxc, sxt, sxh, sxw, LAYOUT, I64)
        d_off = x_off
        o_off = x_off
        if LAYOUT == 0:
            d_off = _offsets(s, ch, height, width, sdc, sdt, sdh, sdw, LAYOUT, I64)
            o_off = _offsets(s, ch, height, width, soc, sot, soh, sow, LAYOUT, I64)
        x = tl.load(x_base + x_off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(d_base + d_off, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :, None]) * rstd[None, :, None]
        z = xhat * w[None, :, :] + bias[None, :, :]
        dz = dy
        if silu != 0:
            sg = tl.sigmoid(z)
            dz = dy * sg * (1.0 + z * (1.0 - sg))
        gh = dz * w[None, :, :]
        dx = rstd[None, :, None] * (gh - c1[None, :, None] - xhat * c2[None, :, None])
        tl.store(o_base + o_off, dx.to(DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# host launchers (torch.library custom ops)


def _empty_like_format(x: torch.Tensor) -> torch.Tensor:
    """An output shaped like x in x's memory format (channels-last when x is, else contiguous)."""
    cl = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    if not x.is_contiguous() and x.is_contiguous(memory_format=cl):
        perm = (0, *range(2, x.dim()), 1)
        inv = (0, x.dim() - 1, *range(1, x.dim() - 1))
        return empty(tuple(x.shape[p] for p in perm), x.dtype, x.device).permute(*inv)
    return empty(tuple(x.shape), x.dtype, x.device)


def _geometry(x: torch.Tensor):
    """(T, H, W, strides (b, c, t, h, w)) of a 4-D or 5-D tensor; 4-D is T = 1."""
    if x.dim() == 4:
        B, C, H, W = x.shape
        sb, sc, sh, sw = x.stride()
        return 1, H, W, (sb, sc, 0, sh, sw)
    return x.shape[2], x.shape[3], x.shape[4], x.stride()


def _layout(tensors) -> tuple[int, tuple]:
    """(LAYOUT, strides) for the kernels: 1 (channels-last packed) or 2 (contiguous packed) when every
    tensor has the same strides and its positions (t, h, w) are one arithmetic run; the strides passed
    are then (b, c, 0, 0, position stride). Else 0 with x's strides."""
    x = tensors[0]
    T, H, W, (sb, sc, st, sh, sw) = _geometry(x)
    C = x.shape[1]
    generic = (0, (sb, sc, st, sh, sw))
    if any(t.stride() != x.stride() for t in tensors[1:]):
        return generic
    q = sw if W > 1 else (sh if H > 1 else st)
    if not ((W == 1 or sw == q) and (H == 1 or sh == W * q) and (T == 1 or st == H * W * q)):
        return generic
    if sc == 1 and C > 1 and q >= C:
        return 1, (sb, sc, 0, 0, q)
    if q == 1:
        return 2, (sb, sc, 0, 0, 1)
    return generic


def _tiling(x: torch.Tensor, num_groups: int, layout: int):
    """(GPP, CG_P, NSPLIT, s_chunk, group blocks): groups per program (several for channels-last x,
    so a tile row is one contiguous run of channels), padded group width, the split of the positions."""
    B, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    cg_p = next_pow2(C // num_groups)
    gpp = min(next_pow2(num_groups), max(1, 128 // cg_p)) if layout == 1 else 1
    group_blocks = triton.cdiv(num_groups, gpp)
    nsplit = max(1, min(triton.cdiv(_TARGET_PROGRAMS, B * group_blocks), triton.cdiv(S, 1024)))
    s_chunk = triton.cdiv(triton.cdiv(S, nsplit), 64) * 64  # aligned chunk starts
    return gpp, cg_p, triton.cdiv(S, s_chunk), s_chunk, group_blocks


def _fwd_impl(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float, silu: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, C = x.shape[:2]
    T, H, W, _ = _geometry(x)
    y = _empty_like_format(x)
    layout, sx = _layout((x, y))
    sy = sx if layout else _geometry(y)[3]
    gpp, cg_p, nsplit, s_chunk, group_blocks = _tiling(x, num_groups, layout)
    partial = empty((B, num_groups, nsplit, 3), torch.float32, x.device)
    mean = empty((B, num_groups), torch.float32, x.device)
    rstd = empty((B, num_groups), torch.float32, x.device)
    grid = (B, group_blocks, nsplit)
    dims = (C, num_groups, T * H * W, H, W, s_chunk, nsplit)
    cx = dict(GPP=gpp, LAYOUT=layout, I64=needs_int64(x, y), CG=C // num_groups, CG_P=cg_p)
    _group_norm_silu_stats_kernel[grid](x, partial, *dims, *sx, **cx)
    _group_norm_silu_fwd_kernel[grid](x, weight, bias, y, partial, mean, rstd, *dims, eps, int(silu), *sx, *sy, **cx)
    return y, mean, rstd


group_norm_silu_fwd = torch.library.custom_op("opensora_fast::group_norm_silu_fwd", _fwd_impl, mutates_args=())


@group_norm_silu_fwd.register_fake
def _(x, weight, bias, num_groups, eps, silu):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return _empty_like_format(x), stats, stats.clone()


def _bwd_impl(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, C = x.shape[:2]
    T, H, W, _ = _geometry(x)
    dx = _empty_like_format(x)
    layout, sx = _layout((x, dy, dx))
    sd = sx if layout else _geometry(dy)[3]
    so = sx if layout else _geometry(dx)[3]
    gpp, cg_p, nsplit, s_chunk, group_blocks = _tiling(x, num_groups, layout)
    partial_g = empty((B, num_groups, nsplit, 2), torch.float32, x.device)
    partial_c = empty((B, nsplit, C, 2), torch.float32, x.device)
    grid = (B, group_blocks, nsplit)
    dims = (C, num_groups, T * H * W, H, W, s_chunk, nsplit, int(silu))
    cx = dict(GPP=gpp, LAYOUT=layout, I64=needs_int64(x, dy, dx), CG=C // num_groups, CG_P=cg_p)
    _group_norm_silu_bwd_reduce_kernel[grid](
        x, dy, weight, bias, mean, rstd, partial_g, partial_c, *dims, *sx, *sd, **cx
    )
    _group_norm_silu_bwd_dx_kernel[grid](x, dy, weight, bias, mean, rstd, partial_g, dx, *dims, *sx, *sd, *so, **cx)
    dweight = partial_c[..., 0].sum((0, 1)).to(weight.dtype)
    dbias = partial_c[..., 1].sum((0, 1)).to(bias.dtype)
    return dx, dweight, dbias


group_norm_silu_bwd = torch.library.custom_op("opensora_fast::group_norm_silu_bwd", _bwd_impl, mutates_args=())


@group_norm_silu_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, num_groups, silu):
    return _empty_like_format(x), torch.empty_like(weight), torch.empty_like(bias)


class _GroupNormSiLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, silu):
        y, mean, rstd = group_norm_silu_fwd(x, weight, bias, num_groups, eps, silu)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.silu = num_groups, silu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if dy.stride() != x.stride():
            # the packed layouts need dy in x's format: one copy of dy instead of the any-strides kernels
            cl = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
            for fmt in (torch.contiguous_format, cl):
                if x.is_contiguous(memory_format=fmt):
                    dy = dy.contiguous(memory_format=fmt)
                    break
        dx, dw, db = group_norm_silu_bwd(dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.silu)
        return dx, dw, db, None, None, None


# --------------------------------------------------------------------------------------------
# public function


def _check(x, weight, bias, num_groups):
    check_tensor(x, "x", ndim=(4, 5))
    C = x.shape[1]
    check_tensor(weight, "weight", shape=(C,), like=x)
    check_tensor(bias, "bias", shape=(C,), like=x)
    if not isinstance(num_groups, int) or num_groups < 1 or C % num_groups != 0:
        raise ValueError(f"num_groups must be a positive int dividing the {C} channels of x, got {num_groups!r}")


def group_norm_silu(x, weight, bias, num_groups, *, eps=1e-5, silu=True):
    """silu(group_norm(x, num_groups, weight, bias, eps)) (plain GroupNorm with silu=False).

    x (B, C, T, H, W) or (B, C, H, W), contiguous or channels-last; weight, bias (C,) are cast to
    x's dtype as F.group_norm's caller in the reference does; the output keeps x's format."""
    _check(x, weight, bias, num_groups)
    if not use_triton(x, weight, bias):
        return reference.group_norm_silu_ref(x, weight, bias, num_groups, eps, silu)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp32, fp16 or bf16 for the Triton kernels, got {x.dtype}")
    if x.shape[1] // num_groups > _MAX_GROUP_CHANNELS:
        raise ValueError(
            f"C / num_groups must be <= {_MAX_GROUP_CHANNELS} for the Triton kernels, got {x.shape[1]} / {num_groups}"
        )
    if x.numel() == 0:
        raise ValueError(f"x must have positions to normalise, got shape {tuple(x.shape)}")
    # the kernels read weight / bias with unit stride: copy other (C,) views (gradients flow back through)
    weight, bias = weight.contiguous(), bias.contiguous()
    return _GroupNormSiLUFunction.apply(x, weight, bias, num_groups, float(eps), bool(silu))


__all__ = ["group_norm_silu"]
