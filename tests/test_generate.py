"""The entry points that compile HF ``generate()``, and how often they compile."""

from __future__ import annotations

import pytest
import torch

import lychee_fx
from lychee_fx import HeadRoles
from tests.tiny_models import VOCAB, hf_model

pytestmark = pytest.mark.slow
LAYERS = 2


def _ids(n=40):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(0))


def _decode_graphs(report) -> set[int]:
    return {s.graph for s in report.sites if s.query_len == "1"}


def test_model_compile_then_generate_dynamic_cache_does_not_recompile_every_token():
    model, hkv = hf_model("llama", layers=LAYERS)
    ref = model.generate(_ids(), max_new_tokens=12, do_sample=False)
    be = lychee_fx.backend(HeadRoles.all_retrieval(LAYERS, hkv), budget=16, block_size=4, sink=4, recent=4, compiler="eager")
    model.compile(backend=be)
    out = model.generate(_ids(), max_new_tokens=12, do_sample=False)
    assert torch.equal(out, ref)
    # prefill, first decode step (static KV length), then one symbolic-length graph for all
    # later steps: 11 decode steps, at most 2 decode graphs
    assert be.report.graphs <= 3, be.report.summary()
    assert len(_decode_graphs(be.report)) <= 2


def test_generate_with_static_cache_and_compile_config_compiles_decode_once():
    from transformers import CompileConfig

    model, hkv = hf_model("llama", layers=LAYERS)
    ref = model.generate(_ids(), max_new_tokens=10, do_sample=False, cache_implementation="static")
    be = lychee_fx.backend(HeadRoles.first_k(LAYERS, hkv, 1), budget=16, block_size=4, sink=4, recent=4, compiler="eager")
    cfg = CompileConfig(backend=be, fullgraph=True)
    cfg._compile_all_devices = True  # HF compiles only on accelerators unless told
    out = model.generate(_ids(), max_new_tokens=10, do_sample=False, cache_implementation="static", compile_config=cfg)
    assert out.shape == ref.shape
    decode = _decode_graphs(be.report)
    assert len(decode) == 1, be.report.summary()
    assert be.report.counters["rewritten"] == LAYERS


def test_torch_compile_wrapper_generate_compiles_nothing():
    """``torch.compile(model).generate()`` runs the original model: generate is not forward."""
    model, hkv = hf_model("llama", layers=LAYERS)
    be = lychee_fx.backend(HeadRoles.all_retrieval(LAYERS, hkv), compiler="eager")
    compiled = torch.compile(model, backend=be)
    compiled.generate(_ids(), max_new_tokens=3, do_sample=False)
    assert be.report.graphs == 0


def test_calling_the_compiled_module_per_step():
    from transformers import DynamicCache

    model, hkv = hf_model("qwen3", layers=LAYERS)
    be = lychee_fx.backend(HeadRoles.all_retrieval(LAYERS, hkv), budget=16, block_size=4, sink=4, recent=4, compiler="eager")
    step = torch.compile(model, backend=be)
    ids = _ids()
    outs = []
    for fn in (model, step):
        cache = DynamicCache(config=model.config)
        logits = fn(input_ids=ids, past_key_values=cache, use_cache=True).logits
        tokens = []
        for _ in range(6):
            nxt = logits[:, -1:].argmax(-1)
            tokens.append(nxt)
            logits = fn(input_ids=nxt, past_key_values=cache, use_cache=True).logits
        outs.append(torch.cat(tokens, 1))
    assert torch.equal(outs[0], outs[1])
    assert be.report.counters["rewritten"] >= LAYERS


def test_compile_config_decodes_as_the_plain_config_with_fast_guards():
    """``lychee_fx.compile_config`` (CUDA graphs as an option, no guards through the model
    object) generates the tokens ``CompileConfig(backend=...)`` does, compiling decode once."""
    from transformers import CompileConfig

    model, hkv = hf_model("llama", layers=LAYERS)
    roles = HeadRoles.first_k(LAYERS, hkv, 1)
    opts = dict(budget=16, block_size=4, sink=4, recent=4, compiler="eager")
    outs, reports = [], []
    for fast in (False, True):
        be = lychee_fx.backend(roles, **opts)
        cfg = lychee_fx.compile_config(be, fast_guards=fast) if fast else CompileConfig(backend=be)
        cfg._compile_all_devices = True  # HF compiles only on accelerators unless told
        torch._dynamo.reset()
        outs.append(model.generate(_ids(), max_new_tokens=10, do_sample=False, cache_implementation="static",
                                   compile_config=cfg))
        reports.append(be.report)
    assert torch.equal(outs[0], outs[1])
    assert len(_decode_graphs(reports[1])) == 1, reports[1].summary()
    assert reports[1].counters["rewritten"] == LAYERS


def test_compile_config_settings_and_errors():
    cfg = lychee_fx.compile_config(HeadRoles.first_k(LAYERS, 2, 1), budget=16, block_size=4, sink=4, recent=4)
    assert cfg.mode is None and cfg.options["triton.cudagraphs"] is True
    assert cfg.options["guard_filter_fn"] is torch.compiler.skip_guard_on_all_nn_modules_unsafe
    assert isinstance(cfg.backend, lychee_fx.LycheeBackend) and cfg.backend.options.budget == 16
    plain = lychee_fx.compile_config(cfg.backend, fast_guards=False)
    assert plain.backend is cfg.backend and plain.mode == "reduce-overhead" and not plain.options
    with pytest.raises(TypeError, match=r"\['budget'\] given with a built LycheeBackend"):
        lychee_fx.compile_config(cfg.backend, budget=32)
    with pytest.raises(TypeError, match="fast_guards must be a bool, got str"):
        lychee_fx.compile_config(cfg.backend, fast_guards="yes")
