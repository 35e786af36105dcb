"""The rewrite pass: the graph changes as intended (op census), the numbers match, and the
sites it must not touch are left alone with a reason."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lychee_fx
from lychee_fx import HeadRoles, RoleMapMismatch
from tests.attn_modules import AttnLayer, Capture, Stack, census, mask4d, reference_stack, repeat_kv, untiled_reference

B, HQ, HKV, N, D = 2, 4, 2, 40, 16


def _inputs(layers=3, n=N, lq=1, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    qs = torch.randn(layers, B, HQ, lq, D, generator=g, dtype=dtype)
    ks = torch.randn(layers, B, HKV, n, D, generator=g, dtype=dtype)
    vs = torch.randn(layers, B, HKV, n, D, generator=g, dtype=dtype)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1, :5] = False
    return qs, ks, vs, valid


def _backend(roles=None, layers=3, **kw):
    roles = roles if roles is not None else HeadRoles([[True, False], [False, True], [False, False]][:layers])
    opts = dict(budget=16, block_size=4, sink=4, recent=4)
    opts.update(kw)
    return Capture(lychee_fx.backend(roles, compiler="eager", **opts))


@pytest.mark.parametrize("form", ["gqa", "repeat_kv", "eager"])
def test_census_decode_attention_becomes_lychee_ops(form):
    qs, ks, vs, valid = _inputs()
    cap = _backend()
    mask = None if form == "gqa" else mask4d(valid)
    out = torch.compile(Stack(3, form), backend=cap, fullgraph=True)(qs, ks, vs, mask)
    (gm,) = cap.graphs
    c = census(gm)
    # roles RR.. / .R / ..: layer 0 is all retrieval (nothing selected yet), layer 1 has one
    # head of each kind, layer 2 is all sparse
    assert c.get("lychee.retrieval_attention.default") == 2
    assert c.get("lychee.sparse_attention.default") == 2
    assert "scaled_dot_product_attention" not in c and "softmax" not in c and "matmul" not in c
    assert "expand" not in c, "the GQA expansion is folded away: the ops read the cache once"
    reports = cap.report.sites
    assert [s.layer for s in reports] == [0, 1, 2]
    assert [s.retrieval_heads for s in reports] == [(0, 1), (1,), ()]
    assert [s.sparse_heads for s in reports] == [(), (0,), (0, 1)]
    torch.testing.assert_close(out, reference_stack(qs, ks, vs, valid if mask is not None else None, cap.inner.roles, cap.inner.options).float(), rtol=1e-5, atol=1e-5)


def test_effective_roles_and_selection_flow():
    """SPEC 1.1: layer 0 is retrieval; a sparse head with no twin yet acts as retrieval;
    retrieval heads select only when a later sparse head reads their selection."""
    qs, ks, vs, valid = _inputs(layers=4)
    roles = HeadRoles([[False, False], [True, False], [False, True], [True, True]])
    cap = _backend(roles)
    torch.compile(Stack(4, "repeat_kv"), backend=cap, fullgraph=True)(qs, ks, vs, mask4d(valid))
    s = cap.report.sites
    assert [x.retrieval_heads for x in s] == [(0, 1), (0,), (1,), (0, 1)]
    assert [x.sparse_heads for x in s] == [(), (1,), (0,), ()]
    # layer 0's head 1 is read by layer 1; layer 1's head 0 by layer 2; layer 2's head 1 by nobody
    assert [x.select for x in s] == [True, True, False, False]


def test_prefill_is_never_changed():
    qs, ks, vs, valid = _inputs(lq=5)
    cap = _backend()
    model = Stack(3, "repeat_kv")
    out = torch.compile(model, backend=cap, fullgraph=True)(qs, ks, vs, mask4d(valid))
    assert census(cap.graphs[0]).get("scaled_dot_product_attention") == 3
    assert all("prefill: query length 5" in s.reason for s in cap.report.declined)
    assert cap.report.counters["rewritten"] == 0
    torch.testing.assert_close(out, model(qs, ks, vs, mask4d(valid)), rtol=0, atol=0)


class _Odd(nn.Module):
    """Attention the pass must decline, one flavour per ``kind``."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.layers = nn.ModuleList([nn.Identity()])

    def forward(self, q, k, v, mask):
        g = q.shape[1] // k.shape[1]
        kk, vv = repeat_kv(k, g), repeat_kv(v, g)
        if self.kind == "dropout":
            return F.scaled_dot_product_attention(q, kk, vv, dropout_p=0.1)
        if self.kind == "causal":
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
        if self.kind == "per_head_mask":  # heads see different slots
            odd = (torch.arange(q.shape[1]) % 2 == 1)[None, :, None, None]
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask[:, None, None, :] | odd)
        scores = torch.matmul(q, kk.transpose(-1, -2)) * D**-0.5
        if self.kind == "bias_after_cap":
            scores = torch.tanh(scores / 30.0) * 30.0 + torch.arange(scores.shape[-1], dtype=scores.dtype) * torch.ones(q.shape[1], 1, 1)
        if self.kind == "sub":  # a per-slot subtraction (a row's max-shift is rewritten: softmax ignores it)
            scores = scores - 0.1 * torch.arange(scores.shape[-1], dtype=scores.dtype)
        if self.kind == "bias_before_scale":
            scores = torch.matmul(q, kk.transpose(-1, -2)) + torch.where(mask, 0.0, -1e9)[:, None, None, :]
            scores = scores * D**-0.5
        probs = F.softmax(scores, dim=-1)
        out = torch.matmul(probs, vv)
        if self.kind == "probs_used":
            return out, probs
        return out


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("dropout", "dropout_p=0.1"),
        ("causal", "is_causal=True with one query"),
        ("per_head_mask", "per-head or per-query mask"),
        ("bias_after_cap", "a position bias is added after the soft-cap"),
        ("sub", "scores pass through 'sub'"),
        ("bias_before_scale", "the mask is added before the scores are scaled"),
        ("probs_used", "probabilities are also used elsewhere"),
    ],
)
def test_declined_sites_are_untouched_and_say_why(kind, reason, caplog):
    qs, ks, vs, valid = _inputs(layers=1)
    cap = _backend(HeadRoles([[False, False]]), layers=1)
    model = _Odd(kind).train(False)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="lychee_fx"):
        out = torch.compile(model, backend=cap, fullgraph=True)(qs[0], ks[0], vs[0], valid)
    (site,) = cap.report.sites
    assert site.status == "declined" and reason in site.reason, site.reason
    assert cap.report.counters[f"declined: {site.reason}"] == 1
    assert any("declined" in r.message and reason in r.message for r in caplog.records)
    assert not any("lychee" in str(n.target) for n in cap.graphs[0].graph.nodes)
    if kind != "dropout":
        torch.manual_seed(0)
        torch.testing.assert_close(out, model(qs[0], ks[0], vs[0], valid))


