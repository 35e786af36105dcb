"""``replay.replay_plan``: which Dynamo graphs a single CUDA-graph replay reproduces exactly.
The analysis runs here on CPU graphs (``device_type="cpu"``); the replays themselves are
GPU tests (tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import StaticCache

from lychee_fx.replay import GraphReplay, ReplayPlan, replay_plan
from tests.tiny_models import hf_model


def _plan(fn, *args, dynamic=False, **kwargs):
    seen = {}

    def capture(gm, example_inputs, **_):
        seen["plan"] = replay_plan(gm, example_inputs, device_type="cpu")
        seen["names"] = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, dynamic=dynamic)(*args, **kwargs)
    return seen["plan"], seen["names"]


def test_hf_static_cache_decode_replays_with_params_and_cache_static():
    model, _ = hf_model("llama")
    cache = StaticCache(config=model.config, max_cache_len=64)
    ids = torch.randint(3, 90, (2, 10))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        plan, names = _plan(model, ids[:, -1:], past_key_values=cache, use_cache=True)
    assert plan.reason == ""
    static = dict(zip(names, plan.static))
    assert len([n for n, s in static.items() if not s]) == 1  # the token ids; the rest is static
    assert all(static[n] for n in names if "keys" in n or "values" in n or "cumulative_length" in n)
    assert all(static[n] for n in names if "weight" in n)


@pytest.mark.parametrize(
    "fn, why",
    [
        (lambda x, y: x.add_(1) * y, "writes input l_x_"),
        (lambda x, y: x.view(-1).mul_(2) + y.sum(), "writes input l_x_"),
        (lambda x, y: x.__setitem__(0, y[0]) or y * 2, "writes input l_x_"),
        (lambda x, y: torch.add(y, 1, out=x), "writes input l_x_"),
        (lambda x, y: (x.view(-1), y + 1), "an output shares storage with input l_x_"),
        (lambda x, y: x * torch.rand_like(y), "a random op"),
        (lambda x, y: torch.nn.functional.dropout(x, 0.5) + y, "a random op"),
    ],
)
def test_graphs_a_replay_cannot_reproduce_are_declined(fn, why):
    plan, _ = _plan(fn, torch.randn(3, 4), torch.randn(3, 4))
    assert why in plan.reason


def test_symbolic_sizes_are_declined():
    plan, _ = _plan(lambda x: x * x.shape[0], torch.randn(5, 3), dynamic=True)
    assert "not tensors" in plan.reason


def test_writing_a_static_input_is_replayable():
    buf = torch.zeros(4)
    torch._dynamo.mark_static_address(buf)
    plan, names = _plan(lambda b, x: b.add_(x).sum(), buf, torch.ones(4))
    assert plan.reason == "" and plan.static == (True, False), (plan, names)


def test_cpu_graphs_are_not_cuda_graphs():
    seen = {}

    def capture(gm, example_inputs, **_):
        seen["plan"] = replay_plan(gm, example_inputs)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(lambda x: x + 1, backend=capture)(torch.randn(2))
    assert "not on one cuda device" in seen["plan"].reason
    with pytest.raises(ValueError, match="cannot be replayed: inputs on"):
        GraphReplay(lambda a: a, seen["plan"])
    assert isinstance(seen["plan"], ReplayPlan)


def test_calls_before_a_capture_run_the_compiled_callable():
    """Dynamo calls a backend's result with the inputs as arguments (a ``_boxed_call`` flag
    made neither torch 2.11 nor 2.13 pass a list); calls before the capture (``warmup``) run
    the compiled callable as is, on any device."""
    seen = []

    def inner(*args):
        seen.append(len(args))
        return (args[0] + args[1],)

    replay = GraphReplay(inner, ReplayPlan((False, False)), warmup=10)
    x, y = torch.ones(3), torch.arange(3.0)
    (a,) = replay(x, y)
    torch.testing.assert_close(a, x + y)
    assert seen == [2] and replay.captures == 0


def test_a_backend_returning_a_replay_runs_under_torch_compile():
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs, **_):
        return GraphReplay(compile_fx(gm, example_inputs), ReplayPlan((False,) * len(example_inputs)), warmup=10)

    torch._dynamo.reset()
    f = torch.compile(lambda x, y: (x * y).sum(-1), backend=backend)
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(f(x, y), (x * y).sum(-1))


def test_the_static_address_check_reads_one_address_per_input():
    """The replay's check (torch's own where it has it) finds a static input that moved and
    only that: on the H200 a list of the static inputs' addresses alone failed every call."""
    from lychee_fx.replay import _ptrs_equal

    args = [torch.ones(3), torch.ones(2), torch.zeros(4)]
    ptrs = [None, args[1].data_ptr(), args[2].data_ptr()]
    assert _ptrs_equal(args, ptrs, [1, 2])
    assert _ptrs_equal([torch.ones(3), args[1], args[2]], ptrs, [1, 2]), "a copied input may move"
    assert not _ptrs_equal([args[0], torch.ones(2), args[2]], ptrs, [1, 2])


def test_tensor_subclass_inputs_are_declined():
    """A wrapper subclass (DTensor parameters under tensor parallelism; TwoTensor here, the same
    kind of subclass) keeps its data in inner tensors: the plan declines, and the backend keeps
    Inductor's CUDA-graph trees, which see the inner tensors."""
    from torch.testing._internal.two_tensor import TwoTensor

    w = TwoTensor(torch.randn(4, 4), torch.randn(4, 4))
    plan, _ = _plan(lambda x, w: x @ w, torch.randn(3, 4), w)
    assert "tensor-subclass inputs (TwoTensor" in plan.reason
    plan, _ = _plan(lambda x, w: x @ w, torch.randn(3, 4), torch.randn(4, 4))
    assert plan.reason == ""


def test_a_failed_capture_runs_the_compiled_callable_and_says_why(monkeypatch):
    """A capture that raises (as a DTensor's address did on the H200) leaves the graph running
    as compiled, never captures again, and tells ``on_fail`` why: the backend's report then
    says the graph runs without CUDA graphs instead of "lychee replay"."""
    told = []
    replay = GraphReplay(lambda a, b: a + b, ReplayPlan((False, False)), warmup=1, on_fail=told.append)

    def fail(args):
        raise RuntimeError("Attempted to access the data pointer on an invalid python storage.")

    monkeypatch.setattr(replay, "_capture", fail)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    x, y = torch.ones(2), torch.full((2,), 2.0)
    for _ in range(4):
        assert torch.equal(replay(x, y), x + y)
    assert told == ["RuntimeError: Attempted to access the data pointer on an invalid python storage."]
    assert replay.captures == 0 and replay.graph is None
