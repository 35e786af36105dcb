"""GPU suite (``-m gpu``; skipped without CUDA): kernels at long contexts and in every dtype,
compiled graphs whose generated code holds the lychee kernels, CUDA graphs, HF decoding.

Run through the device tool, whole suite in one call:  python -m pytest -q -m gpu tests/test_gpu.py
"""

from __future__ import annotations

import pytest
import torch

import lychee_fx
from lychee_fx import HeadRoles
from lychee_fx import reference as R
from tests.attn_modules import Stack, mask4d, reference_stack
from tests.kernel_checks import check_recorded_calls, decode_tiny, record_calls
from tests.strategies import (
    assert_close_anchored,
    assert_selection_agrees,
    exact_values,
    low_precision_problem,
    rel_err,
    sdpa_lowp,
    selection_error_bound,
)

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    from lychee_fx.codegen import launch

    def poisoned(shape, dtype, device):
        return torch.empty(shape, dtype=dtype, device=device).fill_(float("nan") if dtype.is_floating_point else -7)

    monkeypatch.setattr(launch, "_alloc", poisoned)
    # one config per kernel: the suite checks numbers; tuning is the benchmark's business
    monkeypatch.setattr(launch, "_configs", lambda bs, d, e, dv=None: [launch.triton.Config({"BLOCK_N": max(64, bs)}, num_warps=4, num_stages=2)])
    launch._tuned.cache_clear()
    yield
    launch._tuned.cache_clear()


def _problem(b, hkv, g, n, d, dtype, seed, pad=0):
    gen = torch.Generator().manual_seed(seed)
    q = exact_values(gen, (b, hkv * g, 1, d), dtype)
    k = exact_values(gen, (b, hkv, n, d), dtype)
    v = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    valid = torch.ones(b, n, dtype=torch.bool)
    if pad:
        valid[0, :pad] = False
        valid[:, n - pad // 2:] = False  # static-cache tail
    return q, k, v, valid


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [4133, 32768, 131072])
def test_kernels_long_context(dtype, n):
    from lychee_fx.codegen import launch

    b, hkv, g, d = 2, 2, 4, 128
    opts = lychee_fx.DecodeOptions()  # the paper's: budget 4096, block 64, sink 128, recent 256
    q, k, v, valid = _problem(b, hkv, g, n, d, dtype, seed=n, pad=1000)
    out, sel = launch.retrieval_attention(q.to(DEV), k.to(DEV), v.to(DEV), valid.to(DEV), None, [0, 1], d**-0.5,
                                          opts.block_size, opts.num_blocks, opts.sink, opts.recent, True)
    ref_sel = R.select_blocks(q, k, valid, opts)
    assert torch.equal(sel.cpu(), ref_sel)
    full = R.full_attention(q, k, v, valid)
    _, bias = R.valid_and_bias(valid, b, n)
    lowp = sdpa_lowp(q, k, v, valid[:, None, :].expand(b, hkv, n), bias, d**-0.5, dtype)
    floor = 2e-6 if dtype == torch.float32 else 1e-2
    assert_close_anchored(f"retrieval {dtype} N={n}", out.cpu(), full, lowp, floor=floor)
    sp = launch.sparse_attention(q.to(DEV), k.to(DEV), v.to(DEV), valid.to(DEV), sel, [0, 1], d**-0.5, opts.block_size)
    tm = R.blocks_to_token_mask(ref_sel, n, opts.block_size) & valid[:, None, :]
    ref = R.masked_attention(q, k, v, tm, bias, d**-0.5)
    assert_close_anchored(f"sparse {dtype} N={n}", sp.cpu(), ref, sdpa_lowp(q, k, v, tm, bias, d**-0.5, dtype), floor=floor)


def _compiled_stack(roles, opts, form, **compile_kw):
    be = lychee_fx.backend(roles, budget=opts.budget, block_size=opts.block_size, sink=opts.sink, recent=opts.recent)
    return be, torch.compile(Stack(3, form), backend=be, fullgraph=True, **compile_kw)


