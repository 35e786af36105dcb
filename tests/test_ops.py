"""The op contracts (``torch.ops.lychee``) against the oracle, directly, on CPU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lychee_fx import ops
from lychee_fx import reference as R
from tests.strategies import assert_close_anchored, assert_selection_agrees, decode_cases, extended_cases, sdpa_lowp


def _previous_selection(case):
    """A selection as an earlier layer would leave it: the reference's, for another query."""
    gen = torch.Generator().manual_seed(case.seed + 7)
    q_prev = (torch.randint(-4, 5, case.q.shape, generator=gen) / 4).to(case.q.dtype)
    return R.select_blocks(q_prev, case.k, case.valid, case.opts)


def _scale(case) -> float:
    return case.q.shape[-1] ** -0.5 if case.scale is None else case.scale


def run_ops(case, sel_prev):
    """One layer through the two ops, assembled into (B, Hq, 1, Dv) like the pass does."""
    b, hq, hkv, n, d = case.shape
    g = hq // hkv
    o = case.opts
    ret = [h for h in range(hkv) if case.roles[h]]
    spa = [h for h in range(hkv) if not case.roles[h]]
    out = case.q.new_full((b, hq, 1, case.v.shape[-1]), float("nan"))  # unwritten rows fail
    sel_out = None
    ext = (case.softcap, case.head_bias, case.sink_logits)
    if ret:
        r, sel_out = ops.retrieval_attention(
            case.q, case.k, case.v, case.mask, sel_prev, ret, _scale(case), o.block_size, o.num_blocks, o.sink,
            o.recent, True, *ext
        )
        for i, h in enumerate(ret):
            out[:, h * g:(h + 1) * g] = r[:, i * g:(i + 1) * g]
    if spa:
        s = ops.sparse_attention(case.q, case.k, case.v, case.mask, sel_prev, spa, _scale(case), o.block_size, *ext)
        for i, h in enumerate(spa):
            out[:, h * g:(h + 1) * g] = s[:, i * g:(i + 1) * g]
    return out, sel_out


def reference_layer(case, sel_prev):
    b, hq, hkv, n, d = case.shape
    dec = R.ReferenceDecoder(case.opts)
    dec.sel, dec.filled = sel_prev.clone(), [True] * hkv
    out = dec(case.q, case.k, case.v, case.mask, case.roles, case.scale, case.softcap, case.head_bias, case.sink_logits)
    return out, dec.sel


@given(decode_cases(dtypes=(torch.float32, torch.bfloat16)))
def test_ops_equal_reference(case):
    b, hq, hkv, n, d = case.shape
    sel_prev = _previous_selection(case)
    out, sel_out = run_ops(case, sel_prev)
    ref, ref_sel = reference_layer(case, sel_prev)
    if sel_out is not None:
        assert torch.equal(sel_out, ref_sel), f"selection differs:\n{sel_out}\n{ref_sel}"
    # the independent low-precision reference: SDPA under the same token mask, in case's dtype
    valid, bias = R.valid_and_bias(case.mask, b, n)
    old = R.blocks_to_token_mask(sel_prev, n, case.opts.block_size)
    is_ret = torch.tensor(case.roles)[None, :, None]
    tm = valid[:, None, :] & (is_ret | old)
    lowp = sdpa_lowp(case.q, case.k, case.v, tm, bias, d**-0.5, case.q.dtype)
    assert_close_anchored("layer output", out, ref, lowp, floor=2e-6 if case.q.dtype == torch.float32 else 1e-2)


@given(extended_cases(dtypes=(torch.float32, torch.bfloat16), sinks=True))
def test_extended_ops_equal_reference(case):
    """A value head dim of its own, a soft-cap, a head bias, sink logits (the reference's extensions):
    the layer's output against the float64 oracle, anchored like the plain case, and the new
    selection equal to the oracle's except at ties within float32's rounding of the scores."""
    b, hq, hkv, n, d = case.shape
    sel_prev = _previous_selection(case)
    out, sel_out = run_ops(case, sel_prev)
    ref, ref_sel = reference_layer(case, sel_prev)
    valid, bias = R.valid_and_bias(case.mask, b, n)
    if sel_out is not None:
        scores = R.selection_scores(case.q, case.k, _scale(case), case.softcap, case.head_bias)
        margin = 1e-5 * (1.0 + float(scores.abs().max()))
        rows = [h for h in range(hkv) if case.roles[h]]
        assert torch.equal(sel_out[:, [h for h in range(hkv) if not case.roles[h]]],
                           sel_prev[:, [h for h in range(hkv) if not case.roles[h]]]), "sparse rows kept"
        assert_selection_agrees("selection", sel_out[:, rows], ref_sel[:, rows], scores[:, rows], valid, case.opts, margin)
    old = R.blocks_to_token_mask(sel_prev, n, case.opts.block_size)
    is_ret = torch.tensor(case.roles)[None, :, None]
    tm = valid[:, None, :] & (is_ret | old)
    lowp = _lowp_extended(case, tm, bias)
    assert_close_anchored("layer output", out, ref, lowp, floor=2e-6 if case.q.dtype == torch.float32 else 1e-2)


