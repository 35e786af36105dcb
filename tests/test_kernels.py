"""The Triton kernels against the oracle, launched directly.

On a machine without a GPU they run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
conftest), over small shapes; with a GPU the same properties run there. Every buffer the
launchers allocate is poisoned first (NaN, or -7 for integers), so an element a kernel forgets
to write fails the comparison.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from lychee_fx import reference as R  # noqa: E402
from lychee_fx.codegen import launch, select_kernel  # noqa: E402
from lychee_fx.options import DecodeOptions  # noqa: E402
from tests.strategies import (  # noqa: E402
    alibi_bias,
    assert_close_anchored,
    assert_selection_agrees,
    decode_problem,
    exact_values,
    low_precision_problem,
    make_valid,
    sdpa_lowp,
    selection_error_bound,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    def poisoned(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan") if dtype.is_floating_point else -7)

    monkeypatch.setattr(launch, "_alloc", poisoned)
    # one config per kernel: the suite checks numbers; tuning is the benchmark's business
    monkeypatch.setattr(launch, "_configs", lambda bs, d, e, dv=None: [launch.triton.Config({"BLOCK_N": max(64, bs)}, num_warps=4, num_stages=2)])
    launch._tuned.cache_clear()
    yield
    launch._tuned.cache_clear()


@st.composite
def kernel_cases(draw):
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 3))
    g = draw(st.integers(1, 4))
    d = draw(st.sampled_from([16, 32, 64, 24]))
    bs = draw(st.sampled_from([1, 16, 64]))
    n = draw(st.integers(1, 200 if bs > 1 else 140))
    sink = draw(st.integers(0, 2 * bs if bs > 1 else 6))
    recent = draw(st.integers(1, 2 * bs if bs > 1 else 8))
    floor = math.ceil(sink / bs) + math.ceil(recent / bs) + 2
    s = draw(st.integers(floor, floor + 6))
    opts = DecodeOptions(budget=s * bs, block_size=bs, sink=sink, recent=recent)
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    kind = draw(st.sampled_from(["none", "bool", "additive"]))
    pattern = "full" if kind == "none" else draw(st.sampled_from(["static", "holes", "left", "full"]))
    heads = sorted(draw(st.sets(st.integers(0, hkv - 1), min_size=1)))
    seed = draw(st.integers(0, 2**31 - 1))
    mult = max(16, bs)
    split = draw(st.sampled_from([None, mult, 2 * mult]))
    q, k, v, valid, mask = decode_problem(seed, b, hkv, g, n, d, dtype, pattern, kind)
    if mask is not None and draw(st.booleans()) and b > 1 and kind == "bool":
        valid[:] = valid[:1]
        mask = mask[:1].clone()  # one row for the whole batch (broadcast)
    return dict(q=q, k=k, v=v, valid=valid, mask=mask, opts=opts, heads=heads, split=split, seed=seed)


@st.composite
def extended_kernel_cases(draw):
    """``kernel_cases`` with the reference's extensions: a value head dim of its own (also one
    that is not a power of 2), a soft-cap, a head bias (ALiBi, exact random, broadcast over
    the batch), a power-of-2 scale; at least one of them."""
    c = draw(kernel_cases())
    b, hq, _, d = c["q"].shape
    hkv, n = c["k"].shape[1], c["k"].shape[2]
    gen = torch.Generator().manual_seed(c["seed"] + 3)
    dv = draw(st.sampled_from([d, 8, 24, 40]))
    if dv != d:
        c["v"] = torch.randn(b, hkv, n, dv, generator=gen).to(c["q"].dtype)
    c["softcap"] = draw(st.sampled_from([0.0, 0.0, 0.5, 2.0, 30.0]))
    kind = draw(st.sampled_from(["none", "alibi", "random", "broadcast"]))
    c["head_bias"] = {"none": None, "alibi": lambda: alibi_bias(b, hq, c["valid"].expand(b, n), c["q"].dtype),
                      "random": lambda: exact_values(gen, (b, hq, n), c["q"].dtype) * 2,
                      "broadcast": lambda: exact_values(gen, (1, hq, n), c["q"].dtype)}[kind]
    c["head_bias"] = c["head_bias"]() if c["head_bias"] else None
    c["scale"] = draw(st.sampled_from([0.25, 0.125, 1.0]))
    if dv == d and not c["softcap"] and c["head_bias"] is None:
        c["softcap"] = 1.0
    return c


def _lowp(c, token_mask, bias):
    """Masked attention with the extensions by plain torch in the case's dtype, float32 logits:
    the independent low-precision reference. token_mask (B, Hkv, N), bias (B, N) float64."""
    q, k, v = c["q"], c["k"], c["v"]
    g = q.shape[1] // k.shape[1]
    kk, vv = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    x = (q.float() @ kk.transpose(-1, -2)) * c["scale"]  # (B, Hq, 1, N)
    if c["head_bias"] is not None:
        x = x + c["head_bias"].float()[:, :, None, :]
    if c["softcap"]:
        x = c["softcap"] * torch.tanh(x / c["softcap"])
    m = token_mask.repeat_interleave(g, 1)[:, :, None, :]
    x = torch.where(m, x + bias.float()[:, None, None, :], float("-inf"))
    out = torch.softmax(x, -1).nan_to_num(0.0) @ torch.where(m.transpose(-1, -2), vv, 0.0)
    return out.to(q.dtype)


def _dev(c):
    """The case on DEVICE, with NaN in K and V wherever the mask says invalid: [Note: invalid
    slots are never read] in attention_kernels (the references get the clean tensors)."""
    d = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    b, _, n, _ = c["k"].shape
    invalid = ~c["valid"].expand(b, n)[:, None, :, None].to(DEVICE)
    d["k"], d["v"] = (x.masked_fill(invalid, float("nan")) for x in (d["k"], d["v"]))
    return d


@settings(max_examples=15)
@given(kernel_cases())
def test_retrieval_kernel_equals_reference(c):
    o = c["opts"]
    d = _dev(c)
    b, hq, _, hd = c["q"].shape
    hkv, n = c["k"].shape[1], c["k"].shape[2]
    g = hq // hkv
    prev = torch.full((b, hkv, o.num_blocks), -1, dtype=torch.int32)
    prev[:, :, 0] = 0
    out, sel = launch.retrieval_attention(d["q"], d["k"], d["v"], d["mask"], prev.to(DEVICE), c["heads"], hd**-0.5,
                                          o.block_size, o.num_blocks, o.sink, o.recent, True, split_size=c["split"])
    ref_sel = R.select_blocks(c["q"], c["k"], c["valid"].expand(b, n), o)
    expect_sel = prev.clone()
    expect_sel[:, c["heads"]] = ref_sel[:, c["heads"]]
    assert torch.equal(sel.cpu(), expect_sel), f"selection:\n{sel.cpu()}\nexpected:\n{expect_sel}"
    full = R.full_attention(c["q"], c["k"], c["v"], c["mask"])  # (B, Hq, 1, D) float64
    rows = [h * g + i for h in c["heads"] for i in range(g)]
    valid, bias = R.valid_and_bias(c["mask"], b, n)
    lowp = sdpa_lowp(c["q"], c["k"], c["v"], valid[:, None, :].expand(b, hkv, n), bias, hd**-0.5, c["q"].dtype)
    floor = 2e-6 if c["q"].dtype == torch.float32 else 1e-2
    assert_close_anchored("retrieval out", out.cpu(), full[:, rows], lowp[:, rows], floor=floor)


@settings(max_examples=15)
@given(kernel_cases())
def test_sparse_kernel_equals_reference(c):
    o = c["opts"]
    d = _dev(c)
    b, hq, _, hd = c["q"].shape
    hkv, n = c["k"].shape[1], c["k"].shape[2]
    g = hq // hkv
    gen = torch.Generator().manual_seed(c["seed"] + 1)
    q_prev = exact_values(gen, c["q"].shape, c["q"].dtype)
    sel = R.select_blocks(q_prev, c["k"], c["valid"].expand(b, n), o)  # an earlier layer's pick
    out = launch.sparse_attention(d["q"], d["k"], d["v"], d["mask"], sel.to(DEVICE), c["heads"], hd**-0.5,
                                  o.block_size, split_size=c["split"])
    valid, bias = R.valid_and_bias(c["mask"], b, n)
    tm = R.blocks_to_token_mask(sel, n, o.block_size) & valid[:, None, :]
    ref = R.masked_attention(c["q"], c["k"], c["v"], tm, bias, hd**-0.5)
    rows = [h * g + i for h in c["heads"] for i in range(g)]
    lowp = sdpa_lowp(c["q"], c["k"], c["v"], tm, bias, hd**-0.5, c["q"].dtype)
    floor = 2e-6 if c["q"].dtype == torch.float32 else 1e-2
    assert_close_anchored("sparse out", out.cpu(), ref[:, rows], lowp[:, rows], floor=floor)


@settings(max_examples=15)
@given(extended_kernel_cases())
def test_kernels_with_extensions_equal_reference(c):
    """Both split kernels with a value head dim of their own, a soft-cap and a head bias
    ([Note: logit extensions]) against the float64 oracle: outputs anchored as in the plain
    tests, the selection equal except at ties within float32's rounding of the scores."""
    o = c["opts"]
    d = _dev(c)
    b, hq, _, hd = c["q"].shape
    hkv, n = c["k"].shape[1], c["k"].shape[2]
    g = hq // hkv
    ext = dict(softcap=c["softcap"], head_bias=None if c["head_bias"] is None else c["head_bias"].to(DEVICE))
    ref_ext = dict(softcap=c["softcap"], head_bias=c["head_bias"])
    valid_bn = c["valid"].expand(b, n)
    out, sel = launch.retrieval_attention(d["q"], d["k"], d["v"], d["mask"], None, c["heads"], c["scale"],
                                          o.block_size, o.num_blocks, o.sink, o.recent, True, split_size=c["split"], **ext)
    ref_sel = R.select_blocks(c["q"], c["k"], valid_bn, o, scale=c["scale"], **ref_ext)
    scores = R.selection_scores(c["q"], c["k"], c["scale"], **ref_ext)
    margin = 1e-5 * (1.0 + float(scores.abs().max()))
    heads = c["heads"]
    assert (sel.cpu()[:, [h for h in range(hkv) if h not in heads]] == -1).all(), "rows of other heads stay empty"
    assert_selection_agrees("selection", sel.cpu()[:, heads], ref_sel[:, heads], scores[:, heads], valid_bn, o, margin)
    rows = [h * g + i for h in heads for i in range(g)]
    valid, bias = R.valid_and_bias(c["mask"], b, n)
    full = R.full_attention(c["q"], c["k"], c["v"], c["mask"], c["scale"], **ref_ext)
    floor = 2e-6 if c["q"].dtype == torch.float32 else 1e-2
    lowp = _lowp(c, valid[:, None, :].expand(b, hkv, n), bias)
    assert_close_anchored("retrieval out", out.cpu(), full[:, rows], lowp[:, rows], floor=floor)
    sp = launch.sparse_attention(d["q"], d["k"], d["v"], d["mask"], ref_sel.to(DEVICE), heads, c["scale"], o.block_size,
                                 split_size=c["split"], **ext)
    tm = R.blocks_to_token_mask(ref_sel, n, o.block_size) & valid[:, None, :]
    ref = R.masked_attention(c["q"], c["k"], c["v"], tm, bias, c["scale"], **ref_ext)
    assert_close_anchored("sparse out", sp.cpu(), ref[:, rows], _lowp(c, tm, bias)[:, rows], floor=floor)