@pytest.mark.parametrize("form", ["gqa", "repeat_kv"])
def test_generated_code_holds_the_lychee_kernels(form):
    from torch._inductor.utils import run_and_get_code

    roles = HeadRoles([[True, False], [False, True], [False, False]])
    opts = lychee_fx.DecodeOptions(budget=512, block_size=64, sink=64, recent=64)
    gen = torch.Generator().manual_seed(1)
    qs = exact_values(gen, (3, 2, 8, 1, 128), torch.bfloat16).to(DEV)
    ks = exact_values(gen, (3, 2, 2, 3000, 128), torch.bfloat16).to(DEV)
    vs = torch.randn(3, 2, 2, 3000, 128, generator=gen).to(torch.bfloat16).to(DEV)
    valid = torch.ones(2, 3000, dtype=torch.bool, device=DEV)
    valid[1, :300] = False
    mask = None if form == "gqa" else mask4d(valid)
    be, model = _compiled_stack(roles, opts, form)
    with torch._inductor.config.patch(fx_graph_cache=False):
        out, code = run_and_get_code(model, qs, ks, vs, mask)
    src = "\n".join(code)
    # layer 0 all retrieval, layer 1 both kinds (one pooled launch pair), layer 2 all sparse
    for name in ("retrieval_split_kernel", "retrieval_reduce_kernel", "sparse_split_kernel", "merge_kernel",
                 "hybrid_split_kernel", "hybrid_reduce_kernel"):
        assert name in src, f"{name} missing from the generated code"
    assert be.report.pooled_layers == 1
    assert "scaled_dot_product" not in src
    ref = reference_stack(qs.cpu(), ks.cpu(), vs.cpu(), None if mask is None else valid.cpu(), roles, opts)
    assert_close_anchored("compiled stack", out.cpu(), ref, floor=1.5e-2)


def test_cuda_graphs_reduce_overhead():
    roles = HeadRoles([[True, True], [True, False], [False, True]])
    opts = lychee_fx.DecodeOptions(budget=256, block_size=16, sink=16, recent=32)
    be, model = _compiled_stack(roles, opts, "repeat_kv", mode="reduce-overhead")
    for step in range(4):  # warm-up, record, replays: inputs change every step
        gen = torch.Generator().manual_seed(100 + step)
        qs = exact_values(gen, (3, 2, 8, 1, 64), torch.float16)
        ks = exact_values(gen, (3, 2, 2, 2048, 64), torch.float16)
        vs = torch.randn(3, 2, 2, 2048, 64, generator=gen).half()
        valid = torch.ones(2, 2048, dtype=torch.bool)
        valid[0, : 100 + step] = False
        args = (qs.to(DEV), ks.to(DEV), vs.to(DEV), mask4d(valid.to(DEV)))
        out = model(*args).clone()
        for name, a, orig in zip("qkv", args, (qs, ks, vs)):
            assert torch.equal(a.cpu(), orig), f"step {step}: the compiled graph wrote into its input {name}"
        ref = reference_stack(qs, ks, vs, valid, roles, opts)
        assert_close_anchored(f"cudagraph step {step}", out.cpu(), ref, floor=2e-3)


