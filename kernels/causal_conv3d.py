"""Open-Sora's CausalConv3d as implicit-GEMM Triton kernels (forward and backward).

Semantics (opensora-v1.2.md §3.3): all temporal padding at the front, (k_t - 1) + (1 - stride_t)
frames; symmetric spatial padding k // 2; then a plain Conv3d with stride (stride_t, 1, 1).

GEMM view of the forward: M = B * T_out * H * W output positions, N = C_out, K = k_t*k_h*k_w * C_in
(tap-major, channel-minor, so channels-last inputs load contiguous K). The padding is fused into the
loads: a tap that falls into the front time pad or the spatial border is a masked load returning 0,
so no padded copy of x is ever made. Every tensor is read through its strides (contiguous NCDHW and
channels_last_3d NDHWC both work; channels-last is the fast one).

Backward:
- dX is the transposed convolution, again an implicit GEMM (M = input positions, N = C_in,
  K = taps * C_out): input frame t receives from output frame t_o = (t + pad_t - i) / stride_t when
  that is an integer in [0, T_out) (for stride 1 the causal pad moves to the back), and from the
  spatially flipped kernel.
- dW is per tap an implicit GEMM reducing over M: dW[:, :, tap] = dY^T @ x-patch(tap), split over M
  into fp32 partials when the (tap, C_in, C_out) tiles alone do not fill the GPU; db = dY summed over
  M, fused into the same kernel.
fp32 accumulation throughout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from opensora_fast.kernels import reference
from opensora_fast.kernels._utils import autotune_configs, check_tensor, empty, use_triton
from opensora_fast.kernels.layernorm_modulate import needs_int64

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the first is also the interpreter's.
_GEMM_CONFIGS = (
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
)
_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# Generic strides (not FAST) load element by element: one config each, no autotuning (dW gathers
# both operands and takes K=32 steps there to stay clear of spills). The autotuner prunes by FAST.
# Forward / dX: the generic config by (K channels <= 16, N channels <= 16): the VAE's 4-channel convs
# (post_quant_conv 4->4, conv1 4->512, conv_out 128->4) take 16-wide K or N blocks, not 64 (a 4-channel
# operand padded to 64 wasted 15/16 of the MMA work, and 4->4 at 1x1x1 spilled 8 B at 255 registers).
_STRIDED_CONFIGS = {
    (False, False): (128, 64, 64, 4, 4),
    (True, False): (128, 64, 16, 4, 4),
    (False, True): (128, 16, 64, 4, 4),
    (True, True): (128, 16, 16, 4, 4),
}
_STRIDED_CONFIG = _STRIDED_CONFIGS[(False, False)]
_DW_STRIDED_CONFIG = (128, 128, 32, 8, 3)


def _configs(gemm=_GEMM_CONFIGS):
    return autotune_configs(
        [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in gemm]
    )


def _config_tuple(c: triton.Config) -> tuple:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)


def _prune(configs, named_args, **kwargs):
    """Configs are _GEMM_CONFIGS + (the generic-strides config,): FAST autotunes over the former,
    generic strides run the last one."""
    return configs[:-1] if kwargs["FAST"] else configs[-1:]


def _gemm_prune(k_arg: str, n_arg: str):
    """Configs are _GEMM_CONFIGS + the _STRIDED_CONFIGS values: FAST autotunes over the former, generic
    strides run the one for (K channels <= 16, N channels <= 16). One config (the interpreter) stays."""

    def prune(configs, named_args, **kwargs):
        if len(configs) == 1:
            return configs
        n_gemm = len(_GEMM_CONFIGS)
        if kwargs["FAST"]:
            return configs[:n_gemm]
        args = {**named_args, **kwargs}
        key = (args[k_arg] <= 16, args[n_arg] <= 16)
        return [configs[n_gemm + list(_STRIDED_CONFIGS).index(key)]]

    return prune


@triton.jit
def _dot(a, b, acc):
    """acc += a @ b; fp32 operands use exact fp32 (not tf32) like the reference."""
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _load_rows(P, row, row_ok, ch, ch_ok, s_ch, FAST: tl.constexpr, I64: tl.constexpr):
    """Tile P[row[:, None] + ch[None, :] * s_ch] (rows x channels), masked rows read as 0.

    FAST: unit channel stride, every row start a multiple of 16 elements and every channel in range
    (channels-last, C a multiple of 128), so the loads vectorise and pipeline (cp.async / TMA-free)."""
    if FAST:
        ptrs = P + tl.multiple_of(row, 16)[:, None] + ch[None, :]
        ptrs = tl.multiple_of(tl.max_contiguous(ptrs, [1, 16]), [16, 16])
        t = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if I64:
            ch = ch.to(tl.int64)
        t = tl.load(P + row[:, None] + ch[None, :] * s_ch, mask=row_ok[:, None] & ch_ok[None, :], other=0.0)
    return t


@triton.jit
def _store_rows(P, row, row_ok, ch, ch_ok, s_ch, val, FAST: tl.constexpr, I64: tl.constexpr):
    if FAST:
        ptrs = P + tl.multiple_of(row, 16)[:, None] + ch[None, :]
        ptrs = tl.multiple_of(tl.max_contiguous(ptrs, [1, 16]), [16, 16])
        tl.store(ptrs, val, mask=row_ok[:, None])
    else:
        if I64:
            ch = ch.to(tl.int64)
        tl.store(P + row[:, None] + ch[None, :] * s_ch, val, mask=row_ok[:, None] & ch_ok[None, :])


@triton.jit
def _offset(b, t, h, w, sb, st, sh, sw, I64: tl.constexpr):
    """Element offset of positions (b, t, h, w): int64 when I64, else int32 (the host proved every
    offset of the tensors fits)."""
    if I64:
        off = b.to(tl.int64) * sb + t.to(tl.int64) * st + h.to(tl.int64) * sh + w.to(tl.int64) * sw
    else:
        off = b * sb + t * st + h * sh + w * sw
    return off


_KEY = ["m_total", "c_in", "c_out", "KT", "KH", "KW", "STRIDE_T", "FAST"]


@triton.autotune(
    configs=_configs(_GEMM_CONFIGS + tuple(_STRIDED_CONFIGS.values())),
    key=_KEY,
    prune_configs_by={"early_config_prune": _gemm_prune("c_in", "c_out")},
)
@triton.jit
def _causal_conv3d_fwd_kernel(
    X,  # (B, C_in, T, H, W), any strides
    Wp,  # (KT*KH*KW, C_in, C_out) contiguous: the weight packed as the GEMM's B operand
    Bias,  # (C_out,) (unused when has_bias == 0)
    Y,  # (B, C_out, T_out, H, W), any strides
    c_in,
    c_out,
    t_in,
    t_out,
    height,
    width,
    m_total,  # B * T_out * H * W
    has_bias,
    sxb,
    sxc,
    sxt,
    sxh,
    sxw,  # strides of X in elements
    syb,
    syc,
    syt,
    syh,
    syw,  # strides of Y in elements
    KT: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE_T: tl.constexpr,
    FAST: tl.constexpr,  # X and Y channels-last with C_in, C_out multiples of 128 (see _load_rows)
    I64: tl.constexpr,  # int64 offsets (a tensor spans >= 2**31 elements)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    PAD_T: tl.constexpr = KT - STRIDE_T
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < m_total
    n_ok = offs_n < c_out
    # output position of each GEMM row
    wo = offs_m % width
    ho = (offs_m // width) % height
    to = (offs_m // (width * height)) % t_out
    bb = offs_m // (width * height * t_out)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_cblk = tl.cdiv(c_in, BLOCK_K)
    for kk in range(KT * KH * KW * n_cblk):  # one flat K loop over (tap, channel block)
        tap = kk // n_cblk
        ck = (kk - tap * n_cblk) * BLOCK_K + offs_k
        ck_ok = ck < c_in
        # input position of each row for this tap; the causal front pad and the border are masked
        ti = to * STRIDE_T + tap // (KH * KW) - PAD_T
        hi = ho + (tap // KW) % KH - KH // 2
        wi = wo + tap % KW - KW // 2
        row_ok = m_ok & (ti >= 0) & (ti < t_in) & (hi >= 0) & (hi < height) & (wi >= 0) & (wi < width)
        a = _load_rows(X, _offset(bb, ti, hi, wi, sxb, sxt, sxh, sxw, I64), row_ok, ck, ck_ok, sxc, FAST, I64)
        b = _load_rows(Wp, (tap * c_in + ck) * c_out, ck_ok, offs_n, n_ok, 1, FAST, I64)
        acc = _dot(a, b.to(a.dtype), acc)
    if has_bias != 0:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(Y.dtype.element_ty).to(tl.float32)[None, :]
    y_row = _offset(bb, to, ho, wo, syb, syt, syh, syw, I64)
    _store_rows(Y, y_row, m_ok, offs_n, n_ok, syc, acc.to(Y.dtype.element_ty), FAST, I64)


@triton.autotune(
    configs=_configs(_GEMM_CONFIGS + tuple(_STRIDED_CONFIGS.values())),
    key=_KEY,
    prune_configs_by={"early_config_prune": _gemm_prune("c_out", "c_in")},
)
@triton.jit
def _causal_conv3d_bwd_dx_kernel(
    DY,  # (B, C_out, T_out, H, W), any strides
    Wp,  # (KT*KH*KW, C_out, C_in) contiguous: the weight packed as this GEMM's B operand
    DX,  # (B, C_in, T, H, W), any strides
    c_in,
    c_out,
    t_in,
    t_out,
    height,
    width,
    m_total,  # B * T * H * W (input positions)
    sdb,
    sdc,
    sdt,
    sdh,
    sdw,  # strides of DY in elements
    sxb,
    sxc,
    sxt,
    sxh,
    sxw,  # strides of DX in elements
    KT: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE_T: tl.constexpr,
    FAST: tl.constexpr,  # DY and DX channels-last with C_in, C_out multiples of 128
    I64: tl.constexpr,  # int64 offsets (a tensor spans >= 2**31 elements)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # dX[m, ci] = sum_{tap, co} dY[src(m, tap), co] * W[co, ci, tap]; N = C_in, K = taps x C_out.
    PAD_T: tl.constexpr = KT - STRIDE_T
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < m_total
    n_ok = offs_n < c_in
    w_ = offs_m % width
    h_ = (offs_m // width) % height
    t_ = (offs_m // (width * height)) % t_in
    bb = offs_m // (width * height * t_in)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_cblk = tl.cdiv(c_out, BLOCK_K)
    for kk in range(KT * KH * KW * n_cblk):
        tap = kk // n_cblk
        ck = (kk - tap * n_cblk) * BLOCK_K + offs_k
        ck_ok = ck < c_out
        # input frame t gets output frame (t + PAD_T - i) / STRIDE_T when that is an integer in
        # [0, T_out): for stride 1 the causal pad sits at the back; the spatial kernel is flipped
        num = t_ + PAD_T - tap // (KH * KW)
        to = num // STRIDE_T
        ho = h_ - (tap // KW) % KH + KH // 2
        wo = w_ - tap % KW + KW // 2
        row_ok = m_ok & (num >= 0) & (num % STRIDE_T == 0) & (to < t_out)
        row_ok = row_ok & (ho >= 0) & (ho < height) & (wo >= 0) & (wo < width)
        a = _load_rows(DY, _offset(bb, to, ho, wo, sdb, sdt, sdh, sdw, I64), row_ok, ck, ck_ok, sdc, FAST, I64)
        b = _load_rows(Wp, (tap * c_out + ck) * c_in, ck_ok, offs_n, n_ok, 1, FAST, I64)
        acc = _dot(a, b.to(a.dtype), acc)
    x_row = _offset(bb, t_, h_, w_, sxb, sxt, sxh, sxw, I64)
    _store_rows(DX, x_row, m_ok, offs_n, n_ok, sxc, acc.to(DX.dtype.element_ty), FAST, I64)


@triton.autotune(
    configs=_configs(_GEMM_CONFIGS + (_DW_STRIDED_CONFIG,)),
    key=_KEY,
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _causal_conv3d_bwd_dw_kernel(
    X,  # (B, C_in, T, H, W), any strides
    DY,  # (B, C_out, T_out, H, W), any strides
    DW,  # (SPLIT, C_out, C_in, KT*KH*KW) fp32, contiguous: partial dW of each M-chunk
    DB,  # (SPLIT, C_out) fp32: partial dbias (written when has_bias != 0)
    c_in,
    c_out,
    t_in,
    t_out,
    height,
    width,
    m_total,  # B * T_out * H * W
    m_chunk,  # rows of M per split
    has_bias,
    sxb,
    sxc,
    sxt,
    sxh,
    sxw,  # strides of X in elements
    sdb,
    sdc,
    sdt,
    sdh,
    sdw,  # strides of DY in elements
    KT: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE_T: tl.constexpr,
    FAST: tl.constexpr,  # X and DY channels-last with C_in, C_out multiples of 128
    I64: tl.constexpr,  # int64 offsets (a tensor spans >= 2**31 elements)
    BLOCK_M: tl.constexpr,  # C_out tile
    BLOCK_N: tl.constexpr,  # C_in tile
    BLOCK_K: tl.constexpr,  # output positions per step
):
    # Per tap: dW[co, ci] = sum_m dY[m, co] * X[src(m, tap), ci]; the GEMM is (C_out x M) @ (M x C_in).
    PAD_T: tl.constexpr = KT - STRIDE_T
    TAPS: tl.constexpr = KT * KH * KW
    pid_mn = tl.program_id(0)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    n_tiles_ci = tl.cdiv(c_in, BLOCK_N)
    pid_co = pid_mn // n_tiles_ci
    pid_ci = pid_mn % n_tiles_ci
    i = tap // (KH * KW)
    j = (tap // KW) % KH
    k = tap % KW
    offs_co = pid_co * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ci = pid_ci * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = offs_co < c_out
    ci_ok = offs_ci < c_in
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_start = split * m_chunk
    m_end = tl.minimum(m_start + m_chunk, m_total)
    for m0 in range(m_start, m_end, BLOCK_K):
        offs_m = m0 + tl.arange(0, BLOCK_K)
        m_ok = offs_m < m_end
        wo = offs_m % width
        ho = (offs_m // width) % height
        to = (offs_m // (width * height)) % t_out
        bb = offs_m // (width * height * t_out)
        dy = _load_rows(DY, _offset(bb, to, ho, wo, sdb, sdt, sdh, sdw, I64), m_ok, offs_co, co_ok, sdc, FAST, I64)
        ti = to * STRIDE_T + i - PAD_T
        hi = ho + j - KH // 2
        wi = wo + k - KW // 2
        row_ok = m_ok & (ti >= 0) & (ti < t_in) & (hi >= 0) & (hi < height) & (wi >= 0) & (wi < width)
        xp = _load_rows(X, _offset(bb, ti, hi, wi, sxb, sxt, sxh, sxw, I64), row_ok, offs_ci, ci_ok, sxc, FAST, I64)
        acc = _dot(tl.trans(dy), xp.to(dy.dtype), acc)
        if has_bias != 0:
            db += tl.sum(dy.to(tl.float32), axis=0)
    dw_ptr = DW + split.to(tl.int64) * c_out * c_in * TAPS + offs_co[:, None] * (c_in * TAPS) + offs_ci[None, :] * TAPS
    tl.store(dw_ptr + tap, acc, mask=co_ok[:, None] & ci_ok[None, :])
    if has_bias != 0:
        if (tap == 0) & (pid_ci == 0):
            tl.store(DB + split * c_out + offs_co, db, mask=co_ok)


# --------------------------------------------------------------------------------------------
# host launchers (torch.library custom ops)


def _out_like(x: torch.Tensor, shape) -> torch.Tensor:
    """A (B, C, T, H, W) output in x's memory format (channels_last_3d when x is, else contiguous)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        B, C, T, H, W = shape
        return empty((B, T, H, W, C), x.dtype, x.device).permute(0, 4, 1, 2, 3)
    return empty(tuple(shape), x.dtype, x.device)


