"""``opensora-fast sample`` as Open-Sora 1.2's scripts/inference.py samples: the prompt T5 sees (score
suffixes, then Open-Sora's text_preprocessing), ... Tiny random weights, CPU, reference kernels."""

import pytest
import torch
from _tiny import tiny_weights, weight_args

from opensora_fast import cli
from opensora_fast.text import T5TextEncoder

pytestmark = pytest.mark.usefixtures("reference_backend")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return weight_args(tiny_weights(tmp_path_factory.mktemp("weights"), perturb=True))


TINY = ["--image-size", "8x8", "--num-frames", "5", "--steps", "1", "--no-progress"]


@pytest.fixture
def encoded(monkeypatch):
    """The prompts T5 is asked to encode, in order."""
    seen = []
    real = T5TextEncoder.encode

    def spy(self, prompts):
        seen.extend(prompts)
        return real(self, prompts)

    monkeypatch.setattr(T5TextEncoder, "encode", spy)
    return seen


def test_prompts_are_cleaned_as_open_sora_cleans_them(weights, encoded, tmp_path):
    prompt = "A RED Square &amp; @bob moving RIGHT https://example.com/x"
    assert cli.main(["sample", prompt, *weights, "--out-dir", str(tmp_path / "a"), *TINY]) == 0
    assert encoded == ["a red square moving right aesthetic score: 6.5."]
    encoded.clear()
    args = ["--flow", "4", "--camera-motion", "Pan Right", "--aes", "5"]
    assert cli.main(["sample", prompt, *weights, "--out-dir", str(tmp_path / "b"), *TINY, *args]) == 0
    assert encoded == ["a red square moving right aesthetic score: 5.0. motion score: 4.0. camera motion: pan right."]
    encoded.clear()
    assert cli.main(["sample", prompt, *weights, "--out-dir", str(tmp_path / "c"), *TINY, "--no-prompt-cleaning"]) == 0
    assert encoded == [prompt + " aesthetic score: 6.5."]


# ---- Open-Sora's inference options: mask strategies, per-prompt references, indices, samples per prompt


@pytest.fixture
def sampled(monkeypatch):
    """Every RFlow.sample call: (z in, cond_mask, z out)."""
    from opensora_fast.rflow import RFlow

    calls = []
    real = RFlow.sample

    def spy(self, model, z, *args, **kw):
        z_in = z.clone()
        out = real(self, model, z, *args, **kw)
        calls.append((z_in, kw.get("cond_mask"), out))
        return out

    monkeypatch.setattr(RFlow, "sample", spy)
    return calls


def _clip(path, seed, frames=9):
    from opensora_fast.io import write_video

    g = torch.Generator().manual_seed(seed)
    write_video(str(path), torch.rand(3, frames, 16, 16, generator=g) * 2 - 1, fps=8)
    return str(path)


def _ref_latents(weights, path, frames=None):
    from opensora_fast.io import read_video
    from opensora_fast.sample import load_vae

    vae = load_vae(weights[3])
    v = read_video(path, size=(16, 16))[: frames or 9]
    with torch.no_grad():
        return vae.encode(v.permute(1, 0, 2, 3)[None], sample=False)[0]


CLIP = ["--image-size", "16x16", "--num-frames", "9", "--steps", "2", "--no-progress"]


def test_prompt_file_json_suffix_conditions_any_frame(weights, sampled, encoded, tmp_path):
    ref = _clip(tmp_path / "ref.mp4", 1)
    pf = tmp_path / "prompts.txt"
    pf.write_text(
        f'a red square moving right\nA Blue circle{{"reference_path": "{ref}", "mask_strategy": "0,0,1,2,1,0"}}\n'
    )
    assert cli.main(["sample", "--prompt-file", str(pf), *weights, "--out-dir", str(tmp_path / "o"), *CLIP]) == 0
    assert encoded == ["a red square moving right aesthetic score: 6.5.", "a blue circle aesthetic score: 6.5."]
    (z0, m0, _), (z1, m1, out1) = sampled
    assert m0 is None
    T = z1.shape[2]
    assert T == 3 and m1.tolist() == [[1.0, 1.0, 0.0]]
    lat = _ref_latents(weights, ref)
    torch.testing.assert_close(z1[0, :, 2], lat[:, 1])  # ref latent frame 1 -> clip latent frame 2
    assert torch.equal(out1[0, :, 2], z1[0, :, 2])  # edit ratio 0: kept through every step
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert names == ["000_a_red_square_moving_right.mp4", "001_a_blue_circle.mp4"]


