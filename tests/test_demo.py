"""The demo's prompt check: the colour and the motion a clip shows, on synthetic clips whose content is
known (``data.synthetic_clip``), on a flat clip and on the wrong caption."""

import pytest
import torch

from opensora_fast.data import synthetic_clip
from opensora_fast.demo import clip_content, prompt_check


@pytest.mark.parametrize(
    "color,shape,direction",
    [("red", "square", "right"), ("blue", "circle", "left"), ("green", "square", "up"), ("yellow", "circle", "down")],
)
def test_prompt_check_reads_colour_and_direction(color, shape, direction):
    clip = synthetic_clip(color, shape, direction, 17, (32, 32), 0.1).permute(1, 0, 2, 3)  # (T, 3, H, W)
    ok, seen = prompt_check(f"a {color} {shape} moving {direction}", clip)
    assert ok, seen
    assert seen["color"] == color and seen["direction"] == direction
    assert seen["displacement"] == pytest.approx(0.5, abs=0.05)  # the shape crosses half the frame
    other = {"right": "left", "left": "right", "up": "down", "down": "up"}[direction]
    assert not prompt_check(f"a {color} {shape} moving {other}", clip)[0]
    assert not prompt_check(f"a {'blue' if color != 'blue' else 'red'} {shape} moving {direction}", clip)[0]


def test_flat_or_still_clips_fail():
    flat = torch.full((9, 3, 16, 16), 0.2) + 0.002 * torch.randn(
        9, 3, 16, 16, generator=torch.Generator().manual_seed(0)
    )
    ok, seen = prompt_check("a red square moving right", flat)
    assert not ok and seen["color"] is None and seen["fg_fraction"] < 0.01
    still = synthetic_clip("red", "square", "right", 1, (32, 32)).permute(1, 0, 2, 3).repeat(9, 1, 1, 1)
    ok, seen = prompt_check("a red square moving right", still)
    assert not ok and seen["color"] == "red" and seen["displacement"] < 0.01


def test_bad_shape():
    with pytest.raises(ValueError, match=r"video must be \(T, 3, H, W\)"):
        clip_content(torch.zeros(3, 9, 16, 16))


def _clip(color, shape, direction, T=9, size=(16, 16), offset=0.0):
    return synthetic_clip(color, shape, direction, T, size, offset).permute(1, 0, 2, 3)  # (T, 3, H, W)


@pytest.mark.parametrize("full", [True, False])
def test_demo_check_passes_only_what_was_asked(full, capsys):
    from opensora_fast.demo import DemoOptions, demo_check

    o = DemoOptions(full_check=full)
    red, blue = _clip("red", "square", "right"), _clip("blue", "circle", "left")
    red2 = _clip("red", "square", "right", offset=0.12)
    good = {(o.caption, 0): red, (o.caption, 1): red2, (o.contrast, 0): blue}
    results = demo_check(o, good, red)
    assert all(ok for _, ok, _ in results), results
    assert len(results) == (5 if full else 1)
    assert "PASS" in capsys.readouterr().out
    # the same clip for both seeds fails; a flat reconstruction (the collapsed VAE) fails
    same = {**good, (o.caption, 1): red}
    assert [ok for name, ok, _ in demo_check(o, same, red) if "seeds" in name] == [False]
    flat = torch.full_like(red, 0.2)
    assert (not demo_check(o, good, flat)[0][1]) == full
    # the contrast caption's clip showing the caption's object fails the full check only
    swapped = {**good, (o.contrast, 0): red}
    assert all(ok for _, ok, _ in demo_check(o, swapped, red)) == (not full)
    wrong_seed = {**good, (o.caption, 1): blue}
    assert all(ok for _, ok, _ in demo_check(o, wrong_seed, red)) == (not full)


def test_vae_rec_loss_l2_and_bad_value():
    """The demo's tiny VAE trains with the squared-error pixel loss (L1 collapsed it to the background)."""
    from opensora_fast.vae_train import VAETrainConfig, rec_loss

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 3, 5, 7, 6, generator=g), torch.randn(2, 3, 5, 7, 6, generator=g)
    ref = ((a.double() - b.double()) ** 2).sum() / (2 * 5)
    assert float(rec_loss(a, b, "l2")) == pytest.approx(float(ref), rel=1e-5)
    assert float(rec_loss(a, b)) == pytest.approx(float((a.double() - b.double()).abs().sum() / 10), rel=1e-5)
    assert torch.isnan(rec_loss(a, b.clone().index_fill_(2, torch.tensor([1]), float("nan")), "l2"))
    assert VAETrainConfig(rec_loss="l2").rec_loss == "l2"
    with pytest.raises(ValueError, match="rec_loss must be 'l1' or 'l2'"):
        VAETrainConfig(rec_loss="l3")