def _t_out(t: int, kt: int, stride_t: int) -> int:
    return (t + (kt - stride_t) - kt) // stride_t + 1


def _pack_weight(weight: torch.Tensor, dtype, transpose: bool) -> torch.Tensor:
    """The weight as the GEMM's B operand: (taps, C_in, C_out) contiguous, or (taps, C_out, C_in) for
    dX. A deliberate copy of the (small, reused by every M tile) weight, never of activations."""
    perm = (2, 3, 4, 0, 1) if transpose else (2, 3, 4, 1, 0)
    w = weight.to(dtype).permute(*perm).contiguous()
    return w.view(-1, w.shape[3], w.shape[4])


def _fast(tensors, c_in: int, c_out: int) -> bool:
    """True when every operand is channels-last with 16-element-aligned rows and both channel counts
    are multiples of 128 (the largest channel block): the FAST constexpr specialisation."""
    if c_in % 128 or c_out % 128:
        return False
    for t in tensors:
        strides = (t.stride(0), *t.stride()[2:])
        if t.stride(1) != 1 or any(s % 16 for s in strides) or t.data_ptr() % 16:
            return False
    return True


def _fwd_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride_t: int) -> torch.Tensor:
    B, C_in, T, H, W = x.shape
    C_out, _, KT, KH, KW = weight.shape
    T_out = _t_out(T, KT, stride_t)
    y = _out_like(x, (B, C_out, T_out, H, W))
    M = B * T_out * H * W
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(C_out, meta["BLOCK_N"]))
    wp = _pack_weight(weight, x.dtype, transpose=False)
    _causal_conv3d_fwd_kernel[grid](
        x, wp, wp if bias is None else bias, y,
        C_in, C_out, T, T_out, H, W, M, int(bias is not None),
        *x.stride(), *y.stride(),
        KT=KT, KH=KH, KW=KW, STRIDE_T=stride_t, FAST=_fast((x, y), C_in, C_out), I64=needs_int64(x, y),
    )  # fmt: skip
    return y


