"""Fused attention for STDiT3: ``flash_attn_func``, ``self_attention`` (q/k RMSNorm + RoPE fused,
read straight from the qkv Linear output) and ``cross_attention`` (varlen packed text), forward and
backward. Kernels in ``_attention_kernels.py``; temporal self-attention with T <= 128 and head_dim 64 / 72
runs the block-diagonal packed kernels of ``_attention_temporal.py`` (whole sequences per program,
RMSNorm + RoPE fused, no scratch); PyTorch references in ``reference.py``.

Launch geometry: every grid is one-dimensional (x < 2^31; ``_grid_x`` raises a ValueError beyond), so no
supported shape reaches CUDA's 65,535 limit on grid y/z (the generic temporal path at 720p, B = 2,
has B*S*H = 115,200 sequence-heads). Each generic kernel gets ``ALIGNED=True`` when all its operands are
16-byte aligned with strides that are multiples of 8 elements (16-byte vector loads/stores and async
copies; the model's qkv layout always is), else a correct 2-byte path. A launch never reads memory it
writes (the autotuner may launch a config several times on the same buffers).

Cross-attention and autotuning: the autotune key of the varlen kernels uses the next power of two of
the longest text (``_lk_bucket``), not its exact length, so a sampling run tunes once per bucket rather
than once per new caption length; ``cu_seqlens(lens, device)`` builds the cumulative lengths once per
(lengths, device) and caches the device tensor (64 entries), so repeated calls with the same text
lengths (every block and step of a sampling run) do no host->device copy and can be captured in a CUDA
graph once warm. Autotune results are also kept on disk across processes: ``triton.autotune(...,
cache_results=True)`` (Triton 3.6 stores the timings in its cache directory keyed by the kernel source,
the GPU, the configs and the key); the backward has one config per head-dim class, so it never tunes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
from opensora_fast.kernels import reference as ref
from opensora_fast.kernels._attention_kernels import (
    _attention_bwd_dkdv_kernel,
    _attention_bwd_dq_kernel,
    _attention_bwd_kernel,
    _attention_bwd_preprocess_kernel,
    _attention_fwd_kernel,
    _dq_reduce_kernel,
    _qk_norm_rope_bwd_kernel,
    _qk_norm_rope_fwd_kernel,
)
from opensora_fast.kernels._attention_temporal import (
    _temporal_attention_bwd_kernel,
    _temporal_attention_bwd_kv_kernel,
    _temporal_attention_bwd_q_kernel,
    _temporal_attention_fwd_kernel,
)
from opensora_fast.kernels._record import sm_count
from opensora_fast.kernels._utils import (
    autotune_configs,
    check_tensor,
    empty,
    interpreting,
    next_pow2,
    use_triton,
)

LOG2E = 1.4426950408889634
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)

# --------------------------------------------------------------------------------------------
# autotuned kernels


def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Configs per head-dim class ("small": padded width <= 96, e.g. D = 72 -> 64 + 16; "large": up to 128),
# each compiled for sm_90 from a real launch (no spills, shared memory <= 227 KiB).
_FWD_TABLE = {
    # 128 x 64 on one warpgroup (two 64-row wgmma per product, 254 registers, no spill): estimated 14-17%
    # faster than on two warpgroups at the model's shapes; the autotuner decides on the GPU
    "small": [_cfg(128, 64, 8, 3), _cfg(128, 64, 4, 3), _cfg(64, 64, 4, 3)],
    "large": [_cfg(128, 64, 8, 3)],  # (64, 64, 8 warps) ran 67% of its wgmma work at N = 32
}
# backward (one fused kernel): 8 warps over 128 keys x 64 queries, so S^T, dP^T, dV and dK run as
# 64x64 wgmma per warpgroup (dQ, M = 64 queries, is split into 64x32); 4 warps at 64 x 64 (all 64-wide)
# spilled 24-208 B on sm_90, 8 warps at 64 x 64 is all 64x32. Large head dims: 32 queries per step.
_BWD_TABLE = {"small": [_cfg(64, 128, 8, 2)], "large": [_cfg(32, 64, 8, 2)]}
# Split backward (the default, see _launch_bwd): one warpgroup per 64 x 64 tile pair, so every product is
# 64-row wgmma over its whole N.
# Large head dims (up to 128): the dK/dV kernel's two 64 x 128 fp32 accumulators leave no room for a second
# stage (2 stages spilled 32 B; 8 warps over 128 keys 8 B), so its loop loads without async copies.
_DKDV_TABLE = {"small": [_cfg(64, 64, 4, 2)], "large": [_cfg(64, 64, 4, 1)]}
_DQ_TABLE = {"small": [_cfg(64, 64, 4, 2)], "large": [_cfg(64, 64, 4, 2)]}
# The backward design: "split" (a dK/dV kernel and a dQ kernel, 7 matmuls per tile pair, no partials) or
# "fused" (one kernel, 5 matmuls, fp32 dQ partials); the gate estimates both (kernels._sm90_cases).
BWD_DESIGN = "split"
# Under the interpreter: small blocks, so that tiny test shapes still run several blocks.
_INTERP_CFG = [_cfg(16, 16, 4, 1)]
_PRE_BLOCK_M = 64
_ELEMWISE_BLOCK_M = 16  # head-rows per program of the q/k pre-pass and prologue-backward kernels
# Autotune keys. Lk is bucketed for varlen (next power of two of the longest text), so a new caption
# length does not re-tune; n_split is part of the backward's problem.
_FWD_KEY = ["Lq", "Lk", "D", "CAUSAL", "VARLEN", "ALIGNED"]
_BWD_KEY = ["Lq", "Lk", "causal", "n_split", "D", "VARLEN", "ALIGNED"]
_SPLIT_KEY = ["Lq", "Lk", "causal", "D", "VARLEN", "ALIGNED"]
_MAX_GRID_X = 2**31 - 1


def _dclass(D: int) -> str:
    sp = DSplit.of(D)
    return "large" if sp.BD0 + (sp.BD1 if sp.HAS_D1 else 0) > 96 else "small"


def _configs(cfgs):
    return autotune_configs(_INTERP_CFG if interpreting() else cfgs)


@functools.cache
def _tuned(kind: str, dclass: str):
    """The autotuned launcher of one kernel for one head-dim class. Autotune results are cached on disk
    across processes (``cache_results=True``: Triton's cache dir, keyed by kernel source, GPU and key)."""
    if kind == "fwd":
        return triton.autotune(_configs(_FWD_TABLE[dclass]), key=_FWD_KEY, cache_results=True)(_attention_fwd_kernel)
    if kind == "dkdv":
        cfgs, fn = _DKDV_TABLE[dclass], _attention_bwd_dkdv_kernel
    elif kind == "dq":
        cfgs, fn = _DQ_TABLE[dclass], _attention_bwd_dq_kernel
    else:
        cfgs, fn = _BWD_TABLE[dclass], _attention_bwd_kernel
    return triton.autotune(_configs(cfgs), key=_SPLIT_KEY if kind != "bwd" else _BWD_KEY, cache_results=True)(fn)


def _grid_x(n: int) -> tuple[int]:
    """A one-dimensional grid (CUDA: x < 2^31, no y/z limit of 65,535 involved)."""
    if n > _MAX_GRID_X:
        raise ValueError(f"attention problem too large: {n} programs > CUDA's grid limit {_MAX_GRID_X}")
    return (n,)


# --------------------------------------------------------------------------------------------
# geometry: how a (Z, L, H, D) operand sits in memory


@dataclass(frozen=True)
class Seq:
    """Element (z, l, h, d) of an attention operand sits at
    ``(z // Z2) * s1 + (z % Z2) * s2 + l * sm + h * sh + d`` (Z2 belongs to the problem)."""

    s1: int
    s2: int
    sm: int
    sh: int

    def args(self) -> tuple[int, int, int, int]:
        return (self.s1, self.s2, self.sm, self.sh)


@dataclass(frozen=True)
class Problem:
    Z: int  # number of sequences
    Z2: int  # sequence z = (z // Z2, z % Z2) for the two outer strides
    H: int
    Lq: int
    Lk: int  # keys per sequence (with varlen: the autotune bucket of the longest, unused by the kernels)
    D: int
    causal: bool = False
    varlen: bool = False


@dataclass(frozen=True)
class DSplit:
    """head_dim as a power-of-two piece BD0 plus an optional masked piece BD1 (see _attention_kernels)."""

    BD0: int
    BD1: int
    HAS_D1: bool

    @staticmethod
    def of(D: int) -> DSplit:
        if D <= 16:
            return DSplit(16, 16, False)
        bd0 = 1 << (D.bit_length() - 1)
        rem = D - bd0
        return DSplit(bd0, max(16, next_pow2(rem)) if rem else 16, rem > 0)

    def kwargs(self) -> dict:
        return {"BD0": self.BD0, "BD1": self.BD1, "HAS_D1": self.HAS_D1}


def _flash_seq(t: torch.Tensor) -> Seq:  # (B, L, H, D)
    return Seq(t.stride(0), 0, t.stride(1), t.stride(2))


def _token_seq(t: torch.Tensor, layout: str, S: int, D: int) -> Seq:
    """A (B, T*S, *) token tensor (qkv, its column views, the output) seen as sequences."""
    if layout == "spatial":  # sequence (b, t): rows are the S tokens of frame t
        return Seq(t.stride(0), S * t.stride(1), t.stride(1), D)
    return Seq(t.stride(0), t.stride(1), S * t.stride(1), D)  # sequence (b, s): rows are the T frames


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _is_aligned(*operands) -> bool:
    """(tensor, Seq) pairs: every tensor 16-byte aligned and every stride a multiple of 8 elements, so the
    kernels may take 16-byte vector loads (``ALIGNED``). Real tensors only (inside the custom ops)."""
    return all(t.data_ptr() % 16 == 0 and all(st % 8 == 0 for st in s.args()) for t, s in operands)


_CU_DUMMY: dict = {}


def _cu_dummy(device) -> torch.Tensor:
    """An int32 stand-in for CU_K without varlen (never read: VARLEN is a constexpr), one per device."""
    t = _CU_DUMMY.get(device)
    if t is None:
        t = _CU_DUMMY[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return t


def _qk_prepass(q, k, qs, ks, p: Problem, eps, qw, kw, cos, sin):
    """Transformed (RMSNorm [+ RoPE]) q and k as contiguous (Z, L, H, D) scratch, and their Seq."""
    qt = empty((p.Z, p.Lq, p.H, p.D), q.dtype, q.device)
    kt = empty((p.Z, p.Lq, p.H, p.D), q.dtype, q.device)
    ts = Seq(p.Z2 * p.Lq * p.H * p.D, p.Lq * p.H * p.D, p.H * p.D, p.D)
    rope = cos is not None
    grid = _grid_x(triton.cdiv(p.Lq, _ELEMWISE_BLOCK_M) * p.Z * p.H)
    _qk_norm_rope_fwd_kernel[grid](
        q, k, qt, kt, qw, kw, cos if rope else qw, sin if rope else qw,
        p.Z2, *qs.args(), *ks.args(), p.H, p.Lq, p.D, cos.stride(0) if rope else 0, eps,
        ROPE=rope, ALIGNED=_is_aligned((q, qs), (k, ks)), BLOCK_M=_ELEMWISE_BLOCK_M, num_warps=4,
        **DSplit.of(p.D).kwargs(),
    )  # fmt: skip
    return qt, kt, ts


def _launch_fwd(q, k, v, o, qs, ks, vs, os_, p: Problem, scale, eps, qw=None, kw=None, cos=None, sin=None,
                cu=None):  # fmt: skip
    lse = empty((p.Z * p.H, p.Lq), torch.float32, q.device)
    if p.Z * p.H * p.Lq == 0:
        return lse
    if qw is not None:  # self-attention: q/k normalised (and rotated) once, into scratch
        q, k, ts = _qk_prepass(q, k, qs, ks, p, eps, qw, kw, cos, sin)
        qs = ks = ts
    aligned = _is_aligned((q, qs), (k, ks), (v, vs), (o, os_))
    grid = lambda META: _grid_x(triton.cdiv(p.Lq, META["BLOCK_M"]) * p.Z * p.H)
    _tuned("fwd", _dclass(p.D))[grid](
        q, k, v, o, lse, cu if p.varlen else _cu_dummy(q.device),
        p.Z2, *qs.args(), *ks.args(), *vs.args(), *os_.args(), p.H, p.Lq, p.Lk, scale * LOG2E,
        D=p.D, CAUSAL=p.causal, VARLEN=p.varlen, ALIGNED=aligned, DOT_PREC=_dot_prec(q.dtype),
        **DSplit.of(p.D).kwargs(),
    )  # fmt: skip
    return lse


def _num_programs(n_blocks: int, device: torch.device) -> int:
    sms = sm_count(device)
    if sms is None:
        return max(1, min(n_blocks, 4))
    return max(1, min(n_blocks, 4 * sms))


_DQ_PARTIAL_BUDGET = 1 << 30  # bytes of fp32 dQ partials beyond the first split


def _n_split(p: Problem, max_lk: int, device: torch.device) -> int:
    """Key splits per (sequence, head) in the backward. Each split is one more program per (sequence,
    head) and one more fp32 dQ partial of q's shape: on a GPU, enough splits for two waves of programs,
    at most one per key block, and the extra partials within 1 GiB (720p-2s spatial: 2 splits of 249 MB;
    720p-16s cross-attention, 4 GB per partial: 1). Two under the interpreter, to test the reduction."""
    sms = sm_count(device)
    if sms is None:  # interpreter: always two splits (also a split without key blocks at tiny shapes)
        return 2
    blocks = max(1, triton.cdiv(max_lk, _BWD_TABLE[_dclass(p.D)][0].kwargs["BLOCK_N"]))
    budget = 1 + _DQ_PARTIAL_BUDGET // max(1, p.Z * p.H * p.Lq * p.D * 4)
    return max(1, min(blocks, triton.cdiv(2 * sms, p.Z * p.H), budget))


def _launch_bwd(do, q, k, v, o, lse, dq, dk, dv, qs, ks, vs, os_, dos, dqs, dks, dvs, p: Problem, scale, eps,
                qw=None, kw=None, cos=None, sin=None, cu=None, max_lk=None, n_split=None):  # fmt: skip
    """Writes dq, dk, dv; returns (dqw, dkw) fp32 (None without norm). n_split: key splits (None: _n_split).

    With norm (self-attention): the pre-pass writes the transformed q and k to scratch (Z, L, H, D); the
    attention backward reads those and writes the gradients w.r.t. the transformed q / k to separate
    scratch (no kernel reads what it writes: a launch repeated by the autotuner gives the same result);
    the prologue-backward kernel then maps them through RoPE^T and RMSNorm to dqkv and the weights."""
    dev = q.device
    norm, rope = qw is not None, cos is not None
    if p.Z * p.H * p.Lq == 0:
        z = torch.zeros(p.D, dtype=torch.float32, device=dev)
        return (z, z.clone()) if norm else (None, None)
    split = DSplit.of(p.D).kwargs()
    delta = empty((p.Z * p.H, p.Lq), torch.float32, dev)
    stride_cs = cos.stride(0) if rope else 0
    cs = (cos if rope else delta, sin if rope else delta)
    _attention_bwd_preprocess_kernel[_grid_x(triton.cdiv(p.Lq, _PRE_BLOCK_M) * p.Z * p.H)](
        o, do, delta, p.Z2, *os_.args(), *dos.args(), p.H, p.Lq, p.D,
        ALIGNED=_is_aligned((o, os_), (do, dos)), BLOCK_M=_PRE_BLOCK_M, **split,
    )  # fmt: skip
    if norm:
        qt, kt, ts = _qk_prepass(q, k, qs, ks, p, eps, qw, kw, cos, sin)
        lq, lqs, lk_, lks = qt, ts, kt, ts
        dqt = empty((p.Z, p.Lq, p.H, p.D), q.dtype, dev)
        dkt = empty((p.Z, p.Lq, p.H, p.D), q.dtype, dev)
        gq, gqs, gk, gks = dqt, ts, dkt, ts  # where the gradients w.r.t. the transformed q/k go
    else:
        lq, lqs, lk_, lks = q, qs, k, ks
        gq, gqs, gk, gks = dq, dqs, dk, dks
    lk = max_lk if p.varlen else p.Lk
    dclass = _dclass(p.D)
    if BWD_DESIGN == "split" and dclass in _DKDV_TABLE:
        # dK/dV per key block, dQ per query block: every program of a (sequence, head) reads the same q, dO
        # (resp. k, v) at the same time, where the fused kernel's programs each stream their whole sequence
        # and an fp32 dQ partial once per key block
        aligned = _is_aligned((lq, lqs), (lk_, lks), (v, vs), (do, dos), (gk, gks), (dv, dvs), (gq, gqs))
        cu_k = cu if p.varlen else _cu_dummy(dev)
        common = (p.Z2, *lqs.args(), *lks.args(), *vs.args(), *dos.args())
        tail = (int(p.causal), scale * LOG2E, scale)
        meta = dict(D=p.D, VARLEN=p.varlen, ALIGNED=aligned, DOT_PREC=_dot_prec(q.dtype), **split)
        zh = p.Z * p.H
        _tuned("dkdv", dclass)[lambda a: _grid_x(zh * triton.cdiv(lk, a["BLOCK_N"]))](
            lq, lk_, v, do, gk, dv, lse, delta, cu_k, *common, *gks.args(), *dvs.args(), p.H, p.Lq, p.Lk, lk, *tail,
            **meta,
        )  # fmt: skip
        _tuned("dq", dclass)[lambda a: _grid_x(zh * triton.cdiv(p.Lq, a["BLOCK_M"]))](
            lq, lk_, v, do, gq, lse, delta, cu_k, *common, *gqs.args(), p.H, p.Lq, p.Lk, *tail, **meta
        )
    else:
        _launch_bwd_fused(lq, lk_, v, do, gq, gk, dv, lse, delta, cu, lqs, lks, vs, dos, gqs, gks, dvs, p, scale, lk,
                          n_split, q.dtype)  # fmt: skip
    if not norm:
        return None, None
    n_rows = p.Z * p.Lq * p.H
    n_prog = _num_programs(triton.cdiv(n_rows, _ELEMWISE_BLOCK_M), dev)
    dws = []
    for x, xs, g, dx, dxs, w in ((q, qs, dqt, dq, dqs, qw), (k, ks, dkt, dk, dks, kw)):
        part = empty((n_prog, p.D), torch.float32, dev)
        _qk_norm_rope_bwd_kernel[(n_prog,)](
            x, g, dx, part, w, *cs, p.Z2, *xs.args(), *dxs.args(), p.H, p.Lq, p.D, n_rows, stride_cs, eps,
            ROPE=rope, ALIGNED=_is_aligned((x, xs), (dx, dxs)), BLOCK_M=_ELEMWISE_BLOCK_M, num_warps=4, **split,
        )  # fmt: skip
        dws.append(part.sum(0))
    return dws[0], dws[1]


def _launch_bwd_fused(lq, lk_, v, do, gq, gk, dv, lse, delta, cu, lqs, lks, vs, dos, gqs, gks, dvs, p: Problem, scale,
                      lk, n_split, dtype):  # fmt: skip
    """The fused backward (5 matmuls per tile pair, fp32 dQ partials per key split, summed in split order)."""
    dev = lq.device
    split = DSplit.of(p.D).kwargs()
    if n_split is None:
        n_split = _n_split(p, lk, dev)
    dqp = empty((n_split, p.Z * p.H, p.Lq, p.D), torch.float32, dev)
    aligned = _is_aligned((lq, lqs), (lk_, lks), (v, vs), (do, dos), (gk, gks), (dv, dvs))
    _tuned("bwd", _dclass(p.D))[_grid_x(p.Z * p.H * n_split)](
        lq, lk_, v, do, gk, dv, dqp, lse, delta, cu if p.varlen else _cu_dummy(dev),
        p.Z2, *lqs.args(), *lks.args(), *vs.args(), *dos.args(), *gks.args(), *dvs.args(),
        p.H, p.Lq, p.Lk, int(p.causal), scale * LOG2E, scale, n_split,
        D=p.D, VARLEN=p.varlen, ALIGNED=aligned, DOT_PREC=_dot_prec(dtype), **split,
    )  # fmt: skip
    _dq_reduce_kernel[_grid_x(triton.cdiv(p.Lq, _PRE_BLOCK_M) * p.Z * p.H)](
        dqp, gq, p.Z2, *gqs.args(), p.H, p.Lq, p.Z * p.H, n_split, scale,
        D=p.D, ALIGNED=_is_aligned((gq, gqs)), BLOCK_M=_PRE_BLOCK_M, num_warps=4, **split,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# custom ops: flash_attn_func


@torch.library.custom_op("opensora_fast::attention_fwd", mutates_args=())
def _flash_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    B, Nq, H, D = q.shape
    o = empty((B, Nq, H, D), q.dtype, q.device)
    p = Problem(B, 1, H, Nq, k.shape[1], D, causal)
    lse = _launch_fwd(q, k, v, o, _flash_seq(q), _flash_seq(k), _flash_seq(v), _flash_seq(o), p, softmax_scale, 0.0)
    return o, lse


@_flash_fwd_op.register_fake
def _(q, k, v, softmax_scale, causal):
    B, Nq, H, D = q.shape
    return q.new_empty((B, Nq, H, D)), q.new_empty((B * H, Nq), dtype=torch.float32)


def _unit_last(g: torch.Tensor) -> torch.Tensor:
    """An upstream gradient with unit stride along its last dim, as the generic backward kernels read it:
    g itself (autograd's usual case), else one explicit copy (e.g. the stride-0 gradient of ``out.sum()``)."""
    return g if g.stride(-1) == 1 else g.contiguous()


@torch.library.custom_op("opensora_fast::attention_bwd", mutates_args=())
def _flash_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    softmax_scale: float, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    B, Nq, H, D = q.shape
    do = _unit_last(do)
    dq = empty(q.shape, q.dtype, q.device)
    dk = empty(k.shape, k.dtype, k.device)
    dv = empty(v.shape, v.dtype, v.device)
    p = Problem(B, 1, H, Nq, k.shape[1], D, causal)
    f = _flash_seq
    _launch_bwd(do, q, k, v, o, lse, dq, dk, dv, f(q), f(k), f(v), f(o), f(do), f(dq), f(dk), f(dv), p,
                softmax_scale, 0.0)  # fmt: skip
    return dq, dk, dv


@_flash_bwd_op.register_fake
def _(do, q, k, v, o, lse, softmax_scale, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class FlashAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, causal):
        o, lse = torch.ops.opensora_fast.attention_fwd(q, k, v, softmax_scale, causal)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.softmax_scale, ctx.causal = softmax_scale, causal
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.opensora_fast.attention_bwd(do, q, k, v, o, lse, ctx.softmax_scale, ctx.causal)
        return dq, dk, dv, None, None


# --------------------------------------------------------------------------------------------
# custom ops: self_attention


def _self_problem(qkv, num_heads, num_frames, layout) -> tuple[Problem, int, int]:
    B, N, C3 = qkv.shape
    C = C3 // 3
    D = C // num_heads
    T = num_frames
    S = N // T
    Z2, L = (T, S) if layout == "spatial" else (S, T)
    return Problem(B * Z2, Z2, num_heads, L, L, D), S, C


@torch.library.custom_op("opensora_fast::self_attention_fwd", mutates_args=())
def _self_fwd_op(
    qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor | None,
    sin: torch.Tensor | None, num_heads: int, num_frames: int, layout: str, eps: float, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    p, S, C = _self_problem(qkv, num_heads, num_frames, layout)
    B, N, _ = qkv.shape
    out = empty((B, N, C), qkv.dtype, qkv.device)
    q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]
    sq = _token_seq(qkv, layout, S, p.D)
    lse = _launch_fwd(q, k, v, out, sq, sq, sq, _token_seq(out, layout, S, p.D), p, softmax_scale, eps,
                      q_weight, k_weight, cos, sin)  # fmt: skip
    return out, lse


@_self_fwd_op.register_fake
def _(qkv, q_weight, k_weight, cos, sin, num_heads, num_frames, layout, eps, softmax_scale):
    p, S, C = _self_problem(qkv, num_heads, num_frames, layout)
    B, N, _ = qkv.shape
    return qkv.new_empty((B, N, C)), qkv.new_empty((p.Z * p.H, p.Lq), dtype=torch.float32)


@torch.library.custom_op("opensora_fast::self_attention_bwd", mutates_args=())
def _self_bwd_op(
    dout: torch.Tensor, qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
    cos: torch.Tensor | None, sin: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, num_heads: int,
    num_frames: int, layout: str, eps: float, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    p, S, C = _self_problem(qkv, num_heads, num_frames, layout)
    dout = _unit_last(dout)
    dqkv = empty(qkv.shape, qkv.dtype, qkv.device)
    q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]
    dq, dk, dv = dqkv[..., :C], dqkv[..., C : 2 * C], dqkv[..., 2 * C :]
    sq, sd = _token_seq(qkv, layout, S, p.D), _token_seq(dqkv, layout, S, p.D)
    so, sdo = _token_seq(out, layout, S, p.D), _token_seq(dout, layout, S, p.D)
    dqw, dkw = _launch_bwd(dout, q, k, v, out, lse, dq, dk, dv, sq, sq, sq, so, sdo, sd, sd, sd, p,
                           softmax_scale, eps, q_weight, k_weight, cos, sin)  # fmt: skip
    return dqkv, dqw.to(q_weight.dtype), dkw.to(k_weight.dtype)


@_self_bwd_op.register_fake
def _(dout, qkv, q_weight, k_weight, cos, sin, out, lse, num_heads, num_frames, layout, eps, softmax_scale):
    return torch.empty_like(qkv), torch.empty_like(q_weight), torch.empty_like(k_weight)


class SelfAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, q_weight, k_weight, cos, sin, num_heads, num_frames, layout, eps, softmax_scale):
        out, lse = torch.ops.opensora_fast.self_attention_fwd(
            qkv, q_weight, k_weight, cos, sin, num_heads, num_frames, layout, eps, softmax_scale
        )
        ctx.save_for_backward(qkv, q_weight, k_weight, cos, sin, out, lse)
        ctx.args = (num_heads, num_frames, layout, eps, softmax_scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, q_weight, k_weight, cos, sin, out, lse = ctx.saved_tensors
        dqkv, dqw, dkw = torch.ops.opensora_fast.self_attention_bwd(
            dout, qkv, q_weight, k_weight, cos, sin, out, lse, *ctx.args
        )
        return dqkv, dqw, dkw, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# custom ops: temporal self-attention, block-diagonal packed tiles (_attention_temporal.py)


@dataclass(frozen=True)
class TemporalTile:
    """T padded to TP frames; BLOCK // TP whole sequences of one head per program (the key tile). Up to
    64 frames the tile is 64 rows and forward and backward each take it at once (4 warps). For 65..128 frames
    (TP = 128, one sequence per tile) the forward takes all 128 queries at once too (8 warps: each
    warpgroup 64 query rows, so S and P V are 64x128 / 64x64 wgmma; 192 registers, stack 0 on sm_90,
    bf16, D=72; in two 64-row steps P V was split into 64x32 / 64x8) and stores each row's lse; the backward
    is two launches of BLOCK // BLOCK_M programs per tile, 4 warps each (every product 64-row wgmma over its
    whole N): dQ per 64 query rows (keys 64 at a time; also writing delta = rowsum(dO * O) and the rows'
    normalised queries), then dK / dV per 64 keys (the two 64-query blocks unrolled). The earlier design
    (dK / dV over all 128 keys in 32-row query steps, computing lse and delta itself, then dQ at 8 warps)
    ran HGMMA 64x32 / 64x16 / 64x8 and was estimated 3.16x its HBM floor at 720p 16 s (now 2.14x)."""

    TP: int
    BLOCK: int
    BLOCK_M: int
    fwd_warps: int

    @property
    def split_bwd(self) -> bool:
        return self.BLOCK_M != self.BLOCK

    @staticmethod
    def of(T: int) -> TemporalTile:
        TP = max(16, next_pow2(T))
        if TP <= _TEMPORAL_BLOCK:
            return TemporalTile(TP, _TEMPORAL_BLOCK, _TEMPORAL_BLOCK, 4)
        return TemporalTile(TP, TP, _TEMPORAL_BLOCK, _TEMPORAL_WARPS)


# Up to 64 frames (BLOCK 64) forward and backward run 4 warps: one warpgroup over the 64-row tile makes every
# product 64x64 wgmma (+ 64x16 for the 8 head-dim columns past 64; 8 warps split N into 64x32 / 64x8). The
# backward stores dV, then dK, then dQ as each is complete (``_bwd_one_step``): sm_90, D 72 / 64, bf16 / fp16,
# with and without RoPE: 180-255 registers, stack 0 (the loop form with dK / dV live to the end spilled 408 B
# at 4 warps). At TP = 128 the forward runs 8 warps (4 spilled 56 B); the split backward's two kernels 4 warps
# (D 72 / 64, bf16 / fp16, RoPE on / off: 188-255 registers, stack 0; the dK / dV kernel's query loop with 2
# stages spilled 40 B, as 1 stage it was a plain-LDG loop: it is unrolled).
_TEMPORAL_BLOCK = 64
_TEMPORAL_WARPS = 8
_TEMPORAL_MAX_T = 128
_TEMPORAL_TPS = (16, 32, 64, 128)
_TEMPORAL_D = (72, 64)


def _strides_ok(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and all(st % 8 == 0 for st in t.stride()[:-1])


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself when its rows start 16-byte aligned, as the packed kernels' vector-load hints assume
    (D and C are multiples of 8 for every D in _TEMPORAL_D); otherwise one explicit contiguous copy:
    a view starting off a 16-byte boundary, or a stride-0 gradient such as that of ``out.sum()``.
    Runs inside the custom ops (real tensors; data_ptr cannot be traced)."""
    if t.data_ptr() % 16 == 0 and _strides_ok(t):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def temporal_supported(qkv: torch.Tensor, T: int, D: int) -> bool:
    """Whether layout="temporal" runs the packed kernels (else the generic flash schedule): T <= 128,
    D in (72, 64), qkv row strides multiples of 8 elements."""
    return T <= _TEMPORAL_MAX_T and D in _TEMPORAL_D and _strides_ok(qkv)


def _temporal_geometry(qkv, num_heads, num_frames):
    B, N, C3 = qkv.shape
    C = C3 // 3
    T = num_frames
    S = N // T
    tile = TemporalTile.of(T)
    n_stiles = triton.cdiv(S, tile.BLOCK // tile.TP)
    return B, N, C, C // num_heads, T, S, tile, n_stiles, B * n_stiles * num_heads


def _rope_args(cos, sin, dummy):
    """The packed kernels' RoPE tables: rows 16-byte aligned like qkv's (their tile loads carry the same
    vector hints), else one contiguous copy each (T x D: small)."""
    if cos is None:
        return dummy, dummy, 0, False
    cos, sin = _aligned(cos), _aligned(sin)
    if cos.stride() != sin.stride():
        sin = sin.clone(memory_format=torch.contiguous_format)
        cos = cos.clone(memory_format=torch.contiguous_format)
    return cos, sin, cos.stride(0), True


@torch.library.custom_op("opensora_fast::temporal_attention_fwd", mutates_args=())
def _temporal_fwd_op(
    qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor | None,
    sin: torch.Tensor | None, num_heads: int, num_frames: int, eps: float, softmax_scale: float, stats: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(out, lse): lse (tiles, 128) fp32 log2 units for the split backward (65..128 frames, when ``stats``: a
    backward will run), else empty."""
    B, N, C, D, T, S, tile, n_stiles, n_prog = _temporal_geometry(qkv, num_heads, num_frames)
    qkv = _aligned(qkv)
    out = empty((B, N, C), qkv.dtype, qkv.device)
    stats = stats and tile.split_bwd
    lse = empty((n_prog, tile.BLOCK) if stats else (0,), torch.float32, qkv.device)
    if n_prog == 0:  # B == 0
        return out, lse
    cs, sn, stride_cs, rope = _rope_args(cos, sin, q_weight)
    _temporal_attention_fwd_kernel[_grid_x(n_prog)](
        qkv, out, q_weight, k_weight, cs, sn, lse if stats else q_weight, qkv.stride(0), qkv.stride(1),
        out.stride(0), out.stride(1), S, T, C, num_heads, n_stiles, stride_cs, softmax_scale * LOG2E, eps,
        D=D, ROPE=rope, TP=tile.TP, BLOCK=tile.BLOCK, BLOCK_M=tile.BLOCK, DOT_PREC=_dot_prec(qkv.dtype),
        STATS=stats, num_warps=tile.fwd_warps, num_stages=1, **DSplit.of(D).kwargs(),
    )  # fmt: skip
    return out, lse


@_temporal_fwd_op.register_fake
def _(qkv, q_weight, k_weight, cos, sin, num_heads, num_frames, eps, softmax_scale, stats):
    B, N, C, D, T, S, tile, n_stiles, n_prog = _temporal_geometry(qkv, num_heads, num_frames)
    lse = qkv.new_empty((n_prog, tile.BLOCK) if stats and tile.split_bwd else (0,), dtype=torch.float32)
    return qkv.new_empty((B, N, C)), lse


@torch.library.custom_op("opensora_fast::temporal_attention_bwd", mutates_args=())
def _temporal_bwd_op(
    dout: torch.Tensor, qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
    cos: torch.Tensor | None, sin: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, num_heads: int,
    num_frames: int, eps: float, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    B, N, C, D, T, S, tile, n_stiles, n_prog = _temporal_geometry(qkv, num_heads, num_frames)
    qkv, dout = _aligned(qkv), _aligned(dout)
    dqkv = empty(qkv.shape, qkv.dtype, qkv.device)
    n_steps = tile.BLOCK // tile.BLOCK_M
    dwq = empty((n_prog * n_steps, D), torch.float32, qkv.device)
    dwk = empty((n_prog * (n_steps if tile.split_bwd else 1), D), torch.float32, qkv.device)
    if n_prog == 0:  # B == 0
        zero = torch.zeros_like(q_weight)
        return dqkv, zero, zero.clone()
    cs, sn, stride_cs, rope = _rope_args(cos, sin, q_weight)
    args = (S, T, C, num_heads, n_stiles, stride_cs, softmax_scale * LOG2E, softmax_scale, eps)
    kw = dict(D=D, ROPE=rope, TP=tile.TP, BLOCK=tile.BLOCK, DOT_PREC=_dot_prec(qkv.dtype), **DSplit.of(D).kwargs())
    strides = (qkv.stride(0), qkv.stride(1))
    if tile.split_bwd:
        if lse.shape != (n_prog, tile.BLOCK):
            raise RuntimeError("temporal attention backward at 65..128 frames without the forward's lse")
        out = _aligned(out)
        delta = empty((n_prog, tile.BLOCK), torch.float32, qkv.device)
        qn = empty((n_prog, tile.BLOCK, D), qkv.dtype, qkv.device)
        grid = _grid_x(n_prog * n_steps)
        _temporal_attention_bwd_q_kernel[grid](
            qkv, out, dout, dqkv, dwq, q_weight, k_weight, cs, sn, lse, delta, qn, *strides, out.stride(0),
            out.stride(1), dout.stride(0), dout.stride(1), dqkv.stride(0), dqkv.stride(1), *args,
            BLOCK_M=tile.BLOCK_M, num_warps=4, num_stages=2, **kw,
        )  # fmt: skip
        _temporal_attention_bwd_kv_kernel[grid](
            qkv, dout, dqkv, dwk, k_weight, cs, sn, lse, delta, qn, *strides, dout.stride(0), dout.stride(1),
            dqkv.stride(0), dqkv.stride(1), *args, BLOCK_M=tile.BLOCK_M, num_warps=4, num_stages=1, **kw,  # unrolled
        )  # fmt: skip
    else:
        _temporal_attention_bwd_kernel[_grid_x(n_prog)](
            qkv, dout, dqkv, dwq, dwk, q_weight, k_weight, cs, sn, *strides, dout.stride(0), dout.stride(1),
            dqkv.stride(0), dqkv.stride(1), *args, num_warps=4, num_stages=1, **kw,
        )  # fmt: skip
    return dqkv, dwq.sum(0).to(q_weight.dtype), dwk.sum(0).to(k_weight.dtype)


@_temporal_bwd_op.register_fake
def _(dout, qkv, q_weight, k_weight, cos, sin, out, lse, num_heads, num_frames, eps, softmax_scale):
    return torch.empty_like(qkv), torch.empty_like(q_weight), torch.empty_like(k_weight)


class TemporalAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, q_weight, k_weight, cos, sin, num_heads, num_frames, eps, softmax_scale, grad=True):
        # grad False: no backward will run (sampling), no lse kept
        out, lse = torch.ops.opensora_fast.temporal_attention_fwd(
            qkv, q_weight, k_weight, cos, sin, num_heads, num_frames, eps, softmax_scale, grad
        )
        # out and lse are kept only for the split backward (65..128 frames); out is this op's own output
        ctx.save_for_backward(qkv, q_weight, k_weight, cos, sin, out if lse.numel() else None, lse)
        ctx.args = (num_heads, num_frames, eps, softmax_scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, q_weight, k_weight, cos, sin, out, lse = ctx.saved_tensors
        dqkv, dqw, dkw = torch.ops.opensora_fast.temporal_attention_bwd(
            dout, qkv, q_weight, k_weight, cos, sin, out if out is not None else lse, lse, *ctx.args
        )
        return dqkv, dqw, dkw, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# custom ops: cross_attention


def _lk_bucket(max_kv_len: int) -> int:
    """The autotune key of a varlen problem's key length: the next power of two (>= 16) of the longest
    text, so that new caption lengths reuse the tuned config."""
    return max(16, next_pow2(max_kv_len))


def _cross_seqs(q, kv, num_heads):
    B, N, C = q.shape
    D = C // num_heads
    sq = Seq(q.stride(0), 0, q.stride(1), D)
    skv = Seq(0, 0, kv.stride(0), D)
    return sq, skv, C, D


@torch.library.custom_op("opensora_fast::cross_attention_fwd", mutates_args=())
def _cross_fwd_op(
    q: torch.Tensor, kv: torch.Tensor, cu_seqlens: torch.Tensor, max_kv_len: int, num_heads: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    B, N, C = q.shape
    sq, skv, C, D = _cross_seqs(q, kv, num_heads)
    out = empty((B, N, C), q.dtype, q.device)
    p = Problem(B, 1, num_heads, N, _lk_bucket(max_kv_len), D, varlen=True)
    so = Seq(out.stride(0), 0, out.stride(1), D)
    lse = _launch_fwd(q, kv[:, :C], kv[:, C:], out, sq, skv, skv, so, p, softmax_scale, 0.0, cu=cu_seqlens)
    return out, lse


@_cross_fwd_op.register_fake
def _(q, kv, cu_seqlens, max_kv_len, num_heads, softmax_scale):
    B, N, C = q.shape
    return q.new_empty((B, N, C)), q.new_empty((B * num_heads, N), dtype=torch.float32)


_MAX_CROSS_CHUNKS = 1024
_CROSS_SLACK = 1.03


def _cross_schedule(B: int, H: int, N: int, max_kv_len: int, D: int, device: torch.device) -> tuple[int, int | None]:
    """(query chunks, key splits) of the cross-attention backward; key splits None = ``_n_split``'s choice.

    The text is short (300 tokens: 3 key blocks of 128), so the fused backward's programs (sample, head,
    key split) are few and each walks all N queries. On a GPU the queries go in n chunks (each chunk its
    own sequence against a copy of its sample's text; n divides N, chunks of >= BLOCK_M rows) with ONE key
    split: every program runs all key blocks of its chunk, so the fp32 dQ partial is written once instead
    of once per split (720p-2s: 497 MB per partial). n: the fewest chunks whose per-SM work in whole waves,
    ceil(B * H * n / SMs) x query blocks per chunk, is within 3% of the least: 720p-2s, B 2, 16 heads,
    132 SMs: 4 chunks, 128 programs (one wave; was 3 chunks x 3 key splits = 288 programs, 3 waves). The
    split design's dK/dV kernel has one program per (chunk, sample, head, key block of 64): the same
    formula with B * H * n * key blocks programs.
    Under the interpreter: 2 chunks (N even) and the default splits, to test the chunked path."""
    sms = sm_count(device)
    if B == 0:
        return 1, None
    if sms is None:
        return (2 if N % 2 == 0 else 1), None
    dclass = _dclass(D)
    if BWD_DESIGN == "split" and dclass in _DKDV_TABLE:  # the dK/dV kernel's programs: one per key block
        cfg = _DKDV_TABLE[dclass][0].kwargs
        bm, kb = cfg["BLOCK_M"], triton.cdiv(max_kv_len, cfg["BLOCK_N"])
    else:
        bm, kb = _BWD_TABLE[dclass][0].kwargs["BLOCK_M"], 1
    cost = {
        n: triton.cdiv(B * H * n * kb, sms) * triton.cdiv(N // n, bm)
        for n in range(1, max(1, min(N // bm, _MAX_CROSS_CHUNKS)) + 1)
        if N % n == 0
    }
    least = min(cost.values())
    # the fewest chunks within _CROSS_SLACK of the least work: each chunk costs a copy of the text and a d(kv)
    # partial (720p-2s: 45 chunks would be 1% less kernel work than 4, for 41 more copies, 0.11 GB)
    n = min(n for n, c in cost.items() if c <= least * _CROSS_SLACK)
    return (n, 1) if n > 1 else (1, None)  # no chunks (N < 2 BLOCK_M, or prime): key splits as elsewhere


@torch.library.custom_op("opensora_fast::cross_attention_bwd", mutates_args=())
def _cross_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, cu_seqlens: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, max_kv_len: int, num_heads: int, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    B, N, C = q.shape
    dout = _unit_last(dout)
    sq, skv, C, D = _cross_seqs(q, kv, num_heads)
    dq = empty(q.shape, q.dtype, q.device)
    H, bucket = num_heads, _lk_bucket(max_kv_len)
    n_qc, n_split = _cross_schedule(B, H, N, max_kv_len, D, q.device)
    if n_qc == 1:
        dkv = empty(kv.shape, kv.dtype, kv.device)
        p = Problem(B, 1, H, N, bucket, D, varlen=True)
        so = Seq(out.stride(0), 0, out.stride(1), D)
        sdo = Seq(dout.stride(0), 0, dout.stride(1), D)
        sdq = Seq(dq.stride(0), 0, dq.stride(1), D)
        sdkv = Seq(0, 0, dkv.stride(0), D)
        k, v, dk, dv = kv[:, :C], kv[:, C:], dkv[:, :C], dkv[:, C:]
        _launch_bwd(dout, q, k, v, out, lse, dq, dk, dv, sq, skv, skv, so, sdo, sdq, sdkv, sdkv, p,
                    softmax_scale, 0.0, cu=cu_seqlens, max_lk=max_kv_len, n_split=n_split)  # fmt: skip
        return dq, dkv
    # The queries as n_qc chunks of N / n_qc rows, each chunk c of sample b its own sequence z = c * B + b
    # (Seq: chunk stride as s1, Z2 = B) attending to its own copy of b's text (kv tiled n_qc times, tiny):
    # n_qc times the programs, no kernel change; the fp32 d(kv) of the copies is summed in chunk order.
    chunk = N // n_qc
    cu = torch.zeros(B * n_qc + 1, dtype=torch.int32, device=q.device)
    cu[1:] = torch.cumsum((cu_seqlens[1:] - cu_seqlens[:-1]).repeat(n_qc), 0)
    kv2 = kv.repeat(n_qc, 1)
    # the copies' d(kv) in kv's dtype (fp32 partials spilled registers in the backward kernel on sm_90,
    # 24 B), summed in fp32: at most _MAX_CROSS_CHUNKS roundings of a partial more than one output
    dkv2 = empty(kv2.shape, kv.dtype, kv.device)
    lse2 = lse.view(B, H, n_qc, chunk).permute(2, 0, 1, 3).reshape(n_qc * B * H, chunk)
    p = Problem(n_qc * B, B, H, chunk, bucket, D, varlen=True)

    def chunked(t):
        return Seq(chunk * t.stride(1), t.stride(0), t.stride(1), D)

    skv2, sdkv2 = Seq(0, 0, kv2.stride(0), D), Seq(0, 0, dkv2.stride(0), D)
    k, v, dk, dv = kv2[:, :C], kv2[:, C:], dkv2[:, :C], dkv2[:, C:]
    _launch_bwd(dout, q, k, v, out, lse2, dq, dk, dv, chunked(q), skv2, skv2, chunked(out), chunked(dout),
                chunked(dq), sdkv2, sdkv2, p, softmax_scale, 0.0, cu=cu, max_lk=max_kv_len,
                n_split=n_split)  # fmt: skip
    return dq, dkv2.view(n_qc, *kv.shape).float().sum(0).to(kv.dtype)


@_cross_bwd_op.register_fake
def _(dout, q, kv, cu_seqlens, out, lse, max_kv_len, num_heads, softmax_scale):
    return torch.empty_like(q), torch.empty_like(kv)


class CrossAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, cu_seqlens, max_kv_len, num_heads, softmax_scale):
        out, lse = torch.ops.opensora_fast.cross_attention_fwd(q, kv, cu_seqlens, max_kv_len, num_heads, softmax_scale)
        ctx.save_for_backward(q, kv, cu_seqlens, out, lse)
        ctx.args = (max_kv_len, num_heads, softmax_scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, kv, cu, out, lse = ctx.saved_tensors
        dq, dkv = torch.ops.opensora_fast.cross_attention_bwd(dout, q, kv, cu, out, lse, *ctx.args)
        return dq, dkv, None, None, None, None


# --------------------------------------------------------------------------------------------
# public functions


def _check_head_dim(D: int, name: str) -> None:
    if D < 8 or D > 128 or D % 8:
        raise ValueError(f"{name}: head_dim must be a multiple of 8 in [8, 128], got {D}")


def _check_dtype(t: torch.Tensor, name: str, like: torch.Tensor | None = None) -> None:
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be fp16, bf16 or fp32, got {t.dtype}")
    if like is not None and t.dtype != like.dtype:
        raise ValueError(f"{name} must have the same dtype as the first input ({like.dtype}), got {t.dtype}")


def _check_last_contiguous(t: torch.Tensor, name: str) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}")


def _scale(softmax_scale, D: int) -> float:
    if softmax_scale is None:
        return D**-0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise ValueError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a positive finite float, got {softmax_scale}")
    return float(softmax_scale)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """softmax(q k^T * scale) v like flash-attn's function of this name.

    q (B, Nq, H, D), k/v (B, Nk, H, D), D a multiple of 8 up to 128; ``causal`` is bottom-right
    aligned (query i sees keys j <= i + Nk - Nq); a query that sees no key outputs zeros.
    Returns (B, Nq, H, D). dropout is not supported (dropout_p > 0 raises NotImplementedError).
    """
    check_tensor(q, "q", ndim=4)
    B, Nq, H, D = q.shape
    check_tensor(k, "k", shape=(B, None, H, D), like=q)
    check_tensor(v, "v", shape=tuple(k.shape), like=q)
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        _check_dtype(t, n, q)
    _check_head_dim(D, "q")
    if dropout_p:
        raise NotImplementedError("flash_attn_func: dropout_p > 0 is not supported (Open-Sora uses 0)")
    if Nq == 0 or k.shape[1] == 0 or B == 0 or H == 0:
        raise ValueError(f"q/k must be non-empty, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    scale = _scale(softmax_scale, D)
    if not use_triton(q, k, v):
        return ref.flash_attn_func_ref(q, k, v, 0.0, scale, bool(causal))
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        _check_last_contiguous(t, n)
    return FlashAttnFunction.apply(q, k, v, scale, bool(causal))


def self_attention(
    qkv,
    q_norm_weight,
    k_norm_weight,
    *,
    num_heads,
    num_frames,
    layout,
    eps=1e-6,
    rope=None,
    softmax_scale=None,
):
    """Open-Sora's self-attention from the raw qkv Linear output (B, T*S, 3C) to (B, T*S, C).

    Columns of qkv are [q heads | k heads | v heads]; layout "spatial" attends over the S tokens of
    each frame, "temporal" over the T frames of each spatial position. q and k get per-head RMSNorm
    (fp32 statistics, cast back, times the (head_dim,) weight), then RoPE when rope=(cos, sin) with
    cos/sin (L, head_dim) (L = S spatial, T temporal; interleaved pairs as reference.rope_cos_sin).
    Gradients flow to qkv and both norm weights, not to cos/sin.

    Schedules on the Triton path: "temporal" with T <= 128 frames, head_dim 64 or 72 and 16-byte
    aligned rows runs the packed whole-sequence kernels (``_attention_temporal.py``); everything else
    runs the flash kernels (``_attention_kernels.py``) after an RMSNorm (+ RoPE) pre-pass that
    normalises q and k once into scratch.
    """
    check_tensor(qkv, "qkv", ndim=3)
    _check_dtype(qkv, "qkv")
    B, N, C3 = qkv.shape
    if not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if not isinstance(num_frames, int) or num_frames <= 0:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if C3 % (3 * num_heads):
        raise ValueError(f"qkv must have shape (B, T*S, 3*C) with C divisible by num_heads={num_heads}, got {C3}")
    if N == 0 or N % num_frames:
        raise ValueError(f"qkv must have shape (B, T*S, 3C) with T*S a positive multiple of num_frames, got N={N}")
    if layout not in ("spatial", "temporal"):
        raise ValueError(f"layout must be 'spatial' or 'temporal', got {layout!r}")
    D = C3 // (3 * num_heads)
    _check_head_dim(D, "qkv")
    for w, n in ((q_norm_weight, "q_norm_weight"), (k_norm_weight, "k_norm_weight")):
        check_tensor(w, n, shape=(D,), like=qkv)
    L = N // num_frames if layout == "spatial" else num_frames
    cos = sin = None
    if rope is not None:
        if not isinstance(rope, (tuple, list)) or len(rope) != 2:
            raise ValueError("rope must be None or a (cos, sin) pair of (L, head_dim) tensors")
        cos, sin = rope
        check_tensor(cos, "rope cos", shape=(L, D), like=qkv)
        check_tensor(sin, "rope sin", shape=(L, D), like=qkv)
        if cos.stride() != sin.stride() or cos.stride(-1) != 1:
            raise ValueError(f"rope cos/sin need equal strides, last dim contiguous, got {cos.stride()} {sin.stride()}")
    scale = _scale(softmax_scale, D)
    if cos is not None:  # positions are constants: no gradient to cos/sin on either path
        cos, sin = cos.detach(), sin.detach()
    if not use_triton(qkv, q_norm_weight, k_norm_weight):
        return ref.self_attention_ref(
            qkv, q_norm_weight, k_norm_weight, num_heads, num_frames, layout, eps,
            None if cos is None else (cos, sin), scale,
        )  # fmt: skip
    _check_last_contiguous(qkv, "qkv")
    _check_last_contiguous(q_norm_weight, "q_norm_weight")
    _check_last_contiguous(k_norm_weight, "k_norm_weight")
    if layout == "temporal" and temporal_supported(qkv, num_frames, D):
        # a backward can follow (the split backward at 65..128 frames needs the forward's lse)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (qkv, q_norm_weight, k_norm_weight))
        return TemporalAttentionFunction.apply(
            qkv, q_norm_weight, k_norm_weight, cos, sin, num_heads, num_frames, float(eps), scale, grad
        )
    return SelfAttentionFunction.apply(
        qkv, q_norm_weight, k_norm_weight, cos, sin, num_heads, num_frames, layout, float(eps), scale
    )


def _lens(kv_lens, B: int, M: int) -> list[int]:
    if isinstance(kv_lens, torch.Tensor):
        if kv_lens.dim() != 1 or kv_lens.is_floating_point() or kv_lens.is_complex() or kv_lens.dtype == torch.bool:
            raise ValueError(f"kv_lens must be a 1-D integer tensor or a list of ints, got {kv_lens.dtype} "
                             f"{tuple(kv_lens.shape)}")  # fmt: skip
        lens = [int(n) for n in kv_lens.tolist()]
    else:
        if isinstance(kv_lens, (str, bytes)) or any(isinstance(n, bool) for n in kv_lens):
            raise ValueError(f"kv_lens must be a list of ints or an int tensor, got {kv_lens!r}")
        try:
            lens = [int(n) for n in kv_lens]
        except TypeError as exc:
            raise ValueError(f"kv_lens must be a list of ints or an int tensor, got {type(kv_lens).__name__}") from exc
    if len(lens) != B:
        raise ValueError(f"kv_lens must have one length per sample (B={B}), got {len(lens)}")
    if any(n < 0 for n in lens):
        raise ValueError(f"kv_lens must be non-negative, got {lens}")
    if sum(lens) != M:
        raise ValueError(f"kv must have shape (sum(kv_lens)={sum(lens)}, 2C), got {M} rows")
    return lens


def cross_attention(q, kv, kv_lens, *, num_heads, softmax_scale=None):
    """Each sample's queries q[b] (N, C) attend to its own kv_lens[b] packed text tokens.

    q (B, N, C); kv (sum(kv_lens), 2C) from the kv Linear (columns [k heads | v heads]); kv_lens a
    list of ints or an int tensor (not bool); a sample with kv_lens[b] == 0 gets zeros; B may be 0.
    Returns (B, N, C). On the Triton path the device copy of the cumulative lengths is cached per
    (lengths, device) (see ``cu_seqlens``): pass the same lengths every step and no copy is made.
    """
    check_tensor(q, "q", ndim=3)
    _check_dtype(q, "q")
    B, N, C = q.shape
    if not isinstance(num_heads, int) or num_heads <= 0 or C % num_heads:
        raise ValueError(f"num_heads must be a positive int dividing C={C}, got {num_heads!r}")
    check_tensor(kv, "kv", shape=(None, 2 * C), like=q)
    _check_dtype(kv, "kv", q)
    D = C // num_heads
    _check_head_dim(D, "q")
    if N == 0:
        raise ValueError(f"q must have shape (B, N, C) with N > 0, got {tuple(q.shape)}")
    lens = _lens(kv_lens, B, kv.shape[0])
    scale = _scale(softmax_scale, D)
    if not use_triton(q, kv):
        return ref.cross_attention_ref(q, kv, lens, num_heads, scale)
    _check_last_contiguous(q, "q")
    _check_last_contiguous(kv, "kv")
    return CrossAttentionFunction.apply(q, kv, cu_seqlens(lens, q.device), max(lens, default=0), num_heads, scale)


_CU_CACHE: dict = {}
_CU_CACHE_SIZE = 64


def cu_seqlens(lens, device) -> torch.Tensor:
    """The (B + 1,) int32 cumulative lengths of ``lens`` on ``device``, cached by (lengths, device): the
    text lengths of a sampling run are the same for all its steps and blocks, so the host->device copy
    happens once per run (and never inside a CUDA graph capture once cached). Up to 64 entries."""
    key = (tuple(int(n) for n in lens), torch.device(device))
    t = _CU_CACHE.get(key)
    if t is None:
        cu = [0]
        for n in key[0]:
            cu.append(cu[-1] + n)
        t = torch.tensor(cu, dtype=torch.int32).to(key[1])
        if len(_CU_CACHE) >= _CU_CACHE_SIZE:
            _CU_CACHE.pop(next(iter(_CU_CACHE)))
        _CU_CACHE[key] = t
    return t