@pytest.mark.parametrize("normed", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d, g", [(64, 1), (128, 7), (256, 4), (256, 12)])
def test_low_precision_selection_equals_the_float64_selection(d, g, dtype, normed):
    """[Note: selection precision] bfloat16 / float16 q and k of normal (not exact) values,
    plain or RMS-normed (Gemma 3's q/k norms): the kernel's selection equals the float64
    selection of the same inputs except where block scores tie within the float32 accumulation
    bound (``selection_error_bound``). Here in the interpreter, whose float32 dots of exact
    products are the GPU's arithmetic up to the order of the sums; tests/test_gpu.py runs the
    tensor-core path at every head dim 64/128/256 and group size 1-12."""
    b, hkv, n = 2, 2, 300
    q, k = low_precision_problem(d * 31 + g, b, hkv, g, n, d, dtype, normed)
    valid = make_valid(torch.Generator().manual_seed(g), b, n, "static")
    opts = DecodeOptions(budget=8 * 16, block_size=16, sink=16, recent=16)
    v = torch.zeros_like(k)
    _, sel = launch.retrieval_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), valid.to(DEVICE), None,
                                        list(range(hkv)), d**-0.5, 16, opts.num_blocks, opts.sink, opts.recent, True)
    ref = R.select_blocks(q, k, valid, opts)
    scores = R.selection_scores(q, k)
    assert_selection_agrees(f"{dtype} D={d} G={g}", sel.cpu(), ref, scores, valid, opts, selection_error_bound(q, k))


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["gemma3_head256_qk_norm", "qwen2_group7"])
def test_bf16_decode_launches_replayed_through_the_kernels(shape, monkeypatch):
    """The CPU twin of test_gpu's bf16 decode check: a short bfloat16 decode of the two shapes
    that differed on the H200 (head dim 256 with q/k norms, group size 7) records every op
    call, and each is replayed through the kernels in the interpreter and compared with the
    oracle fed the same inputs (tests/kernel_checks.py)."""
    if DEVICE == "cuda":
        pytest.skip("test_gpu runs the launches themselves")
    from lychee_fx import eager_ops
    from tests.kernel_checks import check_recorded_calls, decode_tiny, record_calls

    calls = record_calls(monkeypatch, eager_ops, ("retrieval_attention", "sparse_attention"))
    decode_tiny(shape, "cpu", prompt=160, steps=2)
    check_recorded_calls(shape, calls, launch=launch)


