"""The rewrite of attention forms beyond SPEC 1.1's shapes (``lychee_fx.reference``'s
extensions), written the way the models that need them write them:

    gemma2     eager, logit soft-cap ``c * tanh(s / c)`` between scaling and mask
    mpt        eager, ALiBi ``(Hq, 1, N)`` added after scaling, then ``masked_fill``
    bloom      eager on ``(B * Hq, 1, N)`` scores: ``alibi.baddbmm(q3, k3^T)``, a view, ``bmm``
    neo        eager without a scale, ``where(causal, s, min)`` and an additive mask (two masks)
    falcon     SDPA whose mask is ``masked_fill(alibi / sqrt(D), ~mask, min)`` (per head)
    hf_bias    SDPA whose mask is HF's ``where(mask, position_bias, min)`` (per head)
    mla        SDPA with a value head dim of its own
    doge       SDPA whose mask is a per-KV-head bias, masked, then expanded like K (``repeat_kv``)
    falcon_e   eager: ALiBi added before the scaling, then a per-head ALiBi mask (Falcon eager)

Each: the op census (the attention became lychee ops), the numbers against the oracle for
any role map (hypothesis), and variants that must be declined.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import lychee_fx
from lychee_fx import HeadRoles
from tests.attn_modules import Capture, census, repeat_kv
from tests.strategies import assert_close_anchored

LAYERS = 3
FORMS = ["gemma2", "mpt", "bloom", "neo", "falcon", "hf_bias", "mla", "doge", "falcon_e", "gpt_oss", "max_shift"]
CAP = 5.0
DV = 8  # the mla form's value head dim


def alibi(hq: int, n: int, dtype, device=None) -> torch.Tensor:
    """(Hq, N): ALiBi slopes 2^-(h % 4 + 1) times the slot index."""
    slopes = torch.tensor([2.0 ** -(h % 4 + 1) for h in range(hq)], dtype=dtype, device=device)
    return slopes[:, None] * torch.arange(n, dtype=dtype, device=device)[None, :]


def sink_logits(hq: int, dtype, device=None) -> torch.Tensor:
    """(Hq,): gpt-oss's attention sinks, one logit per query head, from below to above the
    scores' size."""
    return torch.linspace(-1.0, 2.0, hq, dtype=dtype, device=device)


def kv_bias(hkv: int, n: int, dtype, device=None) -> torch.Tensor:
    """(Hkv, N): a finite bias per KV head (Doge's dynamic-mask values)."""
    ar = torch.arange(n, dtype=dtype, device=device)[None, :] % 5 - 2
    return ar * 0.25 * torch.arange(1, hkv + 1, dtype=dtype, device=device)[:, None]


