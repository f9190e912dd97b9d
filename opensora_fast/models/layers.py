"""STDiT3 building blocks with Open-Sora 1.2's parameter names (../shared/reference/opensora-v1.2.md §1).

All normalisation and attention math goes through ``opensora_fast.kernels`` (Triton on CUDA, the
PyTorch reference on CPU, ``OPENSORA_FAST_BACKEND`` forces one), so one switch selects the path.
Shapes: x (B, N, C) with N = T * S tokens, frame-major; modulation vectors (B, 1, C).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from opensora_fast import kernels as K


def approx_gelu() -> nn.Module:
    return nn.GELU(approximate="tanh")


class Mlp(nn.Module):
    """timm's Mlp as Open-Sora uses it: fc1 -> GELU(tanh) -> fc2 (dropout 0)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = approx_gelu()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RMSNorm(nn.Module):
    """LlamaRMSNorm parameters (weight (D,)); the math lives in the attention kernel's prologue."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x):
        return K.reference.rms_norm_ref(x, self.weight, self.variance_epsilon)


# ---------------------------------------------------------------------------------------------
# embedders (§1.4, §1.5)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t f_k), sin(t f_k)] with f_k = exp(-ln(max_period) k / (dim/2)); fp32, cos first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """sinusoid(t) (256) -> Linear -> SiLU -> Linear, t in [0, 1000] unnormalised."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(dtype))


class SizeEmbedder(TimestepEmbedder):
    """The fps embedder: the same sinusoid and MLP on a (B,) or (B, 1) value, repeated to batch bs."""

    def forward(self, s: torch.Tensor, bs: int) -> torch.Tensor:  # type: ignore[override]
        if s.ndim == 1:
            s = s[:, None]
        if s.shape[0] != bs:
            if bs % s.shape[0]:
                raise ValueError(f"fps has batch {s.shape[0]}, which does not divide the batch {bs}")
            s = s.repeat(bs // s.shape[0], 1)
        b, d = s.shape
        dtype = self.mlp[0].weight.dtype
        emb = self.mlp(timestep_embedding(s.reshape(-1), self.frequency_embedding_size).to(dtype))
        return emb.reshape(b, d * emb.shape[-1])


class CaptionEmbedder(nn.Module):
    """T5 features (B, 1, L, 4096) -> Mlp -> (B, 1, L, C); ``y_embedding`` is the null caption
    (a persistent buffer) that replaces each caption with probability ``uncond_prob`` in training."""

    def __init__(self, in_channels: int, hidden_size: int, uncond_prob: float, token_num: int):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)
        self.uncond_prob = uncond_prob

    def token_drop(self, caption, force_drop_ids=None, generator=None):
        if force_drop_ids is None:
            u = torch.rand(caption.shape[0], generator=generator, device="cpu").to(caption.device)
            drop_ids = u < self.uncond_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids[:, None, None, None], self.y_embedding.to(caption.dtype), caption)

    def forward(self, caption, train: bool, force_drop_ids=None, generator=None):
        if train and caption.shape[2:] != self.y_embedding.shape:
            raise ValueError(
                f"y must have shape (B, 1, {self.y_embedding.shape[0]}, {self.y_embedding.shape[1]}) in "
                f"training (the null caption replaces whole captions), got {tuple(caption.shape)}"
            )
        if (train and self.uncond_prob > 0) or force_drop_ids is not None:
            caption = self.token_drop(caption, force_drop_ids, generator)
        return self.y_proj(caption)


class PatchEmbed3D(nn.Module):
    """Conv3d with kernel = stride = patch; zero right-padding of W, H, T to the patch multiple."""

    def __init__(self, patch_size, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x):
        _, _, T, H, W = x.shape
        pt, ph, pw = self.patch_size
        x = F.pad(x, (0, (-W) % pw, 0, (-H) % ph, 0, (-T) % pt))
        x = self.proj(x)  # (B, C, T', H', W')
        return x.flatten(2).transpose(1, 2)  # (B, T'H'W', C), t-major then h then w


@functools.lru_cache(maxsize=512)
def _pos_embed_2d(dim: int, h: int, w: int, scale: float, base_size: int | None, device, dtype):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim // 2, 2, device=device).float() / (dim // 2)))
    rows = torch.arange(h, device=device) / scale
    cols = torch.arange(w, device=device) / scale
    if base_size is not None:
        rows = rows * (base_size / h)
        cols = cols * (base_size / w)
    # token (i, j) row-major; the column coordinate comes first (MAE's meshgrid order)
    c = cols[None, :].expand(h, w).reshape(-1)
    r = rows[:, None].expand(h, w).reshape(-1)

    def sincos(p):
        a = p[:, None] * inv_freq[None, :]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=-1)

    return torch.cat([sincos(c), sincos(r)], dim=-1)[None].to(dtype)


