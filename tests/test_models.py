"""Whole models: tiny random HF decoders and two hand-written ones, decoded through the backend.

- all heads retrieval: the same tokens and logits (fp32, 1e-5) as the uncompiled model;
- a sparse map with a budget under the context: the same as an eager decode whose attention
  is ``lychee_fx.reference`` (float64, so no near-tie in a block score can flip);
- the pass finds one site per layer; prefill is declined; dynamic and static caches; batch 2
  with left padding.
"""

from __future__ import annotations

import pytest
import torch

import lychee_fx
from lychee_fx import HeadRoles
from tests.tiny_models import (
    HF_SPECS,
    TinyDecoder,
    VOCAB,
    hf_model,
    reference_attention,
    register_hf_reference,
    tiny_generate,
)

pytestmark = pytest.mark.slow
LAYERS = 3
PROMPT = 56
STEPS = 8
SPARSE_OPTS = dict(budget=24, block_size=4, sink=4, recent=8)


def _prompt(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, PROMPT), generator=g)
    am = torch.ones(batch, PROMPT, dtype=torch.long)
    if batch > 1:
        am[0, :9] = 0  # left padding
    return ids, am


def _generate(model, ids, am, cache):
    out = model.generate(
        ids, attention_mask=am, max_new_tokens=STEPS, do_sample=False, cache_implementation=cache,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )
    return out.sequences, torch.stack(out.logits)


def _decode_sites(report):
    return [s for s in report.sites if s.query_len == "1"]


@pytest.mark.parametrize("name", list(HF_SPECS))
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_hf_all_retrieval_equals_eager(name, cache):
    model, hkv = hf_model(name, layers=LAYERS)
    ids, am = _prompt()
    seq_ref, logits_ref = _generate(model, ids, am, cache)
    be = lychee_fx.backend(HeadRoles.all_retrieval(LAYERS, hkv), **SPARSE_OPTS, compiler="eager")
    model.compile(backend=be)
    seq, logits = _generate(model, ids, am, cache)
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    decode = _decode_sites(be.report)
    assert decode and all(s.status == "rewritten" for s in decode), be.report.summary()
    graphs = {s.graph for s in decode}
    assert all(sorted(s.layer for s in decode if s.graph == g) == list(range(LAYERS)) for g in graphs)
    prefill = [s for s in be.report.sites if s.query_len != "1"]
    assert all(s.status == "declined" and "prefill" in s.reason for s in prefill)


@pytest.mark.parametrize("name", ["llama", "qwen3", "phi3", "gpt2"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_hf_sparse_map_equals_reference_decode(name, cache):
    model, hkv = hf_model(name, layers=LAYERS, dtype=torch.float64)
    roles = HeadRoles.first_k(LAYERS, hkv, 1)
    opts = lychee_fx.DecodeOptions(**SPARSE_OPTS)
    ids, am = _prompt()
    impl = register_hf_reference(roles, opts)
    model.set_attn_implementation(impl)
    seq_ref, logits_ref = _generate(model, ids, am, cache)
    model.set_attn_implementation("sdpa")
    seq_full, _ = _generate(model, ids, am, cache)
    be = lychee_fx.backend(roles, **SPARSE_OPTS, compiler="eager")
    model.compile(backend=be)
    seq, logits = _generate(model, ids, am, cache)
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-9, atol=1e-9)
    assert any(s.sparse_heads for s in be.report.rewritten), be.report.summary()
    del seq_full  # sparse decoding may or may not change greedy tokens at this size


def _tiny_pair(manual, roles, opts):
    model = TinyDecoder(layers=LAYERS, manual=manual).double().eval()
    ref = TinyDecoder(layers=LAYERS, manual=manual, attention=reference_attention(roles, opts)).double().eval()
    ref.load_state_dict(model.state_dict())
    return model, ref


@pytest.mark.parametrize("manual", [False, True], ids=["nanogpt-sdpa", "manual-softmax"])
def test_hand_written_models(manual):
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, VOCAB, (2, PROMPT), generator=g)
    valid = torch.ones(2, PROMPT, dtype=torch.bool)
    if manual:
        valid[0, :9] = False  # only the manual model takes a padding mask
    opts = lychee_fx.DecodeOptions(**SPARSE_OPTS)

    full = HeadRoles.all_retrieval(LAYERS, 2)
    model, _ = _tiny_pair(manual, full, opts)
    model = model.float()
    be = lychee_fx.backend(full, **SPARSE_OPTS, compiler="eager")
    tok, logits = tiny_generate(model, prompt, valid, STEPS, step_fn=torch.compile(model, backend=be, fullgraph=True))
    tok_ref, logits_ref = tiny_generate(model, prompt, valid, STEPS)
    assert torch.equal(tok, tok_ref)
    torch.testing.assert_close(torch.stack(logits), torch.stack(logits_ref), rtol=1e-5, atol=1e-5)
    assert be.report.counters["rewritten"] == LAYERS * be.report.graphs

    torch._dynamo.reset()
    roles = HeadRoles([[True, False], [False, True], [False, False]])
    model, ref = _tiny_pair(manual, roles, opts)
    be = lychee_fx.backend(roles, **SPARSE_OPTS, compiler="eager")
    tok, logits = tiny_generate(model, prompt, valid, STEPS, step_fn=torch.compile(model, backend=be, fullgraph=True))
    tok_ref, logits_ref = tiny_generate(ref, prompt, valid, STEPS)
    assert torch.equal(tok, tok_ref)
    torch.testing.assert_close(torch.stack(logits), torch.stack(logits_ref), rtol=1e-9, atol=1e-9)
    kind = "eager" if manual else "sdpa"
    assert all(s.kind == kind for s in be.report.sites)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_inductor_llama_sparse_equals_reference(cache):
    """The full path, Inductor included, on one architecture per cache."""
    model, hkv = hf_model("llama", layers=LAYERS, dtype=torch.float64)
    roles = HeadRoles([[True, False], [False, True], [False, False]])
    opts = lychee_fx.DecodeOptions(**SPARSE_OPTS)
    ids, am = _prompt()
    model.set_attn_implementation(register_hf_reference(roles, opts))
    seq_ref, logits_ref = _generate(model, ids, am, cache)
    model.set_attn_implementation("sdpa")
    be = lychee_fx.backend(roles, **SPARSE_OPTS)
    model.compile(backend=be)
    with torch._inductor.config.patch(fx_graph_cache=False):  # so the op census runs
        seq, logits = _generate(model, ids, am, cache)
    assert torch.equal(seq, seq_ref)
    # HF computes rotary embeddings in float32, which Inductor fuses differently: 1e-7 level.
    torch.testing.assert_close(logits, logits_ref, rtol=1e-6, atol=1e-6)
    assert be.report.ops_after_aot["lychee.sparse_attention.default"] >= 1


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dynamic_true_symbolic_scale_is_rewritten(attn):
    """Under dynamic=True Dynamo turns HF's float ``self.scaling`` into a SymFloat graph
    input: the pass must still rewrite (the scale becomes a symbolic op argument)."""
    model, hkv = hf_model("llama", layers=LAYERS, attn=attn, dtype=torch.float64)
    roles = HeadRoles([[True, False], [False, True], [False, False]])
    opts = lychee_fx.DecodeOptions(**SPARSE_OPTS)
    # one unpadded row: HF's own float64 eager attention turns left-padded rows into NaN
    ids, am = _prompt(batch=1)
    model.set_attn_implementation(register_hf_reference(roles, opts))
    seq_ref, logits_ref = _generate(model, ids, am, "dynamic")
    model.set_attn_implementation(attn)
    be = lychee_fx.backend(roles, **SPARSE_OPTS, compiler="eager")
    model.compile(backend=be, dynamic=True)
    seq, logits = _generate(model, ids, am, "dynamic")
    assert be.report.rewritten and all("scale" not in s.reason for s in be.report.declined), be.report.summary()
    assert torch.equal(seq, seq_ref)
    # HF's eager attention takes its prompt softmax in float32 even for float64 models; the
    # reference's prompt goes through SDPA: 1e-8 level differences in the cache.
    tol = 1e-9 if attn == "sdpa" else 1e-6
    torch.testing.assert_close(logits, logits_ref, rtol=tol, atol=tol)


