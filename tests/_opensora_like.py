"""A minimal, independent plain-PyTorch copy of Open-Sora 1.2's STDiT3 module tree, written from
../shared/reference/opensora-v1.2.md §1 (same class layout, attribute and parameter names, explicit
attention path, rearranges done with view/permute). No Open-Sora import. Used as the oracle for
opensora_fast's STDiT3 and as the target of ``opensora_fast.apply``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, h):
        dt = h.dtype
        h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dt)


class RotaryEmbedding(nn.Module):
    """rotary_embedding_torch 0.5.3 semantics, 'lang' freqs, interleaved rotate_half."""

    def __init__(self, dim, theta=10000):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    def rotate_queries_or_keys(self, t, seq_dim=-2):
        n = t.shape[seq_dim]
        pos = torch.arange(n, device=t.device, dtype=t.dtype).type(self.freqs.dtype)
        f = pos[:, None] * self.freqs[None, :]
        f = torch.stack([f, f], dim=-1).reshape(n, -1)  # "... n -> ... (n r)", r=2
        x = t.reshape(*t.shape[:-1], -1, 2)
        rot = torch.stack([-x[..., 1], x[..., 0]], dim=-1).reshape(t.shape)
        return t * f.cos() + rot * f.sin()


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, out_features=None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, rope=None):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.enable_flash_attn = False
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = LlamaRMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = LlamaRMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.qk_norm_legacy = False
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)
        self.rope = False
        if rope is not None:
            self.rope = True
            self.rotary_emb = rope

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, D)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = self.rotary_emb(q), self.rotary_emb(k)
        dt = q.dtype
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.to(torch.float32).softmax(dim=-1).to(dt)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class MultiHeadCrossAttention(nn.Module):
    def __init__(self, d_model, num_heads):
        super().__init__()
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.q_linear = nn.Linear(d_model, d_model)
        self.kv_linear = nn.Linear(d_model, d_model * 2)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(d_model, d_model)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, cond, mask=None):
        """Block-diagonal attention: sample b's N queries see only its mask[b] text tokens."""
        B, N, C = x.shape
        H, D = self.num_heads, self.head_dim
        q = self.q_linear(x).view(B, N, H, D).transpose(1, 2)
        kv = self.kv_linear(cond).view(-1, 2, H, D)
        lens = mask if mask is not None else [kv.shape[0] // B] * B
        outs, start = [], 0
        for b, n in enumerate(lens):
            k = kv[start : start + n, 0].transpose(0, 1)  # (H, n, D)
            v = kv[start : start + n, 1].transpose(0, 1)
            start += n
            s = (q[b] @ k.transpose(-2, -1)) * D**-0.5
            outs.append((s.float().softmax(-1).to(q.dtype) @ v).transpose(0, 1).reshape(N, C))
        return self.proj_drop(self.proj(torch.stack(outs)))


def t2i_modulate(x, shift, scale):
    return x * (1 + scale) + shift


def t_mask_select(x_mask, x, masked_x, T, S):
    B, N, C = x.shape
    x = torch.where(x_mask[:, :, None, None], x.view(B, T, S, C), masked_x.view(B, T, S, C))
    return x.reshape(B, N, C)


class STDiT3Block(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, rope=None, qk_norm=True, temporal=False):
        super().__init__()
        self.temporal = temporal
        self.hidden_size = hidden_size
        self.enable_flash_attn = False
        self.enable_sequence_parallelism = False
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm, rope=rope)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.drop_path = nn.Identity()
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(self, x, y, t, mask=None, x_mask=None, t0=None, T=None, S=None):
        B, N, C = x.shape
        sa, ca, ga, sm, cm, gm = (self.scale_shift_table[None] + t.reshape(B, 6, -1)).chunk(6, dim=1)
        if x_mask is not None:
            sa0, ca0, ga0, sm0, cm0, gm0 = (self.scale_shift_table[None] + t0.reshape(B, 6, -1)).chunk(6, dim=1)

        x_m = t2i_modulate(self.norm1(x), sa, ca)
        if x_mask is not None:
            x_m = t_mask_select(x_mask, x_m, t2i_modulate(self.norm1(x), sa0, ca0), T, S)
        if self.temporal:  # B (T S) C -> (B S) T C
            x_m = x_m.view(B, T, S, C).transpose(1, 2).reshape(B * S, T, C)
            x_m = self.attn(x_m).view(B, S, T, C).transpose(1, 2).reshape(B, N, C)
        else:  # B (T S) C -> (B T) S C
            x_m = self.attn(x_m.reshape(B * T, S, C)).reshape(B, N, C)
        x_m_s = ga * x_m
        if x_mask is not None:
            x_m_s = t_mask_select(x_mask, x_m_s, ga0 * x_m, T, S)
        x = x + self.drop_path(x_m_s)
        x = x + self.cross_attn(x, y, mask)
        x_m = t2i_modulate(self.norm2(x), sm, cm)
        if x_mask is not None:
            x_m = t_mask_select(x_mask, x_m, t2i_modulate(self.norm2(x), sm0, cm0), T, S)
        x_m = self.mlp(x_m)
        x_m_s = gm * x_m
        if x_mask is not None:
            x_m_s = t_mask_select(x_mask, x_m_s, gm0 * x_m, T, S)
        return x + self.drop_path(x_m_s)


