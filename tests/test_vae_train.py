"""VAE training: the three stage configs, losses, freezing, loss falls, exact resume from checkpoints."""

import os

import pytest
import torch
from opensora_fast.configs import vae as cv

from opensora_fast import vae_train as vt


def smooth_clips(n, T, H, W, seed=0):
    """(n, 3, T, H, W) random smooth videos in [-0.8, 0.8]: moving sinusoids with random phases/speeds."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, T)[:, None, None]
    y = torch.linspace(-1, 1, H)[None, :, None]
    x = torch.linspace(-1, 1, W)[None, None, :]
    clips = []
    for _ in range(n):
        a = torch.rand(3, 3, generator=g) * 4 - 2
        ph = torch.rand(3, generator=g) * 6.28
        ch = [torch.sin(a[c, 0] * x + a[c, 1] * y + a[c, 2] * t + ph[c]).expand(T, H, W) for c in range(3)]
        clips.append(0.8 * torch.stack(ch, 0))
    return torch.stack(clips)


def test_stage_configs_follow_the_release():
    s1, s2, s3 = cv.STAGE1, cv.STAGE2, cv.STAGE3
    assert (s1.freeze_spatial, s1.use_real_rec_loss, s1.use_z_rec_loss, s1.use_image_identity_loss) == (
        True,
        False,
        True,
        True,
    )
    assert (s1.mixed_strategy, s1.mixed_image_ratio, s1.num_frames) == ("mixed_video_image", 0.2, 17)
    assert (s2.freeze_spatial, s2.use_z_rec_loss, s2.use_image_identity_loss) == (True, True, False)
    assert (s3.freeze_spatial, s3.use_real_rec_loss, s3.use_z_rec_loss) == (False, True, False)
    assert (s3.mixed_strategy, s3.num_frames) == ("mixed_video_random", 33)
    for s in (s1, s2, s3):
        assert (s.lr, s.grad_clip, s.kl_loss_weight, s.batch_size, s.dtype) == (1e-5, 1.0, 1e-6, 1, "bf16")
        assert s.model.temporal.filters == 128 and s.image_size == (256, 256)
    with pytest.raises(ValueError, match="mixed_strategy"):
        vt.VAETrainConfig(mixed_strategy="sometimes")


def test_losses_and_stage1_freezing():
    cfg = cv.tiny(1, mixed_image_ratio=1.0)  # every batch becomes a single frame
    clips = smooth_clips(2, 5, 8, 8)
    torch.manual_seed(0)
    model = vt.build_model(cfg, "cpu")
    frozen = {k: v.clone() for k, v in model.spatial_vae.state_dict().items()}
    temporal = {k: v.clone() for k, v in model.temporal_vae.state_dict().items()}
    seen = []
    res = vt.train_vae(cfg, clips, steps=2, model=model, progress=False, on_step=lambda s, l, p: seen.append(p))
    assert len(res.losses) == 2 and res.step == 2
    assert set(seen[0]) == {"z_rec", "identity"}  # the identity loss is on for one-frame batches
    assert res.losses[0] == pytest.approx(seen[0]["z_rec"] + seen[0]["identity"], rel=1e-6)
    for k, v in model.spatial_vae.state_dict().items():
        assert torch.equal(v, frozen[k]), k  # 2D VAE frozen
    changed = [k for k, v in model.temporal_vae.state_dict().items() if not torch.equal(v, temporal[k])]
    assert len(changed) > 0.9 * len(temporal)

    # the loss terms, recomputed by hand on one batch
    x = clips[:1, :, :3]
    g = torch.Generator().manual_seed(5)
    loss, parts = vt.vae_loss(cv.tiny(3), model, x, generator=g)
    out = model(x, generator=torch.Generator().manual_seed(5))
    rec = (x - out.x_rec).abs().sum() / 3
    m, lv = out.posterior.mean, out.posterior.logvar
    kl = 1e-6 * 0.5 * (m**2 + lv.exp() - 1 - lv).sum()
    assert parts["rec"] == pytest.approx(rec.item(), rel=1e-5)
    assert parts["kl"] == pytest.approx(kl.item(), rel=1e-5)
    assert loss.item() == pytest.approx(rec.item() + kl.item(), rel=1e-5)


def test_loss_falls_stage2():
    clips = smooth_clips(8, 17, 8, 8)
    res = vt.train_vae(cv.tiny(2, mixed_image_ratio=0.0, lr=3e-3), clips, steps=30, progress=False)
    last = sum(res.losses[-5:]) / 5
    assert last < 0.75 * res.losses[0], (res.losses[0], last)
    # control: without updates the same data keeps the loss where it was
    still = vt.train_vae(cv.tiny(2, mixed_image_ratio=0.0, lr=0.0), clips, steps=8, progress=False).losses
    assert min(still) > 0.85 * still[0], still


def test_exact_resume_stage3(tmp_path):
    """4 steps straight == 2 steps, checkpoint, a fresh process-like resume, 2 more steps."""
    cfg = cv.tiny(3, ckpt_every=2)
    clips = smooth_clips(3, 5, 8, 8, seed=1)
    straight = vt.train_vae(cfg, clips, steps=4, progress=False)
    ckpt = str(tmp_path / "ckpt")
    first = vt.train_vae(cfg, clips, steps=2, ckpt_dir=ckpt, progress=False)
    assert first.checkpoint == os.path.join(ckpt, "step-00000002")
    assert sorted(os.listdir(ckpt)) == ["latest", "step-00000002"]  # no temporaries left
    assert sorted(os.listdir(first.checkpoint)) == [
        "checksums.json", "config.json", "model.safetensors", "train_state.pt"
    ]  # fmt: skip
    resumed = vt.train_vae(cfg, clips, steps=4, ckpt_dir=ckpt, resume="auto", progress=False)
    assert resumed.step == 4
    assert first.losses + resumed.losses == straight.losses  # bit-exact
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(os.listdir(ckpt)) == ["latest", "step-00000002", "step-00000004"]
    with open(os.path.join(ckpt, "latest")) as f:
        assert f.read().strip() == "step-00000004"
    with pytest.raises(ValueError, match="no training checkpoint"):
        vt.resolve_resume(str(tmp_path))
    # a flipped bit in the weights is refused on resume, naming the file
    p = os.path.join(first.checkpoint, "model.safetensors")
    data = bytearray(open(p, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(p, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=r"step-00000002/model\.safetensors.*corrupt"):
        vt.train_vae(cfg, clips, steps=4, resume=first.checkpoint, progress=False)


def test_grad_checkpointing_changes_nothing():
    clips = smooth_clips(2, 5, 8, 8, seed=2)
    runs = [vt.train_vae(cv.tiny(3, grad_checkpoint=gc), clips, steps=2, progress=False) for gc in (False, True)]
    assert runs[1].losses == pytest.approx(runs[0].losses, rel=1e-6)
    a, b = runs[0].model.state_dict(), runs[1].model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_train_bf16_autocast_cuda():
    cfg = cv.tiny(3)
    res = vt.train_vae(cfg, smooth_clips(2, 17, 32, 32), steps=3, device="cuda", progress=False)
    assert len(res.losses) == 3 and all(torch.isfinite(torch.tensor(res.losses)))


# ---------------------------------------------------------------------------------------------
# issue 11: LPIPS from local weights, opensora-fast train-vae


def _random_lpips_file(path, lin_names="lin{}.model.1.weight"):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    m = vt.LPIPS()
    sd = {f"features.{k}": v.clone() * 4 for k, v in m.features.state_dict().items()}  # larger: nonzero deep taps
    for i, lin in enumerate(m.lins):
        sd[lin_names.format(i)] = lin.weight.detach().abs().clone()  # LPIPS's lin weights are non-negative
    save_file(sd, str(path))
    return str(path)


def test_lpips_from_local_weights(tmp_path):
    lp = vt.load_lpips(_random_lpips_file(tmp_path / "lpips.safetensors"))
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1, torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    assert torch.equal(lp(a, a), torch.zeros(3))
    d = lp(a, b)
    assert d.shape == (3,) and (d > 0).all()
    assert torch.allclose(lp(b, a), d)
    vt.load_lpips(_random_lpips_file(tmp_path / "b.safetensors", "lin{}.weight"))  # either lin naming
    with pytest.raises(ValueError, match="does not exist"):
        vt.load_lpips(str(tmp_path / "none.pth"))
    from safetensors.torch import save_file

    save_file({"features.0.weight": torch.zeros(64, 3, 3, 3)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(ValueError, match="lacks"):
        vt.load_lpips(str(tmp_path / "c.safetensors"))
    # in the stage-3 loss: weight x LPIPS per frame, broadcast over C*H*W as the release's VAELoss
    cfg = cv.tiny(3)
    torch.manual_seed(0)
    model = vt.build_model(cfg, "cpu")
    x = smooth_clips(1, 5, 16, 16)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    base, p0 = vt.vae_loss(cfg, model, x, g1)
    with_lp, p1 = vt.vae_loss(cfg, model, x, g2, lp)
    out = model(x, generator=torch.Generator().manual_seed(3), decode_pixels=True)
    frames = lambda v: v.transpose(1, 2).reshape(5, 3, 16, 16)  # noqa: E731
    expect = 0.1 * lp(frames(x), frames(out.x_rec)).sum() * (3 * 16 * 16) / 5
    assert p1["lpips"] == pytest.approx(float(expect.detach()), rel=1e-5) and p1["lpips"] > 0
    assert float(with_lp) == pytest.approx(float(base) + p1["lpips"], rel=1e-5)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_train_vae_command_per_stage_with_exact_resume(tmp_path, stage, capsys):
    from opensora_fast import cli
    from opensora_fast.data import make_synthetic_dataset

    csv_path = make_synthetic_dataset(str(tmp_path / "d"), 17, (16, 16), 8, colors=("red",), shapes=("square",))
    argv = ["train-vae", "--data", csv_path, "--stage", str(stage), "--model-config", "tiny", "--image-size",
            "16x16", "--num-frames", "17", "--lr", "1e-3", "--ckpt-every", "2", "--no-progress"]  # fmt: skip
    base = list(argv)
    if stage == 3:
        argv += ["--lpips-weights", _random_lpips_file(tmp_path / "lpips.safetensors")]
    assert cli.main([*argv, "--steps", "4", "--out-dir", str(tmp_path / "a")]) == 0
    assert cli.main([*argv, "--steps", "2", "--out-dir", str(tmp_path / "b")]) == 0
    # the options come from the checkpoint's run.json: --data, --out-dir, --resume and the new --steps suffice
    resume = ["train-vae", "--data", csv_path, "--out-dir", str(tmp_path / "b"), "--resume", "--no-progress"]
    assert cli.main([*resume, "--steps", "4"]) == 0
    import json

    la = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    lb = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb] and len(la) == 4
    if stage == 3:
        assert all(r["lpips"] > 0 for r in la)
    else:
        assert all("z_rec" in r for r in la)
    assert os.path.isfile(tmp_path / "a" / "checkpoints" / "step-00000004" / "model.safetensors")
    capsys.readouterr()
    assert cli.main([*base, "--steps", "1", "--out-dir", str(tmp_path / "c"), "--stage", "3"]) == 0
    assert "LPIPS term off: no --lpips-weights" in capsys.readouterr().err
    assert cli.main([*base, "--steps", "1", "--out-dir", str(tmp_path / "e"), "--lpips-weights", "/nope.pth"]) == 2
    other = 1 if stage != 1 else 2  # another stage's loss cannot continue this run: one line, exit 2
    assert cli.main([*resume, "--steps", "5", "--stage", str(other)]) == 2
    assert "does not fit the checkpoint" in capsys.readouterr().err


def test_micro_frame_size_sets_the_temporal_vae_pieces(tmp_path):
    """Open-Sora 1.2's micro_frame_size: the temporal VAE sees pieces of N frames (None: the model's 17; 0: the
    whole clip, as the 1.2 training configs); the saved config keeps the model's 17."""
    import json

    clips = smooth_clips(2, 20, 8, 8, seed=3)
    seen, losses = {}, {}
    for m in (None, 8, 0):
        torch.manual_seed(0)
        cfg = cv.tiny(2, mixed_image_ratio=0.0, micro_frame_size=m)
        model = vt.build_model(cfg, "cpu")
        real = model.temporal_vae.encode
        seen[m] = []

        def encode(x, *a, _real=real, _seen=seen[m], **k):
            _seen.append(x.shape[2])
            return _real(x, *a, **k)

        model.temporal_vae.encode = encode
        res = vt.train_vae(cfg, clips, steps=1, model=model, progress=False, ckpt_dir=str(tmp_path / str(m)))
        losses[m] = res.losses[0]
        assert model.cfg.micro_frame_size == 17
        with open(os.path.join(res.checkpoint, "config.json")) as f:
            assert json.load(f)["micro_frame_size"] == 17
    assert seen == {None: [17, 3], 8: [8, 8, 4], 0: [20]}
    assert len({losses[None], losses[8], losses[0]}) == 3
    with pytest.raises(ValueError, match="micro_frame_size must be >= 0"):
        cv.tiny(2, micro_frame_size=-1)


