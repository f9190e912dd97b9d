"""Rectified flow: timestep transform, training loss, the Euler/CFG sampler with conditioning."""

import math

import pytest
import torch
from _opensora_like import STDiT3 as OSSTDiT3

from opensora_fast.models.stdit3 import STDiT3, STDiT3Config
from opensora_fast.rflow import RFlow, mean_flat, timestep_transform


def _t(v):
    return torch.tensor([float(v)])


def test_timestep_transform_hand_values():
    # 720p 16 s: ratio = sqrt(720*1280/512^2) * sqrt(408 // 17 * 5) = 1.875 * sqrt(120)
    r = 1.875 * math.sqrt(120)
    got = timestep_transform(_t(500), _t(720), _t(1280), _t(408))
    assert got.item() == pytest.approx(1000 * r * 0.5 / (1 + (r - 1) * 0.5), rel=1e-6)
    # Open-Sora passes bf16 sizes at inference: the ratio is bf16-rounded to 20.5
    bf = {k: v.to(torch.bfloat16) for k, v in dict(h=_t(720), w=_t(1280), n=_t(408)).items()}
    got = timestep_transform(_t(500), bf["h"], bf["w"], bf["n"])
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(1000 * 20.5 * 0.5 / (1 + 19.5 * 0.5), rel=1e-6)
    # an image (num_frames 1) at 240p 9:16 (240 x 426): only the spatial ratio
    r = math.sqrt(240 * 426 / 512**2)
    got = timestep_transform(_t(300), _t(240), _t(426), _t(1))
    assert got.item() == pytest.approx(1000 * r * 0.3 / (1 + (r - 1) * 0.3), rel=1e-6)
    # endpoints are fixed
    ends = timestep_transform(torch.tensor([0.0, 1000.0]), 720, 1280, 408)
    torch.testing.assert_close(ends, torch.tensor([0.0, 1000.0]))


def test_timestep_transform_short_clips_are_finite():
    """2..16 frames: Open-Sora's n_lat = num_frames // 17 * 5 = 0 made t' = 0 / 0 = NaN at t = 1000 (a NaN
    clip from the first step); now the transform of a one-latent-frame clip (an image of that size)."""
    for frames in (2, 9, 16):
        got = timestep_transform(_t(1000), _t(16), _t(16), _t(frames))
        assert torch.isfinite(got).all() and got.item() == pytest.approx(1000.0)
        mid = timestep_transform(_t(500), _t(64), _t(64), _t(frames))
        assert mid.item() == pytest.approx(timestep_transform(_t(500), _t(64), _t(64), _t(1)).item())
    rf = RFlow(num_sampling_steps=4)
    ts = rf.timesteps(1, "cpu", _t(16), _t(16), _t(9))
    assert all(torch.isfinite(t).all() for t in ts)


def test_sampling_timesteps():
    rf = RFlow()
    ts = rf.timesteps(2, "cpu", _t(480).repeat(2), _t(854).repeat(2), _t(102).repeat(2))
    assert len(ts) == 30 and all(t.shape == (2,) for t in ts)
    plain = RFlow(use_timestep_transform=False).timesteps(1, "cpu", None, None, None)
    assert [t.item() for t in plain[:3]] == pytest.approx([1000.0, 1000 * (1 - 1 / 30), 1000 * (1 - 2 / 30)])
    assert all(a[0] > b[0] for a, b in zip(ts, ts[1:]))


def test_logit_normal_timesteps_and_masked_mean():
    rf = RFlow(sample_method="logit-normal", use_timestep_transform=False)
    t = rf.sample_t(4000, "cpu", torch.Generator().manual_seed(0))
    u = torch.logit(t / 1000)
    assert abs(u.mean().item()) < 0.06 and abs(u.std().item() - 1) < 0.05
    x = torch.randn(2, 3, 4, 2, 2)
    m = torch.tensor([[1.0, 0, 1, 1], [0, 0, 1, 0]])
    want = torch.stack([(x[b] * m[b][None, :, None, None]).sum() / (m[b].sum() * 3 * 4) for b in range(2)])
    torch.testing.assert_close(mean_flat(x, m), want)
    torch.testing.assert_close(mean_flat(x), x.mean(dim=(1, 2, 3, 4)))


class _Linearish(torch.nn.Module):
    """Output channels 0..C-1 = the mean of y per sample (constant velocity), C..2C-1 = junk."""

    def forward(self, x, timestep, y, mask=None, x_mask=None, fps=None, height=None, width=None):
        v = y.mean(dim=(1, 2, 3))[:, None, None, None, None].expand_as(x)
        return torch.cat([v, torch.full_like(x, 1e6)], 1)


