"""Kernel launches of a real decode, checked against the oracle on their own inputs.

A compiled model's q and k are not bit-equal to the eager model's (fusion rounds at other
points), and a selection is a discontinuous function of them: at a near-tie a rounding
difference picks another block, and the decode goes on from there. So a low-precision decode
is checked launch by launch: ``record_calls`` keeps every launch's arguments and results,
``check_recorded_calls`` compares each with ``lychee_fx.reference`` fed those arguments
(select_kernel [Note: selection precision]).
"""

from __future__ import annotations

import torch

import lychee_fx
from lychee_fx import HeadRoles
from lychee_fx import reference as R
from tests.strategies import assert_close_anchored, assert_selection_agrees, sdpa_lowp, selection_error_bound

# the two shapes that decoded differently from SPEC 1.1 in bfloat16 on the H200
SHAPES = {
    "gemma3_head256_qk_norm": ("gemma3_text", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                                   layer_types=["full_attention"] * 4, sliding_window=4096)),
    "qwen2_group7": ("qwen2", dict(num_attention_heads=14, num_key_value_heads=2, hidden_size=14 * 128,
                                   use_sliding_window=False)),
}


def tiny_hf(shape: str, device, dtype=torch.bfloat16):
    """A 4-layer random HF model of one of ``SHAPES``, and its KV heads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = SHAPES[shape]
    cfg = dict(vocab_size=96, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
               max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg), dtype=dtype,
                                             attn_implementation="sdpa")
    return model.eval().to(device), extra["num_key_value_heads"]


def decode_tiny(shape: str, device, prompt: int, steps: int = 3, dtype=torch.bfloat16):
    """Prefill ``prompt`` tokens (batch 2, the first row left-padded), then ``steps`` decode
    steps through ``lychee_fx.backend(..., compiler="eager")`` with one retrieval KV head per
    layer (rotating) after an all-retrieval layer 0 (one KV head: every other layer sparse).
    Returns the backend."""
    model, hkv = tiny_hf(shape, device, dtype)
    if hkv == 1:  # one KV head: retrieval and sparse layers alternate
        roles = HeadRoles([[layer % 2 == 0] for layer in range(4)])
    else:
        roles = HeadRoles([[h == layer % hkv for h in range(hkv)] if layer else [True] * hkv for layer in range(4)])
    be = lychee_fx.backend(roles, budget=256, block_size=16, sink=16, recent=32, compiler="eager")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (2, prompt), generator=gen).to(device)
    am = torch.ones_like(ids)
    am[0, : prompt // 20] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am, use_cache=True)
        step = torch.compile(model, backend=be)
        cache = out.past_key_values
        for t in range(steps):
            am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
            out = step(input_ids=ids[:, t : t + 1], attention_mask=am, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
    assert be.report.counters["rewritten"] >= 4, be.report.summary()
    return be


def record_calls(monkeypatch, module, names) -> list:
    """Wrap ``module.<name>`` for each name (op implementations taking the op's arguments):
    each call appends ``(name, cloned args, result)``."""
    calls = []
    for name in names:
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kw):
            res = _real(*args, **kw)
            kept = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
            calls.append((_name, kept, res))
            return res

        monkeypatch.setattr(module, name, spy)
    return calls


def check_recorded_calls(name: str, calls: list, launch=None) -> None:
    """Every recorded retrieval / sparse call against the oracle fed its own inputs. With
    ``launch`` (``lychee_fx.codegen.launch``), the calls are replayed through the kernels
    first (recorded from another implementation, e.g. the CPU's)."""
    assert any(n == "retrieval_attention" for n, _, _ in calls) and any(n == "sparse_attention" for n, _, _ in calls)
    for i, (kind, args, res) in enumerate(calls):
        if launch is not None:
            # the eager ops take sink logits last; the kernels have no sink path (lowering.py)
            n_args = 14 if kind == "retrieval_attention" else 10
            assert all(a is None for a in args[n_args:]), f"{name} call {i}: sink logits, which the kernels do not take"
            res = getattr(launch, kind)(*args[:n_args])
        q, k, v, mask, sel, heads, scale = (a.cpu() if isinstance(a, torch.Tensor) else a for a in args[:7])
        b, n = q.shape[0], k.shape[2]
        valid, bias = R.valid_and_bias(mask, b, n)
        g = q.shape[1] // k.shape[1]
        rows = [h * g + j for h in heads for j in range(g)]
        where = f"{name} call {i} ({kind})"
        if kind == "retrieval_attention":
            out, sel_out = (x.cpu() for x in res)
            if args[11]:  # select
                bs, nb, sink, recent = args[7:11]
                opts = lychee_fx.DecodeOptions(budget=nb * bs, block_size=bs, sink=sink, recent=recent)
                ref = R.select_blocks(q, k, valid, opts)
                assert_selection_agrees(where, sel_out[:, heads], ref[:, heads], R.selection_scores(q, k)[:, heads],
                                        valid, opts, selection_error_bound(q, k)[:, heads])
            tm = valid[:, None, :].expand(b, k.shape[1], n)
        else:
            out = res.cpu()
            tm = R.blocks_to_token_mask(sel, n, args[7]) & valid[:, None, :]
        ref_out = R.masked_attention(q, k, v, tm, bias, scale)[:, rows]
        lowp = sdpa_lowp(q, k, v, tm, bias, scale, q.dtype)[:, rows]
        assert_close_anchored(where, out, ref_out, lowp, floor=1.5e-2)