def pos_embed_2d(dim: int, h: int, w: int, scale: float, base_size: int | None, device, dtype) -> torch.Tensor:
    """(1, h*w, dim): [sin(c w), cos(c w), sin(r w), cos(r w)], r_i = i/scale*base/h, c_j = j/scale*base/w,
    w_k = 1/10000^(2k/(dim/2)). Cached per argument tuple, like Open-Sora's PositionEmbedding2D."""
    return _pos_embed_2d(dim, h, w, float(scale), base_size, torch.device(device), dtype)


class RotaryEmbedding(nn.Module):
    """RoPE frequencies as rotary_embedding_torch 0.5.3 keeps them: ``freqs`` (D/2,) is a parameter
    (requires_grad=False), so ``model.to(bf16)`` rounds it and the angles are computed in bf16."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)


# ---------------------------------------------------------------------------------------------
# attention (§1.7, §1.8)


class Attention(nn.Module):
    """qkv Linear -> per-head RMSNorm(q, k) -> RoPE (temporal) -> SDPA -> proj, over frames
    ("spatial") or over time ("temporal") of a (B, T*S, C) token tensor."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, rope: RotaryEmbedding | None = None):
        super().__init__()
        if not qk_norm:
            raise ValueError("only qk_norm=True (Open-Sora 1.2's setting) is implemented")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)
        # Open-Sora's attribute names: ``rope`` is a flag, ``rotary_emb`` the shared RoPE, kept as a
        # plain attribute (not a submodule) so its ``freqs`` is stored once, as ``rope.freqs``.
        self.rope = rope is not None
        self.__dict__["rotary_emb"] = rope

    def forward(self, x, num_frames: int, layout: str):
        return attention_forward(self, x, num_frames, layout)


def rope_freqs(attn: nn.Module) -> torch.Tensor | None:
    """The RoPE ``freqs`` parameter of an Attention (ours, or Open-Sora's whose ``rotary_emb`` is
    the bound method ``RotaryEmbedding.rotate_queries_or_keys``); None without RoPE."""
    if not getattr(attn, "rope", False):
        return None
    r = attn.rotary_emb
    return getattr(r, "__self__", r).freqs


def rope_cos_sin(freqs: torch.Tensor, length: int, device=None):
    """cos, sin (length, 2 * len(freqs)) computed in ``freqs``' dtype (bf16 in a bf16 model, as
    rotary_embedding_torch 0.5.3 does): angles = arange(length) * freqs, pairs interleaved."""
    device = device or freqs.device
    pos = torch.arange(length, device=device, dtype=freqs.dtype)
    ang = (pos[:, None] * freqs.to(device)[None, :]).repeat_interleave(2, dim=-1)
    return ang.cos(), ang.sin()


def attention_forward(attn: nn.Module, x: torch.Tensor, num_frames: int, layout: str) -> torch.Tensor:
    """Open-Sora's Attention on x (B, T*S, C) laid out frame-major; works on our module and on
    Open-Sora's (same attribute names)."""
    qkv = attn.qkv(x)
    freqs = rope_freqs(attn)
    rope = rope_cos_sin(freqs, num_frames, x.device) if freqs is not None else None
    o = K.self_attention(
        qkv,
        attn.q_norm.weight,
        attn.k_norm.weight,
        num_heads=attn.num_heads,
        num_frames=num_frames,
        layout=layout,
        eps=attn.q_norm.variance_epsilon,
        rope=rope,
    )
    return attn.proj(o.to(x.dtype))


class MultiHeadCrossAttention(nn.Module):
    """Video tokens attend to their own sample's valid text tokens (packed (sum y_lens, C))."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(d_model, d_model)
        self.kv_linear = nn.Linear(d_model, 2 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.kv_cache: tuple[object, torch.Tensor] | None = None  # (key, kv), set by the model

    def text_kv(self, y: torch.Tensor, cache_key=None) -> torch.Tensor:
        """kv_linear(y) for packed y (..., sum y_lens, C) -> (sum y_lens, 2C); reused while the
        model's text-KV cache holds the same ``cache_key``."""
        if cache_key is not None and self.kv_cache is not None and self.kv_cache[0] is cache_key:
            return self.kv_cache[1]
        kv = self.kv_linear(y.reshape(-1, y.shape[-1]))
        if cache_key is not None:
            self.kv_cache = (cache_key, kv)
        return kv

    def forward(self, x, y, y_lens, cache_key=None):
        return cross_attention_forward(self, x, y, y_lens, kv=self.text_kv(y, cache_key))


def cross_attention_forward(ca: nn.Module, x, y, y_lens, kv=None) -> torch.Tensor:
    """Open-Sora's MultiHeadCrossAttention: x (B, N, C) queries, packed text y (1, sum y_lens, C)
    (or its precomputed ``kv`` (sum y_lens, 2C)) -> (B, N, C)."""
    q = ca.q_linear(x)
    if kv is None:
        kv = ca.kv_linear(y.reshape(-1, y.shape[-1]))
    o = K.cross_attention(q, kv.to(q.dtype), list(y_lens), num_heads=ca.num_heads)
    return ca.proj(o.to(x.dtype))
