"""``lychee::decode_linear``: the kernel (Triton's interpreter on CPU) against float64
``F.linear``, the op's contract and errors, and the pass that groups a decode step's linears
(op census, numbers, the linears it must leave alone)."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from lychee_fx import ops
from lychee_fx.passes.linears import group_decode_linears
from tests.strategies import assert_close_anchored
from tests.tiny_models import hf_model

DECODE_LINEAR = torch.ops.lychee.decode_linear.default


def _problem(seed, m, k, ns, bias, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    ws = [torch.randn(n, k, generator=gen).to(dtype) for n in ns]
    bs = [torch.randn(n, generator=gen).to(dtype) if bias else None for n in ns]
    return x, ws, bs


def _ref64(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@given(
    seed=st.integers(0, 2**16), m=st.integers(1, ops.LINEAR_MAX_ROWS), k=st.integers(1, 300),
    ns=st.lists(st.integers(1, 80), min_size=1, max_size=ops.LINEAR_MAX_WEIGHTS), bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), dot=st.booleans(),
    block_n=st.sampled_from([16, 32]), block_k=st.sampled_from([16, 64, 128]),
)
def test_kernel_matches_float64(seed, m, k, ns, bias, dtype, dot, block_n, block_k):
    from lychee_fx.codegen import linear

    x, ws, bs = _problem(seed, m, k, ns, bias, dtype)
    assert linear.supports(x, ws, bs) is None
    cfg = linear.LinearConfig(block_n, block_k, 4, 1, dot)
    ys = linear.decode_linear(x, ws, bs, config=cfg)
    assert len(ys) == len(ws)
    for i, (y, w, b) in enumerate(zip(ys, ws, bs)):
        assert y.shape == (m, w.shape[0]) and y.dtype == dtype
        if dtype == torch.float32:
            assert_close_anchored(f"y[{i}]", y, _ref64(x, w, b))
        else:  # float32 sums rounded once, like the kernel's; a single rounding step is always allowed
            lowp = F.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype)
            assert_close_anchored(f"y[{i}]", y, _ref64(x, w, b), lowp, floor=torch.finfo(dtype).eps)


def test_kernel_tiles_cover_every_weight():
    """Programs are numbered weight after weight: each weight's last partial tile is its own."""
    from lychee_fx.codegen import linear

    assert linear.tiles([40, 16, 1], 16) == [3, 4, 5]
    x, ws, bs = _problem(3, 2, 64, [40, 16, 1], False, torch.float32)
    for y, w in zip(linear.decode_linear(x, ws, bs, config=linear.LinearConfig(16, 64, 4, 1, True)), ws):
        assert_close_anchored("y", y, _ref64(x, w, None))


def test_kernel_declines_what_it_cannot_take():
    from lychee_fx.codegen import linear

    x, ws, bs = _problem(0, 9, 32, [8], False, torch.float32)
    assert "M <= 8" in linear.supports(x, ws, bs)
    x, ws, bs = _problem(0, 2, 32, [8, 8], False, torch.float32)
    assert "bias" in linear.supports(x, ws, [None, torch.zeros(8)])
    assert "strides" in linear.supports(x, [ws[0].t().contiguous().t()], [None])
    assert "float64" in linear.supports(x.double(), [w.double() for w in ws], bs)


def test_op_is_f_linear_per_weight():
    x, ws, bs = _problem(1, 3, 24, [5, 7], True, torch.float32)
    ys = torch.ops.lychee.decode_linear(x, ws, bs)
    for y, w, b in zip(ys, ws, bs):
        torch.testing.assert_close(y, F.linear(x, w, b), rtol=0, atol=0)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.zeros(2, 3, 4), [torch.zeros(5, 4)], [None]), ValueError, r"x of shape \(M, K\), got \(2, 3, 4\)"),
        ((torch.zeros(2, 4), [torch.zeros(5, 3)], [None]), ValueError, r"\(N, K=4\), got \(5, 3\)"),
        ((torch.zeros(2, 4), [torch.zeros(5, 4)], []), ValueError, "one bias .* got 1 weights and 0 biases"),
        ((torch.zeros(2, 4), [torch.zeros(5, 4, dtype=torch.float64)], [None]), TypeError, "float32 and torch.float64"),
        ((torch.zeros(2, 4), [torch.zeros(5, 4)], [torch.zeros(4)]), ValueError, r"bias of shape \(5,\)"),
    ],
)
def test_op_errors_name_expected_and_actual(args, error, match):
    with pytest.raises(error, match=match):
        torch.ops.lychee.decode_linear(*args)


