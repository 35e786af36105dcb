"""The decode loop shared by demo and eval: chunked prefill, greedy and teacher-forced
steps, and the SPEC 1.3 cache correction."""

from __future__ import annotations

import pytest
import torch

import lychee_fx
from lychee_fx.apps.decoding import cache_kwarg, clone_cache, decode, pick_device, prefill
from lychee_fx.apps.shipped_roles import rotating
from tests.tiny_models import VOCAB, hf_model

LAYERS = 3


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _max_kv_diff(a, b) -> float:
    return max(max((x - y).abs().max().item() for x, y in zip(ka, kb)) for ka, kb in zip(_kv(a), _kv(b)))


def _sparse_step(model, hkv: int):
    """A compiled step that really decodes sparsely: budget 16 of a 100+ token cache."""
    be = lychee_fx.backend(rotating(LAYERS, hkv), budget=16, block_size=4, sink=4, recent=4, compiler="eager")
    return torch.compile(model, backend=be), be


def test_chunked_prefill_equals_one_call():
    model, _ = hf_model("llama", layers=LAYERS)
    ids = _ids(70)
    one = prefill(model, ids, chunk=1000)
    chunked = prefill(model, ids, chunk=16)
    assert one.get_seq_length() == chunked.get_seq_length() == 70
    assert _max_kv_diff(one, chunked) < 1e-5


def test_greedy_decode_equals_generate():
    model, _ = hf_model("llama", layers=LAYERS)
    ids = _ids(40)
    ref = model.generate(ids, max_new_tokens=8, do_sample=False)[0, 40:].tolist()
    res = decode(model, model, prefill(model, ids[:, :-1]), ids[:, -1:], 8)
    assert res.tokens.tolist() == [ref]
    assert res.nll is None and res.seconds > 0 and res.corrected == []


def test_teacher_forced_nll_equals_one_forward_pass():
    """Step i feeds token P+i and scores token P+i+1: the same numbers as one causal pass."""
    model, _ = hf_model("qwen3", layers=LAYERS)
    ids = _ids(50)
    prompt, rest = ids[:, :40], ids[:, 40:]  # decode feeds ids[39], scores ids[40:50]
    res = decode(model, model, prefill(model, prompt[:, :-1]), prompt[:, -1:], 10, targets=rest)
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)  # (50, V)
    expected = [-logp[39 + i, ids[0, 40 + i]].item() for i in range(10)]
    assert res.nll.shape == (1, 10)
    assert res.nll[0].tolist() == pytest.approx(expected, abs=1e-4)


def test_cache_correction_leaves_dense_kv_behind():
    """After k * C steps with correction every C, the cache equals a dense prefill of the
    same tokens; without correction the sparse steps leave different K/V behind."""
    model, hkv = hf_model("llama", layers=LAYERS)
    ids = _ids(120)
    base = prefill(model, ids[:, :-1])
    step, be = _sparse_step(model, hkv)
    for correct_every, expect_dense in ((4, True), (0, False)):
        cache = clone_cache(base)
        res = decode(step, model, cache, ids[:, -1:], 8, correct_every=correct_every)
        fed = torch.cat([ids, res.tokens[:, :-1]], dim=1)  # the 120 + 7 tokens the cache holds
        dense = prefill(model, fed)
        assert cache.get_seq_length() == dense.get_seq_length() == 127
        diff = _max_kv_diff(cache, dense)
        if expect_dense:
            assert res.corrected == [3, 7]
            assert diff < 1e-4, f"corrected cache differs from dense by {diff}"
        else:
            assert res.corrected == []
            assert diff > 1e-3, f"sparse decoding left dense K/V (diff {diff}): the test would prove nothing"
    assert be.report.counters["rewritten"] >= LAYERS


def test_correction_every_step_is_full_attention():
    model, hkv = hf_model("llama", layers=LAYERS)
    ids = _ids(100)
    base = prefill(model, ids[:, :-1])
    step, _ = _sparse_step(model, hkv)
    dense = decode(model, model, clone_cache(base), ids[:, -1:], 6)
    corrected = decode(step, model, clone_cache(base), ids[:, -1:], 6, correct_every=1)
    assert torch.equal(corrected.tokens, dense.tokens)
    assert corrected.corrected == list(range(6))