def _lowp_extended(case, tm, bias):
    """The layer's masked attention in float32 by plain torch (matmul, tanh, softmax): an
    independent low-precision reference for the extended cases."""
    b, hq, hkv, n, d = case.shape
    g = hq // hkv
    q, k, v = case.q.float(), case.k.float().repeat_interleave(g, 1), case.v.float().repeat_interleave(g, 1)
    x = (q @ k.transpose(-1, -2)) * _scale(case)  # (B, Hq, 1, N)
    if case.head_bias is not None:
        x = x + case.head_bias.float()[:, :, None, :]
    if case.softcap:
        x = case.softcap * torch.tanh(x / case.softcap)
    m = tm.repeat_interleave(g, 1)[:, :, None, :]
    x = torch.where(m, x + bias.float()[:, None, None, :], float("-inf"))
    if case.sink_logits is None:
        probs = torch.softmax(x, -1).nan_to_num(0.0)
    else:  # gpt-oss's spelling: the sink concatenated as a last logit, its probability dropped
        sink = case.sink_logits.float().reshape(1, hq, 1, 1).expand(b, -1, 1, 1)
        probs = torch.softmax(torch.cat([x, sink], -1), -1)[..., :-1].nan_to_num(0.0)
    out = probs @ torch.where(m.transpose(-1, -2), v, 0.0)
    return out.to(case.q.dtype)


@given(decode_cases(), st.randoms(use_true_random=False))
def test_batch_permutation_permutes_output(case, rnd):
    b, hq, hkv, n, d = case.shape
    perm = list(range(b))
    rnd.shuffle(perm)
    sel_prev = _previous_selection(case)
    out, sel = run_ops(case, sel_prev)
    p = torch.tensor(perm)
    case.q, case.k, case.v, case.valid = case.q[p], case.k[p], case.v[p], case.valid[p]
    case.mask = None if case.mask is None else case.mask[p]
    out_p, sel_p = run_ops(case, sel_prev[p])
    torch.testing.assert_close(out_p, out[p], rtol=1e-6, atol=1e-6)
    if sel is not None:
        assert torch.equal(sel_p, sel[p])


@given(decode_cases(mask_kinds=("bool", "additive")), st.integers(1, 130))
def test_empty_slots_past_the_valid_length_change_nothing(case, extra):
    """A static cache's unused slots (garbage, even NaN), and masked slots inside the valid
    range (left padding), never change the output."""
    b, hq, hkv, n, d = case.shape
    sel_prev = _previous_selection(case)
    out, sel = run_ops(case, sel_prev)
    junk = torch.full((b, hkv, extra, d), float("nan"), dtype=case.k.dtype)
    hidden = ~case.valid[:, None, :, None]  # (B, 1, N, 1): the masked slots already there
    case.k = case.k.masked_fill(hidden, float("nan"))
    case.v = case.v.masked_fill(hidden, float("nan"))
    case.k, case.v = torch.cat([case.k, junk], 2), torch.cat([case.v, junk], 2)
    fill = False if case.mask.dtype == torch.bool else torch.finfo(case.mask.dtype).min
    case.mask = torch.cat([case.mask, torch.full((b, extra), fill, dtype=case.mask.dtype)], 1)
    out2, sel2 = run_ops(case, sel_prev)
    torch.testing.assert_close(out2, out, rtol=1e-6, atol=1e-6)
    if sel is not None:
        assert torch.equal(sel2, sel)


