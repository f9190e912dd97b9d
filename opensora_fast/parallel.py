"""Sequence and batch parallelism for STDiT3 on torch.distributed.

Sequence parallelism: the p ranks of a group share one sample's tokens (B, T, S, C) (T latent frames, S
tokens per frame). Every operation of an STDiT3 block except self-attention is token-wise, so a block only
needs, locally, the whole sequence its attention runs over. Default mode "dsp":

- spatial blocks run in the **frames** layout: rank r holds frames [r*Tp, (r+1)*Tp) with all S tokens
  of each (Tp = ceil(T / p); frames past T are padding);
- temporal blocks run in the **tokens** layout: rank r holds token positions [r*Sp, (r+1)*Sp) of every
  frame (Sp = ceil(S / p); positions past S are padding).

Between the two, one all-to-all of the activation switches the layout (VideoSys' Dynamic Sequence
Parallel), so an STDiT3 spatial+temporal block pair costs two activation-sized all-to-alls and no
attention-internal communication (Open-Sora 1.2's Ulysses path moves about six). Padding is harmless:
padded frames are separate sequences of spatial attention and padded positions separate sequences of
temporal attention, and both are dropped by the next switch. Modes "ulysses" (Open-Sora 1.2) and
"fastseq" (OpenDiT) keep the tokens layout throughout and run spatial attention over H/p heads instead
(``seq_to_heads`` / ``all_gather_tokens`` and ``heads_to_seq``, used by ``layers.attention_forward``).

Batch parallelism (``enable_batch_parallel``): each rank of a group runs a share of the batch (the CFG
(cond, uncond) pair over 2 ranks) and the outputs are all-gathered; on a (batch, seq) mesh it composes
with sequence parallelism.

Installed from outside by ``parallelize(model, mesh, sp_mode=..., cfg_parallel=..., overlap=True)``: each
block's and the final layer's ``forward`` is replaced per instance (``_ParallelBlock`` / ``_ParallelFinal``),
the model's own forward keeps one block loop. With ``overlap`` every collective is asynchronous (work
handles; on CUDA NCCL runs them on its own stream and ``wait`` is a stream wait, never a host sync), cut
into pieces and pipelined with independent compute, forward and backward (the autograd pair
``_A2AIssue`` / ``_A2AWait``: the backward of the wait issues the reverse collective, the backward of the
issue waits for it); ``record_schedule`` records issue / compute / wait events (tests, bench).

Gradients: the switches' backward is the opposite switch. ``split_frames`` keeps this rank's frames of a
full tensor every rank holds; ``gather_tokens`` all-gathers the final output (its backward keeps this
rank's part). So when every rank computes the same loss from the gathered output, each rank's parameter
gradients are the contribution of its own tokens, and their SUM over the group (all-reduce) is the
single-process gradient; ``GradSync`` does that bucketed and overlapped with the backward (hooks),
``all_reduce_grads`` blocking after it (FSDP2 DTensor gradients included). With FSDP2, ``shard`` shards
over the flattened (dp, sp) mesh instead, so FSDP2's reduce-scatter, issued per block during the
backward, does the sum (divided by dp: mean over dp, sum over sp) and nothing runs after the backward.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import types
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class SeqLayout:
    """The shapes of one forward: T frames of S tokens shared by ``world`` ranks."""

    T: int
    S: int
    world: int
    rank: int

    @property
    def Tp(self) -> int:  # frames per rank in the frames layout
        return math.ceil(self.T / self.world)

    @property
    def Sp(self) -> int:  # token positions per rank in the tokens layout
        return math.ceil(self.S / self.world)

    def local_x_mask(self, x_mask: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's frames of a (B, T) x_mask, padded with True (no t0 branch on padding)."""
        if x_mask is None:
            return None
        pad = self.world * self.Tp - self.T
        full = F.pad(x_mask, (0, pad), value=True) if pad else x_mask
        return full[:, self.rank * self.Tp : (self.rank + 1) * self.Tp]


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """x (p, ...) contiguous: chunk j goes to rank j; returns (p, ...) with chunk i from rank i."""
    x = x.contiguous()
    out = torch.empty_like(x)  # after .contiguous(): empty_like keeps a permuted input's strides
    dist.all_to_all_single(out, x, group=group)
    return out


def _frames_to_tokens(x: torch.Tensor, lay: SeqLayout, group) -> torch.Tensor:
    B, C = x.shape[0], x.shape[-1]
    p, Tp, Sp = lay.world, lay.Tp, lay.Sp
    x = x.reshape(B, Tp, lay.S, C)
    x = F.pad(x, (0, 0, 0, p * Sp - lay.S))  # pad S
    x = x.view(B, Tp, p, Sp, C).permute(2, 0, 1, 3, 4)  # (p: destination S chunk, B, Tp, Sp, C)
    x = _all_to_all(x, group)  # (p: source frame chunk, B, Tp, Sp, C)
    x = x.permute(1, 0, 2, 3, 4).reshape(B, p * Tp, Sp, C)[:, : lay.T]
    return x.reshape(B, lay.T * Sp, C)


def _tokens_to_frames(x: torch.Tensor, lay: SeqLayout, group) -> torch.Tensor:
    B, C = x.shape[0], x.shape[-1]
    p, Tp, Sp = lay.world, lay.Tp, lay.Sp
    x = x.reshape(B, lay.T, Sp, C)
    x = F.pad(x, (0, 0, 0, 0, 0, p * Tp - lay.T))  # pad T
    x = x.view(B, p, Tp, Sp, C).permute(1, 0, 2, 3, 4)  # (p: destination frame chunk, B, Tp, Sp, C)
    x = _all_to_all(x, group)  # (p: source S chunk, B, Tp, Sp, C)
    x = x.permute(1, 2, 0, 3, 4).reshape(B, Tp, p * Sp, C)[:, :, : lay.S]
    return x.reshape(B, Tp * lay.S, C)


class _FramesToTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lay, group):
        ctx.lay, ctx.group = lay, group
        return _frames_to_tokens(x, lay, group)

    @staticmethod
    def backward(ctx, g):
        return _tokens_to_frames(g.contiguous(), ctx.lay, ctx.group), None, None


class _TokensToFrames(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lay, group):
        ctx.lay, ctx.group = lay, group
        return _tokens_to_frames(x, lay, group)

    @staticmethod
    def backward(ctx, g):
        return _frames_to_tokens(g.contiguous(), ctx.lay, ctx.group), None, None


def frames_to_tokens(x: torch.Tensor, lay: SeqLayout, group=None) -> torch.Tensor:
    """(B, Tp*S, C) frames layout -> (B, T*Sp, C) tokens layout (one all-to-all)."""
    return _FramesToTokens.apply(x, lay, group)


def tokens_to_frames(x: torch.Tensor, lay: SeqLayout, group=None) -> torch.Tensor:
    """(B, T*Sp, C) tokens layout -> (B, Tp*S, C) frames layout (one all-to-all)."""
    return _TokensToFrames.apply(x, lay, group)


# ---- schedule recording (tests, bench) and NVTX ranges (nsys) ------------------------------------------

_RECORDERS: list[list] = []


@contextlib.contextmanager
def record_schedule():
    """Record ("issue" | "wait" | "compute", name) events of the overlapped collectives, in program order
    (forward and backward), into the yielded list. Used by the schedule tests and bench/bench_parallel.py."""
    events: list = []
    _RECORDERS.append(events)
    try:
        yield events
    finally:
        _RECORDERS.remove(events)


def _trace(kind: str, name: str) -> None:
    for ev in _RECORDERS:
        ev.append((kind, name, time.perf_counter()))
    if kind != "compute" and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.nvtx.mark(f"{kind} {name}")  # issue / wait points on an nsys timeline


@contextlib.contextmanager
def _compute(name: str, t: torch.Tensor):
    """One chunk of compute between an issue and its wait: recorded, and an NVTX range on CUDA."""
    _trace("compute", name)
    nvtx = t.is_cuda
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()


