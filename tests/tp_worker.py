"""One rank of the tensor-parallel tests (``tests/test_tensor_parallel.py`` starts them).

    python -m tests.tp_worker --rank R --world W --dir DIR --cases hf-llama-dynamic,...

Joins a gloo group through a file store in DIR (no port to race for), runs each case on a
tiny model that the test saved in DIR/<arch>, and saves what the case produced to
DIR/<case>.rank<R>.pt: tokens, logits, the backend's report and its shard, or the error a
case raised. The test compares them with a single-process decode; nothing is judged here.
"""

from __future__ import annotations

import argparse
import datetime
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

import lychee_fx
from lychee_fx.apps.decoding import cache_kwarg

STEPS = 5
PROMPT = 40
OPTS = dict(budget=24, block_size=4, sink=4, recent=8)
# 2 layers x 4 KV heads: over 2 ranks each holds 2 columns, over 4 ranks one.
ROLES = [[True, False, False, True], [False, True, True, False]]
# 3 KV heads: does not divide over 2 ranks.
ROLES_3 = [[True, False, True], [False, True, False]]


def prompt(batch: int = 2, vocab: int = 96):
    """Token ids (B, PROMPT) and an attention mask with left padding in row 0."""
    ids = torch.randint(3, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
    am = torch.ones(batch, PROMPT, dtype=torch.long)
    am[0, :7] = 0
    return ids, am


def hand_plan(model) -> dict:
    """A hand-written ``parallelize_module`` plan for an HF Llama-style decoder: the attention
    and MLP projections colwise in, rowwise out (Megatron's split), all else replicated."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    col, row = ColwiseParallel(), RowwiseParallel()
    return {
        **{f"model.layers.*.self_attn.{p}": col for p in ("q_proj", "k_proj", "v_proj")},
        "model.layers.*.self_attn.o_proj": row,
        **{f"model.layers.*.mlp.{p}": col for p in ("gate_proj", "up_proj")},
        "model.layers.*.mlp.down_proj": row,
    }


def generate(model, be, cache: str):
    """HF ``generate`` through the backend: ``model.compile`` for the dynamic cache, a
    ``CompileConfig`` for the static one (the form CUDA runs use). Tokens (B, STEPS) and
    logits (STEPS, B, V)."""
    from transformers import CompileConfig

    ids, am = prompt()
    kw = dict(attention_mask=am, max_new_tokens=STEPS, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0, cache_implementation=cache)
    if cache == "static":
        cfg = CompileConfig(backend=be, fullgraph=False)
        cfg._compile_all_devices = True  # HF compiles only on accelerators unless told
        kw["compile_config"] = cfg
    else:
        model.compile(backend=be)
    out = model.generate(ids, **kw)
    return out.sequences[:, PROMPT:], torch.stack(out.logits)


def step_loop(model, be, cache: str):
    """``torch.compile(model)`` called once per token, on a cache built here (HF's
    ``generate`` sizes a static cache from the config's head count, not from a plan it did
    not apply). Greedy, and aligned as ``generate`` returns them: token i is the argmax of
    logits i, the first logits are the (uncompiled) prefill's."""
    from transformers import DynamicCache, StaticCache

    ids, am = prompt()
    if cache == "static":
        kv = StaticCache(config=model.config, max_cache_len=PROMPT + STEPS)  # as generate sizes it
    else:
        kv = DynamicCache(config=model.config)
    step = torch.compile(model, backend=be)
    name = cache_kwarg(model)
    logits = [model(input_ids=ids, attention_mask=am, use_cache=True, **{name: kv}).logits[:, -1]]
    tokens = []
    for i in range(STEPS):
        tokens.append(logits[-1].argmax(-1, keepdim=True))  # (B, 1)
        if i + 1 < STEPS:
            am = torch.cat([am, torch.ones_like(am[:, :1])], dim=1)
            logits.append(step(input_ids=tokens[-1], attention_mask=am, use_cache=True, **{name: kv}).logits[:, -1])
    return torch.cat(tokens, 1), torch.stack(logits)


def load(root: Path, arch: str, plan: str):
    """The saved tiny model: HF's own plan (``tp_plan="auto"``), a hand plan, or none."""
    from transformers import AutoModelForCausalLM

    path = root / arch
    if plan == "hf":
        return AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if plan == "hand":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module

        mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
        parallelize_module(model, mesh, hand_plan(model))
    return model


def bare_inputs(layers: int = 2, batch: int = 2, hq: int = 8, hkv: int = 4, n: int = 40, d: int = 16):
    """Decode q (L, B, Hq, 1, D) and caches k, v (L, B, Hkv, N, D) for ``attn_modules.Stack``."""
    g = torch.Generator().manual_seed(2)
    return (torch.randn(layers, batch, hq, 1, d, generator=g), torch.randn(layers, batch, hkv, n, d, generator=g),
            torch.randn(layers, batch, hkv, n, d, generator=g))


class _Reduced(torch.nn.Module):
    """Tensor parallelism written with plain tensors (gpt-fast style): this rank's heads, and
    an ``all_reduce`` in the graph, as a row-parallel output projection would have."""

    def __init__(self):
        super().__init__()
        from tests.attn_modules import Stack

        self.stack = Stack(2, "gqa")

    def forward(self, qs, ks, vs):
        from torch.distributed import _functional_collectives as funcol

        out = self.stack(qs, ks, vs, None)
        return out, funcol.all_reduce(out.sum(), "sum", dist.group.WORLD)


def run_bare(variant: str) -> dict:
    """Bare attention layers over this rank's block of heads, in plain tensors: ``none`` (no
    DTensor, no collective, no ``tp=``), ``collective`` (an all_reduce in the graph) or ``tp``
    (``tp=(rank, world)``). Output (L, B, Hq / world, 1, D)."""
    from tests.attn_modules import Stack

    rank, world = dist.get_rank(), dist.get_world_size()
    qs, ks, vs = bare_inputs()
    hq, hkv = qs.shape[2] // world, ks.shape[2] // world
    q, k, v = qs[:, :, rank * hq:(rank + 1) * hq], ks[:, :, rank * hkv:(rank + 1) * hkv], vs[:, :, rank * hkv:(rank + 1) * hkv]
    torch._dynamo.reset()
    be = lychee_fx.backend(ROLES, compiler="eager", tp=(rank, world) if variant == "tp" else None, **OPTS)
    out: dict = {}
    try:
        if variant == "collective":
            out["out"] = torch.compile(_Reduced(), backend=be, fullgraph=True)(q, k, v)[0]
        else:
            out["out"] = torch.compile(Stack(2, "gqa"), backend=be, fullgraph=True)(q, k, v, None)
    except Exception as e:  # noqa: BLE001 - the test judges the error
        out["error"] = _chain(e)
    out["report"] = be.report.summary()
    out["shard"] = None if be.report.shard is None else be.report.shard.kv_heads
    return out


def _chain(e: BaseException) -> str:
    chain, cur = [], e
    while cur is not None:
        chain.append(f"{type(cur).__name__}: {cur}")
        cur = cur.__cause__ or cur.__context__
    return "\n".join(chain)


def run_case(root: Path, case: str) -> dict:
    """``<plan>-<arch>-<cache>[-inductor][-roles3]`` (e.g. ``hf-llama-static-inductor``), or
    ``bare-<variant>`` (``run_bare``)."""
    parts = case.split("-")
    if parts[0] == "bare":
        return run_bare(parts[1])
    plan, arch, cache = parts[:3]
    compiler = "inductor" if "inductor" in parts else "eager"
    roles = ROLES_3 if "roles3" in parts else ROLES
    torch._dynamo.reset()
    model = load(root, arch, plan)
    be = lychee_fx.backend(roles, compiler=compiler, **OPTS)
    out: dict = {}
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            tokens, logits = (generate if plan == "hf" else step_loop)(model, be, cache)
        out.update(tokens=tokens, logits=logits)
    except Exception as e:  # noqa: BLE001 - the test judges the error
        out["error"] = _chain(e)
    out["seconds"] = time.perf_counter() - t0
    out["report"] = be.report.summary()
    out["shard"] = None if be.report.shard is None else be.report.shard.kv_heads
    out["sites"] = [(s.layer, s.status, s.retrieval_heads, s.sparse_heads) for s in be.report.sites if s.query_len == "1"]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--cases", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{a.dir / 'store'}", rank=a.rank, world_size=a.world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        for case in a.cases.split(","):
            try:
                res = run_case(a.dir, case)
            except Exception:  # noqa: BLE001 - a case that breaks outside generate
                res = {"error": traceback.format_exc()}
            torch.save(res, a.dir / f"{case}.rank{a.rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