causal_conv3d_fwd = torch.library.custom_op("opensora_fast::causal_conv3d_fwd", _fwd_impl, mutates_args=())


@causal_conv3d_fwd.register_fake
def _(x, weight, bias, stride_t):
    B, _, T, H, W = x.shape
    return _out_like(x, (B, weight.shape[0], _t_out(T, weight.shape[2], stride_t), H, W))


def _bwd_dx_impl(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride_t: int) -> torch.Tensor:
    B, C_in, T, H, W = x.shape
    C_out, _, KT, KH, KW = weight.shape
    T_out = dy.shape[2]
    dx = _out_like(x, x.shape)
    M = B * T * H * W
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(C_in, meta["BLOCK_N"]))
    wp = _pack_weight(weight, dy.dtype, transpose=True)
    _causal_conv3d_bwd_dx_kernel[grid](
        dy, wp, dx,
        C_in, C_out, T, T_out, H, W, M,
        *dy.stride(), *dx.stride(),
        KT=KT, KH=KH, KW=KW, STRIDE_T=stride_t, FAST=_fast((dy, dx), C_in, C_out), I64=needs_int64(dy, dx),
    )  # fmt: skip
    return dx


causal_conv3d_bwd_dx = torch.library.custom_op("opensora_fast::causal_conv3d_bwd_dx", _bwd_dx_impl, mutates_args=())