class _OwnMiddle(nn.Module):
    """Three SDPA layers; layer 1 reads the K/V passed as ``kw``, ``vw`` (its own cache)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Identity() for _ in range(3))

    def forward(self, qs, ks, vs, kw, vw):
        outs = []
        for i in range(3):
            k, v = (kw, vw) if i == 1 else (ks[i], vs[i])
            outs.append(F.scaled_dot_product_attention(qs[i], k, v, enable_gqa=True))
        return torch.stack(outs)


def test_sliding_window_layers_are_declined():
    """A layer whose cache is shorter than the others' (a sliding window) keeps SDPA."""
    qs, ks, vs, _ = _inputs()
    kw, vw = ks[1, :, :, -8:].contiguous(), vs[1, :, :, -8:].contiguous()
    cap = _backend(HeadRoles.all_retrieval(3, 2))
    out = torch.compile(_OwnMiddle(), backend=cap, fullgraph=True)(qs, ks, vs, kw, vw)
    st = [(s.layer, s.status) for s in cap.report.sites]
    assert st == [(0, "rewritten"), (1, "declined"), (2, "rewritten")]
    assert "KV length 8 differs from the longest layer's (40)" in cap.report.sites[1].reason
    torch.testing.assert_close(out, _OwnMiddle()(qs, ks, vs, kw, vw), rtol=1e-5, atol=1e-5)


