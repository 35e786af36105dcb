"""The example scripts still run (on the CPU, tiny sizes): quickstart, and bench_decode in
both its sequential and its one-process-per-method (``--jobs``) form. Benchmarks are scripts,
not timed tests: these check their output's shape and sense, never a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_quickstart_rewrites_and_agrees():
    out = _run("examples/quickstart.py")
    dense = out.split("lychee, all heads retrieval")[1]
    assert "100.0% of tokens agree with full attention" in dense.split("\n")[1]  # all retrieval = full attention
    assert "rewritten" in out and "declined: prefill" in out  # decode rewritten, prefill left alone


@pytest.mark.parametrize("jobs", [False, True])
def test_bench_decode_tiny(tmp_path, jobs):
    methods = ["hf_eager", "lychee_paper"]
    _run("examples/bench_decode.py", "--tiny", "--device", "cpu", "--out", str(tmp_path), "--steps", "1",
         "--methods", ",".join(methods), *(["--jobs"] if jobs else []))
    report = json.loads((tmp_path / "bench_decode.json").read_text())
    rows = report["rows"]
    assert [r["method"] for r in rows] == [m for m in methods for _ in range(2)]  # the order asked for
    assert {r["context"] for r in rows} == {256, 1024}
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 for r in rows)
    paper = [r for r in rows if r["method"] == "lychee_paper"]
    full = [r for r in rows if r["method"] == "hf_eager"]
    assert all(p["floor_ms"] < f["floor_ms"] for p, f in zip(paper, full))  # sparse heads read less
    assert report["env"]["lychee_paper_sites"] == {"found": 4, "rewritten": 4}
    assert (tmp_path / "bench_decode.png").exists() and (tmp_path / "bench_decode.lychee_paper.partial.json").exists()
