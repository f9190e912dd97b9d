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

Gradients: the switches' backward is the opposite switch. ``split_frames`` keeps this rank's frames of a
full tensor every rank holds; ``gather_tokens`` all-gathers the final output (its backward keeps this
rank's part). So when every rank computes the same loss from the gathered output, each rank's parameter
gradients are the contribution of its own tokens, and their SUM over the group (all-reduce) is the
single-process gradient; ``all_reduce_grads`` does that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
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


# ---- Ulysses / FastSeq: tokens layout throughout, spatial attention over heads -------------------------


def _seq_to_heads(x: torch.Tensor, lay: SeqLayout, group, parts: int) -> torch.Tensor:
    """(B, T*Sp, parts*H*D) tokens layout, columns [part 0 heads | part 1 heads | ...] -> (B, T*S,
    parts*(H/p)*D): all S positions for this rank's H/p heads of every part (one all-to-all)."""
    B, _, W = x.shape
    p, Sp = lay.world, lay.Sp
    x = x.reshape(B, lay.T, Sp, parts, p, W // (parts * p))
    x = _all_to_all(x.permute(4, 0, 1, 2, 3, 5), group)  # (p: source S chunk, B, T, Sp, parts, hd)
    x = x.permute(1, 2, 0, 3, 4, 5).reshape(B, lay.T, p * Sp, W // p)[:, :, : lay.S]
    return x.reshape(B, lay.T * lay.S, W // p)


def _heads_to_seq(x: torch.Tensor, lay: SeqLayout, group, parts: int) -> torch.Tensor:
    """The inverse of ``_seq_to_heads``: (B, T*S, parts*(H/p)*D) -> (B, T*Sp, parts*H*D)."""
    B, _, w = x.shape
    p, Sp = lay.world, lay.Sp
    x = F.pad(x.reshape(B, lay.T, lay.S, w), (0, 0, 0, p * Sp - lay.S))
    x = x.view(B, lay.T, p, Sp, parts, w // parts).permute(2, 0, 1, 3, 4, 5)  # (p: dest S chunk, ...)
    x = _all_to_all(x, group)  # (p: source head group, B, T, Sp, parts, w / parts)
    return x.permute(1, 2, 3, 4, 0, 5).reshape(B, lay.T * Sp, w * p)


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
    """(B, T*Sp, C) -> (B, T*S, C) on every rank; backward: the sum of every rank's gradient for this
    rank's positions (all-reduce, then keep this rank's part: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, lay, group):
        ctx.lay, ctx.group = lay, group
        return _GatherTokens.forward(ctx, x, lay, group)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return _GatherTokens.backward(ctx, g)[0], None, None


def all_gather_tokens(x: torch.Tensor, lay: SeqLayout, group=None) -> torch.Tensor:
    """FastSeq: every rank gets all tokens (B, T*S, C) of its (B, T*Sp, C) share; gradients summed back."""
    return _AllGatherTokens.apply(x, lay, group)


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
    module docstring). FSDP2's sharded gradients (DTensor) are summed shard by shard."""
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    for p in params:
        if p.grad is not None:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            dist.all_reduce(g, group=group)


SP_MODES = ("dsp", "ulysses", "fastseq")


def enable_sequence_parallel(model, group=None, mode: str = "dsp"):
    """Run ``model`` (an STDiT3) sequence-parallel over ``group`` (default: the world group); every rank
    of the group must call the model with the same inputs. Returns the model.

    ``mode``: "dsp" (default; the layout switch above: 2 activation all-to-alls per block pair);
    "ulysses" (Open-Sora 1.2's scheme: tokens stay sharded by position, spatial attention runs over H/p
    heads after an all-to-all of q, k, v and one of its output; needs heads divisible by p); "fastseq"
    (OpenDiT's: all-gather the spatial attention input, q, k, v of this rank's heads only, one all-to-all
    back)."""
    if not dist.is_initialized():
        raise RuntimeError("enable_sequence_parallel needs torch.distributed initialised (torchrun)")
    if mode not in SP_MODES:
        raise ValueError(f"mode must be one of {SP_MODES}, got {mode!r}")
    model.sp_group = group if group is not None else dist.group.WORLD
    model.sp_mode = mode
    return model


def enable_batch_parallel(model, group=None):
    """Split every call's batch over ``group`` (default: the world group) and all-gather the outputs; e.g.
    the CFG (cond, uncond) pair over 2 ranks. Combines with ``enable_sequence_parallel`` on another
    group (a (batch, sequence) mesh). Every rank of the group passes the same inputs. Returns the model."""
    if not dist.is_initialized():
        raise RuntimeError("enable_batch_parallel needs torch.distributed initialised (torchrun)")
    model.bp_group = group if group is not None else dist.group.WORLD
    return model


def parallel_mesh(world: int, batch: int = 1):
    """(batch_group, sequence_group) of a (batch, world / batch) device mesh over the world group; either
    is None when its size is 1. ``batch`` 2 for CFG-parallel sampling."""
    if world % batch:
        raise ValueError(f"batch-parallel size {batch} must divide the world size {world}")
    if batch == 1:
        return None, (dist.group.WORLD if world > 1 else None)
    if batch == world:
        return dist.group.WORLD, None
    from torch.distributed.device_mesh import init_device_mesh

    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(dev, (batch, world // batch), mesh_dim_names=("batch", "seq"))
    return mesh["batch"].get_group(), mesh["seq"].get_group()


__all__ = [
    "SeqLayout",
    "all_reduce_grads",
    "batch_parallel_forward",
    "enable_batch_parallel",
    "enable_sequence_parallel",
    "parallel_mesh",
    "SP_MODES",
    "frames_to_tokens",
    "gather_tokens",
    "split_frames",
    "tokens_to_frames",
]
