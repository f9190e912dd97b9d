"""The README's "Try every program on a CPU" block runs as written, from an empty directory, with tiny models:
inputs made in Python, train + --resume, train --bucket-config with --grad-accum, extract + train --features,
eval-loss, train-vae + --resume, sample --dry-run and sample (issue 11)."""

import json
import math
import os
import subprocess
import sys
import time

import av
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADING = "## Try every program on a CPU"


def readme_block() -> str:
    """The one bash code block of the README section under HEADING, exactly as written."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert text.count(f"\n{HEADING}\n") == 1, f"README.md has no single {HEADING!r} section"
    section = text.split(f"\n{HEADING}\n", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```bash\n")[1:]
    assert len(blocks) == 1, f"{HEADING!r} should hold one bash block, found {len(blocks)}"
    assert "\n```" in blocks[0], "the bash block is not closed"
    return blocks[0].split("\n```", 1)[0] + "\n"


def test_readme_block_is_found():
    block = readme_block()
    for prog in ("train", "extract", "eval-loss", "train-vae", "sample"):
        assert f"opensora-fast {prog} " in block
    assert "--resume" in block and "--bucket-config" in block and "--features" in block and "--dry-run" in block


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not torch.cuda.is_available():
        env.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py sets it
    # `python` and `opensora-fast` from the interpreter running the tests (its venv may not be on PATH)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + readme_block()],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    wall = time.monotonic() - start
    tail = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode} after {wall:.0f} s\n{tail}"
    out = proc.stdout

    # train, then --resume from step 2 to step 4
    assert "resuming from step 2" in out
    for step in (2, 4):
        ckpt = work / "run" / "checkpoints" / f"step-{step:08d}"
        assert (ckpt / "model.safetensors").is_file() and (ckpt / "ema" / "model.safetensors").is_file()
    assert [json.loads(line)["step"] for line in open(work / "run" / "log.jsonl")] == [1, 2, 3, 4]
    # the bucket_config run: 144p buckets, 2 batches of 2 clips per step
    recs = [json.loads(line) for line in open(work / "run-buckets" / "log.jsonl")]
    assert [r["step"] for r in recs] == [1, 2]
    assert all(r["shape"][1:] == [144, 256] and r["batch"] == 4 for r in recs)
    assert (work / "run-buckets" / "checkpoints" / "step-00000002" / "ema").is_dir()
    # extract, then train from the features
    assert (work / "feats" / "features.json").is_file()
    assert (work / "run-features" / "checkpoints" / "step-00000002" / "ema").is_dir()
    # eval-loss: Open-Sora 1.2's 10 timesteps for the one bucket
    table = json.load(open(work / "eval-loss.json"))
    bucket = table["buckets"]["9x16x16"]
    assert len(bucket["per_t"]) == 10 and bucket["clips"] == 16 and math.isfinite(bucket["mean"])
    assert "average over 1 bucket(s)" in out
    # train-vae, then --resume to step 4
    assert [json.loads(line)["step"] for line in open(work / "vae-run" / "log.jsonl")] == [1, 2, 3, 4]
    assert (work / "vae-run" / "checkpoints" / "step-00000004" / "model.safetensors").is_file()
    # sample --dry-run printed the plan; sample wrote a 9-frame 16x16 clip
    assert "memory plan: 9 frames at 16x16" in out
    video = work / "samples" / "000_a_red_square_moving_right.mp4"
    with av.open(str(video)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    assert len(frames) == 9 and frames[0].shape == (16, 16, 3)
    print(f"README commands: {wall:.0f} s")
