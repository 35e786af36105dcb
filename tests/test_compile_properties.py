"""SPEC 1.1 properties through the whole backend: Dynamo graph -> pass -> ops (-> Inductor).

Hypothesis draws the shapes, dtypes, role maps and options; each example compiles a stack of
three attention layers in one of the forms models use. The bulk runs with
``compiler="eager"`` (the rewritten graph as is: the pass and the ops are what is under
test); a fixed set of examples goes through Inductor.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lychee_fx
from lychee_fx import HeadRoles
from tests.attn_modules import Stack, mask4d, reference_stack, untiled_reference
from tests.strategies import assert_close_anchored, decode_cases, exact_values

LAYERS = 3


def _stack_inputs(case):
    """Three layers' worth of q/k/v drawn like the case's first layer."""
    gen = torch.Generator().manual_seed(case.seed + 11)
    dt = case.q.dtype
    qs = torch.stack([case.q] + [exact_values(gen, case.q.shape, dt) for _ in range(LAYERS - 1)])
    ks = torch.stack([case.k] + [exact_values(gen, case.k.shape, dt) for _ in range(LAYERS - 1)])
    vs = torch.stack([case.v] + [torch.randn(case.v.shape, generator=gen).to(dt) for _ in range(LAYERS - 1)])
    return qs, ks, vs


def _compile(roles, opts, form, compiler="eager"):
    torch._dynamo.reset()  # each hypothesis example compiles afresh (no recompile limit)
    be = lychee_fx.backend(roles, budget=opts.budget, block_size=opts.block_size, sink=opts.sink,
                           recent=opts.recent, compiler=compiler)
    return be, torch.compile(Stack(LAYERS, form), backend=be, fullgraph=True, dynamic=False)


def _form_for(case, draw_form):
    # enable_gqa SDPA is the mask-less dynamic-cache form; the others carry the mask.
    return draw_form if case.mask_kind != "none" or draw_form != "gqa" else "gqa"


@given(decode_cases(dtypes=(torch.float32, torch.bfloat16)), st.sampled_from(["gqa", "repeat_kv", "eager"]), st.data())
def test_all_retrieval_or_large_budget_equals_eager_full_attention(case, form, data):
    b, hq, hkv, n, d = case.shape
    qs, ks, vs = _stack_inputs(case)
    if data.draw(st.booleans(), label="all retrieval"):
        roles, opts = HeadRoles.all_retrieval(LAYERS, hkv), case.opts
    else:
        rows = data.draw(st.lists(st.lists(st.booleans(), min_size=hkv, max_size=hkv), min_size=LAYERS, max_size=LAYERS))
        roles = HeadRoles(rows)
        o = case.opts
        blocks = math.ceil(n / o.block_size) + 1
        opts = type(o)(budget=max(o.num_blocks, blocks) * o.block_size, block_size=o.block_size, sink=o.sink, recent=o.recent)
    be, model = _compile(roles, opts, form)
    m4 = mask4d(case.mask)
    out = model(qs, ks, vs, m4)
    eager = Stack(LAYERS, form)(qs, ks, vs, m4)
    assert be.report.counters["rewritten"] == LAYERS, be.report.summary()
    full64 = Stack(LAYERS, form)(qs.double(), ks.double(), vs.double(), None if m4 is None else m4 if m4.dtype == torch.bool else m4.double())
    assert_close_anchored("compiled stack", out, full64, eager, floor=2e-6 if case.q.dtype == torch.float32 else 1e-2)


@given(decode_cases(dtypes=(torch.float32, torch.bfloat16)), st.sampled_from(["gqa", "repeat_kv", "eager", "opt", "tile"]), st.data())
def test_any_roles_equal_reference(case, form, data):
    b, hq, hkv, n, d = case.shape
    rows = data.draw(st.lists(st.lists(st.booleans(), min_size=hkv, max_size=hkv), min_size=LAYERS, max_size=LAYERS))
    roles = HeadRoles(rows)
    qs, ks, vs = _stack_inputs(case)
    be, model = _compile(roles, case.opts, form)
    out = model(qs, ks, vs, mask4d(case.mask))
    # "tile" (JetMoE's K/V tiling): query head t * Hkv + h reads KV head h
    ref = (untiled_reference if form == "tile" else reference_stack)(qs, ks, vs, case.mask, roles, case.opts)
    assert be.report.counters["rewritten"] == LAYERS, be.report.summary()
    floor = 2e-6 if case.q.dtype == torch.float32 else 1.5e-2
    if form == "opt" and case.q.dtype == torch.bfloat16:
        floor = 3e-2  # q * D**-0.5 rounds to bf16 before the dot products
    assert_close_anchored("compiled stack vs reference", out, ref, floor=floor)


INDUCTOR_CASES = [
    # (B, Hkv, G, D, N, block, budget, sink, recent, mask kind, form, roles)
    (1, 2, 2, 32, 200, 16, 128, 16, 32, "none", "gqa", [[True, False], [False, True], [False, False]]),
    (2, 2, 3, 16, 130, 1, 24, 4, 6, "bool", "repeat_kv", [[False, True], [True, False], [True, True]]),
    (3, 1, 4, 64, 70, 64, 256, 64, 64, "additive", "eager", [[True], [False], [False]]),
    (2, 4, 1, 16, 257, 16, 96, 8, 16, "bool", "repeat_kv", [[True, True, False, False], [False, False, True, True], [False, True, False, True]]),
]


@pytest.mark.slow
@pytest.mark.parametrize("spec", INDUCTOR_CASES, ids=lambda s: f"{s[10]}-{s[9]}-bs{s[5]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_equals_reference(spec, dtype):
    b, hkv, g, d, n, bs, budget, sink, recent, kind, form, rows = spec
    gen = torch.Generator().manual_seed(sum(spec[:9]))
    qs = exact_values(gen, (LAYERS, b, hkv * g, 1, d), dtype)
    ks = exact_values(gen, (LAYERS, b, hkv, n, d), dtype)
    vs = torch.randn(LAYERS, b, hkv, n, d, generator=gen).to(dtype)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[-1, : n // 3] = False  # left padding in the last row
    mask = None if kind == "none" else valid if kind == "bool" else torch.where(valid, 0.0, torch.finfo(dtype).min).to(dtype)
    roles = HeadRoles(rows)
    opts = lychee_fx.DecodeOptions(budget=budget, block_size=bs, sink=sink, recent=recent)
    be, model = _compile(roles, opts, form, compiler="inductor")
    with torch._inductor.config.patch(fx_graph_cache=False):  # so the op census runs
        out = model(qs, ks, vs, mask4d(mask))
    ref = reference_stack(qs, ks, vs, mask, roles, opts)
    assert be.report.counters["rewritten"] == LAYERS
    assert be.report.ops_after_aot["lychee.retrieval_attention.default"] >= 1
    assert_close_anchored("inductor stack vs reference", out, ref, floor=2e-6 if dtype == torch.float32 else 1.5e-2)