@pytest.mark.parametrize("pool", [False, True])
def test_inductor_sees_only_the_kernels_outputs_as_written(monkeypatch, pool):
    """Inductor's mutation analysis of each kernel (internal APIs of
    ``torch._higher_order_ops.triton_kernel_wrap``: ``identify_mutated_tensors`` in torch 2.11,
    ``identify_accessed_tensors`` in 2.13) must name every buffer the kernel writes and no input
    the caller owns: an input it wrongly counts as written is cloned and copied back, which
    broke the query of CUDA-graph decoding once (attention_kernels [Note: store pointers]).
    Workspace buffers the op allocates itself may be named too (a needless copy, not a wrong
    answer): torch 2.13 names the block scores and counts for the reduce kernel, whose
    selection store addresses derive from them (checked on the CPU against an sm_90 target)."""
    import torch._higher_order_ops.triton_kernel_wrap as tkw

    seen: dict[str, set[str]] = {}
    if hasattr(tkw, "identify_mutated_tensors"):
        name, written = "identify_mutated_tensors", lambda result, kwargs: set(result)
    else:
        name = "identify_accessed_tensors"

        def written(result, kwargs):
            return {d.name for d in result.read_writes.writes if isinstance(kwargs.get(d.name), torch.Tensor)}

    real = getattr(tkw, name)

    def spy(kernel, kwargs, *a, **k):
        result = real(kernel, kwargs, *a, **k)
        seen.setdefault(getattr(kernel, "fn", kernel).__name__, set()).update(written(result, kwargs))
        return result

    monkeypatch.setattr(tkw, name, spy)
    roles = HeadRoles([[True, True], [True, False], [False, True]])
    opts = lychee_fx.DecodeOptions(budget=256, block_size=16, sink=16, recent=32)
    be = lychee_fx.backend(roles, budget=opts.budget, block_size=opts.block_size, sink=opts.sink, recent=opts.recent,
                           pool=pool)
    model = torch.compile(Stack(3, "repeat_kv"), backend=be, fullgraph=True)
    gen = torch.Generator().manual_seed(3)
    qs = exact_values(gen, (3, 2, 8, 1, 64), torch.float16).to(DEV)
    ks = exact_values(gen, (3, 2, 2, 1024, 64), torch.float16).to(DEV)
    vs = torch.randn(3, 2, 2, 1024, 64, generator=gen).half().to(DEV)
    with torch._inductor.config.patch(fx_graph_cache=False):
        model(qs, ks, vs, mask4d(torch.ones(2, 1024, dtype=torch.bool, device=DEV)))
    partials = {"PART_O", "PART_M", "PART_L"}
    pooled = {f"{p}_{part}" for p in partials for part in "RS"}
    outputs = {
        "retrieval_split_kernel": partials | {"BLK_SCORE", "BLK_CNT"},
        "retrieval_reduce_kernel": {"OUT", "SEL_OUT"},
    }
    if pool:  # layers 1 and 2 have both kinds of heads: one launch pair each
        outputs.update(hybrid_split_kernel=pooled | {"BLK_SCORE", "BLK_CNT"}, hybrid_reduce_kernel={"OUT", "SEL_OUT"})
    else:
        outputs.update(sparse_split_kernel=partials, merge_kernel={"OUT"})
    workspaces = partials | pooled | {"BLK_SCORE", "BLK_CNT"}
    assert seen.keys() == outputs.keys()
    for kernel, names in seen.items():
        assert outputs[kernel] <= names <= outputs[kernel] | workspaces, (kernel, names)


