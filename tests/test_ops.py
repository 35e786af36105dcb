"""The op contracts (``torch.ops.lychee``) against the oracle, directly, on CPU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lychee_fx import ops
from lychee_fx import reference as R
from tests.strategies import assert_close_anchored, decode_cases, sdpa_lowp


def _previous_selection(case):
    """A selection as an earlier layer would leave it: the reference's, for another query."""
    gen = torch.Generator().manual_seed(case.seed + 7)
    q_prev = (torch.randint(-4, 5, case.q.shape, generator=gen) / 4).to(case.q.dtype)
    return R.select_blocks(q_prev, case.k, case.valid, case.opts)


def run_ops(case, sel_prev):
    """One layer through the two ops, assembled into (B, Hq, 1, D) like the pass does."""
    b, hq, hkv, n, d = case.shape
    g = hq // hkv
    o = case.opts
    ret = [h for h in range(hkv) if case.roles[h]]
    spa = [h for h in range(hkv) if not case.roles[h]]
    out = torch.full_like(case.q, float("nan"))  # unwritten rows fail
    sel_out = None
    if ret:
        r, sel_out = ops.retrieval_attention(
            case.q, case.k, case.v, case.mask, sel_prev, ret, d**-0.5, o.block_size, o.num_blocks, o.sink, o.recent, True
        )
        for i, h in enumerate(ret):
            out[:, h * g:(h + 1) * g] = r[:, i * g:(i + 1) * g]
    if spa:
        s = ops.sparse_attention(case.q, case.k, case.v, case.mask, sel_prev, spa, d**-0.5, o.block_size)
        for i, h in enumerate(spa):
            out[:, h * g:(h + 1) * g] = s[:, i * g:(i + 1) * g]
    return out, sel_out


def reference_layer(case, sel_prev):
    b, hq, hkv, n, d = case.shape
    dec = R.ReferenceDecoder(case.opts)
    dec.sel, dec.filled = sel_prev.clone(), [True] * hkv
    out = dec(case.q, case.k, case.v, case.mask, case.roles)
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


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(q=torch.randn(1, 4, 2, 8)), ValueError, r"one query position, got q \(1, 4, 2, 8\)"),
        (dict(k=torch.randn(1, 2, 10, 4)), ValueError, r"k and v of shape \(B=1, Hkv, N, D=8\), got k \(1, 2, 10, 4\)"),
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
                sel=torch.full((1, 2, 4), -1, dtype=torch.int32), heads=[0, 1])
    args.update(change)
    if "k" in change and "v" not in change:
        args["v"] = args["k"].clone()
    with pytest.raises(exc, match=match):
        ops.sparse_attention(args["q"], args["k"], args["v"], args["mask"], args["sel"], args["heads"], 0.3, 4)


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
