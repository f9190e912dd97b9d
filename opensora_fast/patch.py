"""``apply(model)``: run an Open-Sora 1.2 STDiT3 built by Open-Sora's own code on opensora_fast's kernels.

The blocks keep their parameters, names and class; only their ``forward`` is replaced (bound per
instance with ``types.MethodType``) by opensora_fast's block computation, which reads the same
attributes (``attn.qkv``, ``attn.q_norm``, ``attn.rotary_emb``, ``cross_attn.q_linear`` ...).
A training or sampling script changes one line::

    model = opensora_fast.apply(model)

A model built with Open-Sora's ``enable_sequence_parallelism`` (its inference turns it on whenever the world
size is above 1, ``zero2-seq`` training too) keeps its own forward, which splits every frame's tokens over
the sequence-parallel group; its spatial blocks get Ulysses attention over that group
(``opensora_fast.parallel``, overlapped), its temporal blocks need no communication.
"""

from __future__ import annotations

import types

import torch.distributed as dist
import torch.nn as nn

from opensora_fast.models.stdit3 import block_forward, final_layer_forward

_BLOCK_ATTRS = ("norm1", "norm2", "attn", "cross_attn", "mlp", "scale_shift_table", "temporal")
_ATTN_ATTRS = ("qkv", "q_norm", "k_norm", "proj", "num_heads")
_CROSS_ATTRS = ("q_linear", "kv_linear", "proj", "num_heads")


def _check_block(name: str, blk: nn.Module) -> None:
    for owner, attrs in ((blk, _BLOCK_ATTRS), (blk.attn, _ATTN_ATTRS), (blk.cross_attn, _CROSS_ATTRS)):
        missing = [a for a in attrs if not hasattr(owner, a)]
        if missing:
            raise TypeError(f"{name} is not an Open-Sora 1.2 STDiT3Block: {type(owner).__name__} lacks {missing}")
    for norm in ("q_norm", "k_norm"):
        if not hasattr(getattr(blk.attn, norm), "weight"):
            raise TypeError(f"{name}.attn.{norm} has no weight: only qk_norm=True models are supported")
    if getattr(blk.attn, "qk_norm_legacy", False):
        raise TypeError(f"{name}.attn uses qk_norm_legacy (RoPE before the norm), which is not supported")
    if getattr(blk.attn, "rope", False):
        r = blk.attn.rotary_emb
        r = getattr(r, "__self__", r)
        if not hasattr(r, "freqs") or getattr(r, "use_xpos", False) or getattr(r, "interpolate_factor", 1.0) != 1.0:
            raise TypeError(f"{name}.attn.rotary_emb is not a plain RotaryEmbedding (freqs, no xpos/interpolation)")
    dp = getattr(blk, "drop_path", None)
    if dp is not None and not isinstance(dp, nn.Identity):
        raise TypeError(f"{name} has drop_path > 0, which opensora_fast does not implement")


def check_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """[(name, block)] of an STDiT3 (ours or Open-Sora's); TypeError naming what is not supported."""
    blocks = [(f"spatial_blocks.{i}", b) for i, b in enumerate(getattr(model, "spatial_blocks", []))]
    blocks += [(f"temporal_blocks.{i}", b) for i, b in enumerate(getattr(model, "temporal_blocks", []))]
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no spatial_blocks / temporal_blocks: not an STDiT3")
    for name, blk in blocks:
        _check_block(name, blk)
    return blocks


def apply(model: nn.Module, *, sp_group=None, overlap: bool = True) -> nn.Module:
    """Swap the computation of every STDiT3 block (and of the final layer) of ``model`` for
    opensora_fast's, in place, sharing the same parameters. Returns ``model``. Idempotent.

    Spatial blocks built with ``enable_sequence_parallelism`` run Ulysses attention over ``sp_group``
    (default: Open-Sora's registered sequence-parallel group when Open-Sora is importable, else the world
    group, which is what Open-Sora's inference registers); ``overlap`` as in ``parallel.parallelize``."""
    blocks = check_blocks(model)
    for _, blk in blocks:
        if getattr(blk, "enable_sequence_parallelism", False) and not blk.temporal:
            from opensora_fast import parallel as P

            if not dist.is_initialized():
                raise RuntimeError(f"{type(model).__name__} was built with enable_sequence_parallelism: "
                                   "initialise torch.distributed before apply()")  # fmt: skip
            blk.forward = types.MethodType(P._OpenSoraSPBlock(P.opensora_sp_group(sp_group), overlap, 2), blk)
        else:
            blk.forward = types.MethodType(block_forward, blk)
    fl = getattr(model, "final_layer", None)
    if fl is not None and all(hasattr(fl, a) for a in ("norm_final", "linear", "scale_shift_table")):
        fl.forward = types.MethodType(final_layer_forward, fl)
    return model