class _Mark(torch.autograd.Function):
    """Identity whose backward records ("compute", name): marks where a chunk's backward starts."""

    @staticmethod
    def forward(ctx, x, name):
        ctx.name = name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        _trace("compute", ctx.name)
        return g, None


def _mark(x: torch.Tensor, name: str) -> torch.Tensor:
    return _Mark.apply(x, name) if _RECORDERS and x.requires_grad else x


# ---- asynchronous all-to-all as an autograd pair: issue ... (independent work) ... wait ------------------


class _Flight:
    """One all-to-all in flight: the forward's work handle and, in the backward, the reverse one's."""

    __slots__ = ("name", "work", "bwork", "bout")

    def __init__(self, name: str):
        self.name, self.work, self.bwork, self.bout = name, None, None, None


class _A2AIssue(torch.autograd.Function):
    """Issue an equal-split all-to-all of x (p, ...) (async, work in ``fl``); returns the receive buffer,
    valid only after ``_A2AWait``. Backward: wait for the reverse all-to-all that ``_A2AWait.backward``
    issued (the all-to-all is its own adjoint)."""

    @staticmethod
    def forward(ctx, x, fl, group):
        x = x.contiguous()
        out = torch.empty_like(x)
        fl.work = dist.all_to_all_single(out, x, group=group, async_op=True)
        _trace("issue", fl.name)
        ctx.fl = fl
        return out

    @staticmethod
    def backward(ctx, g):
        fl = ctx.fl
        fl.bwork.wait()
        _trace("wait", fl.name + ".bwd")
        out, fl.bout, fl.bwork = fl.bout, None, None
        return out, None, None


class _A2AWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buf, fl, group):
        fl.work.wait()
        fl.work = None
        _trace("wait", fl.name)
        ctx.fl, ctx.group = fl, group
        return buf.view_as(buf)

    @staticmethod
    def backward(ctx, g):
        fl = ctx.fl
        g = g.contiguous()
        fl.bout = torch.empty_like(g)
        fl.bwork = dist.all_to_all_single(fl.bout, g, group=ctx.group, async_op=True)
        _trace("issue", fl.name + ".bwd")
        return g, None, None  # a placeholder: _A2AIssue.backward returns the received gradient


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool = False):
    """Sum ``inp`` over the ranks, rank r keeps chunk r: reduce_scatter_single where this torch has it
    (reduce_scatter_tensor is deprecated in 2.13), else reduce_scatter_tensor."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp, group=group, async_op=async_op)


def _a2a_start(x: torch.Tensor, group, name: str):
    fl = _Flight(name)
    return _A2AIssue.apply(x, fl, group), fl


def _a2a_finish(buf: torch.Tensor, fl: _Flight, group) -> torch.Tensor:
    return _A2AWait.apply(buf, fl, group)


# ---- Ulysses / FastSeq: tokens layout throughout, spatial attention over heads -------------------------


def _s2h_send(x: torch.Tensor, T: int, Sp: int, parts: int, p: int) -> torch.Tensor:
    """(B, T*Sp, parts*p*w) columns [part][dest rank][w] -> (p: dest rank, B, T, Sp, parts, w)."""
    B, _, W = x.shape
    return x.reshape(B, T, Sp, parts, p, W // (parts * p)).permute(4, 0, 1, 2, 3, 5)


def _s2h_recv(x: torch.Tensor, lay: SeqLayout, T: int) -> torch.Tensor:
    """(p: source S chunk, B, T, Sp, parts, w) -> (B, T*S, parts*w) (padded positions cropped)."""
    p, B, _, Sp, parts, w = x.shape
    x = x.permute(1, 2, 0, 3, 4, 5).reshape(B, T, p * Sp, parts * w)[:, :, : lay.S]
    return x.reshape(B, T * lay.S, parts * w)


def _h2s_send(x: torch.Tensor, lay: SeqLayout, T: int, parts: int) -> torch.Tensor:
    """(B, T*S, parts*w) -> (p: dest S chunk, B, T, Sp, parts, w) (positions padded to p*Sp)."""
    B, _, W = x.shape
    p, Sp = lay.world, lay.Sp
    x = F.pad(x.reshape(B, T, lay.S, W), (0, 0, 0, p * Sp - lay.S))
    return x.view(B, T, p, Sp, parts, W // parts).permute(2, 0, 1, 3, 4, 5)


def _h2s_recv(x: torch.Tensor) -> torch.Tensor:
    """(p: source head group, B, T, Sp, parts, w) -> (B, T*Sp, parts*p*w) columns [part][source][w]."""
    p, B, T, Sp, parts, w = x.shape
    return x.permute(1, 2, 3, 4, 0, 5).reshape(B, T * Sp, parts * p * w)


def _seq_to_heads(x: torch.Tensor, lay: SeqLayout, group, parts: int) -> torch.Tensor:
    """(B, T*Sp, parts*H*D) tokens layout, columns [part 0 heads | part 1 heads | ...] -> (B, T*S,
    parts*(H/p)*D): all S positions for this rank's H/p heads of every part (one all-to-all)."""
    return _s2h_recv(_all_to_all(_s2h_send(x, lay.T, lay.Sp, parts, lay.world), group), lay, lay.T)


def _heads_to_seq(x: torch.Tensor, lay: SeqLayout, group, parts: int) -> torch.Tensor:
    """The inverse of ``_seq_to_heads``: (B, T*S, parts*(H/p)*D) -> (B, T*Sp, parts*H*D)."""
    return _h2s_recv(_all_to_all(_h2s_send(x, lay, lay.T, parts), group))


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lay, group, parts):
        ctx.args = (lay, group, parts)
        return _seq_to_heads(x, lay, group, parts)

    @staticmethod
    def backward(ctx, g):
        return _heads_to_seq(g.contiguous(), *ctx.args), None, None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lay, group, parts):
        ctx.args = (lay, group, parts)
        return _heads_to_seq(x, lay, group, parts)

    @staticmethod
    def backward(ctx, g):
        return _seq_to_heads(g.contiguous(), *ctx.args), None, None, None


def seq_to_heads(x: torch.Tensor, lay: SeqLayout, group=None, parts: int = 1) -> torch.Tensor:
    """Ulysses: this rank's token positions of all heads -> all positions of this rank's heads."""
    return _SeqToHeads.apply(x, lay, group, parts)


def heads_to_seq(x: torch.Tensor, lay: SeqLayout, group=None, parts: int = 1) -> torch.Tensor:
    """Ulysses: all positions of this rank's heads -> this rank's token positions of all heads."""
    return _HeadsToSeq.apply(x, lay, group, parts)


