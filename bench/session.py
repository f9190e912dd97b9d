"""One budgeted GPU session (``bench/gpu_session.sh``): every result written the moment it is measured.

    python -m bench.session --out DIR [--dry [--interpret]] [--deadline S] [--group-deadline GROUP=S ...]
                            [--groups A,B]
    python -m bench.session --summarize DIR        # rebuild DIR/summary.md from DIR/results.jsonl
    python -m bench.session --list [--dry]         # the planned cases

The runner plans the fixed case list of ``bench/session_cases.py`` (written to ``DIR/plan.json``), then runs
each group in its own worker process (``--worker GROUP``: its own process group, so a deadline kills it with
any helper processes; PR_SET_PDEATHSIG, so it dies with the runner) with a deadline: min(the group's
deadline, what is left of the global deadline). A worker appends one JSON line per case to
``DIR/results.jsonl`` (flush + fsync after each). A group killed at its deadline, or whose worker died, gets
a line for each planned case it did not record (``"error": "timeout ..."`` or ``"not run ..."``), so the
file always ends with one line per planned case, and a killed session keeps what it measured. Last,
``DIR/summary.md`` (a short markdown table, built from whatever results.jsonl holds) is written and printed.
Worker output goes to ``DIR/session.log``. DIR must not hold a results.jsonl already.

Each line: group, case, impl, shape, dtype, ms (steady state, median), tflops, gbps, pct_of_ceiling (of this
run's bf16 matmul TFLOP/s when the case has flops, else of its copy GB/s), first_call_ms (the first call,
synced: compile + autotune), est_ms (the sm_90 gate's static estimate of the spec's ``est_case``, see
:func:`load_estimates`, else null), ok, error; also setup_ms (building inputs / the model), peak_gb, note,
detail (correctness errors), est_case, wall_s, t (unix time), dry. A dry run (CPU, tiny shapes, opensora_fast
on the reference backend, or the Triton interpreter with ``--interpret``) times one call: ms = first call.

Deadlines: global ``--deadline`` or ``SESSION_DEADLINE_S`` (default 480 s; dry 150 s); per group
``GROUP_DEADLINES_S`` overridden by ``--group-deadline`` or ``SESSION_GROUP_DEADLINES="stdit3=120,vae_decode=30"``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS, PLAN, SUMMARY, LOG = "results.jsonl", "plan.json", "summary.md", "session.log"
DEFAULT_DEADLINE_S, DRY_DEADLINE_S = 480.0, 150.0
# seconds per group on the H200 (estimates: process start + CUDA init ~5 s, first-call compiles, timing)
# (sum 485: the global deadline trims the last group when every group runs to its own deadline)
GROUP_DEADLINES_S = {
    "ceilings": 25, "correctness": 100, "attention_spatial": 45, "attention_temporal": 55,
    "add_layernorm_modulate": 75, "causal_conv3d": 45, "stdit3": 80, "vae_decode": 60,
}  # fmt: skip
DRY_GROUP_DEADLINE_S = 60.0
RESERVE_S = 3.0  # kept back from the global deadline for the summary
INTERPRET_ENV = "SESSION_INTERPRET"  # 1: a dry run takes opensora_fast through the Triton interpreter (slow)
STALL_ENV = "SESSION_TEST_STALL"
RUNNER_PID_ENV = "SESSION_RUNNER_PID"
MIN_GROUP_S = 2.0  # a group with less time left than this is recorded as skipped
FIELDS = ("group", "case", "impl", "shape", "dtype", "ms", "tflops", "gbps", "pct_of_ceiling", "first_call_ms",
          "est_ms", "ok", "error")  # fmt: skip
# the sm_90 gate's committed table (kernels/_sm90.py --write-ratchet: {"cases": {name: {"est_ms": ..}}}) first
ESTIMATE_FILES = ("kernels/sm90_estimates.json", "bench/sm90_estimates.json", "kernels/sm90_perf.json")


# ---------------------------------------------------------------------------------------------
# results file


def append_result(out: Path, rec: dict) -> None:
    """One JSON line, flushed and fsynced before returning (a kill afterwards cannot lose it)."""
    line = json.dumps(_finite(rec), default=str, allow_nan=False) + "\n"
    with open(out / RESULTS, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_results(out: Path) -> tuple[list[dict], int]:
    """(records, number of unreadable lines) of out/results.jsonl; a missing file is empty."""
    path = Path(out) / RESULTS
    if not path.exists():
        return [], 0
    recs, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            recs.append(rec)
        else:
            bad += 1
    return recs, bad


def base_record(group: str, case: str, impl: str, shape: str, dtype: str, dry: bool) -> dict:
    rec = dict.fromkeys(FIELDS)
    rec.update(group=group, case=case, impl=impl, shape=shape, dtype=dtype, ok=False, dry=dry)
    return rec


def _finite(v):
    """v with every non-finite float (at any depth) replaced by None: each line stays strict JSON."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


