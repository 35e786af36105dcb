"""Tensor parallelism over gloo on the CPU, each rank's compiled decode against a
single-process lychee decode with the whole role map (tokens equal, logits at 1e-5).

2 ranks (``tests/tp_worker.py``): one launch runs every case in one process group (starting
processes and importing transformers is most of the cost), the ranks joining through a file
store (no port to race for). Cases: HF ``tp_plan="auto"`` with ``generate()`` (dynamic
cache through ``model.compile``, static cache through ``CompileConfig``), a hand-written
``parallelize_module`` plan called step by step through Inductor, a tiny Llama and Qwen3
(8 query heads, 4 KV heads); bare attention over plain tensors, where the group comes from
a collective or from ``tp=`` or cannot be told; a role map that does not divide.
4 ranks: ``examples/tensor_parallel.py`` under ``torchrun --standalone`` (a free port), HF's
plan and the static cache. Output goes to files; a launch past its deadline is killed.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lychee_fx
from tests import tp_worker as w
from tests.attn_modules import reference_stack

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 480
RUNS = {
    2: ["hf-llama-dynamic", "hf-qwen3-static", "hand-llama-static-inductor", "hand-llama-dynamic-roles3",
        "bare-none", "bare-collective", "bare-tp"],
}
# (arch, cache) of each model case -> the single-process decode it must equal
REFERENCES = sorted({(c.split("-")[1], c.split("-")[2]) for cs in RUNS.values() for c in cs if c.split("-")[0] != "bare"})
EXAMPLE_WORLD, EXAMPLE_BATCH, EXAMPLE_NEW = 4, 2, 5


def _example():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        return importlib.import_module("tensor_parallel")
    finally:
        sys.path.remove(str(ROOT / "examples"))


def _example_args(root: Path) -> list[str]:
    return ["--model-dir", str(root / "llama"), "--roles", str(root / "roles.json"), "--compiler", "eager",
            "--cache", "static", "--batch", str(EXAMPLE_BATCH), "--prompt", str(w.PROMPT), "--new", str(EXAMPLE_NEW),
            *(f"--{k.replace('_', '-')}={v}" for k, v in w.OPTS.items()), "--save", str(root / "example")]


def _example_reference(root: Path):
    """The example's own decode of the unsharded model with the whole map, in this process."""
    ex = _example()
    torch._dynamo.reset()
    model = ex.load(root / "llama", "none", torch.float32, torch.device("cpu"))
    ids = ex.prompt_ids(model.config.vocab_size, EXAMPLE_BATCH, w.PROMPT, torch.device("cpu"))
    be = lychee_fx.backend(w.ROLES, compiler="eager", **w.OPTS)
    return ex.Decoder(model, be, "static", ids).run(EXAMPLE_NEW)


def _save_models(root: Path) -> None:
    """Tiny random Llama and Qwen3 (2 layers, 8 query heads, 4 KV heads), saved as model folders."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for arch, extra in (("llama", {}), ("qwen3", dict(head_dim=16))):
        cfg = AutoConfig.for_model(
            arch, vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra,
        )
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().save_pretrained(root / arch)


def _single_process(root: Path, arch: str, cache: str):
    """The same model in this process, unsharded, decoded by lychee with the whole role map."""
    from transformers import AutoModelForCausalLM

    torch._dynamo.reset()
    model = AutoModelForCausalLM.from_pretrained(root / arch, dtype=torch.float32).eval()
    be = lychee_fx.backend(w.ROLES, compiler="eager", **w.OPTS)
    with torch.no_grad():
        tokens, logits = w.generate(model, be, cache)
    assert be.report.shard is None and be.report.rewritten, be.report.summary()
    return tokens, logits


def _popen(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, stdout=f,
                                stderr=subprocess.STDOUT)


def _launch(root: Path, world: int, cases: list[str]) -> list[subprocess.Popen]:
    """``world`` worker processes, each told its rank (what torchrun would set, plus the store)."""
    run = root / f"world{world}"
    run.mkdir()
    for arch in ("llama", "qwen3"):
        (run / arch).symlink_to(root / arch)
    return [
        _popen([sys.executable, "-m", "tests.tp_worker", "--rank", str(rank), "--world", str(world), "--dir", str(run),
                "--cases", ",".join(cases)], run / f"rank{rank}.log",
               dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world)))
        for rank in range(world)
    ]


def _wait(run: Path, procs: list[subprocess.Popen], deadline: float, what: str) -> None:
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        logs = "\n".join(f"--- process {r} (exit {procs[r].returncode}):\n{(run / f'rank{r}.log').read_text()[-3000:]}" for r in failed)
        pytest.fail(f"{what} failed (a return code of -9 means it was killed at the deadline):\n{logs}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{world: {(case, rank): result}}, the single-process references, and the example's 4 ranks
    with their reference."""
    root = tmp_path_factory.mktemp("tp")
    _save_models(root)
    results = {}
    for world, cases in RUNS.items():
        procs = _launch(root, world, cases)
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        refs = {key: _single_process(root, *key) for key in REFERENCES}  # while the ranks run
        run = root / f"world{world}"
        _wait(run, procs, deadline, f"{world}-rank launch")
        results[world] = {(c, r): torch.load(run / f"{c}.rank{r}.pt", weights_only=False) for c in cases for r in range(world)}
    (root / "roles.json").write_text(json.dumps(w.ROLES))
    (root / "example").mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={EXAMPLE_WORLD}"]
    procs = [_popen([*torchrun, "examples/tensor_parallel.py", *_example_args(root)], root / "example" / "rank0.log", {})]
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    example_ref = _example_reference(root)
    _wait(root / "example", procs, deadline, f"torchrun of examples/tensor_parallel.py over {EXAMPLE_WORLD} ranks")
    example = {"stdout": (root / "example" / "rank0.log").read_text(),
               "ranks": [torch.load(root / "example" / f"rank{r}.pt", weights_only=False) for r in range(EXAMPLE_WORLD)]}
    return results, refs, example, example_ref