@causal_conv3d_bwd_dx.register_fake
def _(dy, x, weight, stride_t):
    return _out_like(x, x.shape)


_TARGET_PROGRAMS = 264  # two waves of 132 SMs
_DW_ROWS_PER_SPLIT = 4096  # fewest rows of M per dW chunk


def _dw_split(M: int, C_in: int, C_out: int, taps: int) -> int:
    """M-chunks for dW: enough programs to fill the GPU, at most one per _DW_ROWS_PER_SPLIT rows."""
    tiles = taps * triton.cdiv(C_in, 128) * triton.cdiv(C_out, 128)
    return max(1, min(triton.cdiv(_TARGET_PROGRAMS, tiles), triton.cdiv(M, _DW_ROWS_PER_SPLIT), 64))


def _bwd_dw_impl(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool, stride_t: int
) -> tuple[torch.Tensor, torch.Tensor]:
    B, C_in, T, H, W = x.shape
    C_out, _, KT, KH, KW = weight.shape
    T_out = dy.shape[2]
    M = B * T_out * H * W
    taps = KT * KH * KW
    split = _dw_split(M, C_in, C_out, taps)
    m_chunk = triton.cdiv(triton.cdiv(M, split), 64) * 64
    split = triton.cdiv(M, m_chunk)
    dw = empty((split, C_out, C_in, taps), torch.float32, x.device)
    db = empty((split, C_out), torch.float32, x.device)
    grid = lambda meta: (
        triton.cdiv(C_out, meta["BLOCK_M"]) * triton.cdiv(C_in, meta["BLOCK_N"]),
        taps,
        split,
    )
    _causal_conv3d_bwd_dw_kernel[grid](
        x, dy, dw, db,
        C_in, C_out, T, T_out, H, W, M, m_chunk, int(has_bias),
        *x.stride(), *dy.stride(),
        KT=KT, KH=KH, KW=KW, STRIDE_T=stride_t, FAST=_fast((x, dy), C_in, C_out), I64=needs_int64(x, dy, dw),
    )  # fmt: skip
    dw = dw.sum(0).reshape(C_out, C_in, KT, KH, KW).to(weight.dtype)
    db = db.sum(0).to(weight.dtype) if has_bias else dw.new_zeros(0)
    return dw, db