# ---------------------------------------------------------------------------------------------
# static estimates


def load_estimates(root: Path = ROOT) -> dict[str, float]:
    """Static per-case estimates (ms), if a table exists: ``$SESSION_ESTIMATES`` or the first of
    ESTIMATE_FILES. Accepted: {"<name>": ms | {"est_ms"|"ms": ms}}, optionally under "cases", "results" or
    "estimates", or a list of {"key"|"case"|"name"|"id": .., "est_ms"|"ms": ..}. Names are matched as in
    :func:`estimate_for`. Unreadable tables give {}."""
    paths = [os.environ["SESSION_ESTIMATES"]] if os.environ.get("SESSION_ESTIMATES") else []
    paths += [str(root / p) for p in ESTIMATE_FILES]
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
        except (OSError, ValueError):
            continue
        rows = data
        if isinstance(data, dict):
            inner = [data[k] for k in ("cases", "results", "estimates") if isinstance(data.get(k), (list, dict))]
            rows = inner[0] if inner else data
        table: dict[str, float] = {}
        if isinstance(rows, dict):
            for k, v in rows.items():
                ms = v.get("est_ms", v.get("ms")) if isinstance(v, dict) else v
                if isinstance(ms, (int, float)):
                    table[str(k)] = float(ms)
        elif isinstance(rows, list):
            for r in rows:
                if not isinstance(r, dict):
                    continue
                k = next((r[n] for n in ("key", "case", "name", "id") if n in r), None)
                ms = r.get("est_ms", r.get("ms"))
                if k is not None and isinstance(ms, (int, float)):
                    table[str(k)] = float(ms)
        if table:
            return table
    return {}


def estimate_for(table: dict[str, float], group: str, case: str, impl: str, est_case: str | None = None):
    """The static estimate (ms) of an opensora_fast result: by the spec's ``est_case`` (a case name of
    kernels/_sm90_cases.py), else by "group/case/impl", "group/case" or "case"; None for other impls."""
    if not impl.startswith("opensora_fast"):
        return None
    for k in (est_case, f"{group}/{case}/{impl}", f"{group}/{case}", case):
        if k is not None and k in table:
            return table[k]
    return None


# ---------------------------------------------------------------------------------------------
# worker: one group in this process


def _ceilings_from(recs: list[dict]) -> dict:
    c = {}
    for r in recs:
        if r.get("group") == "ceilings" and r.get("ok"):
            if r.get("gbps"):
                c["gbps"] = r["gbps"]
            if r.get("tflops"):
                c["tflops"] = r["tflops"]
    return c


def _stall_point(group: str) -> int | None:
    """``SESSION_TEST_STALL=GROUP:N``: the worker of GROUP hangs before its N-th case (tests of the deadline)."""
    name, _, n = os.environ.get(STALL_ENV, "").partition(":")
    return int(n) if name == group and n.isdigit() else None


def worker_main(group: str, out: Path, dry: bool) -> int:
    _die_with_runner()
    if dry:  # before torch / triton are imported
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if group == "correctness":
        os.environ["OPENSORA_FAST_POISON"] = "1"
    import torch

    from bench import session_cases as sc

    device = "cpu" if dry or not torch.cuda.is_available() else "cuda"
    interpret = os.environ.get(INTERPRET_ENV, "0") == "1"
    ctx = sc.Ctx(dry=dry, device=device, dtype=torch.float32 if dry else torch.bfloat16, interpret=interpret)
    ctx.ceilings = _ceilings_from(read_results(out)[0])
    estimates = load_estimates()
    specs = sc.plan(dry, [group], interpret)[group]
    print(f"[{group}] {len(specs)} cases on {device}", flush=True)
    stall = _stall_point(group)
    for i, spec in enumerate(specs):
        if i == stall:  # test hook: hang here until the runner's deadline kills this worker
            print(f"[{group}] {STALL_ENV}: stalling before case {i}", flush=True)
            time.sleep(3600)
        rec = base_record(spec.group, spec.case, spec.impl, spec.shape, spec.dtype, dry)
        rec["note"] = spec.note or None
        rec["est_case"] = spec.est_case
        t0 = time.perf_counter()
        try:
            rec.update(spec.run(ctx))
        except torch.cuda.OutOfMemoryError as exc:
            rec.update(ok=False, error=f"OOM: {str(exc).splitlines()[0][:200]}")
        except Exception as exc:  # recorded, never hidden; the next case still runs
            import traceback

            traceback.print_exc()
            msg = str(exc).splitlines()[0][:300] if str(exc) else ""
            rec.update(ok=False, error=f"{type(exc).__name__}: {msg}")
            if device == "cuda" and "CUDA error" in msg:  # the context is gone: the runner records the rest
                append_result(out, _clean(rec, t0, estimates))
                return 3
        append_result(out, _clean(rec, t0, estimates))
        if group == "ceilings":
            ctx.ceilings = _ceilings_from(read_results(out)[0])
        ms = f"{rec['ms']:.4g} ms" if rec.get("ms") is not None else ""
        print(f"[{group}] {spec.case} | {spec.impl}: {'ok' if rec['ok'] else 'FAIL'} {ms} {rec['error'] or ''}",
              flush=True)  # fmt: skip
    return 0