def _decode_graph(name, batch=2, prompt=12):
    """(model, the decode step's inputs, a cache for each run) of a tiny HF model."""
    model, _ = hf_model(name)
    ids = torch.randint(3, 90, (batch, prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    nxt = torch.randint(3, 90, (batch, 1), generator=torch.Generator().manual_seed(1))
    return model, nxt, cache


def _run_grouped(model, inputs, cache, **kwargs):
    seen = {}

    def capture(gm, example_inputs, **_):
        seen["groups"] = group_decode_linears(gm, device_type="cpu", **kwargs)
        seen["census"] = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=capture)(inputs, past_key_values=cache, use_cache=True).logits
    return out, seen


@pytest.mark.parametrize("name", ["llama", "qwen2", "phi3"])
def test_pass_groups_projections_and_keeps_numbers(name):
    model, nxt, cache = _decode_graph(name)
    with torch.no_grad():
        ref = model(nxt, past_key_values=copy.deepcopy(cache), use_cache=True).logits
    got, seen = _run_grouped(model, nxt, cache)
    layers = model.config.num_hidden_layers
    widths = sorted(len(g.nodes) for g in seen["groups"])
    if name == "phi3":  # q, k, v and gate, up are one weight each already
        assert widths == [1] * (4 * layers + 1)
    else:  # per layer: q/k/v, o, gate/up, down; then the LM head
        assert widths == [1] * (2 * layers + 1) + [2] * layers + [3] * layers
    assert seen["census"][DECODE_LINEAR] == len(seen["groups"])
    assert seen["census"][torch._C._nn.linear] == 0
    assert all(g.rows == 2 for g in seen["groups"])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_pass_without_singles_groups_only_shared_inputs():
    model, nxt, cache = _decode_graph("llama")
    _, seen = _run_grouped(model, nxt, cache, singles=False)
    layers = model.config.num_hidden_layers
    assert sorted(len(g.nodes) for g in seen["groups"]) == [2] * layers + [3] * layers
    assert seen["census"][torch._C._nn.linear] == 2 * layers + 1


def test_pass_leaves_prefill_and_other_devices_alone():
    model, _ = hf_model("llama")
    ids = torch.randint(3, 90, (1, 9))  # 9 rows: more than the op takes
    seen = {}

    def capture(gm, example_inputs, **_):
        seen.setdefault("groups", []).extend(group_decode_linears(gm, device_type="cpu"))
        seen.setdefault("cuda", []).extend(group_decode_linears(gm, device_type="cuda"))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture)(ids, use_cache=True)
    assert seen["cuda"] == []  # CPU tensors: never grouped for CUDA
    assert seen["groups"] == []  # 9 rows in every linear, the LM head's too


class _LateWeight(torch.nn.Module):
    """Two linears of one input, the second weight computed between them."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(6, 4))
        self.b = torch.nn.Parameter(torch.randn(6, 4))

    def forward(self, x):
        y = F.linear(x, self.a)
        w = self.b * y.sum()  # depends on the first linear's output
        return y + F.linear(x, w)


def test_pass_does_not_group_a_weight_computed_later():
    mod, x = _LateWeight(), torch.randn(1, 4)
    seen = {}

    def capture(gm, example_inputs, **_):
        seen["groups"] = group_decode_linears(gm, device_type="cpu", singles=False)
        return gm.forward

    torch._dynamo.reset()
    got = torch.compile(mod, backend=capture)(x)
    assert seen["groups"] == []
    torch.testing.assert_close(got, mod(x))


def test_backend_groups_nothing_on_cpu():
    import lychee_fx
    from lychee_fx import HeadRoles

    model, nxt, cache = _decode_graph("llama")
    be = lychee_fx.backend(HeadRoles.all_retrieval(model.config.num_hidden_layers, 2), budget=64, block_size=16,
                           sink=16, recent=16)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=be)(nxt, past_key_values=cache, use_cache=True)
    assert be.report.linear_groups == []
    with pytest.raises(TypeError, match="linears must be a bool, got str"):
        lychee_fx.backend(HeadRoles.all_retrieval(2, 2), linears="yes")