def _block(rank: int, world: int) -> tuple[int, ...]:
    per = len(w.ROLES[0]) // world
    return tuple(range(rank * per, (rank + 1) * per))


MODEL_CASES = [(world, c) for world, cs in RUNS.items() for c in cs if c.split("-")[0] != "bare" and "roles3" not in c]


@pytest.mark.parametrize("world, case", MODEL_CASES, ids=[f"{w_}ranks-{c}" for w_, c in MODEL_CASES])
def test_each_rank_decodes_as_one_process_with_the_whole_map(runs, world, case):
    results, refs, _, _ = runs
    _, arch, cache = case.split("-")[:3]
    ref_tokens, ref_logits = refs[(arch, cache)]
    for rank in range(world):
        res = results[world][(case, rank)]
        assert "error" not in res, res["error"]
        assert res["shard"] == _block(rank, world), res["report"]
        decode = res["sites"]
        assert decode and all(status == "rewritten" for _, status, _, _ in decode), res["report"]
        # the report speaks role-map indices: this rank's heads, and only them
        assert all(set(r) | set(s) == set(_block(rank, world)) for _, _, r, s in decode), res["report"]
        assert torch.equal(res["tokens"], ref_tokens), f"rank {rank} tokens"
        torch.testing.assert_close(res["logits"], ref_logits, rtol=1e-5, atol=1e-5, msg=lambda m: f"rank {rank} logits: {m}")
        assert f"rank {rank} of {world} holds KV heads {list(_block(rank, world))} of the role map's 4" in res["report"]


def test_example_over_four_ranks_decodes_as_one_process(runs):
    """``torchrun --nproc-per-node 4 examples/tensor_parallel.py``: HF's plan, one KV head per
    rank, ``generate()`` with the static cache; each rank prints what it holds."""
    _, _, example, (ref_tokens, ref_logits) = runs
    for rank, res in enumerate(example["ranks"]):
        assert res["shard"] == (rank,), res["report"]
        assert torch.equal(res["tokens"], ref_tokens), f"rank {rank} tokens"
        torch.testing.assert_close(res["logits"], ref_logits, rtol=1e-5, atol=1e-5, msg=lambda m: f"rank {rank} logits: {m}")
        assert f"rank {rank} of 4 holds KV heads [{rank}] of the role map's 4; from the device mesh" in example["stdout"]
        assert f"== rank {rank} of 4 (gloo, cpu): LlamaForCausalLM, plan hf, 2 layers" in example["stdout"]


def test_a_role_map_that_does_not_divide_over_the_ranks_is_a_clear_error(runs):
    results = runs[0]
    for rank in range(2):
        res = results[2][("hand-llama-dynamic-roles3", rank)]
        assert "tokens" not in res
        assert f"TensorParallelMismatch: rank {rank} of 2 (the device mesh of the graph's DTensor parameters" in res["error"]
        assert ("reads 2 KV heads per layer, so its 2 ranks hold 4 KV heads, but the role map has 3; "
                "3 KV heads do not divide over 2 ranks; expected a role map of 4 KV heads per layer") in res["error"]