def test_sliding_window_layer_with_heads_of_its_own_is_declined_not_a_map_error():
    """Inkling-style: the sliding-window layer has 1 KV head where the full layers have the
    map's 2. It keeps its attention (a decline), and the map still fits the rest; the same
    head count on a full-length layer is the user's error."""
    qs, ks, vs, _ = _inputs()
    kw = torch.randn(B, 1, 8, D)  # 1 KV head for 4 query heads, 8 slots: a window
    vw = torch.randn(B, 1, 8, D)
    cap = _backend(HeadRoles.all_retrieval(3, 2))
    out = torch.compile(_OwnMiddle(), backend=cap, fullgraph=True)(qs, ks, vs, kw, vw)
    assert [(s.layer, s.status) for s in cap.report.sites] == [(0, "rewritten"), (1, "declined"), (2, "rewritten")]
    assert "sliding-window" in cap.report.sites[1].reason
    torch.testing.assert_close(out, _OwnMiddle()(qs, ks, vs, kw, vw), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    kf, vf = torch.randn(B, 1, N, D), torch.randn(B, 1, N, D)  # the same head at full length
    with pytest.raises(Exception, match="role map has 2 KV heads per layer, but this attention reads 1 KV heads"):
        torch.compile(_OwnMiddle(), backend=_backend(HeadRoles.all_retrieval(3, 2)), fullgraph=True)(qs, ks, vs, kf, vf)


def test_role_map_must_fit_the_model():
    qs, ks, vs, valid = _inputs()
    with pytest.raises(Exception, match="role map has 2 layers, but attention site .* is layer 2"):
        torch.compile(Stack(3, "gqa"), backend=_backend(HeadRoles.all_retrieval(2, 2)), fullgraph=True)(qs, ks, vs, None)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="role map has 3 KV heads per layer, but this attention reads 2 KV heads"):
        torch.compile(Stack(3, "gqa"), backend=_backend(HeadRoles.all_retrieval(3, 3)), fullgraph=True)(qs, ks, vs, None)


def test_role_map_mismatch_is_a_value_error():
    assert issubclass(RoleMapMismatch, ValueError)


class _Unnamed(nn.Module):
    """Attention layers with no number in their module path."""

    def __init__(self, n):
        super().__init__()
        self.first, self.second, self.third = (nn.Identity() for _ in range(3))
        self.n = n

    def forward(self, qs, ks, vs):
        return torch.stack([F.scaled_dot_product_attention(qs[i], ks[i], vs[i], enable_gqa=True) for i in range(self.n)])


def test_layers_fall_back_to_graph_order_when_the_graph_holds_them_all():
    qs, ks, vs, _ = _inputs()
    cap = _backend()
    torch.compile(_Unnamed(3), backend=cap, fullgraph=True)(qs, ks, vs)
    assert [s.layer for s in cap.report.sites] == [0, 1, 2]
    assert cap.report.counters["rewritten"] == 3


def test_unknown_layers_are_declined():
    qs, ks, vs, _ = _inputs()
    cap = _backend(HeadRoles.all_retrieval(4, 2))
    out = torch.compile(_Unnamed(3), backend=cap, fullgraph=True)(qs, ks, vs)
    assert all("layer index unknown" in s.reason for s in cap.report.sites)
    torch.testing.assert_close(out, _Unnamed(3)(qs, ks, vs))


class _Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(AttnLayer("repeat_kv") for _ in range(4))

    def forward(self, qs, ks, vs, mask):
        first = self.run(0, 2, qs, ks, vs, mask)
        torch._dynamo.graph_break()
        return torch.cat([first, self.run(2, 4, qs, ks, vs, mask)])

    def run(self, lo, hi, qs, ks, vs, mask):
        outs = []
        for i in range(lo, hi):
            outs.append(self.layers[i](qs[i], ks[i], vs[i], mask))
        return torch.stack(outs)


def test_graph_break_restarts_the_selection():
    """The first rewritten layer of each graph starts with no selection (acts as retrieval)."""
    qs, ks, vs, valid = _inputs(layers=4, n=64)
    roles = HeadRoles([[True, False], [False, True], [False, False], [False, True]])
    cap = _backend(roles)
    out = torch.compile(_Broken(), backend=cap)(qs, ks, vs, mask4d(valid))
    assert len(cap.graphs) >= 2
    s = cap.report.sites
    assert [x.layer for x in s] == [0, 1, 2, 3]
    assert s[2].retrieval_heads == (0, 1), "layer 2 opens the second graph: nothing selected yet"
    # The oracle with its state reset at the break.
    opts = cap.inner.options
    dec = lychee_fx.reference.ReferenceDecoder(opts)
    ref = []
    for i in range(4):
        if i == 2:
            dec.reset()
        ref.append(dec(qs[i], ks[i], vs[i], valid, roles.row(i)))
    torch.testing.assert_close(out, torch.stack(ref).float(), rtol=1e-5, atol=1e-5)