def test_a_washed_out_blob_is_no_colour():
    """The object of the VAE that averaged the four colours (mean (0.18, 0.10, -0.07) at the object, measured
    on the last full demo's reconstructions) read as yellow; it must read as grey and fail every caption."""
    from opensora_fast.data import BACKGROUND, COLORS

    g = torch.Generator().manual_seed(7)
    offset = float(torch.rand((), generator=g)) * 0.2 - 0.1
    red = _clip("red", "square", "right", T=17, size=(32, 32), offset=offset)
    bg = torch.tensor(BACKGROUND)[None, :, None, None]
    alpha = (red - bg)[:, :1] / (COLORS["red"][0] - BACKGROUND[0])  # (T, 1, H, W) object coverage
    for color, expect in (((0.18, 0.10, -0.07), "grey"), (COLORS["yellow"], "yellow")):
        clip = bg + (torch.tensor(color)[None, :, None, None] - bg) * alpha
        ok, seen = prompt_check("a yellow square moving right", clip)
        assert seen["color"] == expect and seen["direction"] == "right" and ok == (expect == "yellow"), seen


def test_rec_loss_foreground_weight():
    """foreground_weight k: each pixel's error times 1 + k * sum_c |target - background| (the clip's per-channel
    median); 0 (the default of VAETrainConfig and of rec_loss) is the unweighted loss."""
    from opensora_fast.vae_train import VAETrainConfig, rec_loss

    target = _clip("red", "square", "right")[None].transpose(1, 2)  # (1, 3, T, H, W)
    rec = torch.full_like(target, 0.6)  # the grey background everywhere: wrong only on the object
    plain = float(rec_loss(target, rec, "l2"))
    assert float(rec_loss(target, rec, "l2", 0.0)) == plain
    bg = torch.tensor([0.6, 0.6, 0.6])[None, :, None, None, None]
    w = 1 + 3.0 * (target - bg).abs().sum(1, keepdim=True)
    ref = float((w * (target - rec) ** 2).sum() / target.shape[2])
    assert float(rec_loss(target, rec, "l2", 3.0)) == pytest.approx(ref, rel=1e-5)
    assert ref > 5 * plain  # the object's pixels count ~10x
    # an error on the background alone is not weighted
    rec_bg = target.clone()
    rec_bg[..., 0, 0] += 0.5
    assert float(rec_loss(target, rec_bg, "l2", 3.0)) == pytest.approx(float(rec_loss(target, rec_bg, "l2")))
    assert VAETrainConfig().foreground_weight == 0.0
    with pytest.raises(ValueError, match="foreground_weight must be >= 0"):
        VAETrainConfig(foreground_weight=-1.0)


def test_temporal_vae_stage_learns_the_latents():
    """The demo's temporal-VAE stage (on the frozen 2D VAE's latents) lowers its loss and leaves the 2D VAE as it
    was."""
    from opensora_fast.demo import ClipWindows, train_temporal_vae
    from opensora_fast.models.vae import OpenSoraVAE, OpenSoraVAEConfig

    torch.manual_seed(0)
    vae = OpenSoraVAE(OpenSoraVAEConfig.tiny())
    clips = [_clip(c, "square", d).transpose(0, 1) for c, d in (("red", "right"), ("blue", "left"))]  # (3, T, H, W)
    before = {k: v.clone() for k, v in vae.spatial_vae.state_dict().items()}
    losses = train_temporal_vae(vae, ClipWindows(clips, 5), 40, 4, 3e-3, 0, torch.device("cpu"), 3.0)
    assert len(losses) == 40 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-8:]) < 0.5 * sum(losses[:8])
    assert all(torch.equal(before[k], v) for k, v in vae.spatial_vae.state_dict().items())
    assert not any(p.requires_grad for p in vae.temporal_vae.parameters())


def test_a_failed_full_check_is_an_error(tmp_path, monkeypatch):
    """A failed full check fails the demo (there is no lenient mode): on the quick recipe's models, which
    are too small and short-trained to learn the captions, the full check fails and run_demo raises."""
    import dataclasses

    from opensora_fast import demo

    o = dataclasses.replace(demo.DemoOptions.make(str(tmp_path), quick=True, progress=False), full_check=True)
    seen = []
    real = demo.demo_check
    monkeypatch.setattr(demo, "demo_check", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    with pytest.raises(RuntimeError, match="the demo's check failed .*: demo FAILED"):
        demo.run_demo(o)
    assert len(seen[0]) == 5 and not all(ok for _, ok, _ in seen[0])


def test_the_small_demo_passes_its_full_check(tmp_path):
    """The full demo's recipe and check (the VAE's reconstruction and the samples of both captions show their
    colour and direction; seeds differ) on 16x16 clips of 9 frames (``--small``): the prompt check that CI runs.
    run_demo raises when any check fails."""
    from opensora_fast.demo import DemoOptions, run_demo

    res = run_demo(DemoOptions.make(str(tmp_path), small=True, progress=False))
    names = [name for name, _, _ in res["checks"]]
    assert len(names) == 5 and all(passed for _, passed, _ in res["checks"]), res["checks"]
    assert any(name.startswith("VAE reconstruction") for name in names)
    assert sum("blue circle moving left" in name for name in names) == 1
    assert res["prompt_check"][0] and res["frames"] == 9