def test_cfg_and_euler_on_velocity_channels():
    rf = RFlow(num_sampling_steps=30, cfg_scale=7.0)
    z = torch.randn(2, 4, 3, 4, 4)
    y = torch.full((2, 1, 5, 8), 2.0)
    y_null = torch.full((2, 1, 5, 8), 0.5)
    sizes = dict(height=_t(720).repeat(2), width=_t(1280).repeat(2), num_frames=_t(51).repeat(2), fps=_t(24))
    out = rf.sample(_Linearish(), z, y, y_null, progress=False, **sizes)
    # the steps' dt sum to exactly 1, v = 0.5 + 7 (2 - 0.5) on every step
    torch.testing.assert_close(out, z + (0.5 + 7.0 * 1.5))


def _tiny_pair():
    torch.manual_seed(0)
    ref = OSSTDiT3().eval()
    ours = STDiT3(STDiT3Config.tiny()).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _sample(model, cond, seed, steps=8, **kw):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 4, 3, 8, 8, generator=g)
    y = torch.randn(2, 1, 8, 64, generator=g)
    y_null = model.y_embedder.y_embedding[None, None].repeat(2, 1, 1, 1)
    sizes = dict(height=_t(64).repeat(2), width=_t(64).repeat(2), num_frames=_t(51).repeat(2), fps=_t(24))
    cond_mask = torch.tensor([[0.0, 1, 1], [1, 1, 1]]) if cond else None
    rf = RFlow(num_sampling_steps=steps)
    out = rf.sample(
        model,
        z.clone(),
        y,
        y_null,
        text_mask=torch.tensor([[1] * 6 + [0] * 2, [1] * 8]),
        cond_mask=cond_mask,
        generator=g,
        progress=False,
        **sizes,
        **kw,
    )
    return z, out


@pytest.mark.parametrize("cond", [False, True])
def test_cfg_halves_one_after_the_other_give_the_same_samples(reference_backend, cond):
    """cfg_sequential (the memory plan's saver: half the activations) = the batched CFG forward."""
    _, ours = _tiny_pair()
    _, a = _sample(ours, cond, seed=5)
    calls = []
    hook = ours.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        _, b = _sample(ours, cond, seed=5, cfg_sequential=True)
    finally:
        hook.remove()
    assert calls == [2] * 16  # 8 steps x (cond, uncond), 2 samples per forward instead of 4
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cond", [False, True])
def test_sampling_deterministic_and_matches_opensora_structure(reference_backend, cond):
    ref, ours = _tiny_pair()
    z, a = _sample(ours, cond, seed=3)
    _, b = _sample(ours, cond, seed=3)
    _, c = _sample(ours, cond, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all()
    # our fast path (text-KV cache, velocity_only, t0 skip) vs the plain Open-Sora structure
    _, d = _sample(ref, cond, seed=3)
    torch.testing.assert_close(a, d, rtol=1e-4, atol=1e-4)
    if cond:  # the conditioning frame holds the reference latent
        assert torch.equal(a[0, :, 0], z[0, :, 0])


def test_training_loss_falls(reference_backend):
    torch.manual_seed(0)
    model = STDiT3(STDiT3Config.tiny(class_dropout_prob=0.0))
    model.train()
    rf = RFlow(sample_method="logit-normal", use_timestep_transform=True)
    g = torch.Generator().manual_seed(0)
    x0 = torch.linspace(-1, 1, 8)[None, None, None, :, None] * torch.ones(2, 4, 3, 8, 8)
    kwargs = dict(
        y=torch.randn(2, 1, 8, 64, generator=g),
        mask=torch.ones(2, 8, dtype=torch.long),
        fps=_t(24),
        height=_t(64).repeat(2),
        width=_t(64).repeat(2),
        num_frames=_t(51).repeat(2),
    )
    frame_mask = torch.tensor([[False, True, True], [True, True, True]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, eps=1e-15, weight_decay=0.0)
    losses = []
    for _ in range(24):
        terms = rf.training_losses(model, x0, dict(kwargs, x_mask=frame_mask), mask=frame_mask, generator=g)
        loss = terms["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.7 * first, (first, last)


def test_v12_configs():
    from opensora_fast.configs import stdit3 as cfg

    s, t = cfg.SampleConfig(), cfg.TrainConfig()
    assert (s.scheduler.num_sampling_steps, s.scheduler.cfg_scale, s.scheduler.use_timestep_transform) == (
        30,
        7.0,
        True,
    )
    assert s.model.hidden_size == 1152 and s.model.depth == 28 and s.text_encoder.model_max_length == 300
    assert t.scheduler.sample_method == "logit-normal" and t.adam_eps == 1e-15 and t.model.freeze_y_embedder
    assert t.model.grad_checkpoint and s.aes == 6.5
