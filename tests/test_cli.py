"""The ``opensora-fast`` command: demo --quick end to end, sample from tiny weights, train + resume,
clear errors for bad arguments and missing weights, lazy imports for ``check``."""

import json
import os
import subprocess
import sys

import av
import pytest
import torch
from _tiny import tiny_weights, weight_args

from opensora_fast import cli
from opensora_fast.data import make_synthetic_dataset
from opensora_fast.masks import STAGE1_MASK_RATIOS

pytestmark = pytest.mark.usefixtures("reference_backend")


def frames_of(path):
    with av.open(path) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    return len(frames), frames[0].shape


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random tiny STDiT3 / VAE / T5 saved as a user would have them."""
    return tiny_weights(tmp_path_factory.mktemp("weights"))


def test_demo_quick_end_to_end(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--out-dir", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    video = tmp_path / "000_a_red_square_moving_right.mp4"
    plot = tmp_path / "losses.png"
    assert video.is_file() and plot.is_file() and plot.stat().st_size > 1000
    assert str(video) in out and str(plot) in out
    assert "VAE loss: first" in out and "STDiT3 loss: first" in out
    n, shape = frames_of(str(video))
    assert n == 9 and shape == (16, 16, 3)
    log = [json.loads(line) for line in open(tmp_path / "stdit3" / "log.jsonl")]
    assert len(log) == 40
    # the quick check: the clip of the next seed exists and differs (the full demo checks colour and motion too)
    assert (tmp_path / "seed" / "000_a_red_square_moving_right.mp4").is_file()
    assert "check (quick):" in out and "PASS seeds 0 and 1 differ" in out and "FAIL" not in out
    # the printed sample command runs as written on the demo's own weights and gives the demo's clip
    import shlex

    command = out.split("on these weights:\n")[1].splitlines()[0].strip()
    argv = shlex.split(command)
    assert argv[:2] == ["opensora-fast", "sample"]
    assert cli.main([*argv[1:], "--no-progress"]) == 0
    again = tmp_path / "samples" / "000_a_red_square_moving_right.mp4"
    with av.open(str(video)) as a, av.open(str(again)) as b:
        fa = [f.to_ndarray(format="rgb24") for f in a.decode(a.streams.video[0])]
        fb = [f.to_ndarray(format="rgb24") for f in b.decode(b.streams.video[0])]
    assert len(fa) == len(fb) == 9 and all((x == y).all() for x, y in zip(fa, fb))


def test_sample_video_and_image(weights, tmp_path, capsys):
    out = tmp_path / "s"
    args = [
        "sample",
        "a red square moving right",
        "a blue circle",
        *weight_args(weights),
        "--out-dir",
        str(out),
    ]
    rc = cli.main([*args, "--image-size", "16x16", "--num-frames", "9", "--steps", "3", "--fps", "8", "--no-progress"])
    assert rc == 0
    files = sorted(os.listdir(out))
    assert files == ["000_a_red_square_moving_right.mp4", "001_a_blue_circle.mp4"]
    assert frames_of(str(out / files[0])) == (9, (16, 16, 3))
    assert str(out / files[1]) in capsys.readouterr().out
    # an image at Open-Sora's 144p 1:1 size (192 x 192), prompts from a file
    pf = tmp_path / "prompts.txt"
    pf.write_text("a green square moving up\n\n")
    rc = cli.main(
        [
            "sample",
            "--prompt-file",
            str(pf),
            *weight_args(weights),
            "--out-dir",
            str(tmp_path / "i"),
            "--resolution",
            "144p",
            "--aspect-ratio",
            "1:1",
            "--duration",
            "image",
            "--steps",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0
    from PIL import Image

    img = Image.open(tmp_path / "i" / "000_a_green_square_moving_up.png")
    assert img.size == (192, 192)


def test_sample_is_deterministic(weights, tmp_path):
    def once(d):
        cli.main(
            [
                "sample",
                "a red circle",
                *weight_args(weights),
                "--out-dir",
                str(d),
                "--image-size",
                "8x8",
                "--num-frames",
                "5",
                "--steps",
                "2",
                "--seed",
                "7",
                "--no-progress",
            ]
        )
        with av.open(str(d / "000_a_red_circle.mp4")) as c:
            return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]

    a, b = once(tmp_path / "a"), once(tmp_path / "b")
    assert all((x == y).all() for x, y in zip(a, b))


def test_sample_with_reference_starts_from_it(weights, tmp_path, monkeypatch, capsys):
    """--reference: the clip's first latent frames are the reference's VAE latents from the first step to
    the last (Open-Sora's mask strategy, edit ratio 0); the rest is generated."""
    from _video import smooth_video

    from opensora_fast import rflow
    from opensora_fast.io import read_video, write_video
    from opensora_fast.sample import load_vae, write_image

    clip = smooth_video(T=9, H=20, W=24, seed=3)
    png = write_image(str(tmp_path / "ref.png"), clip[0])
    mp4 = write_video(str(tmp_path / "ref.mp4"), clip.permute(1, 0, 2, 3), fps=8)
    seen = {}
    orig = rflow.RFlow.sample

    def spy(self, model, z, *args, **kwargs):
        seen.update(z0=z.clone(), cond=kwargs.get("cond_mask"))
        seen["out"] = orig(self, model, z, *args, **kwargs)
        return seen["out"]

    monkeypatch.setattr(rflow.RFlow, "sample", spy)
    vae = load_vae(weights["vae"])
    base = ["sample", "a red square", *weight_args(weights), "--image-size", "16x16", "--steps", "3", "--no-progress"]
    for ref, n in ((png, 1), (mp4, 5)):
        out = tmp_path / f"out{n}"
        argv = [*base, "--num-frames", "17", "--out-dir", str(out), "--reference", ref, "--reference-frames", str(n)]
        assert cli.main(argv) == 0
        k = vae.get_latent_size((n, 16, 16))[0]
        lat_t = vae.get_latent_size((17, 16, 16))[0]
        assert 1 <= k < lat_t
        assert seen["cond"].tolist() == [[0.0] * k + [1.0] * (lat_t - k)]
        with torch.no_grad():
            want = vae.encode(read_video(ref, num_frames=n, size=(16, 16)).permute(1, 0, 2, 3)[None], sample=False)
        torch.testing.assert_close(seen["z0"][:, :, :k], want)
        torch.testing.assert_close(seen["out"][:, :, :k], want)  # held through every step
        assert (seen["out"][:, :, k:] - seen["z0"][:, :, k:]).abs().max() > 1e-3  # the rest was generated
        assert frames_of(str(out / "000_a_red_square.mp4")) == (17, (16, 16, 3))
        assert f"{k} of {lat_t} latent frames" in capsys.readouterr().out
    # clear errors: nothing left to generate, an image output, a missing file, a too-short reference
    errs = [
        (["--num-frames", "5", "--reference", mp4, "--reference-frames", "5"], "nothing left to generate"),
        (["--num-frames", "1", "--reference", png], "use a video duration"),
        (["--num-frames", "9", "--reference", str(tmp_path / "nope.png")], "does not exist"),
        (["--num-frames", "17", "--reference", png, "--reference-frames", "3"], "fewer than num_frames=3"),
    ]
    for extra, msg in errs:
        assert cli.main([*base, "--out-dir", str(tmp_path / "e"), *extra]) == 2
        assert msg in capsys.readouterr().err, msg


def test_sample_under_torchrun_matches_one_process(weights, tmp_path):
    """`torchrun --nproc_per_node 2 -m opensora_fast.cli sample` (CPU, gloo), rank 0 writing the clip:
    sequence-parallel (--no-cfg-parallel) gives the single-process clip frame for frame; CFG-parallel (the
    default with 2 processes) runs cond and uncond on one process each, the same up to float rounding."""
    import numpy as np
    from _dist import torchrun as torchrun_cmd

    args = ["sample", "a red circle", *weight_args(weights), "--image-size", "16x16", "--num-frames", "17",
            "--steps", "3", "--seed", "3", "--no-progress", "--device", "cpu"]  # fmt: skip
    assert cli.main([*args, "--out-dir", str(tmp_path / "one")]) == 0

    def torchrun(out, *extra):
        cmd = torchrun_cmd(2, "-m", "opensora_fast.cli", *args, "--out-dir", str(tmp_path / out), *extra)
        r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert r.stdout.count("wrote ") == 1  # rank 0 only
        with av.open(str(tmp_path / out / "000_a_red_circle.mp4")) as c:
            return r.stdout, [f.to_ndarray(format="rgb24").astype(np.int16) for f in c.decode(c.streams.video[0])]

    with av.open(str(tmp_path / "one" / "000_a_red_circle.mp4")) as c:
        one = [f.to_ndarray(format="rgb24").astype(np.int16) for f in c.decode(c.streams.video[0])]
    out, sp = torchrun("sp", "--no-cfg-parallel")
    assert "CFG-parallel 1 x sequence-parallel 2 (dsp)" in out
    assert len(sp) == 17 and all((a == b).all() for a, b in zip(one, sp))
    out, fs = torchrun("fastseq", "--no-cfg-parallel", "--sp-mode", "fastseq")
    assert "sequence-parallel 2 (fastseq)" in out and all((a == b).all() for a, b in zip(one, fs))
    out, cfgp = torchrun("cfg")
    assert "CFG-parallel 2 x sequence-parallel 1" in out
    diff = np.abs(np.stack(one) - np.stack(cfgp))
    print("CFG-parallel vs one process, uint8 frames: mean |diff|", diff.mean(), "max", diff.max())
    assert len(cfgp) == 17 and diff.mean() < 0.05 and diff.max() <= 8, (diff.mean(), diff.max())


def test_sample_missing_weights_are_clear_errors(weights, tmp_path, capsys):
    base = ["sample", "a cat", "--out-dir", str(tmp_path)]
    assert cli.main([*base, "--vae", weights["vae"], "--t5", weights["t5"]]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert cli.main([*base, "--model", str(tmp_path / "nope"), "--vae", weights["vae"], "--t5", weights["t5"]]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "does not exist" in err and "no downloads" in err
    assert cli.main([*base, "--model", weights["model"], "--vae", weights["vae"], "--t5", str(tmp_path / "t")]) == 2
    assert "--t5" in capsys.readouterr().err
    assert not any(p.suffix == ".mp4" for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv,message",
    [
        (["sample", "x", "--resolution", "999p"], "invalid choice: '999p'"),
        (["sample", "x", "--aspect-ratio", "7:5"], "invalid choice: '7:5'"),
        (["sample", "x", "--duration", "3s"], "invalid choice: '3s'"),
        (["sample", "x", "--image-size", "3by4"], "HxW"),
        (
            ["train", "--data", "d.csv", "--vae", "v", "--t5", "t", "--out-dir", "o", "--buckets", "9x16"],
            "TxHxW",
        ),
        (["train", "--data", "d.csv"], "required"),
        (["nope"], "invalid choice"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,message",
    [
        ([], "at least one non-empty prompt"),
        (["x", "--steps", "0"], "--steps must be >= 1"),
        (["x", "--num-frames", "0"], "--num-frames must be >= 1"),
    ],
)
def test_bad_sample_values(weights, extra, message, capsys):
    assert cli.main(["sample", *extra, *weight_args(weights)]) == 2
    assert message in capsys.readouterr().err


def test_train_and_resume(weights, tmp_path, capsys):
    csv_path = make_synthetic_dataset(str(tmp_path / "data"), 9, (16, 16), 8, colors=("red", "blue"))

    def train(out, steps, *extra):
        argv = [
            "train",
            "--data",
            csv_path,
            "--vae",
            weights["vae"],
            "--t5",
            weights["t5"],
            "--model-config",
            "tiny",
            "--buckets",
            "9x16x16",
            "--steps",
            str(steps),
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--warmup-steps",
            "2",
            "--ckpt-every",
            "2",
            "--out-dir",
            str(out),
            "--no-progress",
            *extra,
        ]
        assert cli.main(argv) == 0

    def losses(out):
        return [json.loads(line)["loss"] for line in open(out / "log.jsonl")]

    train(tmp_path / "straight", 4)
    train(tmp_path / "split", 2)
    train(tmp_path / "split", 4, "--resume")
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    train(tmp_path / "cached", 4, "--cache-latents")
    assert len(losses(tmp_path / "cached")) == 4 and losses(tmp_path / "cached") != losses(tmp_path / "straight")
    out = capsys.readouterr().out
    assert "sample with --model" in out and "step 4/4 loss" in out
    cfg = json.load(open(tmp_path / "split" / "config.json"))
    assert cfg["train"]["adam_eps"] == 1e-15 and cfg["train"]["ema_decay"] == 0.99
    assert cfg["train"]["mask_ratios"] == STAGE1_MASK_RATIOS  # Open-Sora 1.2's stage-1 default
    train(tmp_path / "stage3", 1, "--mask-ratios", "stage3")
    train(tmp_path / "nomask", 1, "--mask-ratios", "none")
    assert json.load(open(tmp_path / "stage3" / "config.json"))["train"]["mask_ratios"]["image_head"] == 0.22
    assert json.load(open(tmp_path / "nomask" / "config.json"))["train"]["mask_ratios"] is None
    ema = tmp_path / "split" / "checkpoints" / "step-00000004" / "ema"
    rc = cli.main(
        [
            "sample",
            "a red square",
            "--model",
            str(ema),
            "--vae",
            weights["vae"],
            "--t5",
            weights["t5"],
            "--image-size",
            "16x16",
            "--num-frames",
            "9",
            "--steps",
            "2",
            "--out-dir",
            str(tmp_path / "s"),
            "--no-progress",
        ]
    )
    assert rc == 0 and (tmp_path / "s" / "000_a_red_square.mp4").is_file()
    # clips shorter than every bucket: a one-line error
    argv = [
        "train",
        "--data",
        csv_path,
        "--vae",
        weights["vae"],
        "--t5",
        weights["t5"],
        "--out-dir",
        str(tmp_path / "x"),
    ]
    assert cli.main([*argv, "--buckets", "51x240x426"]) == 2
    assert "long enough for any bucket" in capsys.readouterr().err
    # --frame-interval reaches the fixed-bucket dataset: 9 frames every 2nd need a 17-frame window
    assert cli.main([*argv, "--buckets", "9x16x16", "--frame-interval", "2"]) == 2
    assert "long enough for any bucket" in capsys.readouterr().err
    # --resume with nothing to resume
    with pytest.raises(Exception, match="no checkpoint"):
        cli._train(
            cli.build_parser().parse_args(
                [
                    "train",
                    "--data",
                    csv_path,
                    "--vae",
                    weights["vae"],
                    "--t5",
                    weights["t5"],
                    "--out-dir",
                    str(tmp_path / "empty"),
                    "--resume",
                ]
            )
        )


def test_check_help_and_lazy_imports(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["check", "--help"])
    assert e.value.code == 0
    assert "usage: opensora-fast check" in capsys.readouterr().out
    # parsing any command must not import the kernels (check enables the interpreter first)
    code = (
        "import sys; from opensora_fast import cli; cli.build_parser().parse_args(['check']); "
        "print('opensora_fast.kernels' in sys.modules, 'opensora_fast.models.stdit3' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["False", "False"], r.stderr


def test_load_vae_ignores_a_foreign_config_json(tmp_path):
    """The release's VAE directory has Open-Sora's own config.json: it must not be read as ours."""
    from opensora_fast.sample import load_vae

    (tmp_path / "config.json").write_text('{"architectures": ["VideoAutoencoderPipeline"], "micro_frame_size": 17}')
    torch.save({"x": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="missing"):  # built as the release VAE, so the keys do not match
        load_vae(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# issue 13: faults, checkpoints, programs


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("data")), 9, (16, 16), 8, colors=("red", "blue"))


def train_argv(w, csv_path, out, steps, *extra):
    return ["train", "--data", csv_path, "--vae", w["vae"], "--t5", w["t5"], "--model-config", "tiny", "--buckets",
            "9x16x16", "--steps", str(steps), "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "2",
            "--ckpt-every", "1", "--out-dir", str(out), "--no-progress", *extra]  # fmt: skip


def log_steps(out):
    return [json.loads(line)["step"] for line in open(out / "log.jsonl")]


def one_line(err):
    """The error in stderr, which must be a single line (warnings and library progress bars aside)."""
    noise = ("warning:", "skipped:", "checkpoints:", "Loading weights")
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith(noise)]
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("opensora-fast"), err
    return lines[0]


def test_resume_finds_the_newest_complete_checkpoint(weights, data_csv, tmp_path, capsys):
    """A kill after a step directory was renamed into place but before ``latest`` was written, plus stale
    temporaries of killed writes: --resume continues from the newest complete step and removes them."""
    out = tmp_path / "run"
    assert cli.main(train_argv(weights, data_csv, out, 2)) == 0
    ck = out / "checkpoints"
    (ck / "latest").unlink()  # killed before the first `latest` was written
    for k in range(3):
        (ck / f".tmp-step-00000003-x{k}").mkdir()
        (ck / f".tmp-step-00000003-x{k}" / "model.safetensors").write_bytes(b"partial")
    capsys.readouterr()
    assert cli.main(train_argv(weights, data_csv, out, 3, "--resume")) == 0
    assert "resuming from step 2" in capsys.readouterr().out
    assert log_steps(out) == [1, 2, 3]
    assert sorted(os.listdir(ck)) == ["latest", "step-00000001", "step-00000002", "step-00000003"]
    # --keep-last prunes the older ones
    assert cli.main(train_argv(weights, data_csv, out, 4, "--resume", "--keep-last", "2")) == 0
    assert sorted(os.listdir(ck)) == ["latest", "step-00000003", "step-00000004"]


@pytest.mark.parametrize("name", ["model.safetensors", "train_state.pt", "ema/model.safetensors"])
def test_resume_refuses_a_corrupt_checkpoint_file(weights, data_csv, tmp_path, capsys, name):
    out = tmp_path / "run"
    assert cli.main(train_argv(weights, data_csv, out, 1)) == 0
    p = out / "checkpoints" / "step-00000001" / name
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x04  # one flipped bit inside the payload
    p.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli.main(train_argv(weights, data_csv, out, 2, "--resume")) == 2
    line = one_line(capsys.readouterr().err)
    assert name in line and "corrupt" in line
    p.write_bytes(bytes(data[:100]))  # truncated
    assert cli.main(train_argv(weights, data_csv, out, 2, "--resume")) == 2
    assert name in one_line(capsys.readouterr().err)
    (p.parent.parent if "/" in name else p.parent).joinpath("checksums.json").unlink()  # no checksums to compare
    assert cli.main(train_argv(weights, data_csv, out, 2, "--resume")) == 2
    line = one_line(capsys.readouterr().err)
    assert name.split("/")[-1] in line and "unreadable" in line


def test_resume_drops_a_torn_log_line(weights, data_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(train_argv(weights, data_csv, out, 2)) == 0
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.12')  # killed mid-write
    assert cli.main(train_argv(weights, data_csv, out, 3, "--resume")) == 0
    assert log_steps(out) == [1, 2, 3]
    # anything else that is not a record: a clear error naming the file and line
    lines = (out / "log.jsonl").read_text().splitlines()
    (out / "log.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    capsys.readouterr()
    assert cli.main(train_argv(weights, data_csv, out, 4, "--resume")) == 2
    line = one_line(capsys.readouterr().err)
    assert "log.jsonl line 2" in line


def test_train_into_an_existing_run_and_resume_options(weights, data_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(train_argv(weights, data_csv, out, 2)) == 0
    before = (out / "log.jsonl").read_text()
    capsys.readouterr()
    # a second run into the same directory: refused, nothing touched
    assert cli.main(train_argv(weights, data_csv, out, 1)) == 2
    assert "already holds a run" in one_line(capsys.readouterr().err)
    assert (out / "log.jsonl").read_text() == before
    # --resume takes the options from the checkpoint: no --model-config / --lr / --buckets needed
    argv = ["train", "--data", data_csv, "--vae", weights["vae"], "--t5", weights["t5"], "--out-dir", str(out),
            "--no-progress", "--resume"]  # fmt: skip
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "nothing left to do" in capsys.readouterr().out  # --steps 2 from the checkpoint, already reached
    assert cli.main([*argv, "--steps", "3", "--lr", "5e-4"]) == 0
    cap = capsys.readouterr()
    assert "resuming from step 2" in cap.out
    assert "--lr 0.0005 differs" in cap.err and "--steps" not in cap.err  # more steps: how a run continues
    assert log_steps(out) == [1, 2, 3] and json.loads((out / "log.jsonl").read_text().splitlines()[-1])["lr"] == 5e-4
    cfg_before = (out / "config.json").read_text()
    # an incompatible model: one line, config.json untouched
    assert cli.main([*argv, "--steps", "4", "--model-config", "small"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "--model-config small" in line and "tiny" in line
    assert (out / "config.json").read_text() == cfg_before
    # --overwrite replaces the run
    assert cli.main(train_argv(weights, data_csv, out, 1, "--overwrite")) == 0
    assert log_steps(out) == [1] and sorted(os.listdir(out / "checkpoints")) == ["latest", "step-00000001"]


def test_train_one_line_errors(weights, data_csv, tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    # --out-dir a file: refused before anything is loaded (the --vae path does not even exist)
    argv = train_argv({**weights, "vae": str(tmp_path / "no_vae")}, data_csv, f, 1)
    assert cli.main(argv) == 2
    assert "is a file" in one_line(capsys.readouterr().err)
    for dev, msg in (("cuda", "no CUDA GPU"), ("tpu", "expected cpu, cuda or cuda:N")):
        if dev == "cuda" and torch.cuda.is_available():
            continue
        assert cli.main(train_argv(weights, data_csv, tmp_path / dev, 1, "--device", dev)) == 2
        assert msg in one_line(capsys.readouterr().err)
        assert cli.main(["sample", "x", *weight_args(weights), "--device", dev, "--out-dir", str(tmp_path)]) == 2
        assert msg in one_line(capsys.readouterr().err)
    # --model-config xl needs 4096-dim captions: the tiny T5 gives 64; say what to use
    assert cli.main([*train_argv(weights, data_csv, tmp_path / "xl", 1), "--model-config", "xl"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "4096-dim captions" in line and "--model-config tiny or small" in line
    # a T5 directory without its tokenizer files
    import shutil

    t5 = tmp_path / "t5"
    shutil.copytree(weights["t5"], t5)
    for n in os.listdir(t5):
        if n.startswith(("tokenizer", "special_tokens", "spiece")):
            os.remove(t5 / n)
    assert cli.main(train_argv({**weights, "t5": str(t5)}, data_csv, tmp_path / "t5run", 1)) == 2
    line = one_line(capsys.readouterr().err)
    assert "no tokenizer files" in line and "sentencepiece" not in line.lower()


def test_train_ctrl_c_prints_the_resume_command(weights, data_csv, tmp_path, monkeypatch, capsys):
    from opensora_fast import train as T

    real = T.update_ema
    calls = [0]

    def interrupt(ema, model, decay):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        real(ema, model, decay)

    monkeypatch.setattr(T, "update_ema", interrupt)
    out = tmp_path / "run"
    try:
        rc = cli.main(train_argv(weights, data_csv, out, 5))
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped the command (a traceback, no resume hint)")
    assert rc == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted after step 2" in err
    assert str(out / "checkpoints" / "step-00000002") in err
    assert "resume with: opensora-fast train" in err and err.rstrip().endswith("--resume")
    monkeypatch.setattr(T, "update_ema", real)
    assert cli.main(train_argv(weights, data_csv, out, 3, "--resume")) == 0
    assert log_steps(out) == [1, 2, 3]


def test_sample_numbers_instead_of_overwriting_and_honours_the_umask(weights, tmp_path, capsys):
    argv = ["sample", "a red circle", *weight_args(weights), "--out-dir", str(tmp_path), "--image-size", "16x16",
            "--num-frames", "5", "--steps", "1", "--no-progress"]  # fmt: skip
    old = os.umask(0o022)
    try:
        assert cli.main(argv) == 0 and cli.main(argv) == 0
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["000_a_red_circle-1.mp4", "000_a_red_circle.mp4"]
    assert all(os.stat(tmp_path / n).st_mode & 0o777 == 0o644 for n in os.listdir(tmp_path))


def test_sample_says_when_the_size_changes(weights, tmp_path, capsys):
    """A size the VAE cannot produce exactly is said, not silently changed (the tiny VAE downsamples 2x)."""
    argv = ["sample", "a red circle", *weight_args(weights), "--out-dir", str(tmp_path), "--image-size", "33x31",
            "--num-frames", "5", "--steps", "1", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "33x31 is not a multiple of the VAE's 2x2 spatial downsampling: the clip will be 32x30" in (
        capsys.readouterr().out
    )


def test_help_shows_defaults_and_required(capsys):
    for cmd in ("train", "sample", "demo"):
        with pytest.raises(SystemExit):
            cli.main([cmd, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        if cmd == "train":
            assert "(required)" in out and "(default: 1000)" in out and "(default: 51x240x426)" in out
            assert "--keep-last N" in out and "--max-bad-clips N" in out and "--dist-timeout S" in out
        if cmd == "sample":
            assert "(default: 240p)" in out and "(default: samples)" in out
            assert "local only (required)" in out  # --model / --vae / --t5: checked with a clearer message
        if cmd == "demo":
            assert "(default: opensora-fast-demo)" in out and "seed (default: 0)" in out


def test_gitignore_covers_the_default_output_folders():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, ".git")):
        pytest.skip("not a git checkout")
    for path in ("samples/000_x.mp4", "opensora-fast-demo/losses.png"):
        r = subprocess.run(["git", "check-ignore", "-q", path], cwd=root, timeout=60)
        assert r.returncode == 0, path


def test_train_skips_unreadable_clips_and_names_them(weights, tmp_path, capsys):
    """An audio-only file is left out at the scan and a clip corrupt inside its stream is skipped at its step,
    each named with its CSV line; --resume passes the same step again; --max-bad-clips 0 stops with one line."""
    from test_data import corrupt_stream, write_audio_only

    csv_path = make_synthetic_dataset(str(tmp_path / "data"), 9, (16, 16), 8, colors=("red", "blue"))
    write_audio_only(str(tmp_path / "data" / "videos" / "red_square_right_0.mp4"))  # CSV line 2
    corrupt_stream(str(tmp_path / "data" / "videos" / "blue_circle_up_0.mp4"))  # CSV line 17
    out = tmp_path / "run"
    assert cli.main(train_argv(weights, csv_path, out, 4)) == 0  # 15 readable clips, 4 per step: all drawn
    err = capsys.readouterr().err
    assert "red_square_right_0.mp4' has no video stream" in err and "data.csv line 2" in err
    assert "blue_circle_up_0.mp4" in err and "data.csv line 17) failed to decode: Invalid data" in err
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["bad_clips"] == 2
    assert cli.main(train_argv(weights, csv_path, out, 5, "--resume", "--ckpt-every", "1")) == 0
    import shutil

    shutil.rmtree(out)
    capsys.readouterr()
    assert cli.main(train_argv(weights, csv_path, out, 4, "--max-bad-clips", "0")) == 2
    assert "more than --max-bad-clips 0" in one_line(capsys.readouterr().err)


def test_sample_and_demo_refuse_an_out_dir_that_is_a_file(weights, tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    assert cli.main(["sample", "x", *weight_args(weights), "--out-dir", str(f)]) == 2
    assert "is a file" in one_line(capsys.readouterr().err)
    assert cli.main(["demo", "--quick", "--out-dir", str(f), "--no-progress"]) == 2
    assert "is a file" in one_line(capsys.readouterr().err)


def _train_parser():
    import argparse

    p = cli.build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_train_flags_and_defaults_come_from_the_dataclasses():
    import dataclasses

    from opensora_fast.common import cli_fields, flag_of
    from opensora_fast.train import DiTTrainConfig, TrainRun

    actions = {a.dest: a for a in _train_parser()._actions}
    cfg, run = DiTTrainConfig(), TrainRun()
    names = []
    for cls, obj in ((DiTTrainConfig, cfg), (TrainRun, run)):
        for f in cli_fields(cls):
            names.append(f.name)
            a = actions[f.name]
            assert flag_of(f) in a.option_strings
            default = a.default
            if isinstance(default, str) and a.type is not None and a.type not in (str,):
                default = a.type(default)
            if f.name == "buckets":
                assert default == [(51, 240, 426)]
            elif f.name in ("mask_ratios", "grad_clip", "fsdp"):  # resolved in __post_init__
                assert dataclasses.replace(cfg, **{f.name: default}) == cfg
            else:
                assert default == getattr(obj, f.name), f.name
    # every train flag is a dataclass field (one source of truth)
    flags = {a.dest for a in _train_parser()._actions if a.option_strings and a.dest != "help"}
    assert flags == set(names)
    # the CLI's spelling builds the same config as the Python defaults
    ns = _train_parser().parse_args(["--data", "d", "--vae", "v", "--t5", "t", "--out-dir", "o"])
    from opensora_fast.common import options_from

    assert options_from(DiTTrainConfig, ns) == cfg
    ns = _train_parser().parse_args(["--data", "d", "--vae", "v", "--t5", "t", "--out-dir", "o", "--grad-clip", "0"])
    assert options_from(DiTTrainConfig, ns).grad_clip is None


def test_train_presets_set_the_stage_values_unless_given():
    from opensora_fast.configs import stdit3 as cs

    from opensora_fast.common import options_from
    from opensora_fast.masks import MASK_RATIOS, STAGE3_MASK_RATIOS
    from opensora_fast.train import DiTTrainConfig, apply_preset

    argv = ["train", "--data", "d", "--vae", "v", "--t5", "t", "--out-dir", "o", "--preset", "stage3", "--lr", "2e-4"]
    args = cli.build_parser().parse_args(argv)
    apply_preset(args, cli.explicit_options(argv))
    c = options_from(DiTTrainConfig, args)
    assert c.lr == 2e-4  # given: kept
    assert c.mask_ratios == STAGE3_MASK_RATIOS and c.grad_checkpoint and c.warmup_steps == 1000
    assert args.bucket_config == cs.STAGE3_BUCKET_CONFIG
    argv2 = [*argv[:-3], "stage2"]
    args = cli.build_parser().parse_args(argv2)
    apply_preset(args, cli.explicit_options(argv2))
    c = options_from(DiTTrainConfig, args)
    assert c.warmup_steps == 0 and c.mask_ratios == MASK_RATIOS["stage2"] == STAGE1_MASK_RATIOS and c.lr == 1e-4
    argv3 = [*argv2, "--buckets", "9x16x16"]  # own buckets: the stage's bucket_config is not applied
    args = cli.build_parser().parse_args(argv3)
    apply_preset(args, cli.explicit_options(argv3))
    assert args.bucket_config is None and args.buckets == [(9, 16, 16)] and args.warmup_steps == 0
    # the stage-1 preset agrees with the stage-1 TrainConfig dataclass where both name a value
    t, s1 = cs.TrainConfig(), cs.PRESETS["stage1"]
    for k in ("lr", "adam_eps", "grad_clip", "warmup_steps", "ema_decay", "dtype", "grad_checkpoint", "ckpt_every"):
        assert s1[k] == getattr(t, k), k
    # the preset's options are options of train
    fields = {a.dest for a in _train_parser()._actions}
    for p in cs.PRESETS.values():
        assert set(p) <= fields, set(p) - fields


def test_programs_do_not_import_each_other_in_a_cycle():
    """train must not import sample (sample imports train's init_distributed until it moves to parallel);
    common imports no program."""
    import ast

    import opensora_fast

    root = os.path.dirname(opensora_fast.__file__)

    def imported(name):
        tree = ast.parse(open(os.path.join(root, name + ".py")).read())
        out = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("opensora_fast."):
                out.add(node.module.split(".")[1])
        return out

    assert "sample" not in imported("train")
    assert not imported("common") & {"train", "sample", "demo", "cli", "vae_train"}


def test_train_with_a_bucket_config_file_lists_left_out_clips_and_resumes(
    weights, data_csv, tmp_path, monkeypatch, capsys
):
    import shutil

    from opensora_fast import data as D
    from opensora_fast.io import write_video

    monkeypatch.setitem(D.RESOLUTION_AREAS, "256", 16 * 16)  # the 16 x 16 clips fill "256"
    d = tmp_path / "d"
    shutil.copytree(os.path.dirname(data_csv), d)
    write_video(str(d / "videos" / "short.mp4"), D.synthetic_clip("red", "square", "up", 3, (16, 16)), 8)
    with open(d / "data.csv", "a") as f:
        f.write("videos/short.mp4,a short clip\n")
    cfg = tmp_path / "stage.py"
    cfg.write_text('bucket_config = {"256": {1: (1.0, 4), 5: (1.0, 3), 8: ((1.0, 0.5), 2)}}\n')
    argv = ["train", "--data", str(d / "data.csv"), "--vae", weights["vae"], "--t5", weights["t5"],
            "--model-config", "tiny", "--bucket-config", str(cfg), "--num-workers", "1", "--lr", "1e-3",
            "--warmup-steps", "2", "--ckpt-every", "2", "--no-progress"]  # fmt: skip
    assert cli.main([*argv, "--steps", "4", "--out-dir", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "left out: " in err and "short.mp4: 3 frames" in err  # named, with the reason
    assert cli.main([*argv, "--steps", "2", "--out-dir", str(tmp_path / "b")]) == 0
    assert cli.main(["train", "--data", str(d / "data.csv"), "--vae", weights["vae"], "--t5", weights["t5"],
                     "--steps", "4", "--out-dir", str(tmp_path / "b"), "--resume", "--no-progress"]) == 0  # fmt: skip
    la = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    lb = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb] and {r["batch"] for r in la} <= {2, 3}
    capsys.readouterr()
    assert cli.main([*argv, "--steps", "1", "--out-dir", str(tmp_path / "c"), "--buckets", "9x16x16"]) == 2
    assert "--bucket-config and --buckets exclude each other" in capsys.readouterr().err


def test_extract_then_train_from_features_equals_training_from_video(weights, data_csv, tmp_path, capsys):
    feats = str(tmp_path / "feats")
    argv = ["extract", "--data", data_csv, "--vae", weights["vae"], "--t5", weights["t5"], "--buckets", "9x16x16",
            "--out", feats, "--dtype", "fp32", "--shard-size", "6", "--text-len", "8", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "16 clip(s)" in capsys.readouterr().out
    assert cli.main(argv) == 0  # again: every shard is there, nothing re-encoded
    common = ["--model-config", "tiny", "--steps", "3", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "2",
              "--num-workers", "0", "--no-progress"]  # fmt: skip
    video = ["train", "--data", data_csv, "--vae", weights["vae"], "--t5", weights["t5"], "--buckets", "9x16x16"]
    assert cli.main([*video, *common, "--cache-latents", "--out-dir", str(tmp_path / "v")]) == 0
    assert cli.main(["train", "--features", feats, *common, "--out-dir", str(tmp_path / "f")]) == 0
    lv = [json.loads(line)["loss"] for line in open(tmp_path / "v" / "log.jsonl")]
    lf = [json.loads(line)["loss"] for line in open(tmp_path / "f" / "log.jsonl")]
    assert lf == pytest.approx(lv, rel=1e-6, abs=0)
    capsys.readouterr()
    bad = ["train", "--features", feats, "--vae", weights["vae"], *common, "--out-dir", str(tmp_path / "g")]
    assert cli.main(bad) == 2
    assert "--features takes the place of --vae" in capsys.readouterr().err


def test_eval_loss_command_and_train_eval_every(weights, data_csv, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", data_csv, "--vae", weights["vae"], "--t5", weights["t5"], "--model-config", "tiny",
            "--buckets", "9x16x16", "--steps", "2", "--batch-size", "4", "--num-workers", "0", "--no-progress",
            "--eval-every", "2", "--eval-data", data_csv, "--out-dir", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    assert "evaluation loss at step 2" in capsys.readouterr().out
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    assert "eval_loss" in recs[1]
    ev = ["eval-loss", "--model", str(out / "checkpoints" / "step-00000002" / "ema"), "--data", data_csv,
          "--vae", weights["vae"], "--t5", weights["t5"], "--buckets", "9x16x16", "--seed", "7"]  # fmt: skip
    assert cli.main([*ev, "--out", str(tmp_path / "a.json")]) == 0
    table = capsys.readouterr().out
    assert "909.1" in table and "90.9" in table and "average over 1 bucket(s)" in table
    assert cli.main([*ev, "--out", str(tmp_path / "b.json")]) == 0
    a, b = (json.load(open(tmp_path / n)) for n in ("a.json", "b.json"))
    assert a == b and len(a["buckets"]["9x16x16"]["per_t"]) == 10  # the same value for the same seed
    capsys.readouterr()
    assert cli.main([*argv[:-2], "--out-dir", str(tmp_path / "x"), "--eval-data", str(tmp_path / "none.csv")]) == 2
    assert "--eval-data" in capsys.readouterr().err


def test_profile_train_prints_where_a_step_goes(weights, data_csv, tmp_path, capsys):
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("profile_train", os.path.join(root, "profiling", "profile_train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["--profile-steps", "2", "--warmup-steps-prof", "1", "--", "--data", data_csv, "--vae", weights["vae"],
            "--t5", weights["t5"], "--model-config", "tiny", "--buckets", "9x16x16", "--batch-size", "4",
            "--num-workers", "1", "--out-dir", str(tmp_path / "p")]  # fmt: skip
    assert mod.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 profiled steps (after 1 warm-up)" in out
    for row in ("kernel", "memcpy", "memset", "communication", "data loading", "CPU", "step"):
        assert row in out
    s = json.load(open(tmp_path / "p" / "profile.json"))
    parts = sum(s[k] for k in ("kernel", "memcpy", "memset", "communication", "data loading", "CPU"))
    assert s["step"] > 0 and parts == pytest.approx(s["step"])  # the rows add up to the step (CPU: no device)


# the flags of `sample` and `demo` before their parsers were derived from SampleOptions / DemoOptions (captured
# from the hand-written parsers): every one must stay
SAMPLE_FLAGS = (
    "--prompt-file --model --vae --t5 --resolution --aspect-ratio --duration --num-frames --image-size --seed "
    "--steps --cfg --fps --aes --flow --camera-motion --no-prompt-cleaning --dtype --reference --reference-frames "
    "--mask-strategy --align --batch-size --num-sample --start-index --end-index --skip-existing "
    "--no-timestep-transform --loop --condition-frame-length --condition-frame-edit --no-cfg-parallel --sp-mode "
    "--device --out-dir --no-progress --dry-run --offload --cfg-sequential --mlp-chunks --vae-micro-batch "
    "--vae-tile --t5-dtype --memory-budget"
).split()
SAMPLE_MEMORY_PLAN_FLAGS = (
    "--dry-run --offload --cfg-sequential --mlp-chunks --vae-micro-batch --vae-tile --t5-dtype --memory-budget"
).split()
DEMO_FLAGS = "--out-dir --steps-vae --steps-dit --seed --small --quick --no-progress".split()


def _subparser(name):
    import argparse

    p = cli.build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_sample_and_demo_keep_every_flag(capsys):
    for name, flags in (("sample", SAMPLE_FLAGS), ("demo", DEMO_FLAGS)):
        p = _subparser(name)
        have = {s for a in p._actions for s in a.option_strings} - {"-h", "--help"}
        assert have == set(flags), name
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        out = capsys.readouterr().out
        for flag in flags:
            assert f" {flag}" in out, (name, flag)
    group = next(g for g in _subparser("sample")._action_groups if g.title.startswith("memory plan"))
    assert [a.option_strings[0] for a in group._group_actions] == SAMPLE_MEMORY_PLAN_FLAGS


def test_sample_flags_and_defaults_come_from_sample_options():
    import dataclasses

    from opensora_fast.common import cli_fields, flag_of
    from opensora_fast.sample import SampleOptions

    p = _subparser("sample")
    actions = {a.dest: a for a in p._actions}
    fields = cli_fields(SampleOptions)
    # every field but the positional prompts is a flag, and every flag but --prompt-file is a field
    assert {f.name for f in dataclasses.fields(SampleOptions)} - {f.name for f in fields} == {"prompts"}
    assert {a.dest for a in p._actions if a.option_strings} - {"help"} == {f.name for f in fields} | {"prompt_file"}
    for f in fields:
        assert actions[f.name].option_strings == [flag_of(f)]
        assert actions[f.name].default == f.default, f.name
    # the previous parser's defaults, as the README and the tests use them
    opts = SampleOptions(prompts=["x"])
    assert (opts.resolution, opts.aspect_ratio, opts.duration, opts.seed, opts.steps, opts.cfg, opts.fps) == (
        "240p", "9:16", "4s", 42, 30, 7.0, 24)  # fmt: skip
    assert (opts.aes, opts.clean_prompts, opts.dtype, opts.out_dir, opts.progress, opts.offload) == (
        6.5, True, "bf16", "samples", True, "auto")  # fmt: skip
    assert (opts.cfg_parallel, opts.sp_mode, opts.t5_dtype, opts.cfg_sequential, opts.reference_frames) == (
        True, "dsp", "bf16", None, 1)  # fmt: skip


def _sample_opts(monkeypatch, argv):
    from opensora_fast import sample

    seen = []
    monkeypatch.setattr(sample, "generate", lambda o: seen.append(o) or [])
    assert cli.main(["sample", *argv]) == 0
    return seen[0]


def test_sample_command_line_builds_sample_options(monkeypatch, tmp_path):
    from opensora_fast.sample import SampleOptions

    assert _sample_opts(monkeypatch, ["a cat"]) == SampleOptions(prompts=["a cat"])  # CLI defaults = Python's
    (tmp_path / "p.txt").write_text("a dog\n")
    argv = ["a cat", "--prompt-file", str(tmp_path / "p.txt"), "--model", "m", "--vae", "v", "--t5", "t",
            "--resolution", "360p", "--aspect-ratio", "1:1", "--duration", "2s", "--num-frames", "17",
            "--image-size", "16x24", "--seed", "3", "--steps", "4", "--cfg", "2.5", "--fps", "8", "--aes", "-1",
            "--flow", "4", "--camera-motion", "pan right", "--no-prompt-cleaning", "--dtype", "fp32",
            "--mask-strategy", "0,0,0,0,1,0", "--align", "2", "--batch-size", "2", "--num-sample", "3",
            "--start-index", "1", "--end-index", "2", "--skip-existing", "--no-timestep-transform", "--loop", "2",
            "--condition-frame-length", "1", "--condition-frame-edit", "0.5", "--no-cfg-parallel",
            "--sp-mode", "ulysses", "--device", "cpu", "--out-dir", str(tmp_path / "o"), "--no-progress",
            "--dry-run", "--offload", "all", "--cfg-sequential", "--mlp-chunks", "2", "--vae-micro-batch", "3",
            "--vae-tile", "64", "--t5-dtype", "fp32", "--memory-budget", "2.5"]  # fmt: skip
    assert _sample_opts(monkeypatch, argv) == SampleOptions(
        prompts=["a cat", "a dog"], model="m", vae="v", t5="t", resolution="360p", aspect_ratio="1:1",
        duration="2s", num_frames=17, image_size=(16, 24), seed=3, steps=4, cfg=2.5, fps=8, aes=None, flow=4.0,
        camera_motion="pan right", clean_prompts=False, dtype="fp32", mask_strategy="0,0,0,0,1,0", align=2,
        batch_size=2, num_sample=3, start_index=1, end_index=2, skip_existing=True, no_timestep_transform=True,
        loop=2, condition_frame_length=1, condition_frame_edit=0.5, cfg_parallel=False, sp_mode="ulysses",
        device="cpu", out_dir=str(tmp_path / "o"), progress=False, dry_run=True, offload="all",
        cfg_sequential=True, mlp_chunks=2, vae_micro_batch=3, vae_tile=64, t5_dtype="fp32", memory_budget=2.5,
    )  # fmt: skip
    assert _sample_opts(monkeypatch, ["a cat", "--aes", "5"]).aes == 5.0


def test_demo_command_line_builds_demo_options(monkeypatch, tmp_path, capsys):
    from opensora_fast import demo
    from opensora_fast.demo import DemoOptions

    seen = []
    monkeypatch.setattr(demo, "run_demo", seen.append)
    assert cli.main(["demo"]) == 0
    assert seen[-1] == DemoOptions.make(DemoOptions.out_dir) == DemoOptions()  # CLI defaults = the dataclass's
    out = str(tmp_path / "d")
    argv = ["demo", "--out-dir", out, "--quick", "--steps-dit", "7", "--seed", "3", "--no-progress"]
    assert cli.main(argv) == 0
    assert seen[-1] == DemoOptions.make(out, quick=True, steps_dit=7, seed=3, progress=False)
    assert cli.main(["demo", "--small", "--out-dir", out]) == 0
    assert seen[-1] == DemoOptions.make(out, small=True) and (seen[-1].size, seen[-1].num_frames) == ((16, 16), 9)
    assert seen[-1].full_check and seen[-1].steps_dit == DemoOptions.steps_dit
    with pytest.raises(SystemExit):
        cli.main(["demo", "--small", "--quick"])
    assert "not allowed with argument" in capsys.readouterr().err
    from opensora_fast.sample import UsageError

    with pytest.raises(UsageError, match="--quick and --small"):
        DemoOptions.make(out, quick=True, small=True)
    assert (
        cli.main(["demo", "--steps-vae", "6"]) == 0
        and seen[-1].steps_vae == 6
        and seen[-1].steps_dit == DemoOptions.steps_dit
    )
    for a in _subparser("demo")._actions:
        if a.dest in ("out_dir", "seed", "progress"):
            assert a.default == getattr(DemoOptions(), a.dest), a.dest
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    quick = DemoOptions.make("x", quick=True)
    assert f"(default {DemoOptions.steps_vae}; --quick {quick.steps_vae})" in help_text
    assert f"(default {DemoOptions.steps_dit}; --quick {quick.steps_dit})" in help_text