def test_decode_argument_errors():
    model, _ = hf_model("llama", layers=1)
    cache = prefill(model, _ids(10))
    with pytest.raises(ValueError, match=r"first of shape \(B, 1\), got \(1, 2\)"):
        decode(model, model, cache, _ids(2), 3)
    with pytest.raises(ValueError, match=r"targets of shape \(1, 3\), got \(1, 4\)"):
        decode(model, model, cache, _ids(1), 3, targets=_ids(4))
    with pytest.raises(ValueError, match="correct_every must be >= 0.*got -1"):
        decode(model, model, cache, _ids(1), 3, correct_every=-1)
    with pytest.raises(ValueError, match=r"ids of shape \(B, T\) with B, T >= 1, got \(5,\)"):
        prefill(model, torch.ones(5, dtype=torch.long))


def test_cache_kwarg_and_device():
    model, _ = hf_model("llama", layers=1)
    assert cache_kwarg(model) in ("cache", "past_key_values")
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device(None) == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


def _batched_vs_alone(step, model, ids: torch.Tensor, steps: int, **kw):
    """Decode rows of ``ids`` (B, T) as one batch and each alone: (greedy, teacher forced on
    ``ids``' own continuation) for the batch, and the same per row."""
    prompt, rest = ids[:, :-steps], ids[:, -steps:]  # (B, T - steps), (B, steps)
    cache = prefill(model, prompt[:, :-1])
    batched = (decode(step, model, clone_cache(cache), prompt[:, -1:], steps, **kw),
               decode(step, model, clone_cache(cache), prompt[:, -1:], steps, targets=rest, **kw))
    alone = []
    for r in range(ids.shape[0]):
        c = prefill(model, prompt[r : r + 1, :-1])
        alone.append((decode(step, model, clone_cache(c), prompt[r : r + 1, -1:], steps, **kw),
                      decode(step, model, clone_cache(c), prompt[r : r + 1, -1:], steps, targets=rest[r : r + 1], **kw)))
    return batched, alone


@pytest.mark.parametrize("method", ["plain", "full", "lychee"])
def test_batched_decode_equals_decoding_each_row_alone(method):
    """B rows of one length decoded together give each row's tokens exactly and its nll to
    1e-5 (float32), with and without cache correction: the eval's batching changes no result."""
    model, hkv = hf_model("llama", layers=LAYERS)
    ids = torch.randint(3, VOCAB, (4, 110), generator=torch.Generator().manual_seed(7))
    step = model
    if method != "plain":
        roles = lychee_fx.HeadRoles.all_retrieval(LAYERS, hkv) if method == "full" else rotating(LAYERS, hkv)
        be = lychee_fx.backend(roles, budget=16, block_size=4, sink=4, recent=4, compiler="eager")
        step = torch.compile(model, backend=be, dynamic=True)
    for kw in ({}, {"correct_every": 3}):
        (greedy, forced), alone = _batched_vs_alone(step, model, ids, 8, **kw)
        for r, (g, f) in enumerate(alone):
            assert greedy.tokens[r].tolist() == g.tokens[0].tolist(), f"row {r} {kw}: greedy tokens"
            assert torch.allclose(forced.nll[r], f.nll[0], atol=1e-5, rtol=0), f"row {r} {kw}: nll {forced.nll[r]} vs {f.nll[0]}"
    if method == "lychee":  # the sparse path ran and changed something, or the test proves little
        dense, _ = _batched_vs_alone(model, model, ids, 8)
        assert not torch.allclose(dense[1].nll, forced.nll, atol=1e-4)


def test_compiled_step_traces_once_for_every_length_and_batch_size():
    """``dynamic=True`` and fresh (B, 1) inputs: one graph for every KV length and batch size
    above 1 (Dynamo specialises size 1, so a batch of one adds exactly one more)."""
    model, hkv = hf_model("llama", layers=LAYERS)
    be = lychee_fx.backend(rotating(LAYERS, hkv), budget=16, block_size=4, sink=4, recent=4, compiler="eager")
    step = torch.compile(model, backend=be, dynamic=True)
    for b, t in ((4, 60), (2, 90), (3, 45)):
        ids = torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(b))
        decode(step, model, prefill(model, ids[:, :-1]), ids[:, -1:], 3)
    assert be.report.graphs == 1
    decode(step, model, prefill(model, _ids(50)[:, :-1]), _ids(50)[:, -1:], 3)
    assert be.report.graphs == 2