def test_report_lists_each_site_once_across_dynamo_restarts():
    """With dynamic=True Dynamo restarts an HF trace from inside the compiler
    (TensorifyScalarRestartAnalysis) and calls the backend twice for one graph: the report
    must list the sites of compiled graphs only, each layer once per graph."""
    model, hkv = hf_model("llama", layers=LAYERS)
    roles = HeadRoles([[True, False], [False, True], [False, False]])
    be = lychee_fx.backend(roles, **SPARSE_OPTS)
    model.compile(backend=be, dynamic=True)
    ids, am = _prompt(batch=1)
    with torch._inductor.config.patch(fx_graph_cache=False):
        _generate(model, ids, am, "dynamic")
    per_graph = {}
    for s in be.report.sites:
        per_graph.setdefault(s.graph, []).append(s.layer)
    assert sorted(per_graph) == list(range(be.report.graphs)), be.report.summary()
    decode = [layers for layers in per_graph.values() if len(layers) == LAYERS]
    assert decode and all(sorted(layers) == list(range(LAYERS)) for layers in per_graph.values()), be.report.summary()
    assert be.report.rewritten, be.report.summary()  # (2 restarts here on torch 2.13)


def test_a_full_sliding_window_under_dynamic_shapes_keeps_its_attention():
    """gpt-oss (alternating sliding-window and full layers, attention sinks), a prompt longer
    than the window, the dynamic cache and ``dynamic=True``: the window layers' cache length is
    another symbol than the full layers' (it was full when traced). Their blocks do not line up
    with the full layers', so they keep their attention; the full layers are rewritten, and
    with a budget over the context the sparse heads see every block: the dense logits. Before
    this rule the window layers were rewritten and their selection read the full layers'
    caches at the wrong slots (logits 0.2 off)."""
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

    cfg = AutoConfig.for_model(
        "gpt_oss", vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=256, bos_token_id=1,
        eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 2.0)
    ids = torch.randint(3, VOCAB, (2, 30))
    cache = DynamicCache(config=cfg)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        nxt = torch.randint(3, VOCAB, (2, 1))
        dense = model(nxt, past_key_values=copy.deepcopy(cache), use_cache=True).logits
        torch._dynamo.reset()
        be = lychee_fx.backend(HeadRoles.first_k(4, 2, 1), budget=256, block_size=4, sink=4, recent=4, compiler="eager")
        out = torch.compile(model, backend=be, dynamic=True)(nxt, past_key_values=copy.deepcopy(cache), use_cache=True).logits
    status = [(s.layer, s.status) for s in be.report.sites]
    assert status == [(0, "declined"), (1, "rewritten"), (2, "declined"), (3, "rewritten")], be.report.summary()
    assert "is shorter than the longest layers'" in be.report.sites[0].reason, be.report.summary()
    assert be.report.sites[3].sparse_heads == (1,), be.report.summary()
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