causal_conv3d_bwd_dw = torch.library.custom_op("opensora_fast::causal_conv3d_bwd_dw", _bwd_dw_impl, mutates_args=())


@causal_conv3d_bwd_dw.register_fake
def _(dy, x, weight, has_bias, stride_t):
    db = weight.new_empty((weight.shape[0],) if has_bias else (0,))
    return torch.empty_like(weight, memory_format=torch.contiguous_format), db


class _CausalConv3dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride_t):
        ctx.save_for_backward(x, weight)
        ctx.stride_t = stride_t
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return causal_conv3d_fwd(x, weight, bias, stride_t)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        c_out, c_in = weight.shape[:2]
        if _fast((x,), c_in, c_out) and not _fast((dy,), c_in, c_out):
            # x runs the FAST (channels-last) path: one copy of dy lets dX and dW run it too
            dy = dy.contiguous(memory_format=torch.channels_last_3d)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = causal_conv3d_bwd_dx(dy, x, weight, ctx.stride_t)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            dw, db = causal_conv3d_bwd_dw(dy, x, weight, ctx.has_bias, ctx.stride_t)
            dw = dw if ctx.needs_input_grad[1] else None
            db = db.to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


# --------------------------------------------------------------------------------------------
# public function


def _check(x, weight, bias, stride, padding_mode):
    check_tensor(x, "x", ndim=5)
    check_tensor(weight, "weight", shape=(None, x.shape[1], None, None, None), like=x)
    if x.shape[1] == 0:
        raise ValueError(
            f"x and weight must have at least one input channel (C_in >= 1), got x {tuple(x.shape)} and "
            f"weight {tuple(weight.shape)}"
        )
    if bias is not None:
        check_tensor(bias, "bias", shape=(weight.shape[0],), like=x)
    if not (isinstance(stride, (tuple, list)) and len(stride) == 3 and all(isinstance(s, int) for s in stride)):
        raise ValueError(f"stride must be a tuple of 3 ints (stride_t, 1, 1), got {stride!r}")
    if stride[0] < 1 or tuple(stride[1:]) != (1, 1):
        raise ValueError(f"stride must be (stride_t >= 1, 1, 1) (no spatial stride), got {tuple(stride)}")
    if padding_mode not in ("zeros", "constant"):
        raise ValueError(f"padding_mode must be 'zeros' (Open-Sora's constant pad), got {padding_mode!r}")
    kt, kh, kw = weight.shape[2:]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"weight's spatial kernel must be odd (symmetric padding k//2), got {(kh, kw)}")
    if kt < stride[0]:
        raise ValueError(f"weight's temporal kernel k_t={kt} must be >= stride_t={stride[0]}")
    if x.shape[2] < stride[0]:
        raise ValueError(f"x must have at least stride_t={stride[0]} frames, got shape {tuple(x.shape)}")


def causal_conv3d(x, weight, bias=None, *, stride=(1, 1, 1), padding_mode="zeros"):
    """Causal 3D convolution: x (B, C_in, T, H, W), weight (C_out, C_in, k_t, k_h, k_w), bias (C_out,)
    -> (B, C_out, T // stride_t, H, W) in x's memory format, in x's dtype (weight and bias are cast
    to it, as the reference does)."""
    _check(x, weight, bias, stride, padding_mode)
    stride = tuple(stride)
    if not use_triton(x, weight, bias):
        return reference.causal_conv3d_ref(x, weight, bias, stride, padding_mode)
    if x.dtype not in _TL_DTYPE:
        raise ValueError(f"x must be fp32, fp16 or bf16 for the Triton kernels, got {x.dtype}")
    # the kernels read bias with unit stride (the weight is repacked anyway): copy any other (C_out,) view
    bias = None if bias is None else bias.contiguous()
    return _CausalConv3dFunction.apply(x, weight, bias, stride[0])


__all__ = ["causal_conv3d"]