def test_bare_attention_over_plain_tensors(runs):
    """Plain local tensors: the group comes from the graph's all_reduce or from ``tp=``; with
    neither, which heads a rank holds cannot be told, and the backend says so."""
    results, world = runs[0], 2
    qs, ks, vs = w.bare_inputs()
    ref = reference_stack(qs, ks, vs, None, lychee_fx.HeadRoles(w.ROLES), lychee_fx.DecodeOptions(**w.OPTS)).float()
    hq = qs.shape[2] // world
    variants = {"tp": f"from tp=({{rank}}, {world})",
                "collective": "from the process group of the graph's all_reduce (global ranks [0, 1])"}
    for variant, source in variants.items():
        for rank in range(world):
            res = results[world][(f"bare-{variant}", rank)]
            assert "error" not in res, res["error"]
            assert res["shard"] == _block(rank, world) and source.format(rank=rank) in res["report"], res["report"]
            torch.testing.assert_close(res["out"], ref[:, :, rank * hq:(rank + 1) * hq], rtol=1e-5, atol=1e-5)
    for rank in range(world):
        err = results[world][("bare-none", rank)]["error"]
        assert (f"TensorParallelMismatch: this graph reads 2 KV heads per layer and the role map has 4, but which of "
                f"them this rank (global rank {rank} of 2) holds cannot be told") in err
        assert "pass tp=<DeviceMesh | ProcessGroup | (rank, size)> to lychee_fx.backend" in err


@pytest.mark.gpu
@pytest.mark.parametrize("plan", ["hand", "hf"])
def test_example_on_cuda_over_nccl(plan):
    """On a GPU machine: the example over NCCL, one rank per GPU (at most 2), static cache
    through ``CompileConfig`` (CUDA graphs), Inductor with lychee's Triton kernels, float32;
    each rank's tokens equal the unsharded model's in the same process. With one GPU this is
    the world-size-1 path: a hand plan puts DTensor parameters on a mesh of one."""
    world = min(2, torch.cuda.device_count())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           "examples/tensor_parallel.py", "--device", "cuda", "--model", "tiny-qwen3", "--dtype", "float32",
           "--plan", plan, "--check", "--prompt", "1024", "--new", "8", "--budget", "256", "--block-size", "64",
           "--sink", "64", "--recent", "64"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = [line for line in proc.stdout.splitlines() if line.startswith("check:")]
    assert len(checks) == world and all("tokens equal" in line for line in checks), proc.stdout
    assert all(float(line.rsplit(" ", 1)[1]) < 1e-3 for line in checks), proc.stdout
    if world > 1:
        assert "rank 1 of 2 holds KV heads [2, 3] of the role map's 4" in proc.stdout, proc.stdout


def test_the_examples_check_tells_a_near_tie_from_a_wrong_token():
    """``--check``'s verdict: equal tokens give the largest logit difference; different tokens
    give the first step where a row differs, the logit difference up to it and whether the
    reference's top-2 gap there is within that difference (a near-tie rounding may flip)."""
    check_line = _example().check_line
    ref_logits = torch.zeros(3, 2, 5)  # (steps, B, V)
    ref_logits[:, :, 1] = 1.0
    ref_logits[1, 1, 2] = 0.999  # row 1, step 1: the top-2 gap is 0.001
    ref_tokens = ref_logits.argmax(-1).T  # (B, steps)
    assert check_line(ref_tokens, ref_logits + 1e-4, ref_tokens, ref_logits).endswith("max |logit diff| 1.00e-04")
    logits = ref_logits.clone()
    logits[1, 1, 2] += 0.002  # a rounding-sized change flips row 1 at step 1
    tokens = ref_tokens.clone()
    tokens[1, 1:] = 2
    line = check_line(tokens, logits, ref_tokens, ref_logits)
    assert "from step 1;" in line and "gap there 1.00e-03" in line and "a near-tie" in line, line
    far = ref_logits.clone()
    far[1, 1, 1] = 10.0  # the reference is sure (gap 9.0) and the logits barely moved: not a near-tie
    ref2 = far.argmax(-1).T
    line = check_line(tokens, far + 1e-3, ref2, far)
    assert "NOT a near-tie" in line, line
