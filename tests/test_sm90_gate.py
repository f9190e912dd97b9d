"""Hopper compile gate: every launchable kernel config builds for sm_90 with no register spills,
inside the shared-memory limit, and (kernels using tl.dot) with wgmma (HGMMA) in its SASS."""

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def gate_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "gate.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "opensora_fast.kernels._sm90", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    print(proc.stdout[-20000:])
    if not out.exists():
        pytest.fail(f"sm_90 gate did not run:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text()), proc


def test_gate_covers_every_kernel_module(gate_results):
    results, _ = gate_results
    from opensora_fast.kernels import _sm90

    names = " ".join(r["name"] for r in results)
    for mod in _sm90.MODULES:
        assert mod in names, f"no sm_90 configs compiled for kernel module {mod}"


def test_every_config_passes(gate_results):
    results, proc = gate_results
    bad = [f"{r['name']}: {'; '.join(r['failures'])} {r['error']}" for r in results if r["failures"]]
    assert not bad, "sm_90 gate failures:\n" + "\n".join(bad)
    assert proc.returncode == 0, proc.stderr[-4000:]