class Layer(nn.Module):
    """One decode attention in ``form``: q (B, Hq, 1, D), k/v (B, Hkv, N, D|Dv), valid (B, N)."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def forward(self, q, k, v, valid):
        b, hq, _, d = q.shape
        n = k.shape[2]
        g = hq // k.shape[1]
        kk, vv = repeat_kv(k, g), repeat_kv(v, g)
        big = torch.finfo(q.dtype).min
        additive = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill(~valid, big)[:, None, None, :]  # (B, 1, 1, N)
        if self.form == "gemma2":
            s = torch.matmul(q, kk.transpose(2, 3)) * d**-0.5
            s = torch.tanh(s / CAP) * CAP
            s = s + additive
            p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
            return torch.matmul(p, vv)
        if self.form == "mpt":
            bias = alibi(hq, n, q.dtype, q.device)[:, None, :]  # (Hq, 1, N)
            s = torch.matmul(q, kk.transpose(-1, -2)) * d**-0.5
            s = s + bias
            s = s.masked_fill(~valid[:, None, None, :], big)
            return torch.matmul(F.softmax(s.float(), dim=-1).to(v.dtype), vv)
        if self.form == "bloom":
            q3 = q.reshape(b * hq, -1, d)
            k3 = kk.reshape(b * hq, -1, d).transpose(-1, -2)
            v3 = vv.reshape(b * hq, -1, d)
            bias3 = alibi(hq, n, q.dtype, q.device)[None].expand(b, hq, n).reshape(b * hq, 1, n)
            s = bias3.baddbmm(batch1=q3, batch2=k3, beta=1.0, alpha=d**-0.5)
            w = s.view(b, hq, 1, -1) + additive
            p = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.bmm(p.view(b * hq, 1, -1), v3)
            return out.view(b, hq, 1, -1)
        if self.form == "neo":
            s = torch.matmul(q, kk.transpose(-1, -2))
            causal = valid[:, None, None, :]
            s = torch.where(causal, s, torch.tensor(big, dtype=s.dtype))
            s = s + torch.zeros_like(additive)  # HF's additive padding mask, zeros here
            return torch.matmul(F.softmax(s, dim=-1), vv)
        if self.form == "falcon":
            m = torch.masked_fill(alibi(hq, n, q.dtype, q.device)[None, :, None, :].expand(b, hq, 1, n) / math.sqrt(d),
                                  ~valid[:, None, None, :], big)
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=m)
        if self.form == "hf_bias":
            m = torch.where(valid[:, None, None, :], alibi(hq, n, q.dtype, q.device)[None, :, None, :],
                            torch.tensor(big, dtype=q.dtype)).contiguous()
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=m)
        if self.form == "mla":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], enable_gqa=True)  # a Python bool: g is symbolic under dynamic shapes
        if self.form == "doge":
            m = kv_bias(k.shape[1], n, q.dtype, q.device)[None, :, None, :].expand(b, -1, 1, -1)  # (B, Hkv, 1, N)
            m = m.masked_fill(~valid[:, None, None, :], big)
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=repeat_kv(m, g), scale=0.5)
        if self.form == "falcon_e":
            s = q @ kk.transpose(-1, -2)
            s = s + alibi(hq, n, q.dtype, q.device)[None, :, None, :]
            s *= d**-0.5
            m = torch.masked_fill(alibi(hq, n, q.dtype, q.device)[None, :, None, :].expand(b, hq, 1, n) / math.sqrt(d),
                                  ~valid[:, None, None, :], big)
            return F.softmax(s + m, dim=-1, dtype=q.dtype) @ vv
        if self.form == "gpt_oss":  # transformers' gpt_oss eager_attention_forward, sinks and max-shift included
            s = torch.matmul(q, kk.transpose(2, 3)) * d**-0.5 + additive
            sinks = sink_logits(hq, q.dtype, q.device).reshape(1, -1, 1, 1).expand(b, -1, 1, -1)
            c = torch.cat([s, sinks], dim=-1)
            c = c - c.max(dim=-1, keepdim=True).values
            p = F.softmax(c, dim=-1, dtype=c.dtype)[..., :-1]
            return torch.matmul(F.dropout(p, p=0.0, training=False).to(vv.dtype), vv)
        if self.form == "max_shift":  # MiMo-V2's layers without sinks: a shift softmax does not see
            s = torch.matmul(q, kk.transpose(2, 3)) * d**-0.5 + additive
            s = s - s.max(dim=-1, keepdim=True).values
            return torch.matmul(F.softmax(s, dim=-1), vv)
        raise ValueError(self.form)


class Model(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.layers = nn.ModuleList(Layer(form) for _ in range(LAYERS))

    def forward(self, qs, ks, vs, valid):
        return torch.stack([layer(qs[i], ks[i], vs[i], valid) for i, layer in enumerate(self.layers)])


def extras(form, hq, hkv, n, d, dtype):
    """(scale, softcap, head_bias (1, Hq, N) float64 or None) of ``form``: what its model hands
    attention. The bias is built in ``dtype``, as ``Layer`` builds it, then widened. ALiBi's
    slope times a slot index reaches hundreds, where bfloat16 keeps steps of 1 to 8 (float32
    about 1e-4): that rounding is the model's input, not an error of the ops."""
    softcap = CAP if form == "gemma2" else 0.0
    head_bias = None
    if form in ("mpt", "bloom", "hf_bias"):
        head_bias = alibi(hq, n, dtype)[None].double()
    elif form == "falcon":
        head_bias = (alibi(hq, n, dtype)[None] / math.sqrt(d)).double()
    elif form == "falcon_e":
        head_bias = 2 * alibi(hq, n, torch.float64)[None] / math.sqrt(d)
    elif form == "doge":
        head_bias = kv_bias(hkv, n, torch.float64).repeat_interleave(hq // hkv, 0)[None]
    return {"neo": 1.0, "doge": 0.5}.get(form), softcap, head_bias


def reference(form, qs, ks, vs, valid, roles, opts):
    """The stack decoded by the oracle with the form's extensions (float64)."""
    dec = lychee_fx.reference.ReferenceDecoder(opts)
    scale, softcap, head_bias = extras(form, qs.shape[2], ks.shape[2], ks.shape[3], qs.shape[-1], qs.dtype)
    sinks = sink_logits(qs.shape[2], qs.dtype) if form == "gpt_oss" else None
    return torch.stack([dec(qs[i], ks[i], vs[i], valid, roles.row(i), scale, softcap, head_bias, sinks)
                        for i in range(LAYERS)])


def dense(form, qs, ks, vs, valid, dtype):
    """Full attention over every head with the form's extensions, computed in ``dtype``: what a
    dense decode in that precision gets, the yardstick of its rounding.

    qs (L, B, Hq, 1, D), ks (L, B, Hkv, N, D), vs (L, B, Hkv, N, Dv), valid (B, N) -> (L, B, Hq, 1, Dv)."""
    hq, hkv, n, d = qs.shape[2], ks.shape[2], ks.shape[3], qs.shape[-1]
    scale, softcap, head_bias = extras(form, hq, hkv, n, d, qs.dtype)
    g = hq // hkv
    q, k, v = qs.to(dtype), ks.repeat_interleave(g, 2).to(dtype), vs.repeat_interleave(g, 2).to(dtype)
    s = (q @ k.transpose(-1, -2)) * (d**-0.5 if scale is None else scale)  # (L, B, Hq, 1, N)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if head_bias is not None:
        s = s + head_bias.to(dtype)[None, :, :, None, :]
    s = s.masked_fill(~valid.to(s.device)[None, :, None, None, :], float("-inf"))
    if form == "gpt_oss":
        sinks = sink_logits(hq, qs.dtype).to(dtype).reshape(1, 1, hq, 1, 1).expand(*s.shape[:-1], 1)
        return torch.softmax(torch.cat([s, sinks.to(s.device)], -1), dim=-1)[..., :-1] @ v
    return torch.softmax(s, dim=-1) @ v


def _inputs(form, b=2, hkv=2, g=2, n=40, d=16, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    qs = torch.randn(LAYERS, b, hkv * g, 1, d, generator=gen, dtype=dtype)
    ks = torch.randn(LAYERS, b, hkv, n, d, generator=gen, dtype=dtype)
    vs = torch.randn(LAYERS, b, hkv, n, DV if form == "mla" else d, generator=gen, dtype=dtype)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[-1, : n // 4] = False  # left padding
    return qs, ks, vs, valid


def _compiled(form, roles, **opts):
    torch._dynamo.reset()
    o = dict(budget=16, block_size=4, sink=4, recent=4)
    o.update(opts)
    cap = Capture(lychee_fx.backend(roles, compiler="eager", **o))
    return cap, torch.compile(Model(form), backend=cap, fullgraph=True, dynamic=False)


@pytest.mark.parametrize("form", FORMS)
def test_census_the_form_becomes_lychee_ops(form):
    roles = HeadRoles([[True, False], [False, True], [False, False]])
    qs, ks, vs, valid = _inputs(form)
    cap, model = _compiled(form, roles)
    out = model(qs, ks, vs, valid)
    (gm,) = cap.graphs
    c = census(gm)
    assert c.get("lychee.retrieval_attention.default") == 2 and c.get("lychee.sparse_attention.default") == 2, c
    for gone in ("scaled_dot_product_attention", "softmax", "matmul", "bmm", "baddbmm", "tanh"):
        assert gone not in c, f"{gone} left in the graph: {c}"
    assert [s.status for s in cap.report.sites] == ["rewritten"] * LAYERS, cap.report.summary()
    ref = reference(form, qs, ks, vs, valid, roles, cap.inner.options)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@settings(max_examples=30)
@given(st.sampled_from(FORMS), st.integers(1, 3), st.sampled_from([1, 2, 3]), st.integers(9, 90), st.data())
def test_any_roles_equal_reference(form, hkv, g, n, data):
    # one attention head: a bias without a head dim is a mask to the pass (its values enter the
    # logits, not the selection), so the per-head-bias forms need two heads
    assume(hkv * g > 1 or form in ("gemma2", "neo", "mla"))
    rows = data.draw(st.lists(st.lists(st.booleans(), min_size=hkv, max_size=hkv), min_size=LAYERS, max_size=LAYERS))
    bs = data.draw(st.sampled_from([1, 4, 8]))
    opts = dict(budget=bs * 6, block_size=bs, sink=bs, recent=bs)
    roles = HeadRoles(rows)
    dtype = data.draw(st.sampled_from([torch.float64, torch.float32]))
    qs, ks, vs, valid = _inputs(form, hkv=hkv, g=g, n=n, seed=data.draw(st.integers(0, 2**16)), dtype=dtype)
    cap, model = _compiled(form, roles, **opts)
    out = model(qs, ks, vs, valid)
    assert cap.report.counters["rewritten"] == LAYERS, cap.report.summary()
    ref = reference(form, qs, ks, vs, valid, roles, cap.inner.options)
    # float64 inputs cannot flip a near-tie; float32 ones are checked against the oracle of the same inputs
    assert_close_anchored(f"{form} stack", out, ref, floor=1e-9 if dtype == torch.float64 else 2e-5)


class _Odd(nn.Module):
    """Forms close to the supported ones that the ops cannot express."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.layers = nn.ModuleList([nn.Identity()])

    def forward(self, q, k, v, valid):
        d, n, hq = q.shape[-1], k.shape[2], q.shape[1]
        additive = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill(~valid, torch.finfo(q.dtype).min)[:, None, None, :]
        s = torch.matmul(q, k.transpose(-1, -2)) * d**-0.5
        if self.kind == "negative_cap":
            s = torch.tanh(s / CAP) * -CAP + additive
        elif self.kind == "bias_after_mask":
            s = s + additive + alibi(hq, n, q.dtype, q.device)[:, None, :]
        elif self.kind == "scaled_mask":
            s = (s + additive) * 0.5
        elif self.kind == "per_head_fill":
            s = s.masked_fill(~valid[:, None, None, :] | (torch.arange(hq, device=q.device) == 0)[None, :, None, None], -math.inf)
        elif self.kind == "twice_capped":
            s = torch.tanh(torch.tanh(s / CAP)) * CAP
        elif self.kind in ("sink_kept", "sink_per_row"):  # sinks appended, then read wrongly for the ops
            if self.kind == "sink_kept":
                col = sink_logits(hq, q.dtype, q.device).reshape(1, -1, 1, 1).expand(q.shape[0], -1, 1, -1)
            else:  # a different sink for every batch row: not one per query head
                col = torch.arange(q.shape[0] * hq, dtype=q.dtype, device=q.device).reshape(-1, hq, 1, 1)
            p = F.softmax(torch.cat([s + additive, col], dim=-1), dim=-1)
            p = p[..., 1:] if self.kind == "sink_kept" else p[..., :-1]  # "sink_kept" drops a slot, not the sink
            return torch.matmul(p, v)
        return torch.matmul(F.softmax(s, dim=-1), v)


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("negative_cap", "soft-cap of -5.0"),
        ("bias_after_mask", "a position bias is added after the soft-cap or a mask"),
        ("scaled_mask", "the mask is added before the scores are scaled"),
        ("per_head_fill", "a per-head masked_fill"),
        ("twice_capped", "'tanh' after a mask or a second time"),
        ("sink_kept", "sink logits appended whose probabilities are not dropped after the softmax"),
        ("sink_per_row", "scores pass through 'cat'"),
    ],
)
def test_forms_the_ops_cannot_express_are_declined(kind, reason):
    qs, ks, vs, valid = _inputs("mpt", hkv=4, g=1)
    torch._dynamo.reset()
    cap = Capture(lychee_fx.backend(HeadRoles([[False] * 4]), compiler="eager", budget=16, block_size=4, sink=4, recent=4))
    model = _Odd(kind)
    out = torch.compile(model, backend=cap, fullgraph=True)(qs[0], ks[0], vs[0], valid)
    (site,) = cap.report.sites
    assert site.status == "declined" and reason in site.reason, site.reason
    assert not any("lychee" in str(n.target) for n in cap.graphs[0].graph.nodes)
    torch.testing.assert_close(out, model(qs[0], ks[0], vs[0], valid), equal_nan=True)


class _ExpandedCache(nn.Module):
    """Falcon's new decoder architecture: the cache itself holds every query head's K/V
    (copies of the KV heads'), and attention reads it as it is (a graph input grown by cat)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Identity() for _ in range(LAYERS))

    def forward(self, qs, ks, vs, new_k, new_v, valid):
        """ks, vs: lists of per-layer caches (each a graph input, as a model's cache is)."""
        outs = []
        for i in range(LAYERS):
            k = torch.cat([ks[i], new_k[i]], dim=-2)
            v = torch.cat([vs[i], new_v[i]], dim=-2)
            outs.append(F.scaled_dot_product_attention(qs[i], k, v, attn_mask=valid[:, None, None, :]))
        return torch.stack(outs)


def test_a_cache_of_expanded_heads_reads_role_columns_per_group():
    """A 2-column map over a cache of 4 heads: cache head h takes column h // 2, as the
    reference's ``roles_for_heads`` says, and each cache head is a KV head of its own."""
    b, hq, n, d = 2, 4, 30, 16
    gen = torch.Generator().manual_seed(3)
    ks = [torch.randn(b, hq, n, d, generator=gen, dtype=torch.float64) for _ in range(LAYERS)]
    vs = [torch.randn(b, hq, n, d, generator=gen, dtype=torch.float64) for _ in range(LAYERS)]
    ks_t, vs_t = torch.stack(ks), torch.stack(vs)
    new_k = torch.randn(LAYERS, b, hq, 1, d, generator=gen, dtype=torch.float64)
    new_v = torch.randn(LAYERS, b, hq, 1, d, generator=gen, dtype=torch.float64)
    qs = torch.randn(LAYERS, b, hq, 1, d, generator=gen, dtype=torch.float64)
    valid = torch.ones(b, n + 1, dtype=torch.bool)
    roles = HeadRoles([[True, False], [False, True], [True, False]])
    cap = Capture(lychee_fx.backend(roles, compiler="eager", budget=16, block_size=4, sink=4, recent=4))
    out = torch.compile(_ExpandedCache(), backend=cap, fullgraph=True)(qs, ks, vs, new_k, new_v, valid)
    assert [s.status for s in cap.report.sites] == ["rewritten"] * LAYERS, cap.report.summary()
    assert [s.kv_heads for s in cap.report.sites] == [4] * LAYERS
    assert cap.report.sites[1].retrieval_heads == (2, 3)  # column 1 -> cache heads 2, 3
    dec = lychee_fx.reference.ReferenceDecoder(cap.inner.options)
    kk, vv = torch.cat([ks_t, new_k], 3), torch.cat([vs_t, new_v], 3)
    ref = torch.stack([dec(qs[i], kk[i], vv[i], valid, roles.row(i)) for i in range(LAYERS)])
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_an_expansion_in_the_graph_that_is_not_a_cache_read_is_still_declined():
    """K with Hq heads made by an op the pass does not know (not a cache read) is declined."""

    class Tiled(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Identity()])

        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k.tile(1, 2, 1, 1), v.tile(1, 2, 1, 1))

    qs, ks, vs, _ = _inputs("mpt")
    cap = Capture(lychee_fx.backend(HeadRoles([[True, False]]), compiler="eager", budget=16, block_size=4, sink=4, recent=4))
    torch.compile(Tiled(), backend=cap, fullgraph=True)(qs[0], ks[0], vs[0])
    (site,) = cap.report.sites
    assert site.status == "declined" and "expanded by an op the pass cannot fold" in site.reason, site.reason
