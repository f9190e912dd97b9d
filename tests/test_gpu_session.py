"""bench/gpu_session.sh in its dry mode (CPU, tiny shapes): every planned case gets a line in results.jsonl,
written as it is measured, so a run killed half-way keeps what it measured and ``--summarize`` rebuilds the
table; a group past its deadline is recorded as timeout and the next group still runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import session

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_session.sh"


def _env(out: Path, **extra) -> dict:
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, PYTHONUNBUFFERED="1", **extra)
    for k in ("DRY", "SESSION_DEADLINE_S", "SESSION_GROUP_DEADLINES", "SESSION_GROUPS", session.STALL_ENV,
              session.INTERPRET_ENV):  # fmt: skip
        if k not in extra:
            env.pop(k, None)
    return env


def _lines(out: Path) -> list[dict]:
    """Every line of results.jsonl, each required to be one valid JSON object."""
    text = (out / session.RESULTS).read_text()
    assert text.endswith("\n"), "results.jsonl ends in a partial line"
    return [json.loads(line) for line in text.splitlines()]


def _planned(dry: bool = True) -> list[tuple[str, str, str]]:
    proc = subprocess.run([sys.executable, "-m", "bench.session", "--list"] + (["--dry"] if dry else []), cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=_env(Path("/nonexistent")))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [tuple(part.strip() for part in line.split("|")[:3]) for line in proc.stdout.splitlines()]


def test_dry_run_writes_one_line_per_planned_case_and_the_summary(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), "--dry"], cwd=ROOT, capture_output=True, text=True, timeout=400,
                          env=_env(tmp_path))  # fmt: skip
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    planned = _planned()
    groups = {g for g, _, _ in planned}
    assert groups == set(session.GROUP_DEADLINES_S), "every group of the real run is planned in the dry run"
    recs = _lines(tmp_path)
    got = [(r["group"], r["case"], r["impl"]) for r in recs]
    assert sorted(got) == sorted(planned), "one line per planned case"
    for r in recs:
        assert set(session.FIELDS) <= set(r), f"missing fields in {r}"
        assert r["ok"] is True and r["error"] is None, r
        assert r["dry"] is True
        if r["group"] != "correctness":
            assert r["ms"] > 0 and r["first_call_ms"] > 0
            assert (r["tflops"] or 0) > 0 or (r["gbps"] or 0) > 0 or r["group"] == "vae_decode"
    checks = [r for r in recs if r["group"] == "correctness"]
    assert len(checks) >= 13 and all(r["detail"]["repeat_equal"] for r in checks)
    # ceilings measured first, then every timed case relative to them
    assert [r["group"] for r in recs[:2]] == ["ceilings", "ceilings"]
    assert all(r["pct_of_ceiling"] > 0 for r in recs if r["group"] not in ("correctness", "vae_decode"))
    summary = (tmp_path / session.SUMMARY).read_text()
    assert f"{len(recs)} lines, {len(recs)} ok" in summary and "dry run" in summary
    for _, case, _impl in planned:
        assert f"| {case} |" in summary
    # the table is printed last
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])
    assert (tmp_path / "gpu.txt").read_text().startswith("dry run")
    print(f"dry run: {len(recs)} cases in {wall:.1f} s")


def test_run_killed_half_way_keeps_its_results_and_summarizes(tmp_path):
    proc = subprocess.Popen(["bash", str(SCRIPT), "--dry"], cwd=ROOT, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    results = tmp_path / session.RESULTS
    want = 4  # both ceilings and the first correctness lines
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and results.read_text().count("\n") >= want:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the dry run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the script, the runner and (through PDEATHSIG) its worker
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(2.0)
    n_then = len(_lines(tmp_path))
    time.sleep(3.0)
    recs = _lines(tmp_path)
    assert len(recs) == n_then, "a worker outlived the killed runner and kept writing"
    planned = _planned()
    assert want <= len(recs) < len(planned)
    assert all(r["ok"] for r in recs) and recs[0]["group"] == "ceilings"
    assert not (tmp_path / session.SUMMARY).exists()
    proc = subprocess.run([sys.executable, "-m", "bench.session", "--summarize", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=_env(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = (tmp_path / session.SUMMARY).read_text()
    assert proc.stdout == summary
    assert f"{len(recs)} lines" in summary and f"{len(planned) - len(recs)} without a line" in summary
    assert "## planned but without a line" in summary and "vae_decode / " in summary


def test_group_past_its_deadline_is_recorded_as_timeout_and_the_next_group_runs(tmp_path):
    # the ceilings worker writes its first line, then hangs; its deadline kills it
    env = _env(tmp_path, **{session.STALL_ENV: "ceilings:1"})
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bench.session", "--dry", "--out", str(tmp_path), "--groups",
                           "ceilings,add_layernorm_modulate", "--group-deadline", "ceilings=15"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    wall = time.monotonic() - t0
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # not every case ok
    recs = _lines(tmp_path)
    by = {(r["group"], r["case"]): r for r in recs}
    assert by[("ceilings", "copy d2d")]["ok"] is True, "the line written before the hang is kept"
    hung = by[("ceilings", "matmul 256^3")]
    assert hung["ok"] is False and hung["error"].startswith("timeout") and hung["ms"] is None
    nxt = [r for r in recs if r["group"] == "add_layernorm_modulate"]
    assert len(nxt) == 6 and all(r["ok"] for r in nxt), "the next group ran in full"
    assert len(recs) == 8
    assert wall < 15 + 200
    summary = (tmp_path / session.SUMMARY).read_text()
    assert "timeout: group killed at its deadline of 15 s" in summary


def test_global_deadline_skips_the_remaining_groups(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.session", "--dry", "--out", str(tmp_path), "--deadline", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env(tmp_path))  # fmt: skip
    assert proc.returncode == 1
    recs = _lines(tmp_path)
    assert len(recs) == len(_planned())
    assert all(not r["ok"] and r["error"].startswith("skipped: global deadline") for r in recs)


def test_summarize_skips_unreadable_lines_and_marks_failures(tmp_path):
    good = session.base_record("attention_spatial", "fwd B*T'=30 S=3600", "opensora_fast", "s", "bf16", False)
    good.update(ok=True, ms=2.0, tflops=400.0, pct_of_ceiling=50.0, first_call_ms=900.0, est_ms=1.5)
    base = dict(good, impl="sdpa-flash", ms=3.0)
    oom = session.base_record("stdit3", "step", "opensora_fast", "s", "bf16", False)
    oom.update(error="OOM: out of memory")
    conv = [dict(good, group="causal_conv3d", case="fwd", impl=f"{p} {lay}", ms=ms, est_ms=None)
            for p, lay, ms in (("opensora_fast", "NDHWC", 1.0), ("cudnn", "NDHWC", 4.0),
                               ("opensora_fast", "NCDHW", 8.0), ("cudnn", "NCDHW", 2.0))]  # fmt: skip
    for r in (good, base, oom, *conv):
        session.append_result(tmp_path, r)
    with open(tmp_path / session.RESULTS, "a") as f:
        f.write('{"group": "cut off mid-li')  # a line a kill cut short
    text = session.summarize(tmp_path)
    assert "7 lines, 6 ok" in text and "1 unreadable lines" in text
    assert "| cudnn NDHWC | 4 |" in text and "| 4x |" in text, "each layout against ours in the same layout"
    assert "| cudnn NCDHW | 2 |" in text and "| 0.25x |" in text
    assert "| 1.5x |" in text, "the baseline's row shows how much faster ours is"
    assert "| 1.5 |" in text, "the static estimate sits beside the measured time"
    assert "OOM: out of memory" in text


def test_estimates_table_formats(tmp_path, monkeypatch):
    p = tmp_path / "est.json"
    monkeypatch.setenv("SESSION_ESTIMATES", str(p))
    p.write_text(json.dumps({"attention_spatial/fwd B*T'=30 S=3600": 2.5, "x": {"est_ms": 1.0}}))
    t = session.load_estimates(tmp_path)
    assert session.estimate_for(t, "attention_spatial", "fwd B*T'=30 S=3600", "opensora_fast") == 2.5
    assert session.estimate_for(t, "attention_spatial", "fwd B*T'=30 S=3600", "sdpa-flash") is None
    p.write_text(json.dumps({"cases": [{"case": "fwd rows=524288", "ms": 0.9}]}))
    t = session.load_estimates(tmp_path)
    assert session.estimate_for(t, "add_layernorm_modulate", "fwd rows=524288", "opensora_fast") == 0.9
    # the sm_90 gate's ratchet format, matched through the spec's est_case
    p.write_text(json.dumps({"what": "..", "cases": {"spatial attention fwd 720p-2s": {"est_ms": 3.25, "bound": "x"}}}))
    t = session.load_estimates(tmp_path)
    assert session.estimate_for(t, "attention_spatial", "fwd", "opensora_fast", "spatial attention fwd 720p-2s") == 3.25
    from bench import session_cases

    real = [s for specs in session_cases.plan(False).values() for s in specs]
    named = {s.est_case for s in real if s.est_case}
    assert len(named) >= 8 and all(s.impl.startswith("opensora_fast") for s in real if s.est_case)
    p.write_text("not json")
    assert session.load_estimates(tmp_path) == {}


def test_an_out_folder_with_results_is_refused(tmp_path):
    """A second run into the same folder would mix two sessions' lines: refused before anything runs."""
    session.append_result(tmp_path, session.base_record("ceilings", "copy d2d", "torch", "s", "bf16", False))
    with pytest.raises(ValueError, match="already holds results.jsonl"):
        session.main(["--dry", "--groups", "ceilings", "--out", str(tmp_path)])
    proc = subprocess.run(["bash", str(SCRIPT), "--dry"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=_env(tmp_path))  # fmt: skip
    assert proc.returncode == 2 and "already holds results.jsonl" in proc.stderr
    assert len(_lines(tmp_path)) == 1


def test_bad_group_deadline_names_the_argument():
    with pytest.raises(ValueError, match="GROUP=SECONDS"):
        session.parse_group_deadlines(["stdit3"])
    with pytest.raises(ValueError, match="unknown groups"):
        session.main(["--dry", "--group-deadline", "nosuch=3", "--out", "/nonexistent"])
    with pytest.raises(ValueError, match="--groups"):
        session.main(["--dry", "--groups", "nosuch", "--out", "/nonexistent"])


def test_every_static_estimate_name_is_a_case_of_the_sm90_gate():
    """est_case names the gate's case whose estimate sits beside the measured time: a renamed gate case
    must not silently leave est_ms empty."""
    from opensora_fast.kernels import _sm90_cases

    from bench import session_cases

    gate = {c.name for c in _sm90_cases.cases()}
    named = {s.est_case for specs in session_cases.plan(False).values() for s in specs if s.est_case}
    assert named and named <= gate, sorted(named - gate)


def test_non_finite_values_are_written_as_null(tmp_path):
    """A NaN error (e.g. a gradient the kernel did not produce) must not break the line or the JSON."""
    rec = session.base_record("correctness", "k", "opensora_fast", "s", "bf16", False)
    rec.update(ms=float("nan"), detail={"bwd_err": float("inf"), "repeat_equal": False, "errs": [1.0, float("nan")]})
    session.append_result(tmp_path, rec)

    def strict(const):
        raise AssertionError(f"non-standard JSON constant {const}")

    (line,) = (tmp_path / session.RESULTS).read_text().splitlines()
    d = json.loads(line, parse_constant=strict)
    assert d["ms"] is None and d["detail"]["bwd_err"] is None and d["detail"]["errs"] == [1.0, None]


def _judge(kernel):
    """run_check on a (2, 33, 48) LayerNorm+modulate with ``kernel`` standing in for the Triton op (dry Ctx)."""
    import torch

    from bench import session_cases as sc

    R = __import__("opensora_fast.kernels.reference", fromlist=["R"])
    ctx = sc.Ctx(dry=True, device="cpu", dtype=torch.float32)

    def make(ctx):
        xs = [sc._randn(s, ctx, seed) for s, seed in (((2, 33, 48), 1), ((2, 1, 48), 2), ((2, 1, 48), 3))]
        return kernel, R.layernorm_modulate_ref, xs

    return sc.run_check(sc.Check("lnm", "x (2,33,48)", make), ctx)


def test_correctness_judge_passes_the_reference_and_fails_each_defect():
    from opensora_fast.kernels import reference as R

    good = _judge(R.layernorm_modulate_ref)
    assert good["ok"] and good["error"] is None and good["detail"]["repeat_equal"]
    off = _judge(lambda x, a, b: R.layernorm_modulate_ref(x, a, b) * (1 + 1e-4))
    assert not off["ok"] and "fwd error" in off["error"] and "bwd error" in off["error"]
    bad_grad = _judge(lambda x, a, b: R.layernorm_modulate_ref(x, a.detach() * 1.0, b))
    assert not bad_grad["ok"] and "bwd error" in bad_grad["error"] and "fwd error" not in bad_grad["error"]
    calls = []

    def drifting(x, a, b):  # a second launch that differs in the last bit (e.g. a stale autotune buffer)
        calls.append(1)
        out = R.layernorm_modulate_ref(x, a, b)
        return out if len(calls) == 1 else out.nextafter(out + 1)

    drift = _judge(drifting)
    assert not drift["ok"] and drift["error"] == "second call differs"

    def poisoned(x, a, b):
        out = R.layernorm_modulate_ref(x, a, b).clone()
        out[0, 5, 7] = float("nan")
        return out

    nan = _judge(poisoned)
    assert not nan["ok"] and "NaN" in nan["error"]


def test_timed_reports_first_call_apart_and_the_ceiling_of_its_bound():
    import torch

    from bench import session_cases as sc

    ctx = sc.Ctx(dry=True, device="cpu", dtype=torch.float32, ceilings={"gbps": 100.0, "tflops": 2.0})
    x = torch.randn(64, 64, requires_grad=True)
    calls = []

    def call():
        calls.append(1)
        return x @ x

    fn = sc.lazy_fwd_bwd(call, [x])
    assert calls == [], "building the fwd+bwd callable must not run the forward (its compile belongs to the first call)"
    fn()
    assert calls == [1] and x.grad is not None
    made = []
    rec = sc.timed(lambda: made.append(1) or fn, flops=2e9, nbytes=1e9, bound="bytes")(ctx)
    assert made == [1] and rec["ok"] and rec["setup_ms"] >= 0 and rec["first_call_ms"] > 0
    assert rec["pct_of_ceiling"] == pytest.approx(100 * rec["gbps"] / 100.0)
    rec = sc.timed(lambda: fn, flops=2e9, nbytes=1e9)(ctx)
    assert rec["pct_of_ceiling"] == pytest.approx(100 * rec["tflops"] / 2.0)


def test_dry_and_groups_from_the_environment(tmp_path):
    """DRY=1 is --dry; SESSION_GROUPS picks groups; the summary is still printed last."""
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=_env(tmp_path, DRY="1", SESSION_GROUPS="ceilings"))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    recs = _lines(tmp_path)
    assert [r["case"] for r in recs] == ["copy d2d", "matmul 256^3"] and all(r["dry"] and r["ok"] for r in recs)
    assert proc.stdout.rstrip().endswith((tmp_path / session.SUMMARY).read_text().rstrip().splitlines()[-1])
