"""STDiT3 (Open-Sora 1.2's diffusion transformer) on opensora_fast's kernels.

Follows ../shared/reference/opensora-v1.2.md §1 with Open-Sora's parameter names, so its checkpoints
load by name. Norm, modulation and attention math go through ``opensora_fast.kernels`` only.
Fusions that do not change the math: each residual add is fused with the LayerNorm + modulation that
reads it (also across consecutive blocks and into the final layer); the t0 branch is skipped when
x_mask is all True; text K/V can be cached across sampling steps; the final layer can emit only the
velocity channels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.utils.checkpoint

from opensora_fast import kernels as K
from opensora_fast.models.layers import (
    Attention,
    CaptionEmbedder,
    Mlp,
    MultiHeadCrossAttention,
    PatchEmbed3D,
    RotaryEmbedding,
    SizeEmbedder,
    TimestepEmbedder,
    attention_forward,
    cross_attention_forward,
    pos_embed_2d,
)


@dataclass
class STDiT3Config:
    """Open-Sora's STDiT3Config fields (defaults = STDiT3-XL/2) plus opensora_fast switches."""

    input_size: tuple = (None, None, None)
    input_sq_size: int = 512
    in_channels: int = 4
    patch_size: tuple = (1, 2, 2)
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    pred_sigma: bool = True
    drop_path: float = 0.0
    caption_channels: int = 4096
    model_max_length: int = 300
    qk_norm: bool = True
    # accepted for config compatibility; opensora_fast always uses its own kernels, and sequence
    # parallelism is installed from outside (opensora_fast.parallel.parallelize), whatever this says
    enable_flash_attn: bool = False
    enable_layernorm_kernel: bool = False
    enable_sequence_parallelism: bool = False
    only_train_temporal: bool = False
    freeze_y_embedder: bool = False
    skip_y_embedder: bool = False
    # opensora_fast
    grad_checkpoint: bool = False  # torch.utils.checkpoint around every block
    nvtx: bool = False  # torch.cuda.nvtx ranges per block (CUDA only)
    extra: dict = field(default_factory=dict)  # unknown keys of a loaded config.json, kept verbatim

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        self.input_size = tuple(self.input_size)
        if self.drop_path:
            raise ValueError("drop_path > 0 is not implemented (Open-Sora 1.2 uses 0.0)")
        if not self.qk_norm:
            raise ValueError("only qk_norm=True (Open-Sora 1.2's setting) is implemented")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    @classmethod
    def from_dict(cls, d: dict) -> STDiT3Config:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})

    @classmethod
    def xl_2(cls, **kw) -> STDiT3Config:
        """STDiT3-XL/2: C 1152, 28 + 28 blocks, 16 heads of 72 (the released v1.2 model)."""
        return cls(**{**dict(depth=28, hidden_size=1152, patch_size=(1, 2, 2), num_heads=16), **kw})

    @classmethod
    def tiny(cls, **kw) -> STDiT3Config:
        """For tests: C 48, 2 heads of 24, depth 1, 64-dim captions of 8 tokens."""
        base = dict(hidden_size=48, num_heads=2, depth=1, caption_channels=64, model_max_length=8)
        return cls(**{**base, **kw})

    @classmethod
    def small(cls, **kw) -> STDiT3Config:
        """For demos: C 288, 4 heads of 72, depth 4, 256-dim captions of 32 tokens."""
        base = dict(hidden_size=288, num_heads=4, depth=4, caption_channels=256, model_max_length=32)
        return cls(**{**base, **kw})


# ---------------------------------------------------------------------------------------------
# blocks


def _mods(table: torch.Tensor, t: torch.Tensor, n: int, dtype) -> list[torch.Tensor]:
    """table (n, C) + t (B, n*C) -> n tensors (B, C): Open-Sora's chunk of scale_shift_table + t."""
    B = t.shape[0]
    return [m.to(dtype) for m in (table[None] + t.reshape(B, n, -1)).unbind(1)]