class _AllGatherTokens(torch.autograd.Function):
    """(B, T*Sp, C) -> (B, T*S, C) on every rank; backward: the sum over ranks of the gradient of this
    rank's positions (one reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, lay, group):
        ctx.lay, ctx.group = lay, group
        return _GatherTokens.forward(ctx, x, lay, group)

    @staticmethod
    def backward(ctx, g):
        lay = ctx.lay
        B, _, C = g.shape
        gp = F.pad(g.reshape(B, lay.T, lay.S, C), (0, 0, 0, lay.world * lay.Sp - lay.S))
        gp = gp.view(B, lay.T, lay.world, lay.Sp, C).permute(2, 0, 1, 3, 4).contiguous()
        out = g.new_empty(B, lay.T, lay.Sp, C)
        _reduce_scatter(out.view(-1), gp.view(-1), ctx.group)  # 1-D: gloo checks dim 0
        return out.view(B, lay.T * lay.Sp, C), None, None


def all_gather_tokens(x: torch.Tensor, lay: SeqLayout, group=None) -> torch.Tensor:
    """FastSeq: every rank gets all tokens (B, T*S, C) of its (B, T*Sp, C) share; gradients summed back."""
    return _AllGatherTokens.apply(x, lay, group)


class _GatherProject(torch.autograd.Function):
    """FastSeq's overlapped q, k, v projection: F.linear(all_gather_tokens(x), weight, bias) where the
    all-gather runs as one broadcast per source rank, all issued at once, and each rank's chunk of tokens is
    projected as soon as it has arrived while the later ones are still in flight (any p). Backward: the input
    gradient of every rank's tokens, reduce-scattered (async) while the weight-gradient GEMM runs.

    x (B, T*Sp, C) this rank's token positions; weight (R, C), bias (R,) or None -> (B, T*S, R)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lay, group):
        p, Sp, T, S = lay.world, lay.Sp, lay.T, lay.S
        B, _, C = x.shape
        R = weight.shape[0]
        full = x.new_empty(p, B, T, Sp, C)  # every rank's tokens, one contiguous chunk per source rank
        full[lay.rank].copy_(x.reshape(B, T, Sp, C))
        works = []
        for j in range(p):  # the same issue order on every rank
            works.append(dist.broadcast(full[j], src=dist.get_global_rank(group, j), group=group, async_op=True))
            _trace("issue", f"fastseq.gather[{j}]")
        out = x.new_empty(p, B, T, Sp, R)
        for i in range(p):
            j = (lay.rank + i) % p  # own chunk first: it needs no communication
            if j != lay.rank:
                works[j].wait()
                _trace("wait", f"fastseq.gather[{j}]")
            with _compute(f"fastseq.qkv[{j}]", x):
                a, o = full[j].view(-1, C), out[j].view(-1, R)
                torch.addmm(bias, a, weight.t(), out=o) if bias is not None else torch.mm(a, weight.t(), out=o)
        works[lay.rank].wait()
        ctx.save_for_backward(full, weight)
        ctx.lay, ctx.group, ctx.has_bias = lay, group, bias is not None
        qkv = out.permute(1, 2, 0, 3, 4).reshape(B, T, p * Sp, R)[:, :, :S]
        return qkv.reshape(B, T * S, R)

    @staticmethod
    def backward(ctx, g):
        full, weight = ctx.saved_tensors
        lay = ctx.lay
        p, B, T, Sp, C = full.shape
        R = weight.shape[0]
        gp = F.pad(g.reshape(B, T, lay.S, R), (0, 0, 0, p * Sp - lay.S))
        gp = gp.view(B, T, p, Sp, R).permute(2, 0, 1, 3, 4).contiguous().view(-1, R)
        with _compute("fastseq.dx", g):
            dfull = (gp @ weight).view(p, B, T, Sp, C)  # gradient of every rank's tokens from this rank's heads
        dx = g.new_empty(B, T, Sp, C)
        work = _reduce_scatter(dx.view(-1), dfull.view(-1), ctx.group, async_op=True)
        _trace("issue", "fastseq.reduce_scatter")
        with _compute("fastseq.dW", g):
            dw = gp.t() @ full.view(-1, C) if ctx.needs_input_grad[1] else None
            db = gp.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        work.wait()
        _trace("wait", "fastseq.reduce_scatter")
        return dx.view(B, T * Sp, C), dw, db, None, None


def _qkv_rows(attn: nn.Module, heads: torch.Tensor) -> torch.Tensor:
    """Row indices of attn.qkv for q, k, v of ``heads`` (index tensor): [q rows | k rows | v rows]."""
    C = attn.qkv.in_features
    D = C // attn.num_heads
    cols = (heads[..., None] * D + torch.arange(D, device=heads.device)).reshape(-1)
    return torch.cat([cols, cols + C, cols + 2 * C])


def _head_cols(attn: nn.Module, heads: torch.Tensor) -> torch.Tensor:
    D = attn.qkv.in_features // attn.num_heads
    return (heads[..., None] * D + torch.arange(D, device=heads.device)).reshape(-1)


def _self_attention(attn, qkv, heads: int, num_frames: int):
    from opensora_fast import kernels as K

    return K.self_attention(qkv, attn.q_norm.weight, attn.k_norm.weight, num_heads=heads, num_frames=num_frames,
                            layout="spatial", eps=attn.q_norm.variance_epsilon, rope=None)  # fmt: skip


def _chunks(n: int, k: int) -> list[tuple[int, int]]:
    """n items in min(k, n) near-equal contiguous (start, size) pieces."""
    k = max(1, min(k, n))
    sizes = [n // k + (i < n % k) for i in range(k)]
    return [(sum(sizes[:i]), s) for i, s in enumerate(sizes)]


def ulysses_attention(attn, x, lay: SeqLayout, group, *, overlap: bool = True, chunks: int = 2):
    """Open-Sora 1.2's spatial self-attention under Ulysses on this rank's token positions x (B, T*Sp, C).

    overlap=False: q, k, v all-to-all (heads <-> positions), attention over H/p heads, output all-to-all,
    proj, each collective blocking. overlap=True: the work is cut into ``chunks`` head groups (or frame
    groups when a rank has one head): the q, k, v projection of group k+1 and its all-to-all run while
    group k's is in flight, the attention of group k while group k+1's all-to-all and group k-1's output
    all-to-all fly, and ``proj`` of group k-1's output (a partial sum over its heads) likewise."""
    H, p = attn.num_heads, lay.world
    if H % p:
        raise ValueError(f"ulysses sequence parallelism needs num_heads ({H}) divisible by {p} ranks")
    h, T, Sp = H // p, lay.T, lay.Sp
    if not overlap:
        qkv = seq_to_heads(attn.qkv(x), lay, group, parts=3)
        o = heads_to_seq(_self_attention(attn, qkv, h, T).to(x.dtype), lay, group)
        return attn.proj(o)
    B, _, C = x.shape
    dev = x.device
    by_heads = h > 1 or T == 1
    pieces = _chunks(h, chunks) if by_heads else _chunks(T, chunks)
    W, bias = attn.qkv.weight, attn.qkv.bias
    xs = x.reshape(B, T, Sp, C)

    def start(k):
        s, n = pieces[k]
        heads = torch.arange(p, device=dev)[:, None] * h + (torch.arange(n, device=dev) + s if by_heads else
                                                             torch.arange(h, device=dev))  # fmt: skip
        nh, Tc = (n, T) if by_heads else (h, n)
        xin = x if by_heads else xs[:, s : s + n].reshape(B, n * Sp, C)
        rows = _qkv_rows(attn, heads)
        with _compute(f"ulysses.qkv[{k}]", x):
            qkv = F.linear(xin, W[rows], bias[rows] if bias is not None else None)
        buf, fl = _a2a_start(_s2h_send(qkv, Tc, Sp, 3, p), group, f"ulysses.qkv_a2a[{k}]")
        return buf, fl, heads, nh, Tc

    outs, parts = [None] * len(pieces), []
    nxt = start(0)
    for k in range(len(pieces)):
        buf, fl, heads, nh, Tc = nxt
        if k + 1 < len(pieces):
            nxt = start(k + 1)
        qkv = _s2h_recv(_a2a_finish(buf, fl, group), SeqLayout(Tc, lay.S, p, lay.rank), Tc)
        with _compute(f"ulysses.attn[{k}]", x):
            o = _mark(_self_attention(attn, qkv, nh, Tc).to(x.dtype), f"ulysses.attn[{k}].bwd")
        obuf, ofl = _a2a_start(_h2s_send(o, SeqLayout(Tc, lay.S, p, lay.rank), Tc, 1), group,
                               f"ulysses.out_a2a[{k}]")  # fmt: skip
        outs[k] = (obuf, ofl, heads)
        if k > 0:
            parts.append(_finish_proj(attn, outs[k - 1], group, k - 1, x))
    parts.append(_finish_proj(attn, outs[-1], group, len(pieces) - 1, x))
    if by_heads:
        out = parts[0]
        for q in parts[1:]:
            out = out + q
        return out + attn.proj.bias if attn.proj.bias is not None else out
    out = torch.cat([q.reshape(B, -1, Sp, C) for q in parts], dim=1).reshape(B, T * Sp, C)
    return out + attn.proj.bias if attn.proj.bias is not None else out


def _finish_proj(attn, out, group, k, x):
    obuf, ofl, heads = out
    o = _h2s_recv(_a2a_finish(obuf, ofl, group))  # (B, Tc*Sp, p*n*D), columns [source rank][head][d]
    with _compute(f"ulysses.proj[{k}]", x):
        return _mark(F.linear(o, attn.proj.weight[:, _head_cols(attn, heads)]), f"ulysses.proj[{k}].bwd")


def fastseq_attention(attn, x, lay: SeqLayout, group, *, overlap: bool = True):
    """OpenDiT's FastSeq spatial self-attention on this rank's token positions x (B, T*Sp, C): all-gather x,
    q, k, v of this rank's H/p heads only (overlapped with the gather when ``overlap``), attention, one
    all-to-all back, proj."""
    H, p = attn.num_heads, lay.world
    if H % p:
        raise ValueError(f"fastseq sequence parallelism needs num_heads ({H}) divisible by {p} ranks")
    h = H // p
    rows = _qkv_rows(attn, torch.arange(h, device=x.device) + lay.rank * h)
    w = attn.qkv.weight[rows]
    b = attn.qkv.bias[rows] if attn.qkv.bias is not None else None
    if overlap:
        qkv = _GatherProject.apply(x, w, b, lay, group)
    else:
        qkv = F.linear(all_gather_tokens(x, lay, group), w, b)
    o = _self_attention(attn, qkv, h, lay.T).to(x.dtype)
    return attn.proj(heads_to_seq(o, lay, group))


def split_tokens(x: torch.Tensor, lay: SeqLayout) -> torch.Tensor:
    """A full (B, T*S, C) tensor every rank holds -> this rank's (B, T*Sp, C) token positions (padded)."""
    B, _, C = x.shape
    x = F.pad(x.view(B, lay.T, lay.S, C), (0, 0, 0, lay.world * lay.Sp - lay.S))
    return x[:, :, lay.rank * lay.Sp : (lay.rank + 1) * lay.Sp].reshape(B, lay.T * lay.Sp, C)


def split_frames(x: torch.Tensor, lay: SeqLayout) -> torch.Tensor:
    """A full (B, T*S, C) tensor every rank holds -> this rank's (B, Tp*S, C) frames (no communication;
    the backward puts the gradient of this rank's frames in place and zeros elsewhere)."""
    B, _, C = x.shape
    x = x.view(B, lay.T, lay.S, C)
    pad = lay.world * lay.Tp - lay.T
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    return x[:, lay.rank * lay.Tp : (lay.rank + 1) * lay.Tp].reshape(B, lay.Tp * lay.S, C)


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lay, group):
        ctx.lay = lay
        B, _, D = x.shape
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(lay.world)]
        dist.all_gather(parts, x, group=group)
        parts = torch.stack(parts)
        full = parts.view(lay.world, B, lay.T, lay.Sp, D).permute(1, 2, 0, 3, 4)
        return full.reshape(B, lay.T, lay.world * lay.Sp, D)[:, :, : lay.S].reshape(B, lay.T * lay.S, D)

    @staticmethod
    def backward(ctx, g):
        lay = ctx.lay
        B, _, D = g.shape
        g = F.pad(g.view(B, lay.T, lay.S, D), (0, 0, 0, lay.world * lay.Sp - lay.S))
        return g[:, :, lay.rank * lay.Sp : (lay.rank + 1) * lay.Sp].reshape(B, lay.T * lay.Sp, D), None, None


