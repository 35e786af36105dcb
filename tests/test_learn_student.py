"""The student (lychee_fx.learn.student): SPEC 1.1 exactly at hard gates, the exact
expectation over Bernoulli(z) roles at soft gates, vectorised tail selection, and the
HF AttentionInterface plumbing."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lychee_fx import HeadRoles
from lychee_fx import eager_ops
from lychee_fx import reference as R
from lychee_fx.learn.examples import cache_kwarg, prepare_example, student_hidden
from lychee_fx.learn.selection import SourceMixture, tail_block_masks, tail_valid
from lychee_fx.learn.student import StudentAttention, hybrid_attention, student_attention
from lychee_fx.options import DecodeOptions
from tests.learn_support import single_thread  # noqa: F401  (autouse fixture)
from tests.tiny_models import VOCAB, hf_model, register_hf_reference

OPTS = DecodeOptions(budget=16, block_size=4, sink=4, recent=4)  # S = 4 blocks, 2 forced




# ---- selection over a tail ------------------------------------------------------------------


@given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 5), n=st.integers(8, 40))
def test_select_from_scores_with_leading_query_dims_equals_one_call_per_query(seed, t, n):
    gen = torch.Generator().manual_seed(seed)
    score = torch.randint(-3, 4, (2, t, 3, n), generator=gen).float()  # (B, T, R, N), many ties
    valid = torch.rand(2, t, n, generator=gen) < 0.8
    valid[..., -1] = True
    got = eager_ops.select_from_scores(score, valid, 4, 4, 4, 4)  # (B, T, R, S)
    for i in range(t):
        want = eager_ops.select_from_scores(score[:, i], valid[:, i], 4, 4, 4, 4)
        assert torch.equal(got[:, i], want), f"query {i}: {got[:, i].tolist()} != {want.tolist()}"


def test_select_from_scores_rejects_mismatched_validity():
    with pytest.raises(ValueError, match=r"valid must have shape \(2, 5, 10\) to match score \(2, 5, 3, 10\), got \(2, 10\)"):
        eager_ops.select_from_scores(torch.zeros(2, 5, 3, 10), torch.ones(2, 10, dtype=torch.bool), 4, 4, 4, 4)


@given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 4))
def test_tail_block_masks_equal_the_reference_selection_of_each_query(seed, t):
    gen = torch.Generator().manual_seed(seed)
    b, hkv, g, n, d = 2, 2, 2, 37, 4
    q = (torch.randint(-4, 5, (b, hkv * g, t, d), generator=gen) / 4).double()
    k = (torch.randint(-4, 5, (b, hkv, n, d), generator=gen) / 4).double()
    valid, _ = tail_valid(None, b, t, n, q.device)  # (B, T, N) causal
    score = torch.einsum("bhgtd,bhnd->bhtn", q.reshape(b, hkv, g, t, d), k) / g
    masks = tail_block_masks(score, valid, OPTS)  # (B, Hkv, T, nb)
    for i in range(t):
        sel = R.select_blocks(q[:, :, i : i + 1], k, valid[:, i], OPTS)  # (B, Hkv, S)
        want = R.blocks_to_token_mask(sel, masks.shape[-1] * OPTS.block_size, OPTS.block_size)
        want = want.view(b, hkv, -1, OPTS.block_size).any(-1)
        assert torch.equal(masks[:, :, i], want), f"query {i} of {t}"


def test_tail_valid_is_causal_bottom_right_and_reads_masks():
    valid, bias = tail_valid(None, 1, 3, 6, torch.device("cpu"))
    assert bias is None
    assert valid[0].int().tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    m = torch.zeros(2, 1, 3, 6)
    m[1, 0, :, 0] = torch.finfo(torch.float32).min
    valid, bias = tail_valid(m, 2, 3, 6, torch.device("cpu"))
    assert valid[0].all() and not valid[1, :, 0].any() and bias.shape == (2, 3, 6)
    with pytest.raises(ValueError, match=r"expected an attention mask of shape \(2 or 1, 1, 3, 6\), got \(2, 2, 3, 6\)"):
        tail_valid(torch.ones(2, 2, 3, 6, dtype=torch.bool), 2, 3, 6, torch.device("cpu"))
    with pytest.raises(TypeError, match="attention mask must be bool or floating, got dtype torch.int64"):
        tail_valid(torch.ones(2, 1, 3, 6, dtype=torch.long), 2, 3, 6, torch.device("cpu"))


# ---- one layer at a time: full attention and the expectation over roles ---------------------


def _layer_inputs(gen, b=1, hkv=2, g=2, t=3, n=29, d=4):
    q = torch.randn(b, hkv * g, t, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64)
    return q, k, v


def test_open_gates_give_exact_causal_attention():
    gen = torch.Generator().manual_seed(0)
    q, k, v = _layer_inputs(gen)
    b, t, n = q.shape[0], q.shape[2], k.shape[2]
    valid, _ = tail_valid(None, b, t, n, q.device)
    mix = SourceMixture(2, torch.float64, q.device)
    out = hybrid_attention(q, k, v, valid, None, 0.5, torch.ones(2, dtype=torch.float64), mix, OPTS)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=valid[:, None], scale=0.5, enable_gqa=True
    )
    torch.testing.assert_close(out, want, msg="all-open student vs SDPA")


@settings(max_examples=6)
@given(seed=st.integers(0, 2**31 - 1))
def test_soft_gates_are_the_exact_expectation_of_spec_1_1_over_bernoulli_roles(seed):
    """Per layer (given its q, k, v), the student output equals the average of SPEC 1.1's
    output over all role maps, each drawn with probability prod z^r (1 - z)^(1 - r)."""
    gen = torch.Generator().manual_seed(seed)
    layers, hkv, t = 3, 2, 3
    inputs = [_layer_inputs(gen, hkv=hkv, t=t) for _ in range(layers)]
    z = torch.rand(layers, hkv, generator=gen, dtype=torch.float64)
    z[1, 0] = 0.0  # exact zeros and ones occur in training: include both
    z[2, 1] = 1.0
    n = inputs[0][1].shape[2]
    valid, _ = tail_valid(None, 1, t, n, torch.device("cpu"))
    mix = SourceMixture(hkv, torch.float64, torch.device("cpu"))
    got = [hybrid_attention(q, k, v, valid, None, 0.5, z[i], mix, OPTS) for i, (q, k, v) in enumerate(inputs)]

    want = [torch.zeros_like(x) for x in got]
    for bits in itertools.product((False, True), repeat=layers * hkv):
        roles = torch.tensor(bits).view(layers, hkv)
        p = torch.where(roles, z, 1 - z).prod()
        if p == 0:
            continue
        for i in range(t):  # tail query i is one SPEC 1.1 decoding step
            dec = R.ReferenceDecoder(OPTS)
            for layer, (q, k, v) in enumerate(inputs):
                out = dec(q[:, :, i : i + 1], k, v, valid[:, i], tuple(roles[layer].tolist()), 0.5)
                want[layer][:, :, i : i + 1] += p * out
    for layer in range(layers):
        torch.testing.assert_close(got[layer], want[layer], msg=f"layer {layer}")
    assert torch.allclose(mix.total(), torch.ones(hkv, dtype=torch.float64))


def test_gate_gradients_reach_units_that_only_supply_selections():
    """A layer-1 gate changes the output of layer 2's sparse head through the selection it
    supplies, so it gets a gradient even where its own output does not enter the loss."""
    gen = torch.Generator().manual_seed(1)
    inputs = [_layer_inputs(gen, t=2, n=96) for _ in range(3)]  # 24 blocks: selections differ
    n = inputs[0][1].shape[2]
    valid, _ = tail_valid(None, 1, 2, n, torch.device("cpu"))
    z = torch.tensor([[1.0, 1.0], [0.5, 0.5], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    mix = SourceMixture(2, torch.float64, torch.device("cpu"))
    outs = [hybrid_attention(q, k, v, valid, None, 0.5, z[i], mix, OPTS) for i, (q, k, v) in enumerate(inputs)]
    outs[2].pow(2).sum().backward()  # only layer 2's output counts
    assert torch.all(z.grad[1] != 0), f"layer-1 gates got no gradient: {z.grad.tolist()}"


# ---- whole HF models ----------------------------------------------------------------------------


def _reference_hidden(model, prompt, answer, roles: HeadRoles, opts: DecodeOptions) -> torch.Tensor:
    """Teacher-forced SPEC 1.1 decoding, one answer token per step, with the oracle."""
    from transformers import DynamicCache

    name = register_hf_reference(roles, opts)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        cache = {cache_kwarg(model): DynamicCache(config=model.config)}
        model.base_model(input_ids=prompt, use_cache=True, **cache)
        hidden = []
        for i in range(answer.shape[1]):
            out = model.base_model(input_ids=answer[:, i : i + 1], use_cache=True, **cache)
            hidden.append(out.last_hidden_state)
        return torch.cat(hidden, dim=1)
    finally:
        model.set_attn_implementation(previous)


@settings(max_examples=8)
@given(seed=st.integers(0, 2**31 - 1), name=st.sampled_from(["llama", "qwen3"]))
@torch.no_grad()
def test_hard_gates_decode_exactly_like_spec_1_1_token_by_token(seed, name):
    model, hkv = hf_model(name, layers=4, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, VOCAB, (1, 45), generator=gen)
    answer = torch.randint(3, VOCAB, (1, 6), generator=gen)
    roles = HeadRoles((torch.rand(4, hkv, generator=gen) < 0.4))
    want = _reference_hidden(model, prompt, answer, roles, OPTS)
    ex = prepare_example(model, prompt, answer)
    attention = StudentAttention(OPTS, 4, hkv)
    with student_attention(model, attention):
        got = student_hidden(model, attention, ex, roles.table.to(torch.float64))
    torch.testing.assert_close(got, want, msg=f"{name}, roles {roles!r}")
    with student_attention(model, attention):
        all_open = student_hidden(model, attention, ex, torch.ones(4, hkv, dtype=torch.float64))
    torch.testing.assert_close(all_open, ex.target, msg="all gates open = the teacher")


def test_student_attention_refuses_to_run_outside_a_pass_and_checks_gates():
    model, hkv = hf_model("llama", layers=2)
    attention = StudentAttention(OPTS, 2, hkv)
    ids = torch.randint(3, VOCAB, (1, 8))
    with student_attention(model, attention):
        with pytest.raises(RuntimeError, match="runs only inside learn_roles' forward passes"):
            model(ids)
    with pytest.raises(ValueError, match=r"gates must have shape \(2, 2\) \(layers, KV heads\), got \(3, 2\)"):
        attention.begin(torch.ones(3, 2))
    assert model.config._attn_implementation == "sdpa", "the previous implementation is restored"


def test_a_role_map_with_too_many_layers_is_caught_after_the_pass():
    model, hkv = hf_model("llama", layers=2)
    ex = prepare_example(model, torch.randint(3, VOCAB, (1, 20)), torch.randint(3, VOCAB, (1, 3)))
    attention = StudentAttention(OPTS, 3, hkv)
    with student_attention(model, attention):
        with pytest.raises(RuntimeError, match="expected 3 attention calls through the student in one forward pass, got 2"):
            student_hidden(model, attention, ex, torch.ones(3, hkv))


def test_prepare_example_validates_token_ids():
    model, _ = hf_model("llama", layers=2)
    with pytest.raises(TypeError, match="prompt_ids must hold integer token ids, got dtype torch.float32"):
        prepare_example(model, torch.zeros(1, 4), torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"answer_ids must have shape \(1, length >= 1\), got \(2, 3\)"):
        prepare_example(model, torch.ones(1, 4, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="prompt_ids must be a tensor of token ids, got list"):
        prepare_example(model, [1, 2], torch.ones(1, 2, dtype=torch.long))
