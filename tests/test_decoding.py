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
    assert res.tokens == ref
    assert res.nll == [] and len(res.seconds) == 8 and res.corrected == []


def test_teacher_forced_nll_equals_one_forward_pass():
    """Step i feeds token P+i and scores token P+i+1: the same numbers as one causal pass."""
    model, _ = hf_model("qwen3", layers=LAYERS)
    ids = _ids(50)
    prompt, rest = ids[:, :40], ids[:, 40:]  # decode feeds ids[39], scores ids[40:50]
    res = decode(model, model, prefill(model, prompt[:, :-1]), prompt[:, -1:], 10, targets=rest)
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)  # (50, V)
    expected = [-logp[39 + i, ids[0, 40 + i]].item() for i in range(10)]
    assert res.nll == pytest.approx(expected, abs=1e-4)


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
        fed = torch.cat([ids, torch.tensor([res.tokens[:-1]])], dim=1)  # the 120 + 7 tokens the cache holds
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
    assert corrected.tokens == dense.tokens
    assert corrected.corrected == list(range(6))


def test_decode_argument_errors():
    model, _ = hf_model("llama", layers=1)
    cache = prefill(model, _ids(10))
    with pytest.raises(ValueError, match=r"first of shape \(1, 1\), got \(1, 2\)"):
        decode(model, model, cache, _ids(2), 3)
    with pytest.raises(ValueError, match=r"targets of shape \(1, 3\), got \(1, 4\)"):
        decode(model, model, cache, _ids(1), 3, targets=_ids(4))
    with pytest.raises(ValueError, match="correct_every must be >= 0.*got -1"):
        decode(model, model, cache, _ids(1), 3, correct_every=-1)
    with pytest.raises(ValueError, match=r"ids of shape \(1, T\), got \(2, 5\)"):
        prefill(model, torch.ones(2, 5, dtype=torch.long))


def test_cache_kwarg_and_device():
    model, _ = hf_model("llama", layers=1)
    assert cache_kwarg(model) in ("cache", "past_key_values")
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device(None) == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")
