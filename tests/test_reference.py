"""The oracle against SPEC 1.1 itself, checked a third way.

``reference.py`` is what every fast path is compared with, so here it is held to the spec's
text: the selection is checked through the properties that define it (forced blocks, count,
order, best-scoring rest, ties to the lower id), and the attention through torch SDPA in
float64 under a boolean mask built here from the selection with ``torch.isin``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lychee_fx import reference as R
from tests.strategies import decode_cases


def _check_selection(sel_row: list[int], scores: list[float], valid: list[bool], opts) -> None:
    """SPEC 1.1's definition of one selection row, checked property by property."""
    bs, s = opts.block_size, opts.num_blocks
    ids = [x for x in sel_row if x >= 0]
    assert sel_row == ids + [-1] * (s - len(ids)), "padding with -1 at the end"
    assert ids == sorted(set(ids)), "ascending, no duplicates"
    positions = [j for j, ok in enumerate(valid) if ok]
    forced = {j // bs for j in positions[: opts.sink]} | {j // bs for j in positions[len(positions) - opts.recent:]}
    candidates = {j // bs for j in positions}
    assert forced <= set(ids), "forced sink/recent blocks are selected"
    assert set(ids) <= candidates, "only blocks with a valid slot"
    assert len(ids) == min(s, len(candidates)), "as many blocks as the budget allows"
    best = {c: max(scores[j] for j in positions if j // bs == c) for c in candidates}
    chosen = set(ids) - forced
    for c in candidates - set(ids):
        for b in chosen:
            assert best[b] > best[c] or (best[b] == best[c] and b < c), (
                f"block {c} (score {best[c]}) was left out for block {b} (score {best[b]})"
            )


@given(decode_cases(dtypes=(torch.float64,)))
def test_selection_is_what_spec_1_1_defines(case):
    b, hq, hkv, n, d = case.shape
    sel = R.select_blocks(case.q, case.k, case.valid, case.opts)  # (B, Hkv, S)
    scores = R.selection_scores(case.q, case.k)  # (B, Hkv, N)
    for bi in range(b):
        for h in range(hkv):
            _check_selection(sel[bi, h].tolist(), scores[bi, h].tolist(), case.valid[bi].tolist(), case.opts)


def _third_way(case, sel, roles_eff, scale):
    """Dense float64 SDPA under a boolean mask of the selected slots, built with isin."""
    b, hq, hkv, n, d = case.shape
    g = hq // hkv
    pos = torch.arange(n)
    allowed = torch.zeros(b, hkv, n, dtype=torch.bool)
    for bi in range(b):
        for h in range(hkv):
            if roles_eff[h]:
                allowed[bi, h] = True
            else:
                allowed[bi, h] = torch.isin(pos // case.opts.block_size, sel[bi, h].long())
    _, bias = R.valid_and_bias(case.mask, b, n)
    allowed &= case.valid[:, None, :]
    m = allowed.repeat_interleave(g, 1)[:, :, None, :]  # (B, Hq, 1, N)
    add = torch.where(m, bias[:, None, None, :], float("-inf"))
    out = torch.nn.functional.scaled_dot_product_attention(
        case.q.double(), case.k.double().repeat_interleave(g, 1), case.v.double().repeat_interleave(g, 1),
        attn_mask=add, scale=scale,
    )
    return torch.where(m.any(-1, keepdim=True), out, 0.0)


@given(decode_cases(dtypes=(torch.float64,)), st.data())
def test_reference_equals_dense_attention_under_the_selected_mask(case, data):
    """Two layers: the first selects (it is retrieval by SPEC 1.1), the second reads it."""
    b, hq, hkv, n, d = case.shape
    dec = R.ReferenceDecoder(case.opts)
    dec(case.q, case.k, case.v, case.mask, case.roles)
    assert dec.last_roles == (True,) * hkv, "the first layer is retrieval"
    sel = dec.sel.clone()
    gen = torch.Generator().manual_seed(case.seed + 1)
    q2 = (torch.randint(-4, 5, case.q.shape, generator=gen) / 4).double()
    out = dec(q2, case.k, case.v, case.mask, case.roles)
    scale = d**-0.5
    case.q = q2
    expect = _third_way(case, sel, case.roles, scale)
    torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-10, msg=lambda m: f"reference layer 2: {m}")


@given(decode_cases(dtypes=(torch.float64,)))
def test_all_retrieval_and_large_budget_equal_full_attention(case):
    b, hq, hkv, n, d = case.shape
    full = R.full_attention(case.q, case.k, case.v, case.mask)
    dec = R.ReferenceDecoder(case.opts)
    dec(case.q, case.k, case.v, case.mask, (True,) * hkv)
    torch.testing.assert_close(dec(case.q, case.k, case.v, case.mask, (True,) * hkv), full)
    # A budget covering every valid slot: sparse heads see everything too.
    big = type(case.opts)(budget=math.ceil(n / case.opts.block_size + 2) * case.opts.block_size + case.opts.budget,
                          block_size=case.opts.block_size, sink=case.opts.sink, recent=case.opts.recent)
    dec = R.ReferenceDecoder(big)
    dec(case.q, case.k, case.v, case.mask, case.roles)
    torch.testing.assert_close(dec(case.q, case.k, case.v, case.mask, case.roles), full)


@given(decode_cases(dtypes=(torch.float64,)), st.integers(0, 3))
def test_selection_depends_only_on_own_query_and_keys(case, head):
    b, hq, hkv, n, d = case.shape
    head %= hkv
    g = hq // hkv
    sel = R.select_blocks(case.q, case.k, case.valid, case.opts)
    q2, k2 = case.q.clone(), case.k.clone()
    others = [h for h in range(hkv) if h != head]
    for h in others:
        q2[:, h * g:(h + 1) * g] = -q2[:, h * g:(h + 1) * g] + 0.25
        k2[:, h] = k2[:, h].flip(1)
    sel2 = R.select_blocks(q2, k2, case.valid, case.opts)
    assert torch.equal(sel[:, head], sel2[:, head])


def test_first_layer_is_retrieval_and_empty_rows_give_zeros():
    from lychee_fx.options import DecodeOptions

    opts = DecodeOptions(budget=8, block_size=2, sink=0, recent=2)
    q = torch.randn(1, 2, 1, 4, dtype=torch.float64)
    k = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    dec = R.ReferenceDecoder(opts)
    full = R.full_attention(q, k, k, None)
    torch.testing.assert_close(dec(q, k, k, None, (False, False)), full)
    assert dec.last_roles == (True, True)
    nothing = torch.zeros(1, 2, 6, dtype=torch.bool)
    out = R.masked_attention(q, k, k, nothing, torch.zeros(1, 6, dtype=torch.float64), 0.5)
    assert torch.equal(out, torch.zeros_like(out))


def test_sink_logits_scale_each_head_by_its_share_of_the_denominator():
    """With a sink logit s_i, head i's output is the sinkless output times Z / (Z + e^s_i),
    Z the sum of exp(logits) over the slots it sees (an identity, computed another way);
    -inf is no sink, and a head that sees nothing still outputs zeros."""
    gen = torch.Generator().manual_seed(3)
    b, hkv, g, n, d = 2, 2, 3, 11, 8
    q = torch.randn(b, hkv * g, 1, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64)
    see = torch.rand(b, hkv, n, generator=gen) < 0.7
    see[1, 1] = False  # a KV head whose queries see nothing
    bias = torch.zeros(b, n, dtype=torch.float64)
    sinks = torch.linspace(-2.0, 3.0, hkv * g, dtype=torch.float64)
    plain = R.masked_attention(q, k, v, see, bias, 0.35)
    with_sink = R.masked_attention(q, k, v, see, bias, 0.35, sink_logits=sinks)
    logits = R.attention_logits(q, k, 0.35).masked_fill(~see[:, :, None, :], float("-inf"))  # (B, Hkv, G, N)
    lse = torch.logsumexp(logits, dim=-1).reshape(b, hkv * g, 1, 1)
    share = torch.sigmoid(lse - sinks.reshape(1, -1, 1, 1)).nan_to_num(0.0)  # Z / (Z + e^s)
    torch.testing.assert_close(with_sink, plain * share, rtol=1e-12, atol=1e-12)
    assert torch.equal(with_sink[1, g:2 * g], torch.zeros_like(with_sink[1, g:2 * g]))
    none = R.masked_attention(q, k, v, see, bias, 0.35, sink_logits=torch.full((hkv * g,), float("-inf"), dtype=torch.float64))
    torch.testing.assert_close(none, plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"sink_logits must have shape \(Hq=6,\), got \(2,\)"):
        R.masked_attention(q, k, v, see, bias, 0.35, sink_logits=sinks[:2])
