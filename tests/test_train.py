"""STDiT3 training: the loss falls, exact resume, checkpoint layout, EMA and warm-up, gradient
checkpointing, and the FSDP2 path in a one-process gloo group."""

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
from _dist import free_port, run_cli

from opensora_fast import train as T
from opensora_fast.data import VideoTextDataset, make_synthetic_dataset
from opensora_fast.models.stdit3 import STDiT3, STDiT3Config
from opensora_fast.models.vae import OpenSoraVAE, OpenSoraVAEConfig
from opensora_fast.text import T5TextEncoder, build_tiny_t5

pytestmark = pytest.mark.usefixtures("reference_backend")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    csv_path = make_synthetic_dataset(str(root / "data"), 9, (16, 16), 8, colors=("red", "blue"))
    t5 = build_tiny_t5(str(root / "t5"), extra_text="square circle moving right left up down")
    torch.manual_seed(0)
    vae = OpenSoraVAE(OpenSoraVAEConfig.tiny()).eval().requires_grad_(False)
    return {
        "root": root,
        "data": VideoTextDataset(csv_path, [(9, 16, 16)]),
        "text": T5TextEncoder(t5, model_max_length=8),
        "vae": vae,
    }


def tiny_model(seed=1, **kw):
    torch.manual_seed(seed)
    return STDiT3(STDiT3Config.tiny(in_channels=4, caption_channels=64, model_max_length=8, **kw))


def cfg(**kw):
    base = dict(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, log_every=100, ckpt_every=3, seed=5)
    return T.DiTTrainConfig(**{**base, **kw})


def run(setup, c, model=None, **kw):
    return T.train_dit(
        c,
        setup["data"],
        model or tiny_model(),
        setup["vae"],
        setup["text"],
        device="cpu",
        progress=False,
        **kw,
    )


def test_loss_falls(setup, tmp_path):
    res = run(setup, cfg(steps=30, ckpt_every=100), log_path=str(tmp_path / "log.jsonl"))
    first, last = sum(res.losses[:6]) / 6, sum(res.losses[-6:]) / 6
    assert last < 0.8 * first, (first, last)
    recs = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in recs] == list(range(1, 31))
    assert all(r["tokens_per_s"] > 0 and r["samples_per_s"] > 0 and r["shape"] == [9, 16, 16] for r in recs)
    # tokens per step: 4 clips x 3 latent frames x (8 / 2)^2 patches
    r = recs[-1]
    assert r["tokens_per_s"] / r["samples_per_s"] == pytest.approx(3 * 16)


@pytest.mark.parametrize("cache_latents", [False, True])
def test_exact_resume(setup, tmp_path, cache_latents):
    c = dict(cache_latents=cache_latents)
    straight = run(setup, cfg(**c), ckpt_dir=str(tmp_path / "a"))
    first = run(setup, cfg(steps=3, **c), ckpt_dir=str(tmp_path / "b"))
    resumed = run(setup, cfg(**c), model=tiny_model(seed=99), ckpt_dir=str(tmp_path / "b"), resume="auto")
    assert resumed.step == 6 and len(resumed.losses) == 3
    assert first.losses + resumed.losses == straight.losses  # bit-identical
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n
    for n in straight.ema:
        assert torch.equal(straight.ema[n], resumed.ema[n]), n


