"""The DuoAttention-style baseline against a plain, loop-by-head reference on a tiny random
Llama (float32): decode steps exactly as stated, prefill unchanged, all-retrieval = full
attention, the previous attention implementation restored."""

from __future__ import annotations

import pytest
import torch

from lychee_fx import HeadRoles
from lychee_fx.apps.decoding import clone_cache, decode, prefill
from lychee_fx.apps.eval_duo import DuoAttention, duo_attention, streaming_keep
from tests.tiny_models import VOCAB, hf_model

LAYERS, SINK, RECENT = 3, 5, 7


class LoopReference:
    """Decode-step attention computed head by head over an explicit list of slots: the
    first SINK and last RECENT slots for streaming heads, every slot for retrieval heads."""

    def __init__(self, roles: HeadRoles):
        self.table = roles.table

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if query.shape[2] != 1:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        b, hq, _, d = query.shape
        hkv, n = key.shape[1], key.shape[2]
        out = torch.empty_like(query)  # (B, Hq, 1, D)
        for h in range(hq):
            kv = h // (hq // hkv)
            slots = list(range(n)) if self.table[module.layer_idx, kv] else sorted(set(range(min(SINK, n))) | set(range(max(0, n - RECENT), n)))
            k, v = key[:, kv, slots], value[:, kv, slots]  # (B, S, D)
            w = torch.softmax((query[:, h] @ k.transpose(1, 2)) * (scaling or d**-0.5), dim=-1)  # (B, 1, S)
            out[:, h] = w @ v
        return out.transpose(1, 2).contiguous(), None


def _with(model, fn, name):
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def _decode_logits(model, ids, steps=4):
    """Greedy decode of ``steps`` from ids (B, T): tokens and teacher-forced nll on ids' tail."""
    cache = prefill(model, ids[:, :-steps - 1])
    first = ids[:, -steps - 1 : -steps]
    forced = decode(model, model, clone_cache(cache), first, steps, targets=ids[:, -steps:])
    greedy = decode(model, model, clone_cache(cache), first, steps)
    return greedy.tokens, forced.nll


@pytest.mark.parametrize("seed", [0, 1])
def test_duo_equals_the_loop_reference(seed):
    model, hkv = hf_model("llama", layers=LAYERS, seed=seed)
    roles = HeadRoles.random(LAYERS, hkv, count=hkv + 1, seed=seed)
    ids = torch.randint(3, VOCAB, (2, 60), generator=torch.Generator().manual_seed(seed))
    plain = _decode_logits(model, ids)
    with duo_attention(model, DuoAttention(roles, SINK, RECENT)):
        duo = _decode_logits(model, ids)
    model.set_attn_implementation(_with(model, LoopReference(roles), "test_duo_loop_ref"))
    ref = _decode_logits(model, ids)
    model.set_attn_implementation("sdpa")
    assert torch.equal(duo[0], ref[0]), "greedy tokens"
    assert torch.allclose(duo[1], ref[1], atol=1e-5, rtol=0), f"nll {duo[1]} vs {ref[1]}"
    assert not torch.allclose(duo[1], plain[1], atol=1e-4), "the streaming heads changed nothing: the test proves little"


def test_all_retrieval_is_full_attention_and_prefill_is_unchanged():
    model, hkv = hf_model("llama", layers=LAYERS)
    ids = torch.randint(3, VOCAB, (3, 50), generator=torch.Generator().manual_seed(3))
    plain = _decode_logits(model, ids)
    with torch.no_grad():
        full_logits = model(input_ids=ids).logits
    with duo_attention(model, DuoAttention(HeadRoles.all_retrieval(LAYERS, hkv), 0, 1)):
        duo = _decode_logits(model, ids)
        with torch.no_grad():
            prefill_logits = model(input_ids=ids).logits  # query length 50: ordinary SDPA
    assert torch.equal(duo[0], plain[0])
    assert torch.allclose(duo[1], plain[1], atol=1e-5, rtol=0)
    assert torch.allclose(prefill_logits, full_logits, atol=1e-5, rtol=0)
    assert model.config._attn_implementation == "sdpa"  # restored on exit


def test_streaming_keep_counts_valid_slots_only():
    valid = torch.tensor([[True, False, True, True, False, True, True, True]])  # (1, 8): 6 valid slots
    keep = streaming_keep(valid, torch.tensor([True, False]), sink=2, recent=2)  # (1, 2, 8)
    assert keep[0, 0].tolist() == valid[0].tolist()
    assert keep[0, 1].tolist() == [True, False, True, False, False, False, True, True]
    assert streaming_keep(valid, torch.tensor([False]), 10, 10)[0, 0].tolist() == valid[0].tolist()


def test_errors():
    with pytest.raises(ValueError, match="expected sink >= 0 and recent >= 1.*got sink=0, recent=0"):
        DuoAttention(HeadRoles.all_retrieval(2, 2), 0, 0)
    with pytest.raises(ValueError, match=r"expected valid \(B, N\) and retrieval \(Hkv,\), got \(8,\) and \(2,\)"):
        streaming_keep(torch.ones(8, dtype=torch.bool), torch.ones(2, dtype=torch.bool), 1, 1)
    model, _ = hf_model("llama", layers=LAYERS)
    ids = torch.randint(3, VOCAB, (1, 20))
    with duo_attention(model, DuoAttention(HeadRoles.all_retrieval(LAYERS, 3), 1, 1)):
        with pytest.raises(ValueError, match=r"expected 3 KV heads per layer, got key \(1, 2, 20, 16\)"):
            decode(model, model, prefill(model, ids[:, :-1]), ids[:, -1:], 1)


def test_masks_bool_and_additive_agree_and_a_bias_is_kept():
    """The decode-step masks attention may get: bool, additive 0 / finfo.min (the same slots),
    and additive with finite values (a bias on the slots kept)."""
    torch.manual_seed(0)
    b, hkv, g, n, d = 2, 2, 2, 30, 8
    q, k, v = torch.randn(b, hkv * g, 1, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    valid = torch.ones(b, 1, 1, n, dtype=torch.bool)
    valid[1, ..., :6] = False  # left padding of row 1
    module = type("M", (), {"layer_idx": 1})()
    duo = DuoAttention(HeadRoles([[True, True], [True, False]]), sink=3, recent=5)
    by_bool, _ = duo(module, q, k, v, valid)
    additive = torch.zeros(b, 1, 1, n).masked_fill(~valid, torch.finfo(torch.float32).min)
    assert torch.allclose(duo(module, q, k, v, additive)[0], by_bool, atol=1e-6, rtol=0)
    bias = torch.linspace(-1, 1, n)
    with_bias, _ = duo(module, q, k, v, additive + bias)
    keep = streaming_keep(valid[:, 0, 0], torch.tensor([True, False]), 3, 5).repeat_interleave(g, dim=1)  # (B, Hq, N)
    logits = (q @ torch.repeat_interleave(k, g, dim=1).transpose(-1, -2)) * d**-0.5 + bias  # (B, Hq, 1, N)
    w = torch.softmax(logits.masked_fill(~keep[:, :, None], float("-inf")), dim=-1)
    ref = (w @ torch.repeat_interleave(v, g, dim=1)).transpose(1, 2)  # (B, 1, Hq, D)
    assert torch.allclose(with_bias, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(with_bias, by_bool, atol=1e-3, rtol=0)
