"""The example scripts still run (on the CPU, tiny sizes): quickstart, and bench_decode in
both its sequential and its one-process-per-method (``--jobs``) form. Benchmarks are scripts,
not timed tests: these check their output's shape and sense, never a speed."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
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
    assert len(report["env"]["lychee_sources"]) == 16  # which code produced the rows
    assert (tmp_path / "bench_decode.png").exists() and (tmp_path / "bench_decode.lychee_paper.partial.json").exists()


def test_bench_decode_reports_a_row_out_of_memory_and_goes_on(tmp_path, monkeypatch):
    """A context whose cache does not fit is reported in the method's errors; the other rows
    are still timed (on the H200 a failing worker once took the others down with it)."""
    import argparse

    bd = _bench_decode()
    real = bd.static_cache

    def cache(model, batch, slots):
        if slots > 1000:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return real(model, batch, slots)

    monkeypatch.setattr(bd, "static_cache", cache)
    args = argparse.Namespace(tiny=True, model="tiny", contexts=[256, 1024], batches=[1], quick=False, device="cpu",
                              steps=1, profile=False, out=tmp_path, sync_dir=None)
    rows, sites = bd.measure("hf_eager", args, bw=1e11)
    assert [r["context"] for r in rows] == [256]
    assert sites["errors"] == [dict(batch=1, context=1024, error="out of memory")]


def test_rows_timed_after_an_incomplete_machine_barrier_say_so(tmp_path):
    """A participant that never arrives (a PRE benchmark still on the GPU) lets the barrier go
    on after its wait, and the rows timed then carry what happened; the table marks them."""
    bd = _bench_decode()
    assert bd.machine_barrier(tmp_path / "all", 1, 5.0, "solo") is None
    shared = bd.machine_barrier(tmp_path / "short", 2, 0.2, "worker")
    assert shared is not None and shared.startswith("1 of 2 after")
    row = dict(method="lychee_paper", batch=1, context=256, ms=2.0, host_ms=1.0, tokens_per_s=500.0, floor_ms=1.0,
               first_call_s=0.0)
    report = {"env": {"model": "tiny", "gpu": "", "torch": "", "date": ""},
              "rows": [row, dict(row, context=1024, machine_barrier=shared)]}
    lines = bd.table(report).splitlines()
    assert "| lychee_paper |" in lines[3] and "| lychee_paper (!) |" in lines[4]
    assert "incomplete machine barrier" in lines[-1]


def test_bench_decode_split_config_argument():
    import argparse

    from lychee_fx.codegen import launch

    bd = _bench_decode()
    assert bd.split_config_arg("retrieval=64x4x3,sparse=128x4x2") == launch.SplitConfigs(
        launch.SplitConfig(64, 4, 3), launch.SplitConfig(128, 4, 2))
    assert bd.split_config_arg("sparse=128x4x2").retrieval is None  # left out: its default
    for bad in ("merge=64x4x3", "retrieval=64x4", "retrieval=64,4,3"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"expected <(kernel>=<)?block_n>x<warps>x<stages>"):
            bd.split_config_arg(bad)


def test_bench_decode_select_config_argument():
    import argparse

    from lychee_fx.codegen import launch

    bd = _bench_decode()
    cfg = bd.select_config_arg("early_exit=0,digit_bits=4")
    assert cfg == launch.SELECT_CONFIG._replace(early_exit=False, digit_bits=4) and cfg.early_exit is False
    for bad in ("early=0", "digit_bits=x", "digit_bits"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected <field>=<int>"):
            bd.select_config_arg(bad)


def test_bench_split_rejects_untuned_configs():
    """``bench_split.py --configs`` names the configs it could have timed (before touching a GPU)."""
    bench_split = _example("bench_split")
    with pytest.raises(SystemExit, match=r"\[SplitConfig\(block_n=64, num_warps=4, num_stages=5\)\] are not among"):
        bench_split.main(["--configs", "64x4x3,64x4x5", "--out", "/tmp/unused-bench-split"])


def test_bench_split_masks_are_the_decode_graphs():
    """bench_split's masks are one (B, N) mask in two forms, as the decode graph passes it:
    valid but for the room left for steps to come (or half the cache), and the bool and the
    additive form attend alike. An unknown mask is refused (before touching a GPU)."""
    bs = _example("bench_split")
    from lychee_fx import eager_ops

    b, hkv, n, d = 2, 2, 96, 8
    for kind, filled in (("bool", n - bs.MASK_ROOM), ("bool_half", n // 2)):
        m = bs.decode_mask(kind, b, n, device="cpu")
        assert m.dtype == torch.bool and m.shape == (b, n) and m.sum(1).tolist() == [filled] * b
    assert bs.decode_mask("none", b, n, device="cpu") is None
    valid = bs.decode_mask("bool", b, n, device="cpu")
    additive = bs.decode_mask("additive", b, n, device="cpu", dtype=torch.float32)
    assert torch.equal(additive > torch.finfo(torch.float32).min, valid)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g) for shape in ((b, 2 * hkv, 1, d), (b, hkv, n, d), (b, hkv, n, d)))
    out = [eager_ops.retrieval_attention(q, k, v, m, None, [0, 1], d**-0.5, 16, 2, 16, 16, False)[0]
           for m in (valid, additive)]
    torch.testing.assert_close(out[0], out[1])
    with pytest.raises(SystemExit, match=r"--masks \['causal'\]: expected some of"):
        bs.main(["--masks", "bool,causal", "--out", "/tmp/unused-bench-split"])


def test_plot_rows_draws_rows_of_several_calls(tmp_path):
    """plot_rows: one panel per (model, batch) from several bench_decode JSONs; a context no
    file has is an error naming it."""
    pr = _example("plot_rows")
    env = {"model": "llama3-8b", "gpu": "NVIDIA H200", "date": "2026-11-30"}
    files = []
    for i, rows in enumerate(([("compile_reduce_overhead", 1, 54.7), ("lychee_paper", 1, 9.6)],
                              [("lychee_paper", 4, 11.1)])):
        path = tmp_path / f"call{i}.json"
        path.write_text(json.dumps({"env": env, "rows": [
            {"method": m, "batch": b, "context": 1024, "ms": ms, "loop_ms": ms * 0.9, "floor_ms": 4.1}
            for m, b, ms in rows]}))
        files.append(f"call {i}={path}")
    rows = pr.load(files, 1024)
    assert [(r["label"], r["method"]) for r in rows] == [("call 0", "compile_reduce_overhead"),
                                                         ("call 0", "lychee_paper"), ("call 1", "lychee_paper")]
    pr.main(["--out", str(tmp_path / "rows.png"), "--context", "1024", *files])
    assert (tmp_path / "rows.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="no row at context 2048"):
        pr.load(files, 2048)


def test_profile_kernel_families():
    """Kernel names from the H200 profiles land in the part of the step they belong to."""
    fam = _bench_decode().kernel_family
    assert fam("retrieval_split_kernel") == "retrieval_split" and fam("merge_kernel") == "merge"
    assert fam("retrieval_reduce_kernel") == "retrieval_reduce" and fam("sparse_split_kernel") == "sparse_split"
    assert fam("cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16_knob_3") == "sdpa"
    assert fam("triton_poi_fused__scaled_dot_product_cudnn_attention_2") == "sdpa"  # HF's expanded K, V
    assert fam("nvjet_sm90_tst_64x8_64x16_2x1_v_bz_TNT") == "gemm"
    assert fam("void cublasLt::splitKreduce_kernel<32, 16, int, float>") == "gemm"
    assert fam("decode_linear_kernel") == "gemm"  # lychee's linears: 3.93 ms of the 128K step sat in "other"
    assert fam("triton_poi_fused__to_copy__unsafe_view_add_arange_bmm_0") == "other"


def _example(name: str):
    """An example script as a module (they import each other by bare name)."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "examples"))