def _clean(rec: dict, t0: float, estimates: dict) -> dict:
    rec["est_ms"] = estimate_for(estimates, rec["group"], rec["case"], rec["impl"], rec.get("est_case"))
    rec["wall_s"] = time.perf_counter() - t0
    rec["t"] = time.time()
    return _finite(rec)


# ---------------------------------------------------------------------------------------------
# runner


def _planned(dry: bool, groups) -> dict[str, list[dict]]:
    from bench import session_cases as sc

    return {
        g: [{"case": s.case, "impl": s.impl, "shape": s.shape, "dtype": s.dtype, "note": s.note} for s in specs]
        for g, specs in sc.plan(dry, groups, os.environ.get(INTERPRET_ENV, "0") == "1").items()
    }


def _die_with_runner() -> None:
    """In a worker: SIGKILL when the runner that started it dies (Linux PR_SET_PDEATHSIG), so a killed
    session leaves no worker writing on. The runner's pid comes in RUNNER_PID_ENV; if it is already gone,
    exit at once."""
    runner = os.environ.get(RUNNER_PID_ENV)
    if not runner:
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != int(runner):
        os._exit(4)


def run_worker(group: str, out: Path, dry: bool, limit_s: float, log) -> tuple[int | None, bool]:
    """(exit code or None, timed out) of one worker run under a deadline of limit_s seconds."""
    cmd = [sys.executable, "-m", "bench.session", "--worker", group, "--out", str(out)] + (["--dry"] if dry else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{RUNNER_PID_ENV: str(os.getpid())})
    # its own process group: killed as one at the deadline (torch.compile's helper processes too)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, process_group=0)
    try:
        return proc.wait(timeout=max(0.1, limit_s)), False
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        return None, True