def test_the_selection_margin_catches_scores_rounded_to_bfloat16():
    """The tie margin is tight enough to fail a selection made from scores that were rounded
    to bfloat16 (what [Note: selection precision] rules out): the test above can fail."""
    b, hkv, g, n, d = 1, 4, 2, 2000, 64
    q, k = low_precision_problem(7, b, hkv, g, n, d, torch.bfloat16, normed=True)
    valid = torch.ones(b, n, dtype=torch.bool)
    opts = DecodeOptions(budget=64, block_size=1, sink=4, recent=4)
    scores = R.selection_scores(q, k)  # (B, Hkv, N) float64
    ref = R.select_from_scores(scores, valid, opts)
    rounded = R.select_from_scores(scores.to(torch.bfloat16).double(), valid, opts)
    with pytest.raises(AssertionError, match="threshold"):
        assert_selection_agrees("bf16 scores", rounded, ref, scores, valid, opts, selection_error_bound(q, k))


def test_budget_covering_the_cache_and_fully_masked_blocks():
    """budget >= N: every block with a valid slot is selected; a block of invalid slots never."""
    gen = torch.Generator().manual_seed(5)
    b, hkv, g, n, hd, bs = 1, 2, 2, 96, 32, 16
    q = exact_values(gen, (b, hkv * g, 1, hd), torch.float32)
    k = exact_values(gen, (b, hkv, n, hd), torch.float32)
    v = torch.randn(b, hkv, n, hd, generator=gen)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[:, 16:48] = False  # blocks 1 and 2 hold no valid slot
    opts = DecodeOptions(budget=8 * bs, block_size=bs, sink=bs, recent=bs)
    out, sel = launch.retrieval_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), valid.to(DEVICE), None, [0, 1],
                                          hd**-0.5, bs, opts.num_blocks, opts.sink, opts.recent, True)
    assert sel.cpu().tolist() == [[[0, 3, 4, 5, -1, -1, -1, -1]] * 2]
    sp = launch.sparse_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), valid.to(DEVICE), sel, [0, 1], hd**-0.5, bs)
    torch.testing.assert_close(sp.cpu(), out.cpu(), rtol=1e-5, atol=1e-5)


