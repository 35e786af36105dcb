"""passes/pool.py: a layer's retrieval and sparse ops become one ``hybrid_attention``, with
the same values, and only where the pair is exactly the rewrite's."""

from __future__ import annotations

import pytest
import torch

import lychee_fx
from lychee_fx import HeadRoles
from lychee_fx.passes.pool import pool_layer_attention
from tests.attn_modules import Capture, Stack, census, mask4d

pytest.importorskip("triton")  # the pass asks the kernels' launcher whether a layer pools

B, HQ, HKV, N, D = 2, 4, 2, 48, 16
# layer 0 all retrieval; layer 1 retrieval head 1 (read as sparse by layer 2: it selects),
# sparse head 0; layer 2 retrieval head 0 (read by nobody later: no selection), sparse head 1
ROLES = HeadRoles([[True, True], [False, True], [True, False]])
OPTS = dict(budget=16, block_size=4, sink=4, recent=4)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    qs = torch.randn(3, B, HQ, 1, D, generator=g)
    ks = torch.randn(3, B, HKV, N, D, generator=g)
    vs = torch.randn(3, B, HKV, N, D, generator=g)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, :7] = False
    return qs, ks, vs, valid


class _Pooled:
    """lychee's backend (compiler eager), then the pool pass for CPU graphs."""

    def __init__(self):
        self.inner, self.graphs, self.pooled = lychee_fx.backend(ROLES, compiler="eager", **OPTS), [], 0

    def __call__(self, gm, example_inputs, **kw):
        self.inner(gm, example_inputs, **kw)
        self.pooled += pool_layer_attention(gm, device_type="cpu")
        self.graphs.append(gm)
        return gm.forward


@pytest.mark.parametrize("form", ["gqa", "repeat_kv"])
def test_pooled_layers_compute_what_the_pairs_compute(form):
    qs, ks, vs, valid = _inputs()
    mask = mask4d(valid)
    plain = Capture(lychee_fx.backend(ROLES, compiler="eager", **OPTS))
    ref = torch.compile(Stack(3, form), backend=plain, fullgraph=True)(qs, ks, vs, mask)
    assert [s.select for s in plain.report.sites] == [True, True, False]
    pooled = _Pooled()
    out = torch.compile(Stack(3, form), backend=pooled, fullgraph=True)(qs, ks, vs, mask)
    assert pooled.pooled == 2
    c = census(pooled.graphs[0])
    assert c.get("lychee.hybrid_attention.default") == 2, c
    assert c.get("lychee.retrieval_attention.default") == 1 and "lychee.sparse_attention.default" not in c, c
    assert "cat" not in c, c
    assert torch.equal(out, ref)


def test_cpu_graphs_are_not_pooled_for_cuda():
    qs, ks, vs, valid = _inputs()
    gms = []

    def be(gm, example_inputs, **kw):
        lychee_fx.backend(ROLES, compiler="eager", **OPTS)(gm, example_inputs)
        gms.append(gm)
        return gm.forward

    torch.compile(Stack(3, "gqa"), backend=be, fullgraph=True)(qs, ks, vs, mask4d(valid))
    assert pool_layer_attention(gms[0]) == 0  # default device_type "cuda": q is on the CPU
    assert census(gms[0]).get("lychee.sparse_attention.default") == 2


def test_a_sparse_op_read_elsewhere_is_not_pooled():
    """The pass takes only the rewrite's exact pair: a sparse output with a second user stays."""
    qs, ks, vs, valid = _inputs()
    gms = []

    def be(gm, example_inputs, **kw):
        lychee_fx.backend(ROLES, compiler="eager", **OPTS)(gm, example_inputs)
        for n in gm.graph.nodes:
            if n.target is torch.ops.lychee.sparse_attention.default:
                with gm.graph.inserting_after(n):
                    extra = gm.graph.call_function(torch.neg, (n,))
                out = next(iter(gm.graph.find_nodes(op="output")))
                out.args = ((*out.args[0], extra),) if isinstance(out.args[0], tuple) else out.args
                break
        gm.recompile()
        gms.append(gm)
        return gm.forward

    torch.compile(Stack(3, "gqa"), backend=be, fullgraph=True)(qs, ks, vs, mask4d(valid))
    assert pool_layer_attention(gms[0], device_type="cpu") == 1  # the other layer still pools


def test_hybrid_op_checks_its_heads():
    qs, ks, vs, valid = _inputs()
    q, k, v = qs[0], ks[0], vs[0]
    sel = torch.zeros(B, HKV, 4, dtype=torch.int32)
    args = (q, k, v, valid, sel)
    tail = (D**-0.5, 4, 4, 4, 4, True)
    with pytest.raises(ValueError, match=r"non-empty, disjoint ret_heads and spa_heads, got \[0\] and \[0\]"):
        torch.ops.lychee.hybrid_attention(*args, [0], [0], *tail)
    with pytest.raises(ValueError, match="got \\[0, 1\\] and \\[\\]"):
        torch.ops.lychee.hybrid_attention(*args, [0, 1], [], *tail)
    with pytest.raises(ValueError, match="a selection sel .* got None"):
        torch.ops.lychee.hybrid_attention(q, k, v, valid, None, [0], [1], *tail)
    with pytest.raises(TypeError, match="pool must be a bool, got int"):
        lychee_fx.backend(ROLES, pool=1)