def test_mask_strategy_several_references_edit_ratio_and_align(weights, sampled, tmp_path):
    a, b = _clip(tmp_path / "a.mp4", 2), _clip(tmp_path / "b.mp4", 3)
    args = ["sample", "a cat", *weights, "--out-dir", str(tmp_path / "o"), *CLIP, "--reference", f"{a};{b}"]
    assert cli.main([*args, "--mask-strategy", "0,0,0,0,1;0,1,-1,-1,1,0.5"]) == 0
    z, m, out = sampled[-1]
    assert m.tolist() == [[0.0, 1.0, 0.5]]
    torch.testing.assert_close(z[0, :, 0], _ref_latents(weights, a)[:, 0])
    torch.testing.assert_close(z[0, :, 2], _ref_latents(weights, b)[:, -1])
    assert torch.equal(out[0, :, 0], z[0, :, 0]) and not torch.equal(out[0, :, 1], z[0, :, 1])
    # --align 2: target start 1 rounds down to 0 (1 % 2 is not past half)
    assert cli.main([*args, "--mask-strategy", "0,1,0,1,1", "--align", "2"]) == 0
    z, m, _ = sampled[-1]
    assert m.tolist() == [[0.0, 1.0, 1.0]]
    torch.testing.assert_close(z[0, :, 0], _ref_latents(weights, b)[:, 0])