def test_every_split_config_computes_the_same_and_a_misfit_is_refused():
    """A fixed ``split_config`` (what bench_split sweeps) changes only the tiling: same selection,
    same output as the default; one whose tiles cannot hold a block is refused by name."""
    gen = torch.Generator().manual_seed(11)
    b, hkv, g, n, hd, bs = 2, 2, 2, 300, 32, 64
    q = exact_values(gen, (b, hkv * g, 1, hd), torch.float32).to(DEVICE)
    k = exact_values(gen, (b, hkv, n, hd), torch.float32).to(DEVICE)
    v = torch.randn(b, hkv, n, hd, generator=gen).to(DEVICE)
    opts = DecodeOptions(budget=4 * bs, block_size=bs, sink=bs, recent=bs)
    args = (q, k, v, None, None, [1], hd**-0.5, bs, opts.num_blocks, opts.sink, opts.recent, True)
    out, sel = launch.retrieval_attention(*args, split_size=128)
    sel_prev = torch.zeros(b, hkv, opts.num_blocks, dtype=torch.int32, device=DEVICE)
    sel_prev[:, :] = sel[:, 1:2]
    sp = launch.sparse_attention(q, k, v, None, sel_prev, [0], hd**-0.5, bs, split_size=128)
    configs = launch.split_configs(bs, hd, 4)
    assert {c.block_n for c in configs} == {64, 128}
    for cfg in configs:
        out_c, sel_c = launch.retrieval_attention(*args, split_size=128, split_config=cfg)
        assert torch.equal(sel_c, sel), cfg
        torch.testing.assert_close(out_c, out, rtol=1e-6, atol=1e-6)
        sp_c = launch.sparse_attention(q, k, v, None, sel_prev, [0], hd**-0.5, bs, split_size=128, split_config=cfg)
        torch.testing.assert_close(sp_c, sp, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"does not fit block_size=128.*expected one of"):
        launch.retrieval_attention(q, k, v, None, None, [1], hd**-0.5, 128, 2, 0, 128, True,
                                   split_config=launch.SplitConfig(64, 4, 2))