def test_empty_selection_gives_zeros_and_opcheck():
    q = torch.randn(2, 4, 1, 16)
    k, v = torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    sel = torch.full((2, 2, 6), -1, dtype=torch.int32)
    out = ops.sparse_attention(q, k, v, None, sel, [0, 1], 0.25, 4)
    assert torch.equal(out, torch.zeros_like(out))
    mask = torch.rand(2, 40) < 0.8
    torch.library.opcheck(torch.ops.lychee.retrieval_attention.default, (q, k, v, mask, sel, [1], 0.25, 4, 6, 4, 4, True))
    torch.library.opcheck(torch.ops.lychee.retrieval_attention.default, (q, k, v, None, None, [0, 1], 0.25, 4, 6, 4, 4, False))
    sel = ops.retrieval_attention(q, k, v, mask, None, [0, 1], 0.25, 4, 6, 4, 4, True)[1]
    torch.library.opcheck(torch.ops.lychee.sparse_attention.default, (q, k, v, mask, sel, [0], 0.25, 4))
    sinks = torch.randn(q.shape[1])
    torch.library.opcheck(torch.ops.lychee.sparse_attention.default, (q, k, v, mask, sel, [0], 0.25, 4, 0.0, None, sinks))
    torch.library.opcheck(torch.ops.lychee.retrieval_attention.default,
                          (q, k, v, mask, sel, [1], 0.25, 4, 6, 4, 4, True, 0.0, None, sinks))


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(q=torch.randn(1, 4, 2, 8)), ValueError, r"one query position, got q \(1, 4, 2, 8\)"),
        (dict(k=torch.randn(1, 2, 10, 4)), ValueError, r"k of shape \(B=1, Hkv, N, D=8\) and v \(B=1, Hkv, N, Dv\), got k \(1, 2, 10, 4\)"),
        (dict(v=torch.randn(1, 2, 9, 8)), ValueError, r"and v \(B=1, Hkv, N, Dv\), got k \(1, 2, 10, 8\), v \(1, 2, 9, 8\)"),
        (dict(head_bias=torch.zeros(1, 2, 10)), ValueError, r"head_bias of shape \(B=1 or 1, Hq=4, N=10\), got \(1, 2, 10\)"),
        (dict(head_bias=torch.zeros(1, 4, 10, dtype=torch.int32)), TypeError, "head_bias must be floating"),
        (dict(softcap=-1.0), ValueError, "softcap must be 0 .none. or a finite positive float, got -1.0"),
        (dict(sink_logits=torch.zeros(2)), ValueError, r"sink_logits of shape \(Hq=4,\), got \(2,\)"),
        (dict(sink_logits=torch.zeros(4, dtype=torch.int32)), TypeError, "sink_logits must be floating"),
        (dict(q=torch.randn(1, 3, 1, 8), k=torch.randn(1, 2, 10, 8), v=torch.randn(1, 2, 10, 8)), ValueError, r"query heads \(3\) must be a multiple of KV heads \(2\)"),
        (dict(q=torch.randn(1, 4, 1, 8).double()), TypeError, "share one floating dtype"),
        (dict(heads=[1, 0]), ValueError, r"strictly ascending KV head indices in \[0, 2\), got \[1, 0\]"),
        (dict(heads=[2]), ValueError, r"in \[0, 2\), got \[2\]"),
        (dict(mask=torch.ones(1, 9, dtype=torch.bool)), ValueError, r"mask of shape \(B=1 or 1, N=10\), got \(1, 9\)"),
        (dict(mask=torch.ones(1, 10, dtype=torch.int64)), TypeError, "mask must be bool or floating"),
        (dict(sel=torch.zeros(1, 2, 4, dtype=torch.int64)), ValueError, r"sel int32 of shape \(B=1, Hkv=2, S=4\)"),
    ],
)
def test_op_input_errors(change, exc, match):
    args = dict(q=torch.randn(1, 4, 1, 8), k=torch.randn(1, 2, 10, 8), v=torch.randn(1, 2, 10, 8), mask=None,
                sel=torch.full((1, 2, 4), -1, dtype=torch.int32), heads=[0, 1], softcap=0.0, head_bias=None,
                sink_logits=None)
    args.update(change)
    if "k" in change and "v" not in change:
        args["v"] = args["k"].clone()
    with pytest.raises(exc, match=match):
        ops.sparse_attention(args["q"], args["k"], args["v"], args["mask"], args["sel"], args["heads"], 0.3, 4,
                             args["softcap"], args["head_bias"], args["sink_logits"])


@given(decode_cases(mask_kinds=("bool", "additive")))
def test_ops_without_host_reads_equal_the_cpu_shortcuts(case):
    """Off the CPU the implementation takes no data-dependent shortcut (a CUDA graph may be
    capturing it); forced onto that path here, it gives the same answer."""
    from lychee_fx import eager_ops

    sel_prev = _previous_selection(case)
    out, sel = run_ops(case, sel_prev)
    real = eager_ops._may_read_back
    eager_ops._may_read_back = lambda t: False
    try:
        out2, sel2 = run_ops(case, sel_prev)
    finally:
        eager_ops._may_read_back = real
    torch.testing.assert_close(out2, out, rtol=1e-6, atol=1e-6)
    if sel is not None:
        assert torch.equal(sel2, sel)


@given(decode_cases())
def test_sparse_op_reads_any_cache_layout(case):
    """A contiguous cache is gathered by one index_select of rows, any other layout by advanced
    indexing: the same answer, bit for bit."""
    b, hq, hkv, n, d = case.shape
    sel_prev = _previous_selection(case)
    heads = [h for h in range(hkv) if not case.roles[h]] or [hkv - 1]
    k2 = torch.cat([case.k, torch.zeros(b, hkv, n, 1, dtype=case.k.dtype)], dim=-1)[..., :d]  # row stride D + 1
    v2 = torch.cat([case.v, torch.zeros(b, hkv, n, 1, dtype=case.v.dtype)], dim=-1)[..., :d]
    assert not k2.is_contiguous() or n == 1
    o = case.opts
    a = ops.sparse_attention(case.q, case.k, case.v, case.mask, sel_prev, heads, d**-0.5, o.block_size)
    z = ops.sparse_attention(case.q, k2, v2, case.mask, sel_prev, heads, d**-0.5, o.block_size)
    torch.testing.assert_close(z, a, rtol=0, atol=0)
