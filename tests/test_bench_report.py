"""The benchmark report command runs end to end (tiny shapes on CPU) and writes markdown, JSON and plots."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_report_writes_markdown_json_and_plots(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.report", "--suite", "qk_norm_rope", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = list(tmp_path.glob("report-*.md"))
    js = list(tmp_path.glob("report-*.json"))
    assert len(md) == 1 and len(js) == 1 and list(tmp_path.glob("report-*-qk_norm_rope.png"))
    data = json.loads(js[0].read_text())
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["matmul_tflops"] > 0
    provs = {r["provider"] for r in data["results"]}
    assert {"opensora_fast", "eager"} <= provs
    assert all(r["ms"] and r["ms"] > 0 and not r["error"] for r in data["results"])
    text = md[0].read_text()
    assert "not performance figures" in text and "## qk_norm_rope" in text


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    cmd = ci[ci.index("# README test command:") + 1].strip()
    assert cmd in (ROOT / "README.md").read_text(), "README must show the exact command .ci/run runs"


def test_pytest_collects_every_bench_suite():
    """`python -m pytest` (the CI command) must collect the bench_*.py suites, not only tests/."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "bench"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    suites = {p.stem for p in (ROOT / "bench").glob("bench_*.py")}
    collected = {line.split("::")[0].split("/")[-1][:-3] for line in proc.stdout.splitlines() if "::" in line}
    assert suites and suites <= collected, f"suites not collected: {sorted(suites - collected)}"