def test_additive_and_masked_fill_masks():
    qs, ks, vs, valid = _inputs()
    roles = HeadRoles([[True, False], [False, True], [False, False]])
    additive = torch.where(valid, 0.0, torch.finfo(torch.float32).min)
    for form, mask in (("repeat_kv", additive), ("eager", additive), ("eager", valid)):
        torch._dynamo.reset()
        cap = _backend(roles)
        out = torch.compile(Stack(3, form), backend=cap, fullgraph=True)(qs, ks, vs, mask4d(mask))
        assert cap.report.counters["rewritten"] == 3, (form, cap.report.summary())
        ref = reference_stack(qs, ks, vs, valid, roles, cap.inner.options)
        torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)


def test_a_map_with_more_rows_than_layers_is_warned_about(caplog):
    qs, ks, vs, _ = _inputs()
    cap = _backend(HeadRoles.all_retrieval(5, 2))
    with caplog.at_level(logging.WARNING, logger="lychee_fx"):
        torch.compile(Stack(3, "gqa"), backend=cap, fullgraph=True)(qs, ks, vs, None)
    assert any("role map has 5 layers but the attention compiled so far stops at layer 2" in r.message for r in caplog.records)


class _Hybrid(nn.Module):
    """Attention at decoder layers 1 and 3 of 4 (the others are another kind of mixer)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Identity(), AttnLayer("gqa"), nn.Identity(), AttnLayer("gqa")])

    def forward(self, qs, ks, vs):
        return torch.stack([self.layers[i](qs[j], ks[j], vs[j], None) for j, i in enumerate((1, 3))])


def test_hybrid_attention_layers_read_rows_by_forward_order_or_decoder_index():
    """SPEC 1.2's map of the attention layers (2 rows) is read in forward order; a map of the
    decoder layers (4 rows) by the decoder index; a 3-row map fits neither and is an error."""
    qs, ks, vs, _ = _inputs(layers=2)
    cap = _backend(HeadRoles([[True, False], [False, True]]), layers=2)
    torch.compile(_Hybrid(), backend=cap, fullgraph=True)(qs, ks, vs)
    assert [s.layer for s in cap.report.sites] == [0, 1]
    torch._dynamo.reset()
    cap = _backend(HeadRoles([[True, True], [True, False], [True, True], [False, True]]))
    torch.compile(_Hybrid(), backend=cap, fullgraph=True)(qs, ks, vs)
    assert [s.layer for s in cap.report.sites] == [1, 3]
    torch._dynamo.reset()
    with pytest.raises(Exception, match="role map has 3 layers, but attention site .* is layer 3"):
        torch.compile(_Hybrid(), backend=_backend(HeadRoles.all_retrieval(3, 2)), fullgraph=True)(qs, ks, vs)


class _TwoPerLayer(nn.Module):
    """Two softmax-attentions in each of 2 decoder layers (DiffLlama's two maps): module
    paths number the sites 0, 0, 1, 1."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleList([AttnLayer("gqa"), AttnLayer("gqa")]) for _ in range(2))

    def forward(self, qs, ks, vs):
        return torch.stack([self.layers[i // 2][i % 2](qs[i], ks[i], vs[i], None) for i in range(4)])


def test_two_attentions_per_layer_read_rows_in_forward_order():
    """A map with one row per attention (4) is read in graph order, and the stack equals the
    oracle; a map with one row per decoder layer (2) fits no site order and is declined."""
    qs, ks, vs, _ = _inputs(layers=4, n=64)
    roles = HeadRoles([[True, True], [False, True], [True, False], [False, False]])
    cap = _backend(roles, layers=4)
    out = torch.compile(_TwoPerLayer(), backend=cap, fullgraph=True)(qs, ks, vs)
    assert [s.layer for s in cap.report.sites] == [0, 1, 2, 3], cap.report.summary()
    assert cap.report.counters["rewritten"] == 4
    ref = reference_stack(qs, ks, vs, None, roles, cap.inner.options)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    cap = _backend(HeadRoles.all_retrieval(2, 2))
    out = torch.compile(_TwoPerLayer(), backend=cap, fullgraph=True)(qs, ks, vs)
    assert all("layer index unknown" in s.reason for s in cap.report.sites), cap.report.summary()
    torch.testing.assert_close(out, _TwoPerLayer()(qs, ks, vs))


class _CacheNamed(nn.Module):
    """Each layer in a graph of its own, its module path numberless, its cache a graph input
    named like HF's (``past_key_values.layers[i].keys``): the number survives the break."""

    def __init__(self):
        super().__init__()
        self.attn = AttnLayer("gqa")

    def forward(self, q, past_key_values):
        return self.attn(q, past_key_values["layers"][self.i]["keys"], past_key_values["layers"][self.i]["values"], None)


def test_a_graph_break_keeps_the_layer_number_of_the_cache_it_reads():
    qs, ks, vs, _ = _inputs()
    cache = {"layers": [{"keys": ks[i], "values": vs[i]} for i in range(3)]}
    cap = _backend(HeadRoles([[True, True], [True, False], [False, True]]))
    outs = []
    for i in range(3):
        torch._dynamo.reset()
        m = _CacheNamed()
        m.i = i
        outs.append(torch.compile(m, backend=cap, fullgraph=True)(qs[i], cache))
    assert [s.layer for s in cap.report.sites] == [0, 1, 2], cap.report.summary()
    assert all(s.status == "rewritten" for s in cap.report.sites)


def test_kv_tiled_by_repeat_is_folded_and_groups_the_query_heads():
    """JetMoE's ``repeat(1, G, 1, 1)``: the ops read the cache's KV heads once, each with the
    query heads that read it (heads h, h + Hkv, ...), and the stack equals the oracle, with
    retrieval and sparse heads in one layer and in one graph."""
    qs, ks, vs, valid = _inputs(n=64)
    cap = _backend()
    out = torch.compile(Stack(3, "tile"), backend=cap, fullgraph=True)(qs, ks, vs, mask4d(valid))
    c = census(cap.graphs[0])
    assert "repeat" not in c and "scaled_dot_product_attention" not in c, c
    assert c.get("lychee.retrieval_attention.default") == 2 and c.get("lychee.sparse_attention.default") == 2
    assert [s.kv_heads for s in cap.report.sites] == [HKV] * 3
    assert [s.sparse_heads for s in cap.report.sites] == [(), (0,), (0, 1)]
    ref = untiled_reference(qs, ks, vs, valid, cap.inner.roles, cap.inner.options)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    # the grouping matters: read as repeat_kv's (head i -> KV head i // G) the sparse heads differ
    wrong = reference_stack(qs, ks, vs, valid, cap.inner.roles, cap.inner.options).float()
    assert not torch.allclose(out, wrong, rtol=1e-3, atol=1e-3)


class _OddTiling(nn.Module):
    """Tilings that are not a fold: K tiled by ``repeat`` with V expanded by ``repeat_kv``
    (query heads would read K and V of different KV heads: declined), and the batch tiled
    instead of the heads (K (2B, Hkv, N, D) for a tiled q: read as it is)."""

    layers = nn.ModuleList([nn.Identity()])

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v, mask):
        g = q.shape[1] // k.shape[1]
        if self.kind == "mixed":
            return F.scaled_dot_product_attention(q, k.repeat(1, g, 1, 1), repeat_kv(v, g), attn_mask=mask)
        return F.scaled_dot_product_attention(q.repeat(2, 1, 1, 1), k.repeat(2, 1, 1, 1), v.repeat(2, 1, 1, 1),
                                              enable_gqa=True)


@pytest.mark.parametrize("kind", ["mixed", "batch"])
def test_tilings_that_are_not_a_head_fold_are_not_folded(kind):
    qs, ks, vs, valid = _inputs(layers=1)
    cap = _backend(HeadRoles([[False, False]]), layers=1)
    model = _OddTiling(kind)
    out = torch.compile(model, backend=cap, fullgraph=True)(qs[0], ks[0], vs[0], mask4d(valid))
    (site,) = cap.report.sites
    assert site.status == "declined" if kind == "mixed" else site.status == "rewritten", cap.report.summary()
    if kind == "mixed":
        assert "expanded by an op the pass cannot fold" in site.reason, site.reason
        assert not any("lychee" in str(n.target) for n in cap.graphs[0].graph.nodes)
    torch.testing.assert_close(out, model(qs[0], ks[0], vs[0], mask4d(valid)))


class _LatentCache(nn.Module):
    """One attention per graph, its module path numberless, K/V computed from the cache rather
    than read from it (multi-head latent attention expands a latent cache: LongCat-Flash),
    the cache a graph input named like HF's. ``kind``: "own" (K/V from layer i's cache, which
    the graph grows by the new token), "read_only" (a cache the graph does not write: another
    layer's), "two_layers" (K from layer i's cache, V from layer i+1's)."""

    def __init__(self, i, kind="own"):
        super().__init__()
        self.i, self.kind = i, kind
        self.attn = AttnLayer("gqa")

    def forward(self, q, new, past_key_values):
        layers = past_key_values["layers"]
        keys = layers[self.i]["keys"]
        if self.kind != "read_only":
            keys = torch.cat([keys, new], dim=-2)  # the dynamic cache's update of layer i
        other = torch.cat([layers[self.i + 1]["keys"], new], dim=-2) if self.kind == "two_layers" else keys
        return self.attn(q, keys * 0.5, other.flip(-1) + 1.0, None)


@pytest.mark.parametrize("kind", ["own", "read_only", "two_layers"])
def test_layer_number_of_attention_computed_from_the_cache_it_writes(kind):
    """The number is the one cache layer K and V are computed from, where the graph writes the
    new token (``cache.update(..., layer_idx)``); a cache the graph only reads, or caches of
    two layers, number nothing and the site is declined."""
    qs, ks, vs, _ = _inputs(layers=4)
    new = torch.randn(B, HKV, 1, D)
    cache = {"layers": [{"keys": ks[i], "values": vs[i]} for i in range(4)]}
    cap = _backend(HeadRoles([[True, True], [True, False], [False, True]]))
    outs, expected = [], []
    for i in range(3):
        torch._dynamo.reset()
        m = _LatentCache(i, kind)
        outs.append(torch.compile(m, backend=cap, fullgraph=True)(qs[i], new, cache))
        expected.append(m(qs[i], new, cache))
    sites = cap.report.sites
    if kind == "own":
        assert [s.layer for s in sites] == [0, 1, 2], cap.report.summary()
        assert all(s.status == "rewritten" for s in sites)
    else:
        assert all(s.layer is None and "layer index unknown" in s.reason for s in sites), cap.report.summary()
    # one layer per graph: every head acts as retrieval (no selection yet), full attention
    torch.testing.assert_close(torch.stack(outs), torch.stack(expected), rtol=1e-5, atol=1e-5)


class _AttentionList(nn.Module):
    """Decoder layers holding two attention modules each (LongCat-Flash's
    ``layers.d.self_attn.0`` / ``.1``, forward-order attentions 2d and 2d + 1); ``calls``:
    the (layer, attention) pairs this graph runs."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls
        self.layers = nn.ModuleList(nn.Module() for _ in range(2))
        for layer in self.layers:
            layer.self_attn = nn.ModuleList([AttnLayer("gqa"), AttnLayer("gqa")])

    def forward(self, qs, ks, vs):
        return torch.stack([self.layers[d].self_attn[i](qs[2 * d + i], ks[2 * d + i], vs[2 * d + i], None)
                            for d, i in self.calls])


def test_a_module_path_with_an_attention_list_below_the_layer_numbers_no_site():
    """``layers.1.self_attn.0`` names decoder layer 1, not attention 2: a graph holding part of
    the model (attentions 1 and 2, whose decoder layers 0 and 1 ascend) declines its sites
    rather than read rows 0 and 1; a graph holding all four reads them in graph order."""
    qs, ks, vs, _ = _inputs(layers=4)
    roles = HeadRoles([[True, True], [False, True], [True, False], [False, False]])
    cap = _backend(roles, layers=4)
    torch.compile(_AttentionList([(0, 1), (1, 0)]), backend=cap, fullgraph=True)(qs, ks, vs)
    assert all(s.layer is None and "layer index unknown" in s.reason for s in cap.report.sites), cap.report.summary()
    torch._dynamo.reset()
    cap = _backend(roles, layers=4)
    out = torch.compile(_AttentionList([(0, 0), (0, 1), (1, 0), (1, 1)]), backend=cap, fullgraph=True)(qs, ks, vs)
    assert [s.layer for s in cap.report.sites] == [0, 1, 2, 3], cap.report.summary()
    torch.testing.assert_close(out, reference_stack(qs, ks, vs, None, roles, cap.inner.options).float(), rtol=1e-5, atol=1e-5)
