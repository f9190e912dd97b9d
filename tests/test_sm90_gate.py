"""The sm_90 gate (kernels/_sm90.py): what real calls launch at real shapes compiles for Hopper as the
runtime would build it, with no spills, 16-byte global tiles, async copies feeding HGMMA loops, HGMMA of
useful width, and a static time estimate no more than 10% worse than the committed one.

The probe tests prove the gate sees each of those on small kernels with known machine code (each failing
case is one the gate must flag); the gate test runs every case of kernels/_sm90_cases.py."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def probes():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_gate_probe.py")], env=_env(), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def _find(probes, kernel, **cx):
    hits = [p for p in probes if p["kernel"] == kernel and all(p["constexprs"].get(k) == v for k, v in cx.items())]
    return hits


def test_probe_pointer_types_come_from_the_values(probes):
    """The launch passing an fp32 tensor where the kernel loads lengths is typed *fp32 by Triton's binder and
    fails to compile, as on a GPU; the int32 one compiles. A hand-typed "*i32" signature would hide this."""
    bad, good = _find(probes, "_probe_varlen_kernel")
    assert bad["signature"]["CU"] == "*fp32" and good["signature"]["CU"] == "*i32"
    assert any(f.startswith("[compile]") for f in bad["failures"]) and "redefines it as fp32" in bad["error"]
    assert good["failures"] == []


def test_probe_narrow_global_accesses_are_flagged(probes):
    (plain,) = _find(probes, "_probe_rows_kernel", HINT=False)
    (hinted,) = _find(probes, "_probe_rows_kernel", HINT=True)
    assert any(f.startswith("[narrow_global]") for f in plain["failures"]), plain
    assert plain["widths"].get("LDG.2", 0) > 0
    assert hinted["failures"] == [] and hinted["widths"].get("LDG.16", 0) > 0 and "LDG.2" not in hinted["widths"]


def test_probe_hgmma_loops_need_async_copies_and_width(probes):
    pipelined, single, narrow = _find(probes, "_probe_matmul_kernel")
    assert pipelined["num_stages"] == 3 and pipelined["failures"] == [] and pipelined["async_copies"] > 0
    assert single["num_stages"] == 1 and any(f.startswith("[plain_ldg_loop]") for f in single["failures"])
    assert narrow["constexprs"]["BLOCK_N"] == 16 and any(f.startswith("[narrow_hgmma]") for f in narrow["failures"])


def test_probe_estimate_is_never_faster_than_the_hardware(probes):
    pipelined = _find(probes, "_probe_matmul_kernel")[0]
    flops = 2.0 * 4096**3
    assert pipelined["trips"] == [4096 // 64]
    # dense bf16 peak of 132 SMs x 4096 FLOP/clk x 1.83 GHz = 989 TFLOP/s
    assert flops / pipelined["est_s"] <= 990e12
    assert flops / pipelined["est_s"] > 300e12  # and not absurdly slow for a tensor-core-bound GEMM


def test_ratchet_logic(tmp_path):
    sys.path.insert(0, str(ROOT))
    from opensora_fast.kernels import _sm90

    path = tmp_path / "est.json"
    table = [{"case": "a", "est_s": 1e-3, "floor_s": 5e-4, "bound": "hbm"},
             {"case": "b", "est_s": 2e-3, "floor_s": None, "bound": "tensor"}]  # fmt: skip
    _sm90.write_ratchet(table, str(path))
    assert _sm90.check_ratchet(table, str(path)) == []
    table[0]["est_s"] = 1.09e-3  # within 10%
    assert _sm90.check_ratchet(table, str(path)) == []
    table[0]["est_s"] = 1.2e-3
    assert len(_sm90.check_ratchet(table, str(path))) == 1
    table[0]["est_s"] = None  # losing an estimate (e.g. a launch stops compiling) fails too
    assert len(_sm90.check_ratchet(table, str(path))) == 1


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "gate.json"
    proc = subprocess.run(
        [sys.executable, "-m", "opensora_fast.kernels._sm90", "--perf", "--check-ratchet", "--json", str(out)],
        env=_env(), capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    print(proc.stdout[-30000:])
    if not out.exists():
        pytest.fail(f"sm_90 gate did not run:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text()), proc


def _jit_kernels() -> set[str]:
    """Every @triton.jit function named *_kernel defined in kernels/*.py."""
    names = set()
    for f in (ROOT / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                decos = [ast.unparse(d) for d in node.decorator_list]
                if any("triton.jit" in d for d in decos):
                    names.add(node.name)
    return names


def test_gate_records_every_kernel(gate):
    """The cases launch every kernel the library defines: nothing ships uncompiled."""
    results, _ = gate
    launched = {r["kernel"] for r in results["launches"]}
    missing = _jit_kernels() - launched
    assert not missing, f"kernels no gate case launches: {sorted(missing)}"
    assert not [c for c in results["cases"] if c["error"]], [c["error"] for c in results["cases"] if c["error"]]


def test_every_launch_passes(gate):
    results, proc = gate
    bad = [f"{r['name']}: {'; '.join(r['failures'])} {r['error']}" for r in results["launches"] if r["failures"]]
    assert not bad, "sm_90 gate failures:\n" + "\n".join(bad)


def test_waivers_are_current(gate):
    """A waiver that matches no finding is stale and must go."""
    from opensora_fast.kernels import _sm90

    results, _ = gate
    used = {(r["kernel"], _sm90.rule_of(w), w.split(" -- waived: ", 1)[1]) for r in results["launches"]
            for w in r["waived"]}  # fmt: skip
    wanted = {(k, rule, reason) for (k, rule), entries in _sm90.WAIVERS.items() for _c, reason in entries}
    stale = wanted - used
    assert not stale, f"stale sm_90 waivers: {sorted(stale)}"


def test_estimates_ratchet(gate):
    _, proc = gate
    bad = [line for line in proc.stdout.splitlines() if line.startswith("RATCHET:")]
    assert not bad, "\n".join(bad)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