def test_a_pinned_split_config_is_what_launches(monkeypatch):
    """``launch.SPLIT_CONFIG`` pins a kernel's config for every call that passes none (compiled
    graphs pass none); the other kernel keeps its default, and a call's own config wins."""
    pinned = launch.SplitConfig(128, 8, 2)
    sparse_default = launch._split_kernel("sparse", 64, 32, 4)  # its default on a GPU, a fixed tile interpreted
    monkeypatch.setattr(launch, "SPLIT_CONFIG", launch.SplitConfigs(retrieval=pinned))
    assert launch._split_kernel("retrieval", 64, 32, 4)[1] == {"BLOCK_N": 128, "num_warps": 8, "num_stages": 2}
    assert launch._split_kernel("sparse", 64, 32, 4) == sparse_default
    own = launch.SplitConfig(64, 4, 3)
    assert launch._split_kernel("retrieval", 64, 32, 4, own)[1] == {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def test_a_pinned_select_config_is_what_launches(monkeypatch):
    """``launch.SELECT_CONFIG`` is read per call (it was bound as a default argument once, so a
    process that pinned another config kept launching the old one)."""
    pinned = launch.SelectConfig(digit_bits=4, wide_keys=True, early_exit=not launch.SELECT_CONFIG.early_exit)
    monkeypatch.setattr(launch, "SELECT_CONFIG", pinned)
    constants = launch.reduce_constants(4, 128, 64, True, 2049)
    assert (constants["DIGIT_BITS"], constants["WIDE_KEYS"], constants["EARLY_EXIT"]) == (4, True, pinned.early_exit)


def test_supports_names_what_falls_back():
    q = torch.randn(1, 4, 1, 32, device=DEVICE)  # a device the kernels run on (or interpret)
    k = torch.randn(1, 2, 8, 32, device=DEVICE)
    assert launch.supports(q.double(), k.double(), 16) == "dtype torch.float64"
    assert "block_size 48" in launch.supports(q, k, 48)
    assert "block_size 256" in launch.supports(q, k, 256)
    wide_q, wide_k = torch.randn(1, 4, 1, 256, device=DEVICE), torch.randn(1, 2, 8, 256, device=DEVICE)
    assert "head dim 256 of torch.float32 at block_size 16: no split tile" in launch.supports(wide_q, wide_k, 16)
    assert launch.supports(wide_q.bfloat16(), wide_k.bfloat16(), 64) is None
    assert "no split tile" in launch.supports(wide_q.bfloat16(), wide_k.bfloat16(), 128)


def test_split_kernels_launch_their_default_config_where_it_fits(monkeypatch):
    """On a GPU a split kernel launches with ``DEFAULT_SPLIT_CONFIG`` (launch [Note: split
    defaults]); where that does not fit, with the autotuner over the configs that do."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    for name, base in (("retrieval", launch.retrieval_split_kernel), ("sparse", launch.sparse_split_kernel)):
        cfg = getattr(launch.DEFAULT_SPLIT_CONFIG, name)
        assert launch._split_kernel(name, 64, 128, 2) == (
            base, {"BLOCK_N": cfg.block_n, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    kernel, extra = launch._split_kernel("retrieval", 64, 128, 4)  # float32: 64 x 3 stages is 192 KiB
    assert extra == {} and isinstance(kernel, launch.triton.runtime.Autotuner)


@pytest.mark.parametrize("values", ["exact", "normal"])
@pytest.mark.parametrize("early_exit", [False, True])
@pytest.mark.parametrize("wide_keys", [True, False])
@pytest.mark.parametrize("digit_bits", [1, 2, 4])
@pytest.mark.parametrize("n", [30, 60, 300])
def test_selection_in_registers_and_in_chunks(n, digit_bits, wide_keys, early_exit, values):
    """Rows within the selection tile (half full and full) and token-level rows longer than it
    (the chunked path) all agree with the oracle (the interpreter's tile is 64 blocks, the
    GPU's up to 4096), at every radix digit width, with either key width, with and without the
    early exit; "exact" values tie often (every digit runs), "normal" ones hardly ever (the
    early exit stops the search: ``test_early_exit_stops_on_untied_scores``)."""
    if values == "normal" and not early_exit:
        pytest.skip("the full search is value-blind: 'exact' values cover it")
    gen = torch.Generator().manual_seed(n)
    b, hkv, g, hd = 2, 2, 2, 16
    if DEVICE == "cuda":
        n *= 100
    draw = exact_values if values == "exact" else (lambda gen, shape, dtype: torch.randn(shape, generator=gen, dtype=dtype))
    q = draw(gen, (b, hkv * g, 1, hd), torch.float32)
    k = draw(gen, (b, hkv, n, hd), torch.float32)
    valid = make_valid(gen, b, n, "holes")
    opts = DecodeOptions(budget=24, block_size=1, sink=4, recent=6)
    out, sel = launch.retrieval_attention(q.to(DEVICE), k.to(DEVICE), k.to(DEVICE), valid.to(DEVICE), None, [0, 1],
                                          hd**-0.5, 1, opts.num_blocks, opts.sink, opts.recent, True, split_size=16,
                                          select_config=launch.SelectConfig(digit_bits=digit_bits, wide_keys=wide_keys,
                                                                            early_exit=early_exit))
    assert torch.equal(sel.cpu(), R.select_blocks(q, k, valid, opts))
    # ... and a merge of more splits than it loads at once
    torch.testing.assert_close(out.cpu().double(), R.full_attention(q, k, k, valid), rtol=1e-5, atol=1e-5)


@triton.jit
def _threshold_kernel(SCORES, OUT, k, N: tl.constexpr, EARLY_EXIT: tl.constexpr):
    key = select_kernel._keys(tl.load(SCORES + tl.arange(0, N)), False)
    cand = tl.full([N], 1, tl.int1)
    thr = select_kernel._threshold(key, cand, k, SCORES, SCORES, 0, 0, N, 0, 0, 0, N, 2, False, EARLY_EXIT, True)
    tl.store(OUT, thr.to(tl.int64))


def _threshold_of(scores: torch.Tensor, k: int, early_exit: bool) -> int:
    """select_kernel's radix threshold over one row of float32 scores (all candidates), as a key."""
    out = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    _threshold_kernel[(1,)](scores.to(DEVICE), out, k, N=scores.numel(), EARLY_EXIT=early_exit)
    return int(out.item())


def _keys(scores: torch.Tensor) -> torch.Tensor:
    """select_kernel [Note: keys] in torch, as int64."""
    bits = scores.view(torch.int32).long() & 0xFFFFFFFF
    return torch.where(bits >= 2**31, 2**32 - 1 - bits, bits | 2**31)


def test_early_exit_stops_on_untied_scores():
    """[Note: early exit]: on untied scores the search stops with exactly k keys at or above its
    threshold, before it reaches the k-th largest key (low bits still clear); the full search
    returns that key; with ties at the k-th score both return it."""
    k = 24
    untied = torch.randn(256, generator=torch.Generator().manual_seed(0))
    keys = _keys(untied)
    kth = int(keys.sort(descending=True).values[k - 1])
    assert _threshold_of(untied, k, early_exit=False) == kth
    thr = _threshold_of(untied, k, early_exit=True)
    assert int((keys >= thr).sum()) == k and thr < kth
    tied = torch.cat([torch.full((40,), 2.0), torch.randn(216, generator=torch.Generator().manual_seed(1)) - 10])
    assert _threshold_of(tied, k, early_exit=True) == _threshold_of(tied, k, early_exit=False) == int(_keys(tied)[0])


def test_selection_alone_selects_the_same_blocks():
    """``merge=False`` (benchmarks time selection with it) launches only the selection programs:
    the same selection row; without selection there is nothing to launch."""
    gen = torch.Generator().manual_seed(3)
    q = exact_values(gen, (2, 4, 1, 16), torch.float32).to(DEVICE)
    k = exact_values(gen, (2, 2, 300, 16), torch.float32).to(DEVICE)
    args = (q, k, k, None, None, [0, 1], 0.25, 16, 8, 16, 32)
    _, sel = launch.retrieval_plan(*args, True).run()
    _, alone = launch.retrieval_plan(*args, True, merge=False).run()
    assert torch.equal(alone, sel)
    with pytest.raises(ValueError, match="select=True"):
        launch.retrieval_plan(*args, False, merge=False)


@settings(max_examples=15)
@given(kernel_cases(), st.booleans(), st.booleans())
def test_hybrid_kernels_equal_reference(c, select, extended):
    """A layer's retrieval and sparse heads in one launch pair ([Note: pooled layers]) against
    the oracle: the retrieval heads' rows are full attention and (``select``) their new
    selection rows, the sparse heads' rows attend over the blocks the layer was given."""
    from hypothesis import assume

    o = c["opts"]
    b, hq, _, hd = c["q"].shape
    hkv, n = c["k"].shape[1], c["k"].shape[2]
    assume(hkv >= 2)
    ret = c["heads"] if len(c["heads"]) < hkv else c["heads"][:-1]
    spa = [h for h in range(hkv) if h not in ret]
    g = hq // hkv
    scale, softcap = hd**-0.5, 0.0
    if extended:
        scale, softcap = 0.25, 2.0
    d = _dev(c)
    valid_bn = c["valid"].expand(b, n)
    gen = torch.Generator().manual_seed(c["seed"] + 1)
    q_prev = exact_values(gen, c["q"].shape, c["q"].dtype)
    prev = R.select_blocks(q_prev, c["k"], valid_bn, o)  # an earlier layer's pick, every head
    out, sel = launch.hybrid_attention(d["q"], d["k"], d["v"], d["mask"], prev.to(DEVICE), ret, spa, scale,
                                       o.block_size, o.num_blocks, o.sink, o.recent, select, softcap)
    ext = dict(softcap=softcap)
    expect_sel = prev.clone()
    if select:
        ref_sel = R.select_blocks(c["q"], c["k"], valid_bn, o, scale=scale, **ext)
        scores = R.selection_scores(c["q"], c["k"], scale, **ext)
        margin = 1e-5 * (1.0 + float(scores.abs().max()))
        assert_selection_agrees("selection", sel.cpu()[:, ret], ref_sel[:, ret], scores[:, ret], valid_bn, o, margin)
        expect_sel[:, ret] = sel.cpu()[:, ret]
    assert torch.equal(sel.cpu(), expect_sel), "the sparse heads' rows are the given selection's"
    valid, bias = R.valid_and_bias(c["mask"], b, n)
    floor = 2e-6 if c["q"].dtype == torch.float32 else 1e-2
    rows_r = [h * g + i for h in ret for i in range(g)]
    rows_s = [h * g + i for h in spa for i in range(g)]
    c2 = dict(c, scale=scale, softcap=softcap, head_bias=None)
    full = R.full_attention(c["q"], c["k"], c["v"], c["mask"], scale, **ext)
    lowp = _lowp(c2, valid[:, None, :].expand(b, hkv, n), bias)
    assert_close_anchored("retrieval rows", out.cpu()[:, :len(rows_r)], full[:, rows_r], lowp[:, rows_r], floor=floor)
    tm = R.blocks_to_token_mask(prev, n, o.block_size) & valid[:, None, :]
    ref = R.masked_attention(c["q"], c["k"], c["v"], tm, bias, scale, **ext)
    assert_close_anchored("sparse rows", out.cpu()[:, len(rows_r):], ref[:, rows_s], _lowp(c2, tm, bias)[:, rows_s],
                          floor=floor)



@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU test_gpu checks this through Inductor itself")
def test_mutation_analysis_names_only_outputs_and_workspaces():
    """Inductor's mutation analysis of every split/reduce kernel (attention_kernels [Note: store
    pointers]) on the kernels' TTIR for an sm_90 target, in a process without Triton's
    interpreter (``tests/mutation_check.py``): it must name the buffers a kernel writes and no
    input the caller owns (q, k, v, the mask, the selection, the heads). test_gpu checks the
    same through a compiled graph."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-m", "tests.mutation_check"], env=env, capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if run.returncode == 3:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stderr[-3000:]
    seen = {k: set(v) for k, v in json.loads(run.stdout.strip().splitlines()[-1]).items()}
    partials = {"PART_O", "PART_M", "PART_L"}
    pooled = {f"{p}_{part}" for p in partials for part in "RS"}
    scores = {"BLK_SCORE", "BLK_CNT"}
    assert seen == {
        "hybrid_split_kernel": pooled | scores,
        "hybrid_reduce_kernel": {"OUT", "SEL_OUT"} | scores,  # the selection's store addresses derive from scores
        "retrieval_split_kernel": partials | scores,
        "retrieval_reduce_kernel": {"OUT", "SEL_OUT"} | scores,
        "sparse_split_kernel": partials,
        "merge_kernel": {"OUT"},
    }, seen
