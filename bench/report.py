"""Benchmark report: ``python -m bench.report [--suite NAME ...] [--out bench/results]``.

First measures this machine's ceilings in the same run (device-to-device copy bandwidth, counting bytes read
plus bytes written; bf16 matmul TFLOP/s on random data), then times every Case of every suite
(``bench/bench_*.py``) and writes ``report-<device>-<date>.md``, ``.json`` and one PNG plot per op to the
output folder. Each result is time, GB/s and TFLOP/s with the fraction of the measured ceiling, next to the
other providers of the same op/shape/mode, and the speed-up of opensora_fast over each of them.

Without CUDA it runs the suites at tiny shapes through the Triton interpreter: that proves the harness
works; such timings are not performance figures and the report says so.

This runs every case of every suite (hundreds, with one ``torch.compile`` per case): far more than one
device-tool call allows. The budgeted GPU run is ``bench/gpu_session.sh`` (``bench/session.py``): a fixed
subset, each result written as it is measured.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.harness import HAS_CUDA, Case, time_fn

SUITES = (
    "layernorm_modulate",
    "qk_norm_rope",
    "attention",
    "causal_conv3d",
    "group_norm_silu",
    "vae",
    "stdit3",
)


@dataclass
class Result:
    op: str
    shape: str
    provider: str
    mode: str
    dtype: str
    ms: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    pct_copy: float | None = None
    pct_matmul: float | None = None
    peak_mem_gb: float | None = None
    error: str = ""


def measure_ceilings(tiny: bool) -> dict:
    """Copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s) measured here and now."""
    dev = "cuda" if HAS_CUDA else "cpu"
    n = (1 << 20) if tiny else (1 << 30)  # 2 GiB of bf16 per buffer on GPU
    a = torch.randn(n, device=dev, dtype=torch.float32).to(torch.bfloat16)
    b = torch.empty_like(a)
    ms = time_fn(lambda: b.copy_(a))
    copy_gbps = 2 * a.numel() * a.element_size() / ms / 1e6
    m = 256 if tiny else 8192
    dt = torch.bfloat16 if HAS_CUDA else torch.float32
    x = torch.randn(m, m, device=dev, dtype=dt)
    y = torch.randn(m, m, device=dev, dtype=dt)
    ms = time_fn(lambda: x @ y)
    mm_tflops = 2 * m**3 / ms / 1e9
    return {"copy_gbps": copy_gbps, "matmul_tflops": mm_tflops, "matmul_dtype": str(dt), "copy_bytes": 2 * n * 2}


def run_case(case: Case, ceilings: dict) -> Result:
    r = Result(case.op, case.shape, case.provider, case.mode, case.dtype)
    try:
        if HAS_CUDA:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        fn = case.make()
        fn()
        r.ms = time_fn(fn)
        if HAS_CUDA:
            r.peak_mem_gb = torch.cuda.max_memory_allocated() / 1e9
        if case.bytes:
            r.gbps = case.bytes / r.ms / 1e6
            r.pct_copy = 100 * r.gbps / ceilings["copy_gbps"]
        if case.flops:
            r.tflops = case.flops / r.ms / 1e9
            r.pct_matmul = 100 * r.tflops / ceilings["matmul_tflops"]
    except torch.cuda.OutOfMemoryError:
        r.error = "OOM"
    except Exception as exc:  # recorded in the report, never hidden
        r.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        traceback.print_exc()
    finally:
        fn = None
        if HAS_CUDA:
            torch.cuda.empty_cache()
    return r


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def _speedups(results: list[Result]) -> dict:
    """(op, shape, mode) -> {provider: time / opensora_fast time}."""
    groups: dict = {}
    for r in results:
        if r.ms is not None:
            groups.setdefault((r.op, r.shape, r.mode), {})[r.provider] = r.ms
    out = {}
    for key, times in groups.items():
        if "opensora_fast" in times:
            out[key] = {p: t / times["opensora_fast"] for p, t in times.items() if p != "opensora_fast"}
    return out


def write_markdown(path: Path, meta: dict, ceilings: dict, results: list[Result], plots: list[str]) -> None:
    sp = _speedups(results)
    lines = [f"# opensora-fast benchmark report: {meta['device']}", ""]
    lines += [f"- date (UTC): {meta['date']}", f"- commit: {meta['commit']}", f"- torch {meta['torch']}, "
              f"triton {meta['triton']}, python {meta['python']}"]  # fmt: skip
    if not HAS_CUDA:
        lines += ["- **No GPU: tiny shapes through the Triton interpreter. These timings prove the harness runs; "
                  "they are not performance figures.**"]  # fmt: skip
    lines += ["", "## Ceilings measured in this run", "",
              f"- device-to-device copy: {ceilings['copy_gbps']:.4g} GB/s (bytes read + written)",
              f"- matmul ({ceilings['matmul_dtype'].replace('torch.', '')}, random data): "
              f"{ceilings['matmul_tflops']:.4g} TFLOP/s", ""]  # fmt: skip
    for op in dict.fromkeys(r.op for r in results):
        lines += [f"## {op}", "", "| shape | mode | provider | ms | GB/s | % copy | TFLOP/s | % matmul | peak GB |"
                  " opensora_fast speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        rows = [r for r in results if r.op == op]
        order = {k: i for i, k in enumerate(dict.fromkeys((r.shape, r.mode) for r in rows))}
        for r in sorted(rows, key=lambda r: (order[(r.shape, r.mode)], r.provider != "opensora_fast")):
            ratio = sp.get((r.op, r.shape, r.mode), {}).get(r.provider)
            speed = f"{ratio:.2f}x" if ratio else ("(this)" if r.provider == "opensora_fast" else "")
            ms = r.error or _fmt(r.ms, ".3f")
            lines.append(
                f"| {r.shape} | {r.mode} | {r.provider} | {ms} | {_fmt(r.gbps, '.4g')} | {_fmt(r.pct_copy, '.3g')} | "
                f"{_fmt(r.tflops, '.4g')} | {_fmt(r.pct_matmul, '.3g')} | {_fmt(r.peak_mem_gb, '.2f')} | {speed} |"
            )
        plot = next((p for p in plots if Path(p).stem.endswith(op)), None)
        if plot:
            lines += ["", f"![{op}]({Path(plot).name})"]
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def write_plots(out: Path, stem: str, results: list[Result]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install 'opensora-fast[plot]')", file=sys.stderr)
        return []
    paths = []
    for op in dict.fromkeys(r.op for r in results):
        rs = [r for r in results if r.op == op and r.ms is not None]
        if not rs:
            continue
        use_flops = any(r.tflops for r in rs)
        metric = (lambda r: r.tflops or 0.0) if use_flops else (lambda r: r.gbps or 0.0)
        unit = "TFLOP/s" if use_flops else "GB/s"
        if not any(metric(r) for r in rs):
            metric, unit = (lambda r: 1e3 / r.ms), "calls/s"
        keys = list(dict.fromkeys((r.shape, r.mode) for r in rs))
        provs = list(dict.fromkeys(r.provider for r in rs))
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys) * max(1, len(provs)) / 2), 4))
        width = 0.8 / len(provs)
        for i, p in enumerate(provs):
            vals = [next((metric(r) for r in rs if (r.shape, r.mode) == k and r.provider == p), 0.0) for k in keys]
            ax.bar([j + i * width for j in range(len(keys))], vals, width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.set_xticklabels([f"{s}\n{m}" for s, m in keys], fontsize=7)
        ax.set_ylabel(unit)
        ax.set_title(f"{op} ({unit}, higher is better)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / f"{stem}-{op}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
    return paths


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
        return (sha + ("+dirty" if dirty else "")) or "unknown"
    except OSError:
        return "unknown"


def _atomic_write(path: Path, writer) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        writer(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", action="append", choices=SUITES, help="only these suites (repeatable)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output folder")
    p.add_argument("--tiny", action="store_true", help="tiny shapes even on a GPU (smoke run)")
    args = p.parse_args(argv)
    tiny = args.tiny or not HAS_CUDA
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    device = "cuda" if HAS_CUDA else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton

    dev_name = torch.cuda.get_device_name() if HAS_CUDA else f"CPU ({platform.processor() or platform.machine()})"
    meta = {
        "device": dev_name, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "commit": _commit(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "tiny": tiny,
    }  # fmt: skip
    ceilings = measure_ceilings(tiny)
    print(f"ceilings: copy {ceilings['copy_gbps']:.4g} GB/s, matmul {ceilings['matmul_tflops']:.4g} TFLOP/s")
    results = []
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    for suite in args.suite or SUITES:
        try:
            mod = importlib.import_module(f"bench.bench_{suite}")
        except ModuleNotFoundError as exc:
            if exc.name == f"bench.bench_{suite}":
                print(f"suite {suite}: not present, skipped", file=sys.stderr)
                continue
            raise
        cs = [c for c in mod.cases(device, dtype, tiny) if HAS_CUDA or not c.gpu_only]
        it = tqdm(cs, desc=suite, unit="case") if tqdm else cs
        for case in it:
            results.append(run_case(case, ceilings))
    tag = "".join(ch if ch.isalnum() else "-" for ch in dev_name).strip("-").lower()
    stem = f"report-{tag}-{meta['date'][:10]}"
    plots = write_plots(out, stem, results)
    payload = {"meta": meta, "ceilings": ceilings, "results": [asdict(r) for r in results]}
    _atomic_write(out / f"{stem}.json", lambda t: t.write_text(json.dumps(payload, indent=1)))
    _atomic_write(out / f"{stem}.md", lambda t: write_markdown(t, meta, ceilings, results, plots))
    n_err = sum(1 for r in results if r.error)
    print(f"wrote {out / stem}.md, .json and {len(plots)} plots; {len(results)} cases, {n_err} errors")
    return 1 if n_err and not all(r.error == "OOM" for r in results if r.error) else 0


if __name__ == "__main__":
    sys.exit(main())