def test_checkpoint_layout(setup, tmp_path):
    ck = tmp_path / "ck"
    res = run(setup, cfg(steps=3, ckpt_every=2), ckpt_dir=str(ck))
    assert sorted(os.listdir(ck)) == ["latest", "step-00000002", "step-00000003"]  # no temporaries left
    assert (ck / "latest").read_text().strip() == "step-00000003"
    d = ck / "step-00000003"
    assert sorted(os.listdir(d)) == ["checksums.json", "config.json", "ema", "model.safetensors", "train_state.pt"]
    state = torch.load(d / "train_state.pt", weights_only=True)
    assert state["step"] == 3 and state["optimizer"]["param_groups"][0]["eps"] == 1e-15
    m = STDiT3.from_pretrained(str(d))
    for n, p in res.model.named_parameters():
        assert torch.equal(m.get_parameter(n), p.detach()), n
    e = STDiT3.from_pretrained(str(d / "ema"))
    assert e.config.hidden_size == 48
    for n, v in res.ema.items():
        assert torch.equal(e.get_parameter(n), v), n
    assert not all(torch.equal(e.get_parameter(n), m.get_parameter(n)) for n in res.ema)
    with pytest.raises(ValueError, match="train_state.pt"):
        run(setup, cfg(), resume=str(tmp_path))