def _commit() -> str:
    """HEAD's short hash, "+dirty" when tracked files differ from it; "unknown" outside git."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout  # noqa: E731
        sha = run("rev-parse", "--short", "HEAD").strip()
        return (sha + ("+dirty" if run("status", "--porcelain", "--untracked-files=no").strip() else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse_group_deadlines(items) -> dict[str, float]:
    out = {}
    for item in items:
        for part in str(item).split(","):
            if not part.strip():
                continue
            name, sep, val = part.partition("=")
            try:
                out[name.strip()] = float(val)
            except ValueError:
                raise ValueError(f"group deadline must look like GROUP=SECONDS, got {part!r}") from None
            if not sep:
                raise ValueError(f"group deadline must look like GROUP=SECONDS, got {part!r}")
    return out


def run_session(out: Path, dry: bool, deadline_s: float, group_deadlines: dict, groups=None) -> int:
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    if (out / RESULTS).exists() and (out / RESULTS).stat().st_size:
        raise ValueError(f"--out {out} already holds {RESULTS}; give the session an empty folder")
    planned = _planned(dry, groups)
    plan_doc = {"dry": dry, "deadline_s": deadline_s, "started": time.time(), "commit": _commit(), "groups": planned,
                "group_deadlines_s": {g: group_deadlines.get(g) for g in planned}}  # fmt: skip
    (out / PLAN).write_text(json.dumps(plan_doc, indent=1))
    n = sum(map(len, planned.values()))
    print(f"session: {n} cases in {len(planned)} groups, deadline {deadline_s:.0f} s{' (dry)' if dry else ''}",
          flush=True)  # fmt: skip
    with open(out / LOG, "a", encoding="utf-8") as log:
        for group, cases in planned.items():
            left = deadline_s - (time.monotonic() - start) - RESERVE_S
            limit = min(group_deadlines.get(group, left), left)
            t0 = time.monotonic()
            if limit < MIN_GROUP_S:
                reason = f"skipped: global deadline of {deadline_s:.0f} s reached"
                rc, timed_out = None, False
            else:
                log.write(f"\n===== {group} (deadline {limit:.0f} s) =====\n")
                log.flush()
                rc, timed_out = run_worker(group, out, dry, limit, log)
                reason = (f"timeout: group killed at its deadline of {limit:.0f} s" if timed_out
                          else f"not run: worker exited with code {rc}")  # fmt: skip
            have = {(r.get("case"), r.get("impl")) for r in read_results(out)[0] if r.get("group") == group}
            missing = [c for c in cases if (c["case"], c["impl"]) not in have]
            for c in missing:
                rec = base_record(group, c["case"], c["impl"], c["shape"], c["dtype"], dry)
                rec.update(error=reason, note=c["note"] or None, t=time.time())
                append_result(out, rec)
            status = "timeout" if timed_out else ("skipped" if rc is None else f"rc={rc}")
            print(f"  {group}: {len(cases) - len(missing)}/{len(cases)} measured, {status}, "
                  f"{time.monotonic() - t0:.1f} s", flush=True)  # fmt: skip
    text = summarize(out)
    print(text, flush=True)
    recs, _ = read_results(out)
    return 0 if recs and all(r.get("ok") for r in recs) else 1


# ---------------------------------------------------------------------------------------------
# summary


def _f(v, spec=".3g") -> str:
    return "" if v is None else format(v, spec)


def _ours(impl: str) -> bool:
    return str(impl).startswith("opensora_fast")


def _variant(impl) -> str:
    """The layout after the provider name ("cudnn NDHWC" -> "NDHWC"): speed-ups compare like with like."""
    return str(impl).partition(" ")[2]


def summarize(out: Path) -> str:
    """Write out/summary.md from out/results.jsonl (and plan.json / gpu.txt where present); return it."""
    out = Path(out)
    recs, bad = read_results(out)
    plan = {}
    try:
        plan = json.loads((out / PLAN).read_text())
    except (OSError, ValueError):
        pass
    device = "unknown device"
    try:
        lines = (out / "gpu.txt").read_text().splitlines()
        device = next((ln for ln in lines[1:] if ln.strip()), lines[0] if lines else device)
    except OSError:
        pass
    dry = bool(plan.get("dry")) or any(r.get("dry") for r in recs)
    planned = [(g, c["case"], c["impl"]) for g, cs in plan.get("groups", {}).items() for c in cs]
    have = {(r.get("group"), r.get("case"), r.get("impl")) for r in recs}
    missing = [p for p in planned if p not in have]
    n_ok = sum(1 for r in recs if r.get("ok"))
    ceil = _ceilings_from(recs)
    lines = ["# GPU session summary", ""]
    lines.append(f"- device: {device}" + (" (**dry run on CPU: tiny shapes, not performance figures**)" if dry else ""))
    if plan.get("commit"):
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(plan.get("started", 0)))
        lines.append(f"- commit {plan['commit']}, started {started}, deadline {plan.get('deadline_s', 0):.0f} s")
    lines.append(f"- results: {len(recs)} lines, {n_ok} ok, {len(recs) - n_ok} failed / timed out / skipped; "
                 f"{len(planned)} planned, {len(missing)} without a line; {bad} unreadable lines")  # fmt: skip
    lines.append(f"- ceilings: copy {_f(ceil.get('gbps'), '.4g') or '?'} GB/s, matmul "
                 f"{_f(ceil.get('tflops'), '.4g') or '?'} TFLOP/s")  # fmt: skip
    checks = [r for r in recs if r.get("group") == "correctness"]
    if checks:
        lines += ["", "## correctness (kernel vs reference in the higher precision; rule: err <= 2 x ref err + atol)",
                  "", "| kernel | shape | fwd err | ref | bwd err | ref | 2nd call equal | first call ms | ok |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in checks:
            d = r.get("detail") or {}
            ok = "PASS" if r.get("ok") else f"FAIL {r.get('error') or ''}".strip()
            errs = [_f(d.get(k)) for k in ("fwd_err", "fwd_ref_err", "bwd_err", "bwd_ref_err")]
            same = _f(d.get("repeat_equal"), "")
            cells = [r["case"], r.get("shape", ""), *errs, same, _f(r.get("first_call_ms"), ".0f"), ok]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    timed = [r for r in recs if r.get("group") != "correctness"]
    if timed:
        ours_ms = {
            (r["group"], r["case"], _variant(r["impl"])): r["ms"] for r in timed if _ours(r.get("impl")) and r.get("ms")
        }
        lines += ["", "## timings (ms: steady-state median; first call: compile + autotune, synced)", "",
                  "| group | case | impl | ms | TFLOP/s | GB/s | % ceiling | first call ms | est ms | ours faster by |"
                  " ok |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in timed:
            mine = ours_ms.get((r.get("group"), r.get("case"), _variant(r.get("impl"))))
            speed = f"{r['ms'] / mine:.3g}x" if mine and r.get("ms") and not _ours(r.get("impl")) else ""
            ok = "ok" if r.get("ok") else (r.get("error") or "FAIL")[:70]
            cells = [r.get("group"), r.get("case"), r.get("impl"), _f(r.get("ms"), ".4g"), _f(r.get("tflops"), ".4g"),
                     _f(r.get("gbps"), ".4g"), _f(r.get("pct_of_ceiling")), _f(r.get("first_call_ms"), ".0f"),
                     _f(r.get("est_ms"), ".4g"), speed, ok]  # fmt: skip
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    if missing:
        lines += ["", f"## planned but without a line ({len(missing)})", ""]
        lines += [f"- {g} / {c} / {i}" for g, c, i in missing]
    text = "\n".join(lines) + "\n"
    tmp = out / f".{SUMMARY}.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / SUMMARY)
    return text


# ---------------------------------------------------------------------------------------------
# command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "results" / "session")))
    p.add_argument("--dry", action="store_true", default=os.environ.get("DRY", "0") not in ("", "0"),
                   help="tiny shapes on CPU (interpreter / reference), tiny deadlines; also DRY=1")  # fmt: skip
    p.add_argument("--interpret", action="store_true",
                   help="dry run: opensora_fast in the Triton interpreter, not the reference (minutes)")  # fmt: skip
    p.add_argument("--deadline", type=float, default=None, help="global deadline in seconds (SESSION_DEADLINE_S)")
    p.add_argument("--group-deadline", action="append", default=[], metavar="GROUP=S",
                   help="per-group deadline (repeatable; also SESSION_GROUP_DEADLINES='a=1,b=2')")  # fmt: skip
    p.add_argument("--groups", default=None, help="comma-separated subset of the groups, in run order")
    p.add_argument("--summarize", metavar="DIR", default=None, help="only rebuild DIR/summary.md and print it")
    p.add_argument("--list", action="store_true", help="print the planned cases and exit")
    p.add_argument("--worker", metavar="GROUP", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize(Path(args.summarize)), end="")
        return 0
    out = Path(args.out)
    if args.interpret:
        os.environ[INTERPRET_ENV] = "1"
    if args.worker:
        return worker_main(args.worker, out, args.dry)
    from bench import session_cases as sc

    groups = None
    if args.groups:
        groups = [g.strip() for g in args.groups.split(",") if g.strip()]
        bad = [g for g in groups if g not in sc.GROUPS]
        if bad:
            raise ValueError(f"--groups: unknown {bad}; groups are {list(sc.GROUPS)}")
        groups = [g for g in sc.GROUPS if g in groups]
    if args.list:
        for g, cs in _planned(args.dry, groups).items():
            for c in cs:
                print(f"{g} | {c['case']} | {c['impl']} | {c['shape']} | {c['dtype']}")
        return 0
    env_deadline = os.environ.get("SESSION_DEADLINE_S")
    deadline = args.deadline or (float(env_deadline) if env_deadline else None)
    deadline = deadline or (DRY_DEADLINE_S if args.dry else DEFAULT_DEADLINE_S)
    per_group = dict.fromkeys(sc.GROUPS, DRY_GROUP_DEADLINE_S) if args.dry else dict(GROUP_DEADLINES_S)
    per_group.update(parse_group_deadlines([os.environ.get("SESSION_GROUP_DEADLINES", ""), *args.group_deadline]))
    unknown = set(per_group) - set(sc.GROUPS)
    if unknown:
        raise ValueError(f"group deadlines name unknown groups {sorted(unknown)}; groups are {list(sc.GROUPS)}")
    return run_session(out, args.dry, deadline, per_group, groups)


if __name__ == "__main__":
    sys.exit(main())