def test_nearest_aligned_hand_values():
    from opensora_fast.sample import nearest_aligned

    assert [nearest_aligned(v, 4, 12) for v in (0, 2, 3, 5, 7, 11)] == [0, 0, 4, 4, 8, 8]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--mask-strategy", "0,0,x"], "expected integers"),
        (["--mask-strategy", "0,0,0,0,0"], "length >= 1"),
        (["--mask-strategy", "1,2,3,4,5,0.5,9"], "at most 6"),
        (["--num-sample", "0"], "--num-sample must be >= 1"),
        (["--start-index", "3", "--end-index", "1"], "--start-index/--end-index"),
        (["--align", "0"], "--align must be >= 1"),
    ],
)
def test_bad_inference_options_are_one_line_errors(weights, tmp_path, capsys, extra, message):
    rc = cli.main(["sample", "a cat", *weights, "--out-dir", str(tmp_path), *CLIP, *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_bad_json_suffix(weights, tmp_path, capsys):
    pf = tmp_path / "p.txt"
    pf.write_text('a cat{"reference_path": "x.mp4", "seed": 3}\n')
    rc = cli.main(["sample", "--prompt-file", str(pf), *weights, "--out-dir", str(tmp_path / "o"), *CLIP])
    assert rc == 2 and "only reference_path and mask_strategy" in capsys.readouterr().err


def test_num_sample_indices_and_skip_existing(weights, sampled, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["sample", "a red square", "a blue circle", "a green square", *weights, "--out-dir", str(out), *CLIP]
    sel = ["--num-sample", "2", "--start-index", "1", "--end-index", "2"]
    assert cli.main([*args, *sel]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["001_a_blue_circle_s0.mp4", "001_a_blue_circle_s1.mp4"]
    assert len(sampled) == 2 and not torch.equal(sampled[0][0], sampled[1][0])  # seeds 42 + 1 and 42 + 1 + 3
    g = torch.Generator().manual_seed(42 + 1 + 3)
    assert torch.equal(sampled[1][0], torch.randn(sampled[1][0].shape, generator=g))
    capsys.readouterr()
    assert cli.main([*args, *sel, "--skip-existing"]) == 0
    assert "001_a_blue_circle_s0.mp4 exists: skipped" in capsys.readouterr().out
    assert len(sampled) == 2 and len(list(out.iterdir())) == 2


def test_batch_size_runs_prompts_together_with_the_same_clips(weights, sampled, tmp_path):
    ref = _clip(tmp_path / "ref.mp4", 4)
    prompts = ["a red square", f'a blue circle{{"reference_path": "{ref}"}}', "a green square"]
    base = ["sample", *prompts, *weights, *CLIP]
    assert cli.main([*base, "--out-dir", str(tmp_path / "one")]) == 0
    one = list(sampled)
    sampled.clear()
    assert cli.main([*base, "--out-dir", str(tmp_path / "two"), "--batch-size", "2"]) == 0
    assert [c[0].shape[0] for c in sampled] == [2, 1]  # 3 prompts in forwards of 2 and 1
    assert sampled[0][1].tolist() == [[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]]  # only prompt 1 is conditioned
    z_two = torch.cat([c[2] for c in sampled])
    z_one = torch.cat([c[2] for c in one])
    torch.testing.assert_close(z_two, z_one, rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


# ---- --loop: each loop conditioned on the end of the previous one; multi-part prompts "|0|...|2|..."

LOOP = ["--image-size", "8x8", "--num-frames", "34", "--steps", "2", "--no-progress"]


@pytest.fixture
def loop_spy(monkeypatch):
    """Every RFlow.sample call as (z in, y, cond_mask, z out), and the frames every written mp4 got."""
    from opensora_fast import io
    from opensora_fast.rflow import RFlow

    calls, written = [], []
    real_sample, real_write = RFlow.sample, io.write_video

    def spy(self, model, z, y, *args, **kw):
        z_in = z.clone()
        out = real_sample(self, model, z, y, *args, **kw)
        calls.append((z_in, y.clone(), kw.get("cond_mask"), out.clone()))
        return out

    def write(path, video, *args, **kw):
        written.append(video.clone())
        return real_write(path, video, *args, **kw)

    monkeypatch.setattr(RFlow, "sample", spy)
    monkeypatch.setattr(io, "write_video", write)
    return calls, written


def test_loop_conditions_each_clip_on_the_last_frames_of_the_one_before(weights, loop_spy, tmp_path):
    from opensora_fast.io import read_video
    from opensora_fast.sample import load_vae

    calls, written = loop_spy
    out = tmp_path / "o"
    args = ["sample", "a red square", *weights, "--out-dir", str(out), *LOOP, "--loop", "3"]
    assert cli.main([*args, "--condition-frame-length", "5"]) == 0
    assert len(calls) == 3 and len(written) == 1
    vae = load_vae(weights[3])
    decoded = []
    with torch.no_grad():
        for li, (z_in, _, mask, z_out) in enumerate(calls):
            decoded.append(vae.decode(z_out, num_frames=34)[0])
            if li == 0:
                assert mask is None
                continue
            # the last 5 latent frames of the previous loop, decoded and encoded again, start this loop, kept
            # through every step (edit ratio 0); the rest is fresh noise
            assert mask.tolist() == [[0.0] * 5 + [1.0] * 5]
            ref = vae.encode(vae.decode(calls[li - 1][3], num_frames=34), sample=False)[0]
            torch.testing.assert_close(z_in[0, :, :5], ref[:, 5:])
            assert torch.equal(z_out[0, :, :5], z_in[0, :, :5])
            assert not torch.equal(z_in[0, :, 5:], calls[li - 1][0][0, :, 5:])
    # the output: loop 0's 34 frames, then each later loop without its first 17 (the repeated chunk)
    want = torch.cat([decoded[0], decoded[1][:, 17:], decoded[2][:, 17:]], dim=1)
    assert written[0].shape == (3, 68, 8, 8)
    torch.testing.assert_close(written[0].float(), want, rtol=1e-4, atol=1e-4)
    assert read_video(str(out / "000_a_red_square.mp4")).shape[0] == 68
    # --condition-frame-edit 0.5: the condition frames are noised again (mask 0.5) and change
    calls.clear()
    assert cli.main([*args, "--out-dir", str(tmp_path / "e"), "--condition-frame-edit", "0.5"]) == 0
    assert calls[1][2].tolist() == [[0.5] * 5 + [1.0] * 5]
    assert not torch.equal(calls[1][3][0, :, :5], calls[1][0][0, :, :5])


def test_loop_prompt_parts_pick_the_text_of_each_loop(weights, loop_spy, encoded, tmp_path):
    calls, _ = loop_spy
    prompt = "|0|A RED square|2| a Blue circle "
    argv = ["sample", prompt, *weights, "--out-dir", str(tmp_path), *LOOP, "--loop", "4"]
    assert cli.main(argv) == 0
    # each part gets the score suffix and Open-Sora's cleaning, encoded once
    assert encoded == ["a red square aesthetic score: 6.5.", "a blue circle aesthetic score: 6.5."]
    t5 = T5TextEncoder(weights[5], model_max_length=8)
    red, blue = [t5.encode([t])["y"] for t in list(encoded)]
    for li, (_, y, _, _) in enumerate(calls):
        torch.testing.assert_close(y, red if li < 2 else blue)
    assert [p.name for p in tmp_path.iterdir()] == ["000_0_a_red_square_2_a_blue_circle.mp4"]
    # one loop: the first part only
    encoded.clear()
    assert cli.main([*argv[:-2], "--out-dir", str(tmp_path / "one")]) == 0
    assert encoded == ["a red square aesthetic score: 6.5."]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--loop", "0"], "--loop must be >= 1"),
        (["--condition-frame-length", "0"], "--condition-frame-length must be >= 1"),
        (["--condition-frame-edit", "1.5"], "--condition-frame-edit must be in [0, 1]"),
        (["--loop", "2", "--condition-frame-length", "3"], "must be a multiple of 5 latent frames"),
        (["--loop", "2", "--condition-frame-length", "10"], "fills the clip's 10 latent frames"),
        (["--loop", "2", "--num-frames", "1"], "--loop extends a video"),
        (["--prompt", "|0|a cat|x|a dog"], "loop marker |x| is not an integer"),
        (["--prompt", "|0|a cat|2"], "needs a text after it"),
        (["--prompt", "|0|a cat|0|a dog"], "loop markers must rise"),
    ],
)
def test_bad_loop_options_are_one_line_errors(weights, tmp_path, capsys, extra, message):
    prompt = "a cat"
    if extra[0] == "--prompt":
        prompt, extra = extra[1], []
    rc = cli.main(["sample", prompt, *weights, "--out-dir", str(tmp_path), *LOOP, *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_no_timestep_transform_samples_at_evenly_spaced_timesteps(weights, monkeypatch, tmp_path):
    from opensora_fast.rflow import RFlow

    seen = []
    real = RFlow.timesteps

    def spy(self, *args, **kw):
        ts = real(self, *args, **kw)
        seen.append([float(t[0]) for t in ts])
        return ts

    monkeypatch.setattr(RFlow, "timesteps", spy)
    argv = ["sample", "a cat", *weights, "--image-size", "16x16", "--num-frames", "9", "--no-progress"]
    assert cli.main([*argv, "--steps", "4", "--out-dir", str(tmp_path / "a"), "--no-timestep-transform"]) == 0
    assert seen[-1] == [1000.0, 750.0, 500.0, 250.0]
    # the default: Open-Sora's shift, towards low noise at 16x16 (ratio sqrt(16 * 16 / 512^2) = 1/32)
    assert cli.main([*argv, "--steps", "4", "--out-dir", str(tmp_path / "b")]) == 0
    r = 1 / 32
    assert seen[-1] == pytest.approx([1000 * r * t / (1 + (r - 1) * t) for t in (1.0, 0.75, 0.5, 0.25)], rel=1e-5)