def test_ema_and_warmup():
    c = cfg(lr=1e-3, warmup_steps=4)
    assert [c.lr_at(s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert cfg(warmup_steps=0).lr_at(0) == 1e-3
    m = torch.nn.Linear(2, 2)
    m.bias.requires_grad_(False)
    ema = T.init_ema(m)
    assert set(ema) == {"weight"}
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    T.update_ema(ema, m, 0.99)
    assert torch.allclose(ema["weight"], w0 + 0.01)
    for bad in (dict(dtype="fp8"), dict(fsdp_mode="zero1"), dict(steps=0), dict(ema_decay=1.0)):
        with pytest.raises(ValueError):
            cfg(**bad)


def test_grad_checkpoint_same_losses(setup):
    a = run(setup, cfg(steps=2, ckpt_every=100))
    b = run(setup, cfg(steps=2, ckpt_every=100, grad_checkpoint=True))
    assert b.losses == pytest.approx(a.losses, rel=1e-5)


def test_fsdp2_one_process_gloo(setup, tmp_path):
    """fully_shard runs on CPU with gloo: one-rank FSDP2 training matches the plain run, and its
    checkpoint (full tensors) resumes a plain run exactly."""
    plain = run(setup, cfg(steps=4, ckpt_every=100))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        sharded = run(setup, cfg(steps=2, fsdp=True, ckpt_every=2), ckpt_dir=str(tmp_path / "f"))
        from torch.distributed.tensor import DTensor

        blk = sharded.model.spatial_blocks[0]
        assert isinstance(blk.attn.qkv.weight, DTensor) and type(blk).__name__.startswith("FSDP")
        assert isinstance(sharded.ema["spatial_blocks.0.attn.qkv.weight"], DTensor)
    finally:
        dist.destroy_process_group()
    assert sharded.losses == pytest.approx(plain.losses[:2], rel=1e-5)
    resumed = run(setup, cfg(steps=4, ckpt_every=100), resume=str(tmp_path / "f"))
    assert resumed.losses == pytest.approx(plain.losses[2:], rel=1e-4)


def test_fsdp_needs_a_process_group(setup):
    with pytest.raises(RuntimeError, match="needs a process group"):
        run(setup, cfg(steps=1, fsdp=True))


def test_torchrun_two_processes_fsdp2_exact_resume(tmp_path):
    """`torchrun --nproc_per_node 2 -m opensora_fast.cli train` on CPU (gloo, FSDP2 with two shards):
    3 steps straight == 2 steps + resume to 3, bit for bit."""

    make_synthetic_dataset(str(tmp_path / "data"), 9, (16, 16), 8, colors=("red", "blue"))
    build_tiny_t5(str(tmp_path / "t5"), extra_text="square circle moving right left up down")
    torch.manual_seed(0)
    OpenSoraVAE(OpenSoraVAEConfig.tiny()).save_pretrained(str(tmp_path / "vae"))
    args = [
        "--data",
        "data/data.csv",
        "--vae",
        "vae",
        "--t5",
        "t5",
        "--model-config",
        "tiny",
        "--buckets",
        "9x16x16",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "2",
        "--ckpt-every",
        "2",
        "--no-progress",
        "--device",
        "cpu",  # also on a GPU machine: 2 processes need 2 GPUs
    ]

    def torchrun(*extra):
        return run_cli(2, "train", *args, *extra, cwd=tmp_path)

    out = torchrun("--steps", "3", "--out-dir", "straight")
    assert "world size 2" in out
    torchrun("--steps", "2", "--out-dir", "split")
    torchrun("--steps", "3", "--out-dir", "split", "--resume")

    def losses(d):
        return [json.loads(line)["loss"] for line in open(tmp_path / d / "log.jsonl")]

    assert len(losses("straight")) == 3 and losses("split") == losses("straight")


def test_resume_truncates_the_log_after_the_checkpoint(setup, tmp_path):
    log = tmp_path / "log.jsonl"
    run(setup, cfg(steps=3, ckpt_every=2), ckpt_dir=str(tmp_path / "c"), log_path=str(log))
    run(
        setup,
        cfg(steps=4),
        ckpt_dir=str(tmp_path / "d"),
        resume=str(tmp_path / "c" / "step-00000002"),
        log_path=str(log),
    )
    assert [json.loads(line)["step"] for line in open(log)] == [1, 2, 3, 4]


def test_frame_masks_reach_the_model_and_the_loss(setup):
    """mask_ratios: the model gets x_mask (False = a clean conditioning frame) and the loss stays finite;
    mask_ratios=None: no x_mask at all."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs.get("x_mask"))

    model = tiny_model()
    model.register_forward_pre_hook(hook, with_kwargs=True)
    res = run(setup, cfg(steps=2, ckpt_every=100, mask_ratios={"image_head": 1.0}), model=model)
    assert len(seen) == 2 and all(torch.isfinite(torch.tensor(res.losses)))
    for x_mask in seen:
        assert x_mask.dtype == torch.bool and x_mask.shape[1] > 1
        assert not x_mask[:, 0].any() and x_mask[:, 1:].all()
    seen.clear()
    run(setup, cfg(steps=1, ckpt_every=100, mask_ratios=None), model=model)
    assert seen == [None]
    with pytest.raises(ValueError, match="unknown kinds"):
        cfg(mask_ratios={"first_frame": 0.5})


def test_torchrun_sequence_parallel_training(tmp_path):
    """`torchrun --nproc_per_node 2 ... train --sp 2` (CPU, gloo): both ranks share every sample; the
    losses follow the one-process run (same data, draws and, up to summation order, gradients), and a
    resumed sequence-parallel run repeats the straight one bit for bit; with 4 processes and --sp 2 the
    two data-parallel groups (FSDP2) follow a plain 2-process FSDP2 run."""

    from opensora_fast import cli

    make_synthetic_dataset(str(tmp_path / "data"), 9, (16, 16), 8, colors=("red", "blue"))
    build_tiny_t5(str(tmp_path / "t5"), extra_text="square circle moving right left up down")
    torch.manual_seed(0)
    OpenSoraVAE(OpenSoraVAEConfig.tiny()).save_pretrained(str(tmp_path / "vae"))
    d = str(tmp_path)
    args = ["train", "--data", f"{d}/data/data.csv", "--vae", f"{d}/vae", "--t5", f"{d}/t5", "--model-config",
            "tiny", "--buckets", "9x16x16", "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "2",
            "--ckpt-every", "2", "--mask-ratios", "stage3", "--no-progress", "--device", "cpu"]  # fmt: skip

    def torchrun(*extra, nproc=2, sp=2):
        return run_cli(nproc, *args, "--sp", str(sp), *extra)

    def losses(name):
        return [json.loads(line)["loss"] for line in open(tmp_path / name / "log.jsonl")]

    assert cli.main([*args, "--steps", "3", "--out-dir", f"{d}/one"]) == 0
    assert "(sequence parallel 2)" in torchrun("--steps", "3", "--out-dir", f"{d}/sp")
    assert losses("sp") == pytest.approx(losses("one"), rel=1e-4) and len(losses("sp")) == 3
    torchrun("--steps", "2", "--out-dir", f"{d}/split")
    torchrun("--steps", "3", "--out-dir", f"{d}/split", "--resume")
    assert losses("split") == losses("sp")
    # 4 processes: 2 data-parallel groups (FSDP2 over them) x 2 sequence-parallel ranks (Ulysses) == FSDP2
    # over 2
    torchrun("--steps", "3", "--out-dir", f"{d}/dp2", sp=1)
    torchrun("--steps", "3", "--out-dir", f"{d}/dp2sp2", "--sp-mode", "ulysses", nproc=4)
    assert losses("dp2sp2") == pytest.approx(losses("dp2"), rel=1e-4) and losses("dp2") != losses("one")


def test_init_distributed_device_choice(monkeypatch):
    """CUDA only when every local process gets its own GPU; otherwise the CPU for all of them."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # no process group is started
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert T.init_distributed()[2] == torch.device("cpu")  # 2 processes, 1 GPU
    with pytest.raises(ValueError, match="2 processes on this node but 1 GPU"):
        T.init_distributed(device="cuda")
    assert T.init_distributed(device="cpu")[2] == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert T.init_distributed()[2] == torch.device("cuda:0")


def test_bad_clips_are_skipped_counted_and_limited(setup, tmp_path, capsys):
    """A clip corrupt inside its stream passes the scan; at its step it is skipped and reported (file and CSV
    line), replaced by another clip of its bucket, counted in the log; past max_bad_clips training stops."""
    from test_data import corrupt_stream

    csv_path = make_synthetic_dataset(str(tmp_path / "data"), 9, (16, 16), 8, colors=("red", "blue"))
    corrupt_stream(str(tmp_path / "data" / "videos" / "blue_circle_up_0.mp4"))
    ds = VideoTextDataset(csv_path, [(9, 16, 16)])
    assert len(ds) == 16 and not getattr(ds, "bad", None)  # the scan cannot see it
    log = tmp_path / "log.jsonl"
    # 4 steps of 4 clips = one epoch: every clip is drawn once
    res = T.train_dit(cfg(steps=4, ckpt_every=100), ds, tiny_model(), setup["vae"], setup["text"], device="cpu",
                      progress=False, log_path=str(log))  # fmt: skip
    assert len(res.losses) == 4 and all(math.isfinite(v) for v in res.losses)
    err = capsys.readouterr().err
    assert err.count("skipped: clip") == 1 and "blue_circle_up_0.mp4" in err and "data.csv line 17" in err
    assert json.loads(log.read_text().splitlines()[-1])["bad_clips"] == 1
    with pytest.raises(T.TooManyBadClips, match=r"more than --max-bad-clips 0.*blue_circle_up_0\.mp4"):
        T.train_dit(cfg(steps=4, ckpt_every=100, max_bad_clips=0), ds, tiny_model(), setup["vae"], setup["text"],
                    device="cpu", progress=False)  # fmt: skip


def test_bad_clip_with_cache_latents_is_replaced_from_its_bucket(setup, tmp_path, capsys):
    """--cache-latents with fixed buckets (keys (i, T, H, W, start)): a clip that fails to decode is reported
    once and replaced by the next readable clip of its bucket (its window at frame 0), as without the cache."""
    from test_data import corrupt_stream

    csv_path = make_synthetic_dataset(str(tmp_path / "data"), 9, (16, 16), 8, colors=("red", "blue"))
    corrupt_stream(str(tmp_path / "data" / "videos" / "blue_circle_up_0.mp4"))
    ds = VideoTextDataset(csv_path, [(9, 16, 16)])
    res = T.train_dit(cfg(steps=4, ckpt_every=100, cache_latents=True), ds, tiny_model(), setup["vae"],
                      setup["text"], device="cpu", progress=False)  # fmt: skip
    assert len(res.losses) == 4 and all(math.isfinite(v) for v in res.losses)
    err = capsys.readouterr().err
    assert err.count("skipped: clip") == 1 and "blue_circle_up_0.mp4" in err


# ---------------------------------------------------------------------------------------------
# issue 11: the DataLoader pipeline and Open-Sora's bucket_config


@pytest.fixture
def small_256(monkeypatch):
    """Resolution "256" shrunk to 16 x 16 pixels so the 16 x 16 synthetic clips fill it (it has no Open-Sora
    size table: its bucket sizes come from the area)."""
    from opensora_fast import data as D

    monkeypatch.setitem(D.RESOLUTION_AREAS, "256", 16 * 16)


def test_dataloader_workers_give_the_same_losses_and_exact_resume(setup, tmp_path):
    one = run(setup, cfg(steps=4, num_workers=0))
    two = run(setup, cfg(steps=4, num_workers=2))
    assert one.losses == two.losses  # decoding in 2 worker processes changes nothing
    first = run(setup, cfg(steps=2, num_workers=2), ckpt_dir=str(tmp_path / "w"))
    resumed = run(
        setup, cfg(steps=4, num_workers=2), model=tiny_model(seed=9), ckpt_dir=str(tmp_path / "w"), resume="auto"
    )
    assert first.losses + resumed.losses == one.losses


def test_bucket_config_training_draws_per_bucket_batches_and_resumes_exactly(setup, small_256, tmp_path, capsys):
    from opensora_fast.data import BucketConfigDataset

    csv_path = os.path.join(str(setup["root"]), "data", "data.csv")
    # 9-frame clips: length 5 (T > 5) in batches of 3; length 8 is tried with probability 0.5, in batches of 2
    ds = BucketConfigDataset(csv_path, {"256": {1: (1.0, 4), 5: (1.0, 3), 8: ((1.0, 0.5), 2)}})
    assert len(ds) == 16 and not ds.left_out
    setup_b = {**setup, "data": ds}
    log = tmp_path / "log.jsonl"
    a = run(setup_b, cfg(steps=6, num_workers=1), log_path=str(log))
    recs = [json.loads(line) for line in open(log)]
    assert {(tuple(r["shape"]), r["batch"]) for r in recs} == {((5, 16, 16), 3), ((8, 16, 16), 2)}
    out = capsys.readouterr().out
    assert "not drawn by the keep probabilities" in out
    b1 = run(setup_b, cfg(steps=3, num_workers=1), ckpt_dir=str(tmp_path / "c"))
    b2 = run(
        setup_b, cfg(steps=6, num_workers=1), model=tiny_model(seed=9), ckpt_dir=str(tmp_path / "c"), resume="auto"
    )
    assert b1.losses + b2.losses == a.losses


def test_grad_accumulation_equals_a_larger_batch(setup):
    big = run(setup, cfg(steps=3, batch_size=4))
    acc = run(setup, cfg(steps=3, batch_size=2, grad_accum=2))  # the same 4 clips and draws, in 2 backward passes
    assert acc.losses == pytest.approx(big.losses, rel=1e-6, abs=0)
    for (n, p), (_, q) in zip(big.model.named_parameters(), acc.model.named_parameters()):
        if n.endswith("cross_attn.kv_linear.bias"):
            # the key half of this bias has zero true gradient (softmax ignores a constant added to every key
            # score), so its gradient is rounding noise that AdamW (eps 1e-15) turns into lr-sized steps
            p, q = p[p.shape[0] // 2 :], q[q.shape[0] // 2 :]
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)
    three = run(setup, cfg(steps=3, batch_size=4, grad_accum=3))  # uneven pieces (4 + 4 + 4 of 12)
    assert all(math.isfinite(v) for v in three.losses)
    assert T._micro_batches(5, 2) == [slice(0, 2), slice(2, 5)] and T._micro_batches(2, 4) == [slice(0, 1), slice(1, 2)]


def test_fp16_gradient_scaler_skips_overflow_steps_and_resumes(setup, tmp_path):
    ref = run(setup, cfg(steps=3, dtype="fp32"))
    log = tmp_path / "log.jsonl"
    fp16 = run(setup, cfg(steps=3, dtype="fp16"), log_path=str(log))
    assert fp16.losses == ref.losses  # on the CPU the step runs fp32; scaling by 2**16 and back is exact
    recs = [json.loads(line) for line in open(log)]
    assert [r["loss_scale"] for r in recs] == [65536.0] * 3 and not any(r["skipped"] for r in recs)
    # an inf gradient in step 2: that step changes no weight and halves the scale; training goes on
    model = tiny_model()
    calls = []

    def poison(g):
        calls.append(1)
        return g * float("inf") if len(calls) == 2 else g

    w = model.x_embedder.proj.weight
    w.register_hook(poison)
    seen = {}

    def on_step(step, rec):
        seen[step] = (rec, w.detach().clone())

    res = run(setup, cfg(steps=3, dtype="fp16"), model=model, on_step=on_step)
    assert [seen[s][0]["skipped"] for s in range(3)] == [False, True, False]
    assert seen[1][0]["loss_scale"] == 65536.0 and seen[2][0]["loss_scale"] == 32768.0
    assert torch.equal(seen[0][1], seen[1][1]) and not torch.equal(seen[1][1], seen[2][1])
    assert all(math.isfinite(v) for v in res.losses)
    # the scaler's state is in the checkpoint and comes back on resume
    ck = tmp_path / "ck"
    run(setup, cfg(steps=2, dtype="fp16", ckpt_every=2), ckpt_dir=str(ck))
    state = torch.load(ck / "step-00000002" / "train_state.pt", weights_only=True)
    assert state["scaler"]["scale"] == 65536.0


def test_mfu_is_na_on_cpu_and_uses_the_flop_counter(setup, tmp_path, capsys):
    res = run(setup, cfg(steps=1, log_every=1), log_path=str(tmp_path / "log.jsonl"))
    rec = json.loads(open(tmp_path / "log.jsonl").readline())
    assert rec["mfu"] is None and "MFU n/a" in capsys.readouterr().out
    c = res.model.config
    f1 = T.step_flops(c, (1, 4, 3, 8, 8), 8)
    f2 = T.step_flops(c, (2, 4, 3, 8, 8), 8)
    assert f1 > 0 and f2 == pytest.approx(2 * f1, rel=0.02)
    assert T._mfu(c, (2, 4, 3, 8, 8), 8, 1, 0.5, torch.device("cpu"), 1.0) == pytest.approx(f2 / 0.5 / 1e12)


def test_eval_loss_is_open_soras_and_stable_for_a_seed(setup):
    from opensora_fast.rflow import RFlow

    ts = T.eval_timesteps()
    assert len(ts) == 10 and ts[0] == pytest.approx(1000 / 11) and ts[-1] == pytest.approx(10000 / 11)
    model = tiny_model()
    a = T.evaluate_loss(model, setup["data"], setup["vae"], setup["text"], seed=3, batch_size=8)
    b = T.evaluate_loss(model, setup["data"], setup["vae"], setup["text"], seed=3, batch_size=8)
    c = T.evaluate_loss(model, setup["data"], setup["vae"], setup["text"], seed=4, batch_size=8)
    assert a == b and a["mean"] != c["mean"] and model.training
    row = a["buckets"]["9x16x16"]
    assert row["clips"] == 16 and len(row["per_t"]) == 10
    assert a["mean"] == pytest.approx(sum(row["per_t"].values()) / 10)
    # by hand: the first batch of 8 clips at the 5th timestep, noise from the (seed, bucket 0, batch 0) generator
    model.eval()
    with torch.no_grad():
        items = [setup["data"][i] for i in range(16)]
        z = setup["vae"].encode(torch.stack([it["video"] for it in items]), sample=False).float()
        enc = setup["text"].encode([it["text"] for it in items])
        sums = 0.0
        for n_b, sl in enumerate((slice(0, 8), slice(8, 16))):
            g = torch.Generator().manual_seed((3 * 1_000_003 + n_b) % (2**63))
            noise = torch.randn(z[sl].shape, generator=g)
            B = 8
            kw = dict(y=enc["y"][sl].float(), mask=enc["mask"][sl], height=torch.full((B,), 16.0),
                      width=torch.full((B,), 16.0), num_frames=torch.full((B,), 9.0),
                      fps=torch.tensor([float(it["fps"]) for it in items[sl]]))  # fmt: skip
            sums += float(
                RFlow().training_losses(model, z[sl], kw, noise=noise, t=torch.full((B,), ts[4]))["loss"].sum()
            )
    assert row["per_t"][f"{ts[4]:.1f}"] == pytest.approx(sums / 16, rel=1e-5)
    print(T.format_eval(a))


def test_train_logs_the_eval_loss_every_n_steps(setup, tmp_path):
    log = tmp_path / "log.jsonl"
    run(setup, cfg(steps=4, eval_every=2), log_path=str(log), eval_dataset=setup["data"])
    recs = [json.loads(line) for line in open(log)]
    assert ["eval_loss" in r for r in recs] == [False, True, False, True]
    assert set(recs[1]["eval"]) == {"9x16x16"} and math.isfinite(recs[3]["eval_loss"])


def test_tensorboard_scalars_beside_the_log_when_installed(setup, tmp_path, monkeypatch):
    got = []

    class Writer:
        def __init__(self, log_dir):
            got.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            got.append((tag, step))

        def close(self):
            got.append(("closed", None))

    monkeypatch.setattr(T, "tensorboard_writer", Writer)  # the real one needs the optional tensorboard package
    run(setup, cfg(steps=2), log_path=str(tmp_path / "log.jsonl"))
    assert got[0] == ("dir", str(tmp_path / "tb")) and got[-1] == ("closed", None)
    assert ("train/loss", 1) in got and ("train/loss", 2) in got and ("train/tokens_per_s", 2) in got
    from opensora_fast.common import tensorboard_writer

    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert tensorboard_writer(str(tmp_path / "x")) is None  # not installed: no event files, no error


def test_text_cache_is_bounded_and_gives_the_same_features(setup):
    enc = setup["text"]
    calls = []

    class Counting:
        def encode(self, prompts):
            calls.append(list(prompts))
            return enc.encode(prompts)

    cache = T.TextCache(Counting(), max_items=2)
    y1, m1 = cache(["a red square", "a blue circle"], "cpu")
    y2, m2 = cache(["a green square"], "cpu")  # evicts "a red square" (least recently used)
    assert list(cache.cache) == ["a blue circle", "a green square"]
    y3, _ = cache(["a red square", "a blue circle"], "cpu")  # re-encoded, the same values
    assert calls[-1] == ["a red square"] and torch.equal(y3[0], y1[0]) and torch.equal(y3[1], y1[1])
    assert len(cache.cache) == 2
    y4, _ = cache(["x", "y", "z"], "cpu")  # a batch larger than the cache still gets all its features
    assert y4.shape[0] == 3 and len(cache.cache) == 2


def test_captions_are_cleaned_before_t5_unless_turned_off(setup, tmp_path):
    """Training captions reach the text encoder as text.preprocess_prompt made them (Open-Sora's
    text_preprocessing), on by default; --no-prompt-cleaning (prompt_cleaning=False) gives them as written."""
    import csv

    from opensora_fast import cli
    from opensora_fast.text import preprocess_prompt

    src = os.path.join(str(setup["root"]), "data")
    rows = list(csv.DictReader(open(os.path.join(src, "data.csv"))))
    g = torch.Generator().manual_seed(11)
    decor = ["<b>{}</b>", "{} https://example.com/clip.mp4", "{} &amp; MORE", "@someone {}", "{}  — “quoted”"]
    for r in rows:
        r["path"] = os.path.join(src, r["path"])
        r["text"] = decor[int(torch.randint(len(decor), (), generator=g))].format(r["text"].upper())
    with open(tmp_path / "dirty.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "text"])
        w.writeheader()
        w.writerows(rows)
    ds = VideoTextDataset(str(tmp_path / "dirty.csv"), [(9, 16, 16)])

    class Recording:
        def __init__(self):
            self.prompts = []

        def encode(self, prompts):
            self.prompts += list(prompts)
            return setup["text"].encode(prompts)

    raw = {it[1] for it in ds.items}  # (path, caption, bucket, fps)
    seen = {}
    for clean in (True, False):
        rec = Recording()
        T.train_dit(cfg(steps=2, batch_size=8, prompt_cleaning=clean), ds, tiny_model(), setup["vae"], rec,
                    device="cpu", progress=False)  # fmt: skip
        seen[clean] = set(rec.prompts)
    assert seen[False] <= raw and len(seen[False]) >= 8
    assert seen[True] == {preprocess_prompt(t) for t in seen[False]}
    assert not seen[True] & seen[False]  # every dirty caption changed (upper case at least)
    assert all(p == p.lower() and "<b>" not in p and "http" not in p for p in seen[True])
    rec = Recording()  # the evaluation loss cleans them the same way
    T.evaluate_loss(tiny_model(), ds, setup["vae"], rec, batch_size=8, max_batches=1)
    assert set(rec.prompts) <= seen[True] and len(rec.prompts) == 8

    class Features:  # extracted without cleaning: training with it on is refused
        features, prompt_cleaning = True, False

    with pytest.raises(ValueError, match="features were extracted with prompt_cleaning=False"):
        T.train_dit(cfg(steps=1), Features(), tiny_model(), None, None, device="cpu", progress=False)
    # the flag derives from DiTTrainConfig.prompt_cleaning
    parse = cli.build_parser().parse_args
    assert T.options_from(T.DiTTrainConfig, parse(["train", "--out-dir", "x"])).prompt_cleaning is True
    off = parse(["train", "--out-dir", "x", "--no-prompt-cleaning"])
    assert T.options_from(T.DiTTrainConfig, off).prompt_cleaning is False


def test_resuming_a_run_from_before_caption_cleaning_keeps_its_raw_captions(setup, tmp_path, capsys):
    """A checkpoint whose run.json has no prompt_cleaning (written before the option) trained on the captions as
    written: its resume goes on without cleaning, and says so."""
    from opensora_fast import cli
    from opensora_fast.checkpoint import write_checksums

    root = setup["root"]
    setup["vae"].save_pretrained(str(tmp_path / "vae"))

    def argv(steps, *extra):
        return ["train", "--data", f"{root}/data/data.csv", "--vae", str(tmp_path / "vae"), "--t5", f"{root}/t5",
                "--model-config", "tiny", "--buckets", "9x16x16", "--batch-size", "2", "--steps", str(steps),
                "--ckpt-every", "1", "--no-progress", "--device", "cpu", "--out-dir", str(tmp_path / "run"),
                *extra]  # fmt: skip

    assert cli.main(argv(1)) == 0
    step = tmp_path / "run" / "checkpoints" / "step-00000001"
    run_json = json.loads((step / "run.json").read_text())
    assert run_json["prompt_cleaning"] is True
    del run_json["prompt_cleaning"]
    (step / "run.json").write_text(json.dumps(run_json))
    os.remove(step / "checksums.json")
    write_checksums(str(step))
    capsys.readouterr()
    assert cli.main(argv(2, "--resume")) == 0
    assert "predates caption cleaning" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["prompt_cleaning"] is False