def test_train_vae_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """`torchrun --nproc_per_node 2 -m opensora_fast.cli train-vae` (CPU, gloo): DDP with one clip per process
    trains as one process with --grad-accum 2 (the same global batch of 2 clips, the same draws for each clip);
    FSDP2, stopped after 2 steps and resumed, too; one process with a global batch of 1 does not."""
    import json

    from _dist import run_cli
    from safetensors.torch import load_file

    from opensora_fast import cli
    from opensora_fast.data import make_synthetic_dataset

    csv_path = make_synthetic_dataset(str(tmp_path / "d"), 17, (16, 16), 8, colors=("red",), shapes=("square",))
    argv = ["train-vae", "--data", csv_path, "--stage", "3", "--model-config", "tiny", "--image-size", "16x16",
            "--num-frames", "17", "--lr", "1e-3", "--ckpt-every", "2", "--no-progress", "--device", "cpu"]  # fmt: skip

    def torchrun(*extra):
        return run_cli(2, *argv, *extra)

    def losses(name):
        return [json.loads(line)["loss"] for line in open(tmp_path / name / "log.jsonl")]

    def weights(name):
        return load_file(str(tmp_path / name / "checkpoints" / "step-00000003" / "model.safetensors"))

    assert "world size 2 (DDP)" in torchrun("--steps", "3", "--out-dir", str(tmp_path / "ddp"))
    assert "world size 2 (FSDP2)" in torchrun("--fsdp", "--steps", "2", "--out-dir", str(tmp_path / "fsdp"))
    torchrun("--fsdp", "--steps", "3", "--out-dir", str(tmp_path / "fsdp"), "--resume")
    assert cli.main([*argv, "--grad-accum", "2", "--steps", "3", "--out-dir", str(tmp_path / "one")]) == 0
    assert cli.main([*argv, "--steps", "3", "--out-dir", str(tmp_path / "batch1")]) == 0
    one = losses("one")
    assert len(one) == 3 and losses("ddp") == pytest.approx(one, rel=1e-5)
    assert losses("fsdp") == pytest.approx(one, rel=1e-5)
    assert losses("batch1") != pytest.approx(one, rel=1e-3)  # control: half the global batch
    w1, wd, wf = weights("one"), weights("ddp"), weights("fsdp")
    assert set(wd) == set(w1) == set(wf)
    for k in w1:
        torch.testing.assert_close(wd[k], w1[k], rtol=1e-4, atol=1e-6, msg=k)
        torch.testing.assert_close(wf[k], w1[k], rtol=1e-4, atol=1e-6, msg=k)
    assert sorted(os.listdir(tmp_path / "ddp" / "checkpoints" / "step-00000003")) == sorted(
        os.listdir(tmp_path / "one" / "checkpoints" / "step-00000003")
    )