@pytest.mark.parametrize("cache", ["dynamic", "static", "static_fast_guards"])
def test_hf_llama_decodes_like_the_reference(cache):
    """static_fast_guards: ``lychee_fx.compile_config`` (CUDA graphs as an option, no guards
    through the model object): the README's generate() path."""
    from tests.tiny_models import hf_model, register_hf_reference

    model, hkv = hf_model("llama", layers=3)
    model = model.to(DEV)
    roles = HeadRoles([[True, False], [False, True], [False, False]])
    opts = lychee_fx.DecodeOptions(budget=64, block_size=16, sink=16, recent=16)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 96, (2, 300), generator=gen).to(DEV)
    am = torch.ones(2, 300, dtype=torch.long, device=DEV)
    am[0, :37] = 0
    from transformers import CompileConfig

    kw = dict(attention_mask=am, max_new_tokens=8, do_sample=False, cache_implementation=cache,
              output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    if cache == "static_fast_guards":
        kw["cache_implementation"] = "static"
    model.set_attn_implementation(register_hf_reference(roles, opts))
    ref = model.generate(ids, **kw, disable_compile=True)  # HF compiles static-cache decoding on CUDA
    model.set_attn_implementation("sdpa")
    be = lychee_fx.backend(roles, budget=opts.budget, block_size=opts.block_size, sink=opts.sink, recent=opts.recent)
    if cache == "static":  # HF compiles the forward itself (CUDA graphs): hand it the backend
        out = model.generate(ids, **kw, compile_config=CompileConfig(backend=be, fullgraph=True))
    elif cache == "static_fast_guards":
        out = model.generate(ids, **kw, compile_config=lychee_fx.compile_config(be, fullgraph=True))
        assert [how for _, how in be.report.cuda_graphs] == ["lychee replay"], be.report.cuda_graphs
    else:
        model.compile(backend=be)
        out = model.generate(ids, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-3, atol=1e-3)
    assert be.report.counters["rewritten"] >= 3


@pytest.mark.parametrize("m", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_decode_linear_kernel_at_model_sizes(m, dtype):
    """One layer's q/k/v and gate/up of Llama-3-8B and its down projection (and, in bfloat16,
    its LM head), in the default configs and with the other inner product."""
    from lychee_fx.codegen import linear

    gen = torch.Generator(device=DEV).manual_seed(m)
    shapes = [(4096, [4096, 1024, 1024]), (4096, [14336, 14336]), (14336, [4096])]
    if dtype == torch.bfloat16:
        shapes.append((4096, [128256]))
    for k, ns in shapes:
        x = torch.randn(m, k, generator=gen, device=DEV).to(dtype)
        ws = [(torch.randn(n, k, generator=gen, device=DEV) * k**-0.5).to(dtype) for n in ns]
        bs = [None] * len(ns)
        for cfg in (None, linear.DEFAULT_CONFIG._replace(dot=not linear.DEFAULT_CONFIG.dot)):
            ys = linear.decode_linear(x, ws, bs, config=cfg)
            for i, (y, w) in enumerate(zip(ys, ws)):
                ref = torch.nn.functional.linear(x.double(), w.double())
                lowp = torch.nn.functional.linear(x.float(), w.float()).to(dtype)
                assert_close_anchored(f"y[{i}] K={k} N={w.shape[0]} {cfg}", y, ref, lowp,
                                      floor=1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_decode_runs_decode_linear_kernels(dtype):
    """The backend groups q/k/v and gate/up; Inductor's code launches the kernel; logits match
    the same backend with cuBLAS linears, under CUDA graphs."""
    from torch._inductor.utils import run_and_get_code
    from transformers import StaticCache

    from tests.tiny_models import hf_model

    model, hkv = hf_model("llama", layers=3, dtype=dtype)
    model = model.to(DEV)
    roles = HeadRoles([[True, True], [True, False], [False, True]])
    opts = dict(budget=64, block_size=16, sink=16, recent=16)
    ids = torch.randint(3, 96, (2, 200), generator=torch.Generator().manual_seed(5)).to(DEV)
    logits = {}
    for linears in (True, False):
        torch._dynamo.reset()
        cache = StaticCache(config=model.config, max_cache_len=256)
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
        be = lychee_fx.backend(roles, linears=linears, **opts)
        step = torch.compile(model, backend=be, mode="reduce-overhead")
        feed = torch.randint(3, 96, (3, 2, 1), generator=torch.Generator().manual_seed(6)).to(DEV)  # teacher-forced
        outs = []
        for i in range(3):
            kw = dict(past_key_values=cache, use_cache=True, position_ids=torch.full((2, 1), 200 + i, device=DEV))
            with torch.no_grad():
                if i == 0:
                    out, code = run_and_get_code(step, feed[i], **kw)
                else:
                    out = step(feed[i], **kw)
            outs.append(out.logits.float().clone())
        logits[linears] = torch.stack(outs)
        src = "\n".join(code)
        assert ("decode_linear_kernel" in src) == linears
        if linears:
            assert sorted(len(g.nodes) for g in be.report.linear_groups) == [1] * 7 + [2] * 3 + [3] * 3
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(logits[True], logits[False], rtol=tol, atol=tol)


def test_lychee_replay_equals_inductor_trees_and_owns_its_outputs(caplog):
    """cuda_graphs="lychee" replays the decode step as one CUDA graph: the same logits as
    Inductor's CUDA-graph trees, outputs that later replays do not overwrite, and a new
    capture (not a wrong answer) when a static input moves to another address."""
    import logging

    from transformers import StaticCache

    from tests.tiny_models import hf_model

    model, hkv = hf_model("llama", layers=3)
    model = model.to(DEV)
    roles = HeadRoles([[True, True], [True, False], [False, True]])
    ids = torch.randint(3, 96, (2, 120), generator=torch.Generator().manual_seed(8)).to(DEV)
    feed = torch.randint(3, 96, (6, 2, 1), generator=torch.Generator().manual_seed(9)).to(DEV)
    runs = {}
    for how in ("inductor", "lychee"):
        torch._dynamo.reset()
        cache = StaticCache(config=model.config, max_cache_len=160)
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
        be = lychee_fx.backend(roles, budget=64, block_size=16, sink=16, recent=16, cuda_graphs=how)
        step = torch.compile(model, backend=be, mode="reduce-overhead")
        outs = []
        with caplog.at_level(logging.INFO, logger="lychee_fx"), torch.no_grad():
            for i in range(6):
                if i == 4:  # a static input moves: the replay must capture again
                    model.lm_head.weight.data = model.lm_head.weight.data.clone()
                pos = torch.full((2, 1), 120 + i, device=DEV)
                logits = step(feed[i], past_key_values=cache, use_cache=True, position_ids=pos).logits
                outs.append(logits.clone() if how == "inductor" else logits)  # the trees reuse their outputs
        runs[how] = (torch.stack(outs), be)
    trees, lean = runs["inductor"][0], runs["lychee"][0]
    torch.testing.assert_close(lean, trees, rtol=1e-5, atol=1e-5)
    assert runs["lychee"][1].report.cuda_graphs == [(0, "lychee replay")]
    assert runs["inductor"][1].report.cuda_graphs == [(0, "Inductor's CUDA-graph trees")]
    captures = [r for r in caplog.records if "captured a CUDA graph" in r.getMessage()]
    assert len(captures) == 2, [r.getMessage() for r in captures]


@pytest.mark.parametrize("normed", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("g", list(range(1, 13)))
@pytest.mark.parametrize("d", [64, 128, 256])
def test_low_precision_selection_equals_the_float64_selection(d, g, dtype, normed):
    """select_kernel [Note: selection precision]: on tensor cores, the retrieval kernel's
    selection from bfloat16 / float16 q and k (normal values, or RMS-normed like Gemma 3's
    q/k norms) equals the float64 selection of the same inputs except where block scores tie
    within the float32 accumulation bound ``selection_error_bound`` (u = 2^-23 per addition of
    the G * D exact products)."""
    from lychee_fx.codegen import launch

    b, hkv, n = 2, 2, 8192 + 77
    q, k = low_precision_problem(d * 131 + g * 7 + normed, b, hkv, g, n, d, dtype, normed)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[0, :300] = False  # left padding
    valid[:, n - 50:] = False  # a static cache's empty tail
    opts = lychee_fx.DecodeOptions(budget=1024, block_size=64, sink=64, recent=128)
    v = torch.zeros(b, hkv, n, 16, dtype=dtype)
    _, sel = launch.retrieval_attention(q.to(DEV), k.to(DEV), v.to(DEV), valid.to(DEV), None, list(range(hkv)),
                                        d**-0.5, opts.block_size, opts.num_blocks, opts.sink, opts.recent, True)
    ref = R.select_blocks(q, k, valid, opts)
    scores = R.selection_scores(q, k)
    assert_selection_agrees(f"{dtype} D={d} G={g} normed={normed}", sel.cpu(), ref, scores, valid, opts,
                            selection_error_bound(q, k))


@pytest.mark.parametrize("shape", ["gemma3_head256_qk_norm", "qwen2_group7"])
def test_bf16_decoding_kernels_follow_spec_on_their_own_inputs(shape, monkeypatch):
    """bfloat16 decoding of the two shapes that decoded differently from SPEC 1.1 on the H200
    (Gemma 3 style: head dim 256, q/k norms; Qwen2.5-7B style: group size 7), at a 2000-token
    prompt. The oracle is fed what each kernel launch was given (select_kernel [Note:
    selection precision]): every retrieval launch's selection equals the float64 selection of
    its own q and k except at ties within ``selection_error_bound``, and every output is as
    close to the float64 attention of its own inputs as SDPA in bfloat16 is."""
    from lychee_fx import codegen
    from lychee_fx.codegen import launch

    codegen.register()  # compiler="eager": the rewritten graph's ops launch the kernels directly
    calls = record_calls(monkeypatch, launch, ("retrieval_attention", "sparse_attention"))
    decode_tiny(shape, DEV, prompt=2000)
    check_recorded_calls(shape, calls)


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["gemma2", "bloom", "mpt", "falcon", "mla", "doge", "neo"])
def test_extension_forms_through_inductor(form, dtype, gate, monkeypatch):
    """The forms of tests/test_pass_extensions (soft-cap, ALiBi in its spellings, a value head
    dim of its own, several masks) compiled by Inductor: the generated code holds the lychee
    kernels with their extension paths, and the stack equals the oracle (float32: to float32
    rounding; bfloat16: anchored like the other bf16 stacks). ``gate``: ``launch.GPU_EXTENSIONS``
    on (the kernels' extension paths, the default) and off (the ops' torch implementation)."""
    from torch._inductor.utils import run_and_get_code

    from lychee_fx.codegen import launch

    monkeypatch.setattr(launch, "GPU_EXTENSIONS", gate)

    from tests.test_pass_extensions import Model, _inputs, dense, reference

    roles = HeadRoles([[True, False], [False, True], [False, False]])
    opts = lychee_fx.DecodeOptions(budget=512, block_size=64, sink=64, recent=64)
    qs, ks, vs, valid = _inputs(form, b=2, hkv=2, g=4 if form != "mla" else 2, n=3000, d=64, dtype=dtype)
    be = lychee_fx.backend(roles, budget=opts.budget, block_size=opts.block_size, sink=opts.sink, recent=opts.recent)
    # a fresh trace with static shapes: another form's compile of the same Layer.forward would
    # make the head counts symbolic (automatic dynamic), which the pass declines
    torch._dynamo.reset()
    model = torch.compile(Model(form), backend=be, fullgraph=True, dynamic=False)
    with torch._inductor.config.patch(fx_graph_cache=False):
        out, code = run_and_get_code(model, qs.to(DEV), ks.to(DEV), vs.to(DEV), valid.to(DEV))
    # every form but neo's (two masks, no scaling) has a soft-cap, a head bias or a value head
    # dim of its own: the kernels take it only once their extension paths passed this suite
    kernels = launch.GPU_EXTENSIONS or form == "neo"
    assert ("retrieval_split_kernel" in "\n".join(code)) == kernels and "scaled_dot_product" not in "\n".join(code)
    assert be.report.counters["rewritten"] == 3, be.report.summary()
    ref = reference(form, qs, ks, vs, valid, roles, opts)
    floor = 2e-2
    if dtype == torch.float32:
        # float32 rounding of these logits: ALiBi's bias reaches hundreds, where float32 keeps
        # steps of about 3e-5; the stack may be as wrong as twice a dense float32 decode is
        full64 = dense(form, qs, ks, vs, valid, torch.float64)
        floor = max(2e-5, 2 * rel_err(dense(form, qs, ks, vs, valid, torch.float32), full64))
    assert_close_anchored(f"{form} {dtype}", out.cpu(), ref, floor=floor)
