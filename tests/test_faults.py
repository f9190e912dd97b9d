"""Faults under torchrun (CPU, gloo): a rank that stops (SIGSTOP) or dies (SIGKILL) mid-training ends the job
with an error naming the rank, instead of holding every other rank for PyTorch's 30-minute default."""

import os
import signal
import subprocess
import threading
import time

import pytest
import torch
from _dist import torchrun

from opensora_fast.data import make_synthetic_dataset
from opensora_fast.models.vae import OpenSoraVAE, OpenSoraVAEConfig
from opensora_fast.text import build_tiny_t5


def _rank_pids(parent: int) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes (from their environment)."""
    out = {}
    for pid in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split():
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        for e in env:
            if e.startswith(b"RANK="):
                out[int(e[5:])] = int(pid)
    return out


@pytest.mark.parametrize("sig", ["SIGSTOP", "SIGKILL"])
def test_a_stopped_or_dead_rank_ends_the_job_naming_it(tmp_path, sig):
    if not os.path.isdir("/proc") or subprocess.run(["which", "pgrep"], capture_output=True).returncode:
        pytest.skip("needs /proc and pgrep")
    d = str(tmp_path)
    make_synthetic_dataset(f"{d}/data", 9, (16, 16), 8, colors=("red", "blue"))
    build_tiny_t5(f"{d}/t5", extra_text="square circle moving right left up down")
    torch.manual_seed(0)
    OpenSoraVAE(OpenSoraVAEConfig.tiny()).save_pretrained(f"{d}/vae")
    cmd = torchrun(2, "-m", "opensora_fast.cli", "train", "--data", f"{d}/data/data.csv", "--vae", f"{d}/vae",
                   "--t5", f"{d}/t5", "--model-config", "tiny", "--buckets", "9x16x16", "--batch-size", "2",
                   "--steps", "100000", "--ckpt-every", "100000", "--no-progress", "--device", "cpu",
                   "--mask-ratios", "none", "--out-dir", f"{d}/run", "--dist-timeout", "2")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENSORA_FAST_BACKEND": "reference"}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(p.stdout.readline, "")), daemon=True)
    reader.start()
    ranks = {}
    try:
        log = os.path.join(d, "run", "log.jsonl")
        deadline = time.monotonic() + 120
        while not (os.path.exists(log) and os.path.getsize(log) > 0):  # training is under way
            assert p.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        ranks = _rank_pids(p.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], getattr(signal, sig))
        t0 = time.monotonic()
        if sig == "SIGKILL":  # torchrun sees the dead worker, names it and stops the others
            rc = p.wait(timeout=60)
            out = "".join(lines)
            assert rc != 0 and "rank      : 1" in out and "Signal 9 (SIGKILL)" in out, out[-3000:]
        else:  # rank 0 gives up after --dist-timeout 2 s and names the silent rank
            while not any("error: rank 0 of 2" in ln for ln in lines):
                assert time.monotonic() - t0 < 40, "".join(lines)[-3000:]
                time.sleep(0.1)
            err = next(ln for ln in lines if "error: rank 0 of 2" in ln)
            assert "rank(s) 1 stopped responding" in err and "Traceback" not in "".join(lines), err
            print(f"rank 0 reported the stopped rank {time.monotonic() - t0:.1f} s after SIGSTOP: {err.strip()}")
            # torchrun then stops the job (SIGTERM, and SIGKILL after its 30 s grace for a stopped process);
            # spare the test that grace: kill the stopped rank now and check torchrun ends with a failure
            os.kill(ranks[1], signal.SIGKILL)
            assert p.wait(timeout=60) != 0
    finally:
        for pid in ranks.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)
