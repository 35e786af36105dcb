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
    assert all(r["host_ms"] > 0 for r in rows)
    assert all("ms_skip_guards" in r for r in paper) and not any("ms_skip_guards" in r for r in full)
    assert report["env"]["lychee_paper_sites"] == {"found": 4, "rewritten": 4}
    assert (tmp_path / "bench_decode.png").exists() and (tmp_path / "bench_decode.lychee_paper.partial.json").exists()


def test_bench_decode_reports_a_row_out_of_memory_and_goes_on(tmp_path, monkeypatch):
    """A context whose cache does not fit is reported in the method's errors; the other rows
    are still timed (on the H200 a failing worker once took the others down with it)."""
    import argparse

    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import bench_decode as bd
    finally:
        sys.path.remove(str(ROOT / "examples"))
    real = bd.static_cache

    def cache(model, batch, slots):
        if slots > 1000:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return real(model, batch, slots)

    monkeypatch.setattr(bd, "static_cache", cache)
    args = argparse.Namespace(tiny=True, model="tiny", contexts=[256, 1024], batches=[1], quick=False, device="cpu",
                              steps=1, profile=False, out=tmp_path)
    rows, sites = bd.measure("hf_eager", args, bw=1e11)
    assert [r["context"] for r in rows] == [256]
    assert sites["errors"] == [dict(batch=1, context=1024, error="out of memory")]