class T2IFinalLayer(nn.Module):
    def __init__(self, hidden_size, num_patch, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        self.out_channels = out_channels

    def forward(self, x, t, x_mask=None, t0=None, T=None, S=None):
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        x = t2i_modulate(self.norm_final(x), shift, scale)
        if x_mask is not None:
            shift0, scale0 = (self.scale_shift_table[None] + t0[:, None]).chunk(2, dim=1)
            x = t_mask_select(x_mask, x, t2i_modulate(self.norm_final(x), shift0, scale0), T, S)
        return self.linear(x)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None].to(t.device)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t, dtype):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size).to(dtype))


class SizeEmbedder(TimestepEmbedder):
    def forward(self, s, bs):
        if s.ndim == 1:
            s = s[:, None]
        if s.shape[0] != bs:
            s = s.repeat(bs // s.shape[0], 1)
        b, d = s.shape
        f = self.timestep_embedding(s.reshape(-1), self.frequency_embedding_size).to(self.mlp[0].weight.dtype)
        return self.mlp(f).reshape(b, -1)


class CaptionEmbedder(nn.Module):
    def __init__(self, in_channels, hidden_size, uncond_prob, token_num):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)
        self.uncond_prob = uncond_prob

    def forward(self, caption, train, force_drop_ids=None):
        if force_drop_ids is not None:
            caption = torch.where((force_drop_ids == 1)[:, None, None, None], self.y_embedding, caption)
        return self.y_proj(caption)


class PatchEmbed3D(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        _, _, D, H, W = x.shape
        p = self.patch_size
        if W % p[2]:
            x = F.pad(x, (0, p[2] - W % p[2]))
        if H % p[1]:
            x = F.pad(x, (0, 0, 0, p[1] - H % p[1]))
        if D % p[0]:
            x = F.pad(x, (0, 0, 0, 0, 0, p[0] - D % p[0]))
        return self.proj(x).flatten(2).transpose(1, 2)


def pos_embed(dim, h, w, scale, base_size, device, dtype):
    """PositionEmbedding2D: meshgrid(grid_w, grid_h, 'ij') then .t() -> column coordinate first."""
    half = dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2).float().to(device) / half))
    gh = torch.arange(h, device=device) / scale
    gw = torch.arange(w, device=device) / scale
    gh = gh * (base_size / h)
    gw = gw * (base_size / w)
    a, b = torch.meshgrid(gw, gh, indexing="ij")
    a, b = a.t().reshape(-1), b.t().reshape(-1)

    def sc(p):
        o = torch.einsum("i,d->id", p, inv_freq)
        return torch.cat((torch.sin(o), torch.cos(o)), dim=-1)

    return torch.cat([sc(a), sc(b)], dim=-1).unsqueeze(0).to(dtype)


class _SplitS(torch.autograd.Function):
    """Open-Sora's split_forward_gather_backward(x, sp group, dim=2, grad_scale="down")."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        p, r = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
        return x.chunk(p, dim=2)[r].contiguous()

    @staticmethod
    def backward(ctx, g):
        parts = [torch.empty_like(g) for _ in range(torch.distributed.get_world_size(ctx.group))]
        torch.distributed.all_gather(parts, g.contiguous(), group=ctx.group)
        return torch.cat(parts, dim=2) / len(parts), None


class _GatherS(torch.autograd.Function):
    """Open-Sora's gather_forward_split_backward(x, sp group, dim=2, grad_scale="up")."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, g):
        p, r = torch.distributed.get_world_size(ctx.group), torch.distributed.get_rank(ctx.group)
        return g.chunk(p, dim=2)[r] * p, None