def _bench_decode():
    return _example("bench_decode")


def test_bench_decode_steps_attend_to_the_context_timed():
    """A timed step at ``pos`` writes slot ``pos`` and attends to slots ``[0, pos]``, on every
    transformers version (5.24 keeps the write position in the cache and ignores
    ``cache_position``: [Note: cache position]); the decode loop writes the slots after it."""
    bd = _bench_decode()
    model = bd.build("tiny", 64, "cpu")
    cache = bd.static_cache(model, 1, 48)
    keys = cache.layers[0].keys
    before = keys.clone()
    bd.time_step(model, model, cache, 1, 20, steps=2)
    changed = (keys != before).any(-1).flatten(0, 1).any(0).nonzero().flatten().tolist()
    assert changed == [20]
    ids = torch.tensor([[7]])
    with torch.no_grad():
        base = model(**bd.step_inputs(model, cache, 1, 20, ids)).logits
        for slot, same in ((25, True), (19, False)):  # a later slot is masked, an earlier one is read
            for layer in cache.layers:
                layer.keys[:, :, slot] += 1.0
            got = model(**bd.step_inputs(model, cache, 1, 20, ids)).logits
            assert torch.equal(got, base) == same, slot
    before = keys.clone()
    ms = bd.time_loop(model, model, cache, 1, 30, steps=4)
    changed = (keys != before).any(-1).flatten(0, 1).any(0).nonzero().flatten().tolist()
    assert ms > 0 and changed == [30, 31, 32, 33]


def test_bench_decode_loop_reuses_the_compiled_step():
    """The decode loop feeds tensors of the layout the timed step was compiled for: an 8B model
    recompiles for minutes, and a contiguous (4, 1) position tensor where the step passed an
    expanded one failed a stride guard at batch 4 (HF compiled rows never finished on the H200)."""
    from torch._dynamo.testing import CompileCounter

    bd = _bench_decode()
    model = bd.build("tiny", 300, "cpu")
    torch._dynamo.reset()
    counter = CompileCounter()
    fn = torch.compile(model, backend=counter, dynamic=True)
    cache = bd.static_cache(model, 4, 160)
    bd.time_step(fn, model, cache, 4, 100, steps=1)
    bd.time_loop(fn, model, cache, 4, 100, steps=3)
    assert counter.frame_count == 1


def test_kernel_resources_reports_the_default_kernel(tmp_path):
    """examples/kernel_resources.py compiles the reduce kernel for sm_90 on the CPU and reads
    ptxas's resource report (a small static tile here, so that it runs in seconds)."""
    import os

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin").exists():
        pytest.skip("this Triton ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    _run("examples/kernel_resources.py", "--out", str(tmp_path), "--static", "--blocks", "64", "--digit-bits", "2",
         "--keys", "wide,narrow", "--no-merge", env=env)
    report = json.loads((tmp_path / "kernel_resources.json").read_text())
    wide, narrow = report["rows"]
    assert narrow["default"] and not wide["default"] and wide["tile"] == narrow["tile"] == 64
    assert wide["registers"] > 0 and wide["ptx_sha"] != narrow["ptx_sha"]  # the key width changes the code