def block_forward(
    self,
    x,
    y,
    t,
    mask=None,
    x_mask=None,
    t0=None,
    T=None,
    S=None,
    *,
    kv=None,
    pending=None,
    defer=False,
    attn=None,
):
    """STDiT3Block.forward on the kernels (§1.3); ``self`` is our block or Open-Sora's.

    x (B, T*S, C); y packed text (1, sum y_lens, C); t / t0 (B, 6C); mask = y_lens (list);
    x_mask (B, T) bool (None: every frame uses t). ``kv``: precomputed text K/V (sum y_lens, 2C).
    ``pending`` = (m, gate, gate0): the previous block's MLP output, whose gated residual is fused
    with this block's first LayerNorm. ``defer=True`` returns (x, m, gate, gate0) instead of x.
    ``attn``: the self-attention, ``attn(self.attn, h, T, layout)`` (default ``layers.attention_forward``;
    a parallel strategy passes its own, e.g. Ulysses over heads).
    """
    eps = self.norm1.eps
    dt = x.dtype
    if x.stride(-1) != 1:  # Open-Sora's patch embedding leaves tokens channel-strided
        x = x.contiguous()
    sa, ca, ga, sm, cm, gm = _mods(self.scale_shift_table, t, 6, dt)
    sa0 = ca0 = ga0 = sm0 = cm0 = gm0 = None
    if x_mask is not None:
        sa0, ca0, ga0, sm0, cm0, gm0 = _mods(self.scale_shift_table, t0, 6, dt)
    sel = dict(x_mask=x_mask)

    if pending is None:
        h = K.layernorm_modulate(x, sa, ca, eps=eps, shift0=sa0, scale0=ca0, **sel)
    else:
        m, g, g0 = pending
        x, h = K.add_layernorm_modulate(x, m, sa, ca, gate=g, eps=eps, shift0=sa0, scale0=ca0, gate0=g0, **sel)
    a = (attn or attention_forward)(self.attn, h, T, "temporal" if self.temporal else "spatial").to(dt)
    x = K.gated_residual(x, a, ga, gate0=ga0, **sel)
    c = cross_attention_forward(self.cross_attn, x, y, mask, kv=kv).to(dt)
    x, h = K.add_layernorm_modulate(x, c, sm, cm, eps=self.norm2.eps, shift0=sm0, scale0=cm0, **sel)
    m = self.mlp(h).to(dt)
    if defer:
        return x, m, gm, gm0
    return K.gated_residual(x, m, gm, gate0=gm0, **sel)