class STDiT3(nn.Module):
    """``enable_sequence_parallelism``: Open-Sora 1.2's SP forward over ``sp_group`` (default: the world
    group): x split over the S tokens of every frame (S % p == 0, as Open-Sora asserts), blocks on S / p,
    gathered before the final layer, the blocks flagged. Its spatial attention is left un-parallel here
    (Open-Sora's SeqParallelAttention has the same attributes): only ``opensora_fast.apply`` makes it right."""

    def __init__(self, hidden_size=48, depth=1, num_heads=2, in_channels=4, caption_channels=64, token_num=8,
                 enable_sequence_parallelism=False, sp_group=None):  # fmt: skip
        super().__init__()
        self.enable_sequence_parallelism = enable_sequence_parallelism
        self.sp_group = sp_group
        C = hidden_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels
        self.hidden_size = C
        self.patch_size = (1, 2, 2)
        self.input_sq_size = 512
        self.rope = RotaryEmbedding(C // num_heads)
        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, C)
        self.t_embedder = TimestepEmbedder(C)
        self.fps_embedder = SizeEmbedder(C)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.y_embedder = CaptionEmbedder(caption_channels, C, 0.1, token_num)
        self.spatial_blocks = nn.ModuleList([STDiT3Block(C, num_heads) for _ in range(depth)])
        self.temporal_blocks = nn.ModuleList(
            [STDiT3Block(C, num_heads, rope=self.rope.rotate_queries_or_keys, temporal=True) for _ in range(depth)]
        )
        self.final_layer = T2IFinalLayer(C, 4, self.out_channels)
        for blk in [*self.spatial_blocks, *self.temporal_blocks]:
            blk.enable_sequence_parallelism = enable_sequence_parallelism

    def encode_text(self, y, mask):
        y = self.y_embedder(y, self.training)
        if mask.shape[0] != y.shape[0]:
            mask = mask.repeat(y.shape[0] // mask.shape[0], 1)
        y = y.squeeze(1).masked_select(mask.unsqueeze(-1) != 0).view(1, -1, self.hidden_size)
        return y, mask.sum(dim=1).tolist()

    def forward(self, x, timestep, y, mask=None, x_mask=None, fps=None, height=None, width=None):
        dtype = self.x_embedder.proj.weight.dtype
        B = x.shape[0]
        x, timestep, y = x.to(dtype), timestep.to(dtype), y.to(dtype)
        _, _, Tx, Hx, Wx = x.shape
        T, H, W = Tx, -(-Hx // 2), -(-Wx // 2)
        S = H * W
        scale = (height[0].item() * width[0].item()) ** 0.5 / self.input_sq_size
        pe = pos_embed(self.hidden_size, H, W, scale, round(S**0.5), x.device, x.dtype)
        t = self.t_embedder(timestep, dtype=x.dtype)
        f = self.fps_embedder(fps.unsqueeze(1), B)
        t = t + f
        t_mlp = self.t_block(t)
        t0 = t0_mlp = None
        if x_mask is not None:
            t0 = self.t_embedder(torch.zeros_like(timestep), dtype=x.dtype) + f
            t0_mlp = self.t_block(t0)
        y, y_lens = self.encode_text(y, mask)
        x = self.x_embedder(x)
        x = x.view(B, T, S, -1) + pe
        Sl = S
        if self.enable_sequence_parallelism:
            group = self.sp_group or torch.distributed.group.WORLD
            assert S % torch.distributed.get_world_size(group) == 0
            x = _SplitS.apply(x, group)
            Sl = x.shape[2]
        x = x.reshape(B, T * Sl, -1)
        for sb, tb in zip(self.spatial_blocks, self.temporal_blocks):
            x = sb(x, y, t_mlp, y_lens, x_mask, t0_mlp, T, Sl)
            x = tb(x, y, t_mlp, y_lens, x_mask, t0_mlp, T, Sl)
        if self.enable_sequence_parallelism:
            x = _GatherS.apply(x.view(B, T, Sl, -1), group).reshape(B, T * S, -1)
        x = self.final_layer(x, t, x_mask, t0, T, S)
        # B (Nt Nh Nw) (Tp Hp Wp Cout) -> B Cout (Nt Tp) (Nh Hp) (Nw Wp)
        x = x.view(B, T, H, W, 1, 2, 2, self.out_channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
        x = x.reshape(B, self.out_channels, T, 2 * H, 2 * W)[:, :, :Tx, :Hx, :Wx]
        return x.to(torch.float32)