def gather_tokens(x: torch.Tensor, lay: SeqLayout, group=None) -> torch.Tensor:
    """This rank's (B, T*Sp, D) tokens layout -> the full (B, T*S, D) on every rank (one all-gather)."""
    return _GatherTokens.apply(x, lay, group)


class _GatherBatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, rank):
        ctx.rank, ctx.n = rank, x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, g):
        return g[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None, None


def _batch_slice(v, B: int, sl: slice, name: str):
    """v's share of the batch: tensors / lists with B rows are sliced; scalars, None and one-row tensors
    (broadcast over the batch, e.g. a text mask shared by the CFG pair) are kept."""
    if v is None or isinstance(v, (int, float)):
        return v
    n = v.shape[0] if torch.is_tensor(v) and v.dim() > 0 else (len(v) if isinstance(v, (list, tuple)) else None)
    if n is None or n == 1:
        return v
    if n != B:
        raise ValueError(f"batch parallel: {name} has {n} rows for a batch of {B}; expected {B} or 1")
    return v[sl]


def batch_parallel_forward(forward, group, x, timestep, y, mask=None, x_mask=None, fps=None, height=None,
                           width=None, **kwargs):  # fmt: skip
    """Run ``forward`` (an STDiT3 forward) on this rank's share of the batch and all-gather the outputs
    (the backward keeps this rank's rows). With classifier-free guidance the batch is the (cond, uncond)
    pair, so 2 ranks each run one half with no activation communication at all."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    B = x.shape[0]
    if B % n:
        raise ValueError(f"batch parallel over {n} ranks needs a batch divisible by {n}, got {B}")
    sl = slice(r * (B // n), (r + 1) * (B // n))
    args = dict(mask=mask, x_mask=x_mask, fps=fps, height=height, width=width)
    local = {k: _batch_slice(v, B, sl, k) for k, v in args.items()}
    out = forward(x[sl], _batch_slice(timestep, B, sl, "timestep"), _batch_slice(y, B, sl, "y"), **local, **kwargs)
    return _GatherBatch.apply(out, group, r)


def all_reduce_grads(params, group=None) -> None:
    """Sum the gradients of ``params`` (a module or an iterable of parameters) over ``group`` (see the
    module docstring), blocking, after the backward. FSDP2's sharded gradients (DTensor) are summed shard by
    shard. ``GradSync`` does the same bucketed and overlapped with the backward."""
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    for p in params:
        if p.grad is not None:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            dist.all_reduce(g, group=group)


class GradSync:
    """The sequence-parallel gradient sum, bucketed and overlapped with the backward (as DDP does it).

    Buckets of about ``bucket_mb`` MiB are filled in reverse parameter order (about the order in which the
    backward produces gradients); a post-accumulate-grad hook on every parameter launches a bucket's
    asynchronous all-reduce (one flat tensor) as soon as all its gradients exist, while the backward goes on
    with earlier layers; a callback at the end of the backward waits for them and writes the sums back.
    Buckets with gradients missing this step are summed there (over the gradients present, the same set
    on every rank). One backward per optimizer step (no gradient accumulation across backwards while
    enabled: set ``enabled = False`` for all but the last). ``remove()`` takes the hooks off."""

    def __init__(self, params, group=None, bucket_mb: float = 25.0):
        if isinstance(params, torch.nn.Module):
            params = params.parameters()
        params = [p for p in params if p.requires_grad]
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        self.group, self.enabled = group, True
        cap, self.buckets, cur, size = bucket_mb * 2**20, [], [], 0
        for p in reversed(params):
            cur.append(p)
            size += p.numel() * p.element_size()
            if size >= cap:
                self.buckets.append(cur)
                cur, size = [], 0
        if cur:
            self.buckets.append(cur)
        self._bucket = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._ready: list[list] = [[] for _ in self.buckets]
        self._inflight: list = []
        self._queued = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _hook(self, p) -> None:
        if not self.enabled:
            return
        if not self._queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._queued = True
        i = self._bucket[id(p)]
        self._ready[i].append(p)
        if len(self._ready[i]) == len(self.buckets[i]):
            self._launch(i)

    def _launch(self, i: int) -> None:
        ps, self._ready[i] = self._ready[i], []
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        _trace("issue", f"grad_sync[{i}]")
        self._inflight.append((i, ps, flat, work))

    def _finish(self) -> None:
        for i in range(len(self.buckets)):
            if self._ready[i]:
                self._launch(i)
        for i, ps, flat, work in self._inflight:
            work.wait()
            _trace("wait", f"grad_sync[{i}]")
            off = 0
            for p in ps:
                n = p.grad.numel()
                p.grad.copy_(flat[off : off + n].view_as(p.grad))
                off += n
        self._inflight, self._queued = [], False


# ---- the VAE over the same ranks: temporal micro chunks are independent ------------------------------------


def _gather_chunks(buf: torch.Tensor, group, dst: int):
    """buf (per, ...) from every rank -> [buf of rank 0, rank 1, ...] on group rank ``dst`` (None elsewhere)."""
    p = dist.get_world_size(group)
    parts = [torch.empty_like(buf) for _ in range(p)] if dist.get_rank(group) == dst else None
    dist.gather(buf, parts, dst=dist.get_global_rank(group, dst), group=group)
    return parts


@torch.no_grad()
def parallel_decode(vae, latents: torch.Tensor, num_frames: int, group=None, *, dst: int = 0,
                    spatial_tile: int | None = None, out_device=None):  # fmt: skip
    """``vae.decode(latents, num_frames)`` (an OpenSoraVAE) split over the ranks of ``group``: the temporal
    VAE's micro chunks (17 frames for the release) are independent, so rank r decodes chunks r, r + p, ...
    (temporal then 2D VAE), and the frames are gathered once, on group rank ``dst``, which gets the clamped
    video (B, 3, num_frames, H, W) on ``out_device`` (default: the latents' device); other ranks get None.
    Identical to one process."""
    group = group if group is not None else dist.group.WORLD
    vae._check_latents(latents, num_frames)
    p, r = dist.get_world_size(group), dist.get_rank(group)
    mz, m = vae.micro_z_frame_size, vae.cfg.micro_frame_size
    n = math.ceil(latents.shape[2] / mz)
    B, _, _, h, w = latents.shape
    f, C = vae.cfg.spatial.downsample, vae.cfg.spatial.in_channels
    buf = torch.zeros(math.ceil(n / p), B, C, m, h * f, w * f, dtype=vae.dtype, device=vae.device)
    for i, k in enumerate(range(r, n, p)):
        z = latents[:, :, k * mz : (k + 1) * mz].to(device=vae.device, dtype=vae.dtype)
        z = z * vae.scale.to(z.dtype) + vae.shift.to(z.dtype)
        frames = vae._spatial_decode(vae.temporal_vae.decode(z, num_frames=min(m, num_frames - k * m)), spatial_tile)
        buf[i, :, :, : frames.shape[2]] = frames.clamp_(-1, 1)
    parts = _gather_chunks(buf, group, dst)
    if parts is None:
        return None
    out_device = latents.device if out_device is None else torch.device(out_device)
    out = torch.empty(B, C, num_frames, h * f, w * f, dtype=vae.dtype, device=out_device)
    for k in range(n):
        t0 = k * m
        nf = min(m, num_frames - t0)
        out[:, :, t0 : t0 + nf] = parts[k % p][k // p, :, :, :nf].to(out.device)
    return out


def _draw_encode_noise(vae, B: int, frames: int, h: int, w: int, generator) -> None:
    """Draw, and drop, the posterior noise ``vae.encode(..., sample=True)`` draws for one temporal chunk of
    ``frames`` frames (the 2D VAE's per micro-batch of frames, then the temporal VAE's), through the same
    distributions' ``sample`` on zero moments of the same shapes, dtypes and devices: ``generator`` ends
    where the real encode of that chunk leaves it, without running the encoders."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from opensora_fast.models.vae_temporal import DiagonalGaussian

    dev = vae.device
    # the 2D VAE's moments come out of a conv: the autocast dtype when autocast is on for this device
    sdt = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else vae.dtype
    n, bs, lc = B * frames, vae.cfg.spatial.micro_batch_size, vae.cfg.spatial.latent_channels
    for i in range(0, n, bs):
        DiagonalGaussianDistribution(torch.zeros(min(bs, n - i), 2 * lc, h, w, dtype=sdt, device=dev)).sample(generator)
    tz = vae.temporal_vae.latent_frames(frames)
    DiagonalGaussian(torch.zeros(B, 2 * vae.out_channels, tz, h, w, dtype=vae.dtype, device=dev)).sample(generator)


@torch.no_grad()
def parallel_encode(vae, video: torch.Tensor, group=None, *, dst: int | None = 0, sample: bool = False,
                    generator=None) -> torch.Tensor | None:  # fmt: skip
    """``vae.encode(video, sample=sample, generator=generator)`` split over the ranks of ``group`` by 17-frame
    chunk (rank r encodes chunks r, r + p, ...), gathered once: on group rank ``dst`` (None elsewhere), or
    with ``dst=None`` on every rank (an all-gather: what a sequence-parallel group of a trainer needs, its
    ranks sharing each sample). Every rank passes the same video.

    ``sample=True``: posterior samples drawn from ``generator`` (None: the default generator), which must
    be in the same state on every rank (seeded alike). A sampled encode draws its noise chunk after chunk,
    so each rank also draws, and drops, the noise of the chunks it does not encode (the draws only, no
    encoder): chunk k gets the noise ``vae.encode`` gives it, and every rank's generator ends where
    ``vae.encode``'s would. The latents (B, C, t, h, w) land on the video's device."""
    group = group if group is not None else dist.group.WORLD
    vae._check_video(video)
    p, r = dist.get_world_size(group), dist.get_rank(group)
    if dst is not None and not (isinstance(dst, int) and 0 <= dst < p):
        raise ValueError(f"dst must be None or a group rank in [0, {p}), got {dst!r}")
    B, _, T, H, W = video.shape
    m, mz = vae.cfg.micro_frame_size, vae.micro_z_frame_size
    n = math.ceil(T / m)
    t, h, w = vae.get_latent_size((T, H, W))
    buf = torch.zeros(math.ceil(n / p), B, vae.out_channels, mz, h, w, dtype=vae.dtype, device=vae.device)
    for k in range(n):
        if k % p != r:
            if sample:
                _draw_encode_noise(vae, B, min(m, T - k * m), h, w, generator)
            continue
        chunk = video[:, :, k * m : (k + 1) * m].to(device=vae.device, dtype=vae.dtype)
        posterior = vae.temporal_vae.encode(vae._spatial_encode(chunk, sample, generator))
        z = posterior.sample(generator) if sample else posterior.mode()
        z = (z - vae.shift.to(z.dtype)) / vae.scale.to(z.dtype)
        buf[k // p, :, :, : z.shape[2]] = z
    if dst is None:
        parts = [torch.empty_like(buf) for _ in range(p)]
        dist.all_gather(parts, buf, group=group)
    else:
        parts = _gather_chunks(buf, group, dst)
        if parts is None:
            return None
    out = torch.empty(B, vae.out_channels, t, h, w, dtype=vae.dtype, device=video.device)
    for k in range(n):
        z0 = k * mz
        nz = min(mz, t - z0)
        out[:, :, z0 : z0 + nz] = parts[k % p][k // p, :, :, :nz].to(out.device)
    return out


SP_MODES = ("dsp", "ulysses", "fastseq")


# ---- installing a strategy on a model from outside --------------------------------------------------------


class _Strategy:
    """Sequence parallelism over ``group``: the mode, the overlap switch and the chunk count."""

    def __init__(self, group, mode: str, overlap: bool, chunks: int):
        self.group, self.mode, self.overlap, self.chunks = group, mode, overlap, chunks
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def layout(self, T: int, S: int) -> SeqLayout:
        return SeqLayout(T, S, self.world, self.rank)

    def attention(self, lay: SeqLayout):
        """The spatial self-attention of Ulysses / FastSeq as ``block_forward``'s ``attn`` argument."""
        if self.mode == "ulysses":
            return lambda a, h, T, layout: ulysses_attention(a, h, lay, self.group, overlap=self.overlap,
                                                             chunks=self.chunks)  # fmt: skip
        return lambda a, h, T, layout: fastseq_attention(a, h, lay, self.group, overlap=self.overlap)


class _ParallelBlock:
    """A block's ``forward`` under a ``_Strategy`` (bound to the block with ``types.MethodType``). The model
    calls it with the full-sequence T, S; what layout its x arrives in follows from the block's place: the
    first spatial block gets the full tokens (split here, no communication), a DSP spatial block the tokens
    layout of the temporal block before it, a DSP temporal block the frames layout (switched here, one
    all-to-all, chunked and pipelined with this block's compute when overlapping); Ulysses / FastSeq keep
    the tokens layout and swap in their spatial attention."""

    def __init__(self, strat: _Strategy, first: bool):
        self.strat, self.first = strat, first

    def __call__(self, blk, x, y, t, mask=None, x_mask=None, t0=None, T=None, S=None, *, kv=None, pending=None,
                 defer=False):  # fmt: skip
        from opensora_fast import kernels as K
        from opensora_fast.models.stdit3 import block_forward

        st = self.strat
        lay = st.layout(T, S)
        if st.mode == "dsp":
            want = "tokens" if blk.temporal else "frames"
            have = "full" if self.first else ("frames" if blk.temporal else "tokens")
        else:
            want, have = "tokens", ("full" if self.first else "tokens")
        fm = lay.local_x_mask(x_mask)
        if have == "full":
            x = split_frames(x, lay) if want == "frames" else split_tokens(x, lay)
        elif have != want:
            if pending is not None:  # the previous MLP's gated residual, before x moves
                m, g, g0 = pending
                x = K.gated_residual(x, m, g, gate0=g0, x_mask=fm if have == "frames" else x_mask)
                pending = None
            if st.overlap and st.chunks > 1:
                return self._pipelined(blk, x, y, t, mask, x_mask, t0, lay, want, kv, defer)
            x = frames_to_tokens(x, lay, st.group) if want == "tokens" else tokens_to_frames(x, lay, st.group)
        xm, Tl, Sl = (fm, lay.Tp, S) if want == "frames" else (x_mask, T, lay.Sp)
        attn = st.attention(lay) if st.mode != "dsp" and not blk.temporal else None
        return block_forward(blk, x, y, t, mask, xm, t0, Tl, Sl, kv=kv, pending=pending, defer=defer, attn=attn)

    def _pipelined(self, blk, x, y, t, mask, x_mask, t0, lay, want, kv, defer):
        """DSP's layout switch cut into pieces (token blocks before a temporal block, frames before a
        spatial one: the pieces are independent sequences of its attention), all issued at once; the block
        runs on each piece as it arrives while the later ones are in flight. Backward: the reverse."""
        from opensora_fast.models.stdit3 import block_forward

        st, p = self.strat, lay.world
        B, C = x.shape[0], x.shape[-1]
        if want == "tokens":  # x (B, Tp*S, C) frames layout -> pieces of the Sp positions
            xv = F.pad(x.reshape(B, lay.Tp, lay.S, C), (0, 0, 0, p * lay.Sp - lay.S)).view(B, lay.Tp, p, lay.Sp, C)
            pieces = _chunks(lay.Sp, st.chunks)
            sends = [xv[:, :, :, a : a + n].permute(2, 0, 1, 3, 4) for a, n in pieces]
        else:  # x (B, T*Sp, C) tokens layout -> pieces of the Tp frames
            xv = F.pad(x.reshape(B, lay.T, lay.Sp, C), (0, 0, 0, 0, 0, p * lay.Tp - lay.T))
            xv = xv.view(B, p, lay.Tp, lay.Sp, C)
            pieces = _chunks(lay.Tp, st.chunks)
            sends = [xv[:, :, a : a + n].permute(1, 0, 2, 3, 4) for a, n in pieces]
        flights = [_a2a_start(s, st.group, f"dsp.to_{want}[{k}]") for k, s in enumerate(sends)]
        fm = lay.local_x_mask(x_mask)
        outs = []
        for k, ((a, n), (buf, fl)) in enumerate(zip(pieces, flights)):
            r = _a2a_finish(buf, fl, st.group)
            if want == "tokens":  # (p: source frame chunk, B, Tp, n, C)
                xc = r.permute(1, 0, 2, 3, 4).reshape(B, p * lay.Tp, n, C)[:, : lay.T].reshape(B, lay.T * n, C)
                xm, Tl, Sl = x_mask, lay.T, n
            else:  # (p: source position chunk, B, n, Sp, C)
                xc = r.permute(1, 2, 0, 3, 4).reshape(B, n, p * lay.Sp, C)[:, :, : lay.S].reshape(B, n * lay.S, C)
                xm, Tl, Sl = (fm[:, a : a + n] if fm is not None else None), n, lay.S
            with _compute(f"dsp.block[{k}]", x):
                o = block_forward(blk, xc, y, t, mask, xm, t0, Tl, Sl, kv=kv, defer=defer)
            o = list(o) if defer else [o]
            o[0] = _mark(o[0], f"dsp.block[{k}].bwd")
            outs.append(o)

        def cat(ts):
            if want == "tokens":
                return torch.cat([v.reshape(B, lay.T, n, C) for v, (_, n) in zip(ts, pieces)], 2).reshape(B, -1, C)
            return torch.cat([v.reshape(B, n, lay.S, C) for v, (_, n) in zip(ts, pieces)], 1).reshape(B, -1, C)

        xo = cat([o[0] for o in outs])
        if not defer:
            return xo
        return xo, cat([o[1] for o in outs]), outs[0][2], outs[0][3]


class _ParallelFinal:
    """The final layer's ``forward`` under a ``_Strategy``: on this rank's token positions, then one
    all-gather of its output."""

    def __init__(self, strat: _Strategy):
        self.strat = strat

    def __call__(self, fl, x, t, x_mask=None, t0=None, T=None, S=None, *, pending=None, rows=None):
        from opensora_fast.models.stdit3 import final_layer_forward

        lay = self.strat.layout(T, S)
        out = final_layer_forward(fl, x, t, x_mask, t0, T, lay.Sp, pending=pending, rows=rows)
        return gather_tokens(out, lay, self.strat.group)


class _BatchParallelForward:
    """A model's ``forward`` split over the batch (``batch_parallel_forward``)."""

    def __init__(self, group, inner):
        self.group, self.inner = group, inner

    def __call__(self, model, x, timestep, y, mask=None, x_mask=None, fps=None, height=None, width=None, **kw):
        def fwd(*a, **k):
            return self.inner(model, *a, **k)

        return batch_parallel_forward(fwd, self.group, x, timestep, y, mask, x_mask, fps, height, width, **kw)


class _OpenSoraSPBlock:
    """An Open-Sora 1.2 spatial block built with ``enable_sequence_parallelism`` (its model's forward splits
    the S tokens of every frame evenly over the sequence-parallel group and gathers them before the final
    layer): our block computation with Ulysses spatial attention over that group. Its cross-attention
    runs locally (it is token-wise; Open-Sora's all-to-alls there move nothing the math needs)."""

    def __init__(self, group, overlap: bool, chunks: int):
        self.group, self.overlap, self.chunks = group, overlap, chunks

    def __call__(self, blk, x, y, t, mask=None, x_mask=None, t0=None, T=None, S=None, **kw):
        from opensora_fast.models.stdit3 import block_forward

        p, r = dist.get_world_size(self.group), dist.get_rank(self.group)
        lay = SeqLayout(T, S * p, p, r)

        def attn(a, h, nf, layout):
            return ulysses_attention(a, h, lay, self.group, overlap=self.overlap, chunks=self.chunks)

        return block_forward(blk, x, y, t, mask, x_mask, t0, T, S, attn=attn, **kw)


def opensora_sp_group(group=None):
    """The group of an Open-Sora model built with ``enable_sequence_parallelism``: ``group``, else Open-Sora's
    own registry (``opensora.acceleration.parallel_states``) when importable, else the world group (what
    Open-Sora's inference sets when the world size is above 1)."""
    if group is not None:
        return group
    try:
        from opensora.acceleration.parallel_states import get_sequence_parallel_group

        g = get_sequence_parallel_group()
        if g is not None:
            return g
    except ImportError:
        pass
    return dist.group.WORLD


def _groups_of(mesh, cfg_parallel):
    """(cfg_group, seq_group) from parallelize()'s ``mesh`` / ``cfg_parallel`` (either None if size 1)."""
    if mesh is None or isinstance(mesh, dist.ProcessGroup):
        group = mesh if mesh is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        if cfg_parallel:
            if world % 2:
                raise ValueError(f"cfg_parallel=True needs an even number of ranks, got {world}")
            if group is not dist.group.WORLD:
                raise ValueError("cfg_parallel=True with a process group: pass a (cfg, seq) DeviceMesh instead")
            return parallel_mesh(world, 2)
        return None, (group if world > 1 else None)
    names = mesh.mesh_dim_names or ()
    cfg_dim = next((n for n in ("cfg", "batch") if n in names), None)
    seq_dim = next((n for n in ("seq", "sp") if n in names), None)
    if seq_dim is None and cfg_dim is None:
        if mesh.ndim != 1:
            raise ValueError(f"mesh: expected dims named 'cfg'/'batch' and 'seq'/'sp', got {names}")
        seq_dim = names[0] if names else 0
    if cfg_parallel is False:
        cfg_dim = None
    elif cfg_parallel and cfg_dim is None:
        raise ValueError(f"cfg_parallel=True needs a mesh dim named 'cfg' or 'batch', got {names}")

    def grp(d):
        if d is None:
            return None
        g = mesh.get_group(d) if isinstance(d, str) else mesh.get_group()
        return g if dist.get_world_size(g) > 1 else None

    return grp(cfg_dim), grp(seq_dim)


def _install_sequence_parallel(model, group, mode: str, overlap: bool, chunks: int) -> None:
    """The per-instance block / final-layer forwards of ``parallelize`` over ``group`` (any size, 1 included:
    bench/bench_parallel.py measures the machinery's own cost that way)."""
    strat = _Strategy(group, mode, overlap, chunks)
    for i, blk in enumerate(model.spatial_blocks):
        blk.forward = types.MethodType(_ParallelBlock(strat, first=i == 0), blk)
    for blk in model.temporal_blocks:
        blk.forward = types.MethodType(_ParallelBlock(strat, first=False), blk)
    model.final_layer.forward = types.MethodType(_ParallelFinal(strat), model.final_layer)


def parallelize(model, mesh=None, *, sp_mode: str = "dsp", cfg_parallel: bool | None = None,
                overlap: bool = True, chunks: int = 2):  # fmt: skip
    """Install sequence (and CFG / batch) parallelism on ``model``, an STDiT3 (ours, or Open-Sora's after
    ``opensora_fast.apply``), from outside: the model's forward keeps its one block loop and knows nothing
    of ranks; each block's and the final layer's ``forward`` are replaced (per instance) by the strategy.
    Every rank of the mesh calls the model with the same inputs and gets the full output. Returns ``model``.

    ``mesh``: None (the world group), a ProcessGroup, or a DeviceMesh (``build_mesh``) whose dims named
    "cfg" (or "batch") split the batch and "seq" (or "sp") the tokens. ``sp_mode``: "dsp" (layout switch,
    2 all-to-alls per block pair), "ulysses" (all-to-alls of q, k, v and of the attention output in every
    spatial block), "fastseq" (all-gather of the spatial attention input, q, k, v of this rank's heads,
    one all-to-all back). ``cfg_parallel``: None follows the mesh; True with mesh None builds a (2,
    world / 2) mesh. ``overlap``: asynchronous collectives in ``chunks`` pieces pipelined with compute
    (``overlap=False``: one blocking collective each). Gradients: each rank's parameter gradients are its
    tokens' share; sum them over the sequence group (``GradSync`` or ``all_reduce_grads``)."""
    from opensora_fast.patch import check_blocks

    if not dist.is_initialized():
        raise RuntimeError("parallelize needs torch.distributed initialised (torchrun)")
    if sp_mode not in SP_MODES:
        raise ValueError(f"sp_mode must be one of {SP_MODES}, got {sp_mode!r}")
    if not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be an int >= 1, got {chunks!r}")
    blocks = check_blocks(model)
    if any(getattr(b, "enable_sequence_parallelism", False) for _, b in blocks):
        raise ValueError("model: built with enable_sequence_parallelism (its forward splits the tokens itself); "
                         "use opensora_fast.apply(model) for it, or build it without and parallelize()")  # fmt: skip
    cfg_group, seq_group = _groups_of(mesh, cfg_parallel)
    if seq_group is not None:
        _install_sequence_parallel(model, seq_group, sp_mode, overlap, chunks)
    if cfg_group is not None:
        model.forward = types.MethodType(_BatchParallelForward(cfg_group, type(model).forward), model)
    return model


def enable_sequence_parallel(model, group=None, mode: str = "dsp", overlap: bool = True):
    """``parallelize(model, group, sp_mode=mode, cfg_parallel=False)`` (kept for callers of the old API)."""
    if not dist.is_initialized():
        raise RuntimeError("enable_sequence_parallel needs torch.distributed initialised (torchrun)")
    return parallelize(model, group, sp_mode=mode, cfg_parallel=False, overlap=overlap)


def enable_batch_parallel(model, group=None):
    """Split every call's batch over ``group`` (default: the world group) and all-gather the outputs; e.g.
    the CFG (cond, uncond) pair over 2 ranks. Combines with ``enable_sequence_parallel`` on another
    group (a (batch, sequence) mesh). Every rank of the group passes the same inputs. Returns the model."""
    if not dist.is_initialized():
        raise RuntimeError("enable_batch_parallel needs torch.distributed initialised (torchrun)")
    group = group if group is not None else dist.group.WORLD
    if dist.get_world_size(group) > 1:
        model.forward = types.MethodType(_BatchParallelForward(group, type(model).forward), model)
    return model


# ---- process groups and meshes ----------------------------------------------------------------------------

DIST_TIMEOUT_S = 600.0  # a collective that waits longer than this fails (PyTorch's default: 30 minutes)


def init_distributed(
    backend: str | None = None, device: str | None = None, timeout: float | None = None
) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's environment; starts the process group when
    WORLD_SIZE is set and none is running (nccl on CUDA, gloo on CPU), with collectives that fail after
    ``timeout`` seconds (default ``DIST_TIMEOUT_S``) instead of PyTorch's 30 minutes.

    ``device`` "cpu" or "cuda" forces the kind; by default CUDA (one GPU per local rank) when this node
    has a GPU for every local process, else the CPU for all of them (e.g. 2 processes on a 1-GPU
    machine): every rank of a node must pick the same kind, or the group's collectives cannot meet."""
    from opensora_fast.common import UsageError, check_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device is None:
        cuda = torch.cuda.is_available() and local_world <= torch.cuda.device_count()
    else:
        check_device(device)
        cuda = torch.device(device).type == "cuda"
        if cuda and local_world > torch.cuda.device_count():
            raise UsageError(
                f"device={device!r}: {local_world} processes on this node but {torch.cuda.device_count()} GPU(s)"
            )
    dev = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout or DIST_TIMEOUT_S))  # fmt: skip
    return rank, world, dev


def parallel_groups(world: int, sp_size: int, device: torch.device):
    """(dp_rank, dp_size, dp_mesh, sp_group) for ``world`` ranks in a (world / sp_size, sp_size) mesh:
    consecutive ranks share a sample (sequence parallel), ranks sp_size apart see different data."""
    is_dist = dist.is_available() and dist.is_initialized()
    if sp_size == 1:
        return (dist.get_rank() if is_dist else 0), world, None, None
    if not is_dist:
        raise RuntimeError(f"sp_size={sp_size} needs a process group (run under torchrun)")
    if world % sp_size:
        raise ValueError(f"sp_size={sp_size} must divide the world size {world}")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // sp_size, sp_size), mesh_dim_names=("dp", "sp"))
    return mesh["dp"].get_local_rank(), world // sp_size, mesh["dp"], mesh["sp"].get_group()


FSDP_MODES = ("zero2", "zero3")


@dataclass(frozen=True)
class Sharding:
    """What ``shard`` returns: the (dp, sp) mesh (its flattened dim "dp_sp" is what FSDP2 shards over),
    this rank's place in it, the sequence-parallel group (None when ``sp_size`` is 1; pass it to
    ``enable_sequence_parallel``) and the gradient divide factor FSDP2's reduce-scatter applies."""

    mesh: object
    dp_rank: int
    dp_size: int
    sp_rank: int
    sp_size: int
    sp_group: object
    grad_divide_factor: float


def shard(model: nn.Module, *, sp_size: int = 1, dp_size: int | None = None, mode: str = "zero2", mp_policy=None,
          device=None, sp_mode: str | None = None, overlap: bool = True, units=None) -> Sharding:  # fmt: skip
    """FSDP2 over every rank of a (dp_size, sp_size) mesh, the sequence-parallel gradient sum included.

    The world's ranks form a (dp, sp) mesh: consecutive ranks share a sample (sequence parallel), ranks
    ``sp_size`` apart see different data. Every module of ``units`` (default: an STDiT3's spatial and
    temporal blocks; units must be called in the forward) is one FSDP2 unit, the rest (embedders, final
    layer) the root's; all are sharded over the flattened (dp, sp) mesh, so FSDP2's own
    reduce-scatter, issued per unit during the backward, sums the gradients over all ranks: no collective
    over the sequence-parallel group after the backward. The wanted gradient is the mean over dp of the
    sum over sp, so the reduction divides by ``dp_size`` instead of the world size. For a model whose
    blocks were built with Open-Sora's ``enable_sequence_parallelism`` (its forward scales the split /
    gather gradients by 1 / p and p, as Open-Sora's zero2-seq expects) the mean over all ranks is right,
    and FSDP2's default (divide by the world size) is kept.

    A divide factor other than the world size runs as a SUM reduce-scatter followed by a division of its
    output (this rank's shard, 1 / world of the gradient) on the reduce-scatter stream, not as NCCL's
    PreMulSum: gloo has no PREMUL_SUM, and a bf16 PreMulSum by a power of two reads its factor as zero
    in NCCL builds of torch <= 2.13 (pytorch/pytorch#190745).

    ``mode``: "zero2" (parameters stay gathered from the forward to the backward) or "zero3" (resharded
    after the forward). ``mp_policy``: a ``MixedPrecisionPolicy`` (``fsdp_mixed_precision``; None: full
    precision). ``device``: the mesh's device type (default: cuda under nccl, else cpu). ``sp_mode``: when
    given, ``parallelize(model, sp_group, sp_mode=sp_mode, overlap=overlap)`` is installed before sharding;
    otherwise install it (or ``opensora_fast.apply(model, sp_group=...)``) with the returned ``sp_group``.
    ``dp_size`` defaults to world / sp_size."""
    if not dist.is_initialized():
        raise RuntimeError("shard needs torch.distributed initialised (torchrun)")
    world = dist.get_world_size()
    if not isinstance(sp_size, int) or sp_size < 1:
        raise ValueError(f"sp_size must be an int >= 1, got {sp_size!r}")
    if dp_size is None:
        dp_size = world // sp_size
    if not isinstance(dp_size, int) or dp_size < 1 or dp_size * sp_size != world:
        raise ValueError(f"dp_size x sp_size must equal the world size {world}, got dp_size={dp_size!r} x {sp_size}")
    if mode not in FSDP_MODES:
        raise ValueError(f"mode must be one of {FSDP_MODES}, got {mode!r}")
    blocks = [*getattr(model, "spatial_blocks", []), *getattr(model, "temporal_blocks", [])]
    if units is None and not blocks:
        raise ValueError(f"model: expected an STDiT3 (spatial_blocks / temporal_blocks) or units, got "
                         f"{type(model).__name__}")  # fmt: skip
    units = blocks if units is None else list(units)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    dev = torch.device(device).type if device is not None else ("cuda" if dist.get_backend() == "nccl" else "cpu")
    mesh = init_device_mesh(dev, (dp_size, sp_size), mesh_dim_names=("dp", "sp"))
    flat = mesh["dp", "sp"]._flatten("dp_sp")  # torchtitan's idiom; rank order = the world's
    sp_group = mesh["sp"].get_group() if sp_size > 1 else None
    if sp_mode is not None and sp_group is not None:
        parallelize(model, sp_group, sp_mode=sp_mode, cfg_parallel=False, overlap=overlap)
    opensora_sp = any(getattr(b, "enable_sequence_parallelism", False) for b in blocks)
    factor = float(world if opensora_sp else dp_size)
    if factor != world and not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        raise RuntimeError(f"shard with sp_size > 1 needs torch >= 2.8 (FSDP2's gradient divide factor with SUM "
                           f"reductions), this is {torch.__version__}")  # fmt: skip
    reshard = mode == "zero3"
    mp = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    for unit in units:
        fully_shard(unit, mesh=flat, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(model, mesh=flat, reshard_after_forward=reshard, mp_policy=mp)
    if factor != world:
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(factor)
                m.set_force_sum_reduction_for_comms(True)
    return Sharding(mesh, mesh["dp"].get_local_rank(), dp_size, mesh["sp"].get_local_rank(), sp_size, sp_group,
                    factor)  # fmt: skip


def fsdp_mixed_precision(dtype: torch.dtype | None):
    """FSDP2's policy for ``dtype`` training: bf16 parameters in the forward / backward and bf16 gradient
    reduction, the sharded fp32 parameters (master weights) and the optimizer state staying fp32; None
    (full precision) for fp32."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype)


def build_mesh(world: int | None = None, cfg: int = 1, device: str | None = None):
    """A (cfg, seq) DeviceMesh over the world group (``cfg`` 2 for CFG-parallel sampling)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = world or dist.get_world_size()
    if cfg < 1 or world % cfg:
        raise ValueError(f"cfg: the CFG-parallel size {cfg} must divide the world size {world}")
    dev = device or ("cuda" if dist.get_backend() == "nccl" else "cpu")
    return init_device_mesh(dev, (cfg, world // cfg), mesh_dim_names=("cfg", "seq"))


def parallel_mesh(world: int, batch: int = 1):
    """(batch_group, sequence_group) of a (batch, world / batch) device mesh over the world group; either
    is None when its size is 1. ``batch`` 2 for CFG-parallel sampling."""
    if world % batch:
        raise ValueError(f"batch-parallel size {batch} must divide the world size {world}")
    if batch == 1:
        return None, (dist.group.WORLD if world > 1 else None)
    if batch == world:
        return dist.group.WORLD, None
    mesh = build_mesh(world, batch)
    return mesh["cfg"].get_group(), mesh["seq"].get_group()


__all__ = [
    "GradSync",
    "SP_MODES",
    "SeqLayout",
    "Sharding",
    "all_reduce_grads",
    "batch_parallel_forward",
    "build_mesh",
    "fsdp_mixed_precision",
    "init_distributed",
    "parallel_groups",
    "enable_batch_parallel",
    "enable_sequence_parallel",
    "fastseq_attention",
    "frames_to_tokens",
    "gather_tokens",
    "parallel_decode",
    "parallel_encode",
    "parallel_mesh",
    "parallelize",
    "record_schedule",
    "shard",
    "split_frames",
    "tokens_to_frames",
    "ulysses_attention",
]