class STDiT3Block(nn.Module):
    """One spatial or temporal block: adaLN-modulated self-attention, cross-attention, MLP."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, rope=None, qk_norm=True, temporal=False):
        super().__init__()
        self.temporal = temporal
        self.hidden_size = hidden_size
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, rope=rope)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    forward = block_forward


def final_layer_forward(self, x, t, x_mask=None, t0=None, T=None, S=None, *, pending=None, rows=None):
    """T2IFinalLayer (§1.4): Linear(LN(x) (1 + scale) + shift) with (shift, scale) = table + t
    (pre-t_block embedding, no SiLU). ``pending`` fuses the last block's gated MLP residual;
    ``rows`` (index tensor) keeps only those output features of the linear layer.

    Open-Sora 1.2's t0 branch here normalises the *already modulated* h again:
    h0 = LN(h) (1 + scale0) + shift0 on the frames where x_mask is False. Mirrored exactly.
    """
    dt = x.dtype
    if x.stride(-1) != 1:
        x = x.contiguous()
    shift, scale = (m.to(dt) for m in (self.scale_shift_table[None] + t[:, None]).unbind(1))
    eps = self.norm_final.eps
    if pending is None:
        h = K.layernorm_modulate(x, shift, scale, eps=eps)
    else:
        m, g, g0 = pending
        # gate per frame (x_mask), shift/scale from t on every frame
        sel = dict(x_mask=x_mask, shift0=shift, scale0=scale, gate0=g0) if x_mask is not None else {}
        _, h = K.add_layernorm_modulate(x, m, shift, scale, gate=g, eps=eps, **sel)
    if x_mask is not None:
        shift0, scale0 = (m.to(dt) for m in (self.scale_shift_table[None] + t0[:, None]).unbind(1))
        h0 = K.layernorm_modulate(h, shift0, scale0, eps=eps)
        B, N, C = h.shape
        keep = x_mask.reshape(B, -1, 1, 1)
        h = torch.where(keep, h.view(B, keep.shape[1], -1, C), h0.view(B, keep.shape[1], -1, C)).view(B, N, C)
    if rows is None:
        return self.linear(h)
    return nn.functional.linear(h, self.linear.weight[rows], self.linear.bias[rows])


class T2IFinalLayer(nn.Module):
    def __init__(self, hidden_size, num_patch, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        self.out_channels = out_channels

    forward = final_layer_forward


# ---------------------------------------------------------------------------------------------
# the model


class _TextKey:
    """Identity token of one cached text encoding (per-block K/V caches compare it with ``is``)."""

    def __init__(self, y, mask, packed, y_lens):
        self.y, self.mask, self.packed, self.y_lens = y, mask, packed, y_lens

    def matches(self, y, mask) -> bool:
        if self.y.shape != y.shape or self.y.dtype != y.dtype or not torch.equal(self.y, y):
            return False
        if (self.mask is None) != (mask is None):
            return False
        return mask is None or (self.mask.shape == mask.shape and torch.equal(self.mask, mask))


class STDiT3(nn.Module):
    """forward(x (B, in, T, H, W), timestep (B,), y (B, 1, L, caption), mask (B, L), x_mask (B, T),
    fps (B,), height (B,), width (B,)) -> (B, out, T, H, W) float32, as Open-Sora 1.2's STDiT3."""

    def __init__(self, config: STDiT3Config | None = None, **kw):
        super().__init__()
        config = config or STDiT3Config(**kw)
        self.config = config
        C, heads = config.hidden_size, config.num_heads
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.hidden_size = C
        self.num_heads = heads
        self.patch_size = config.patch_size
        self.input_sq_size = config.input_sq_size

        self.rope = RotaryEmbedding(C // heads)
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, C)
        self.t_embedder = TimestepEmbedder(C)
        self.fps_embedder = SizeEmbedder(C)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C, bias=True))
        self.y_embedder = CaptionEmbedder(
            config.caption_channels, C, config.class_dropout_prob, config.model_max_length
        )
        self.spatial_blocks = nn.ModuleList(
            [STDiT3Block(C, heads, config.mlp_ratio, qk_norm=config.qk_norm) for _ in range(config.depth)]
        )
        self.temporal_blocks = nn.ModuleList(
            [
                STDiT3Block(C, heads, config.mlp_ratio, rope=self.rope, qk_norm=config.qk_norm, temporal=True)
                for _ in range(config.depth)
            ]
        )
        p = math.prod(config.patch_size)
        self.final_layer = T2IFinalLayer(C, p, self.out_channels)

        self._text_cache_on = False
        self._text_key: _TextKey | None = None
        self.initialize_weights()
        if config.only_train_temporal:
            self.requires_grad_(False)
            self.temporal_blocks.requires_grad_(True)
        if config.freeze_y_embedder:
            self.y_embedder.requires_grad_(False)
        self.rope.freqs.requires_grad_(False)

    def initialize_weights(self):
        """Open-Sora's init: xavier-uniform Linear weights, zero biases; fps MLP N(0, 0.02) / zero
        output; zero output projections in temporal blocks."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fps_embedder.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.fps_embedder.mlp[0].bias)
        nn.init.zeros_(self.fps_embedder.mlp[2].weight)
        nn.init.zeros_(self.fps_embedder.mlp[2].bias)
        for blk in self.temporal_blocks:
            nn.init.zeros_(blk.attn.proj.weight)
            nn.init.zeros_(blk.cross_attn.proj.weight)
            nn.init.zeros_(blk.mlp.fc2.weight)

    # ---- sampling-time caches --------------------------------------------------------------

    @contextlib.contextmanager
    def text_kv_cache(self):
        """Within this context (eval, no grad), the embedded text and every block's text K/V are
        computed once and reused while y and mask stay equal (checked with torch.equal each call)."""
        prev = self._text_cache_on
        self._text_cache_on = True
        try:
            yield self
        finally:
            self._text_cache_on = prev
            if not prev:
                self.clear_text_kv_cache()

    def clear_text_kv_cache(self):
        self._text_key = None
        for blk in [*self.spatial_blocks, *self.temporal_blocks]:
            blk.cross_attn.kv_cache = None

    # ---- pieces of forward -----------------------------------------------------------------

    def get_dynamic_size(self, x):
        _, _, T, H, W = x.shape
        pt, ph, pw = self.patch_size
        return -(-T // pt), -(-H // ph), -(-W // pw)

    def encode_text(self, y, mask=None):
        """y (B, 1, L, caption) -> packed (1, sum y_lens, C) and y_lens (list), Open-Sora's encode_text."""
        y = self.y_embedder(y, self.training)
        C = self.hidden_size
        if mask is not None:
            if mask.shape[0] != y.shape[0]:
                mask = mask.repeat(y.shape[0] // mask.shape[0], 1)
            mask = mask.reshape(mask.shape[0], -1)
            y = y.squeeze(1).masked_select(mask.unsqueeze(-1) != 0).view(1, -1, C)
            y_lens = mask.sum(dim=1).tolist()
        else:
            y_lens = [y.shape[2]] * y.shape[0]
            y = y.squeeze(1).reshape(1, -1, C)
        return y, [int(n) for n in y_lens]

    def _text(self, y, mask):
        """(packed y, y_lens, cache key or None); cached only in eval under no_grad."""
        if not (self._text_cache_on and not self.training and not torch.is_grad_enabled()):
            return (*self.encode_text(y, mask), None)
        key = self._text_key
        if key is None or not key.matches(y, mask):
            packed, y_lens = self.encode_text(y, mask)
            key = _TextKey(y.clone(), None if mask is None else mask.clone(), packed, y_lens)
            self._text_key = key
        return key.packed, key.y_lens, key

    def _run(self, name, fn, *args, **kw):
        nvtx = self.config.nvtx and args[0].is_cuda
        if nvtx:
            torch.cuda.nvtx.range_push(name)
        try:
            if self.config.grad_checkpoint and self.training and torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kw)
            return fn(*args, **kw)
        finally:
            if nvtx:
                torch.cuda.nvtx.range_pop()

    def forward(
        self,
        x,
        timestep,
        y,
        mask=None,
        x_mask=None,
        fps=None,
        height=None,
        width=None,
        *,
        velocity_only: bool = False,
        **kwargs,
    ):
        """Open-Sora 1.2's STDiT3.forward. ``velocity_only=True`` returns only the first
        ``in_channels`` output channels (the velocity), computing only those in the final linear.
        Parallelism is installed from outside (``opensora_fast.parallel.parallelize``): this forward
        is the same in one process and under torchrun."""
        if fps is None or height is None or width is None:
            raise ValueError("fps, height and width (pixel sizes, tensors (B,)) are required, as in Open-Sora")
        dtype = self.x_embedder.proj.weight.dtype
        B = x.shape[0]
        x, timestep, y = x.to(dtype), timestep.to(dtype), y.to(dtype)

        # pos-emb (§1.5)
        _, _, Tx, Hx, Wx = x.shape
        T, H, W = self.get_dynamic_size(x)
        S = H * W
        h0 = height[0].item() if torch.is_tensor(height) else float(height)
        w0 = width[0].item() if torch.is_tensor(width) else float(width)
        scale = (h0 * w0) ** 0.5 / self.input_sq_size
        pos_emb = pos_embed_2d(self.hidden_size, H, W, scale, round(S**0.5), x.device, x.dtype)

        # timestep + fps (§1.2 step 4); the t0 branch only when some frame is conditioning
        if x_mask is not None and bool(x_mask.all()):
            x_mask = None
        fps = fps if torch.is_tensor(fps) else torch.tensor([float(fps)], device=x.device)
        fps_emb = self.fps_embedder(fps.unsqueeze(1), B)
        t = self.t_embedder(timestep, dtype=x.dtype) + fps_emb
        t_mlp = self.t_block(t)
        t0 = t0_mlp = None
        if x_mask is not None:
            x_mask = x_mask.to(torch.bool)
            t0 = self.t_embedder(torch.zeros_like(timestep), dtype=x.dtype) + fps_emb
            t0_mlp = self.t_block(t0)

        # text
        if self.config.skip_y_embedder:
            y_lens = mask.long().tolist() if torch.is_tensor(mask) else list(mask)
            key = None
        else:
            y, y_lens, key = self._text(y, mask)

        # patches + pos-emb
        x = self.x_embedder(x)
        # the conv output is channel-strided; the kernels want C contiguous
        x = (x.view(B, T, S, -1) + pos_emb[:, None]).reshape(B, T * S, -1).contiguous()

        cout = self.in_channels if velocity_only else self.out_channels
        rows = None
        if velocity_only:
            idx = torch.arange(self.final_layer.linear.out_features, device=x.device)
            rows = idx[idx % self.out_channels < self.in_channels]
        # blocks: each MLP's gated residual is fused into the next LayerNorm
        pending = None
        for i, (sb, tb) in enumerate(zip(self.spatial_blocks, self.temporal_blocks)):
            for kind, blk in (("spatial", sb), ("temporal", tb)):
                kv = blk.cross_attn.text_kv(y, key) if key is not None else None
                x, *pending = self._run(
                    f"{kind}_block[{i}]",
                    blk,
                    x,
                    y,
                    t_mlp,
                    y_lens,
                    x_mask,
                    t0_mlp,
                    T,
                    S,
                    kv=kv,
                    pending=pending,
                    defer=True,
                )

        x = self._run("final_layer", self.final_layer, x, t, x_mask, t0, T, S, pending=pending, rows=rows)
        x = self.unpatchify(x, T, H, W, Tx, Hx, Wx, cout)
        return x.to(torch.float32)

    def unpatchify(self, x, N_t, N_h, N_w, R_t, R_h, R_w, cout=None):
        """B (Nt Nh Nw) (Tp Hp Wp Cout) -> B Cout (Nt Tp) (Nh Hp) (Nw Wp), cropped to (R_t, R_h, R_w)."""
        cout = cout or self.out_channels
        Tp, Hp, Wp = self.patch_size
        B = x.shape[0]
        x = x.view(B, N_t, N_h, N_w, Tp, Hp, Wp, cout)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, cout, N_t * Tp, N_h * Hp, N_w * Wp)
        return x[:, :, :R_t, :R_h, :R_w]

    # ---- weights ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str, config: STDiT3Config | None = None, strict: bool = True, **kw):
        """Build from a local directory (config.json + safetensors / .bin / .pt) or a weights file.

        Without config.json (or an explicit ``config``) the XL/2 preset is used; ``kw`` overrides
        config fields. Raises naming every missing, unexpected and mis-shaped key when ``strict``.
        """
        from opensora_fast.checkpoint import find_weights, load_into

        if config is None:
            cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else None
            if cfg_path and os.path.exists(cfg_path):
                with open(cfg_path) as f:
                    config = STDiT3Config.from_dict({**json.load(f), **kw})
            else:
                config = STDiT3Config.xl_2(**kw)
        # strict: every tensor comes from the file, so build on the meta device and assign;
        # otherwise keys absent from the file keep their fresh initialisation
        with torch.device("meta") if strict else contextlib.nullcontext():
            model = cls(config)
        load_into(model, find_weights(path), strict=strict, assign=strict)
        model.rope.freqs.requires_grad_(False)
        return model
