"""Tensor parallelism in one process: ``backend(tp=...)`` validation, the shard a graph gets
from ``(rank, size)``, the errors, and the KV head count the pass reads off a graph. The
multi-process runs are in ``test_tensor_parallel.py``."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import lychee_fx
from lychee_fx import HeadRoles, RoleMapMismatch, TensorParallelMismatch
from lychee_fx.passes.kv_heads import decode_kv_heads
from lychee_fx.tensor_parallel import coerce_tp
from tests.attn_modules import Capture, Stack, mask4d, reference_stack

B, N, D = 2, 40, 16
OPTS = dict(budget=24, block_size=4, sink=4, recent=8)
ROLES = HeadRoles([[True, False, False, True], [False, True, True, False], [False, False, False, False]])


def _inputs(hq, hkv, layers=3, lq=1):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(layers, B, hq, lq, D, generator=g), torch.randn(layers, B, hkv, N, D, generator=g),
            torch.randn(layers, B, hkv, N, D, generator=g))


@pytest.mark.parametrize(
    "tp, exc, match",
    [
        ((2, 2), ValueError, r"tp=\(rank, size\) needs size >= 1 and 0 <= rank < size, got rank=2, size=2"),
        ((0, 0), ValueError, r"got rank=0, size=0"),
        ((0,), TypeError, r"tp as a sequence must be \(rank, size\), two ints, got \(0,\)"),
        ((0.0, 2), TypeError, r"two ints, got \(0.0, 2\)"),
        ((True, 2), TypeError, r"two ints, got \(True, 2\)"),
        ("tp", TypeError, r"tp must be None, a DeviceMesh, a ProcessGroup or \(rank, size\), got str"),
    ],
)
def test_tp_is_validated_at_backend_time(tp, exc, match):
    with pytest.raises(exc, match=match):
        lychee_fx.backend(ROLES, tp=tp)


@pytest.mark.parametrize("form", ["gqa", "repeat_kv", "eager"])
def test_a_rank_applies_its_block_of_columns(form):
    """Rank 1 of 2 reads KV heads 2 and 3 of 4 (and query heads 4..7 of 8): its decode equals
    the oracle's over the whole map, restricted to those heads."""
    qs, ks, vs = _inputs(8, 4)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, :6] = False
    mask = None if form == "gqa" else mask4d(valid)
    cap = Capture(lychee_fx.backend(ROLES, compiler="eager", tp=(1, 2), **OPTS))
    out = torch.compile(Stack(3, form), backend=cap, fullgraph=True)(qs[:, :, 4:], ks[:, :, 2:], vs[:, :, 2:], mask)
    ref = reference_stack(qs, ks, vs, valid if mask is not None else None, ROLES, lychee_fx.DecodeOptions(**OPTS))
    torch.testing.assert_close(out, ref[:, :, 4:].float(), rtol=1e-5, atol=1e-5)
    report = cap.report
    assert report.shard.kv_heads == (2, 3) and report.shard.num_kv_heads == 4
    assert "rank 1 of 2 holds KV heads [2, 3] of the role map's 4; from tp=(1, 2)" in report.summary()
    # role-map (global) indices in the report; columns 2, 3 of ROLES are .R / R. / ..
    assert [(s.retrieval_heads, s.sparse_heads) for s in report.sites] == [((2, 3), ()), ((2,), (3,)), ((), (2, 3))]


def test_a_rank_whose_attention_is_not_sharded_reads_the_whole_map():
    qs, ks, vs = _inputs(8, 4)
    be = lychee_fx.backend(ROLES, compiler="eager", tp=(0, 2), **OPTS)
    out = torch.compile(Stack(3, "gqa"), backend=be, fullgraph=True)(qs, ks, vs, None)
    ref = reference_stack(qs, ks, vs, None, ROLES, lychee_fx.DecodeOptions(**OPTS))
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    assert be.report.shard.kv_heads == (0, 1, 2, 3)
    assert "rank 0 of 2 holds all 4 KV heads of the role map (this rank's attention is not sharded)" in be.report.summary()


def test_a_map_that_does_not_divide_over_the_ranks():
    qs, ks, vs = _inputs(4, 2)
    roles = HeadRoles([[True, False, True]] * 3)
    be = lychee_fx.backend(roles, compiler="eager", tp=(1, 2), **OPTS)
    with pytest.raises(Exception, match=(
        r"rank 1 of 2 \(tp=\(1, 2\)\) reads 2 KV heads per layer, so its 2 ranks hold 4 KV heads, but the role map "
        r"has 3; 3 KV heads do not divide over 2 ranks; expected a role map of 4 KV heads per layer"
    )) as e:
        torch.compile(Stack(3, "gqa"), backend=be, fullgraph=True)(qs, ks, vs, None)
    assert isinstance(getattr(e.value, "inner_exception", e.value), TensorParallelMismatch)
    assert issubclass(TensorParallelMismatch, RoleMapMismatch)


def test_a_map_of_the_wrong_width_that_divides():
    qs, ks, vs = _inputs(4, 2)
    be = lychee_fx.backend(HeadRoles.all_retrieval(3, 8), compiler="eager", tp=(0, 2), **OPTS)
    with pytest.raises(Exception, match=r"rank 0 of 2 \(tp=\(0, 2\)\) reads 2 KV heads .* hold 4 KV heads, but the role map has 8; expected"):
        torch.compile(Stack(3, "gqa"), backend=be, fullgraph=True)(qs, ks, vs, None)


def test_a_world_of_one_is_a_single_process():
    """tp=(0, 1) changes nothing: no shard, and a map that does not fit is the pass's own error."""
    qs, ks, vs = _inputs(4, 2)
    be = lychee_fx.backend(HeadRoles.first_k(3, 2, 1), compiler="eager", tp=(0, 1), **OPTS)
    torch.compile(Stack(3, "gqa"), backend=be, fullgraph=True)(qs, ks, vs, None)
    assert be.report.shard is None and be.report.counters["rewritten"] == 3
    torch._dynamo.reset()
    be = lychee_fx.backend(ROLES, compiler="eager", tp=(0, 1), **OPTS)
    with pytest.raises(Exception, match="the role map has 4 KV heads per layer, but this attention reads 2 KV heads"):
        torch.compile(Stack(3, "gqa"), backend=be, fullgraph=True)(qs, ks, vs, None)


@pytest.mark.parametrize("form, hkv, definite", [("gqa", 2, True), ("repeat_kv", 2, True), ("eager", 2, True), ("gqa", 4, False),
                                                 ("tile", 2, True)])
def test_decode_kv_heads_reads_the_folded_head_count(form, hkv, definite):
    """K's heads once repeat_kv (or a repeat tiling) is folded; with as many K heads as query heads and no fold
    (multi-head attention, or an expansion the pass cannot fold) the count is indefinite."""
    qs, ks, vs = _inputs(4, hkv)
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(Stack(3, form), backend=keep, fullgraph=True)(qs, ks, vs, None)
    counts = decode_kv_heads(graphs[0].graph)
    assert [(c.kv_heads, c.query_heads, c.definite) for c in counts] == [(hkv, 4, definite)] * 3


def test_decode_kv_heads_leaves_prefill_out():
    qs, ks, vs = _inputs(4, 2, lq=3)
    graphs = []
    torch.compile(Stack(3, "gqa"), backend=lambda gm, ex: graphs.append(gm) or gm.forward, fullgraph=True)(qs, ks, vs, None)
    assert decode_kv_heads(graphs[0].graph) == []


@pytest.fixture
def world_of_one(tmp_path):
    """torch.distributed in this process, one rank over gloo, torn down after the test."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_tp_takes_a_device_mesh_or_a_process_group(world_of_one):
    from torch.distributed.device_mesh import init_device_mesh

    group = coerce_tp(init_device_mesh("cpu", (1,)))
    assert (group.rank, group.size) == (0, 1) and "tp=DeviceMesh, mesh dim 0" in group.source
    group = coerce_tp(init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp")))
    assert (group.rank, group.size) == (0, 1) and "mesh dim 1 'tp'" in group.source
    group = coerce_tp(dist.group.WORLD)
    assert (group.rank, group.size, group.source) == (0, 1, "tp=ProcessGroup")
    with pytest.raises(ValueError, match=r"a DeviceMesh of 2 dims must name one dim 'tp', got dim names \('dp', 'cp'\)"):
        lychee_fx.backend(ROLES, tp=init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "cp")))
    with pytest.raises(ValueError, match=r"a DeviceMesh of 2 dims must name one dim 'tp', got dim names None"):
        lychee_fx.backend(ROLES, tp=init_device_mesh("cpu", (1, 1)))


def _graph_of(module, *inputs):
    graphs = []
    torch.compile(module, backend=lambda gm, ex: graphs.append(gm) or gm.forward, fullgraph=True)(*inputs)
    return graphs[0]


def test_decode_linear_leaves_dtensor_linears_alone(world_of_one):
    """A ``parallelize_module`` plan leaves DTensor linears in the graph; ``decode_linear`` has
    no sharding rule, so the linear pass must not take them (it takes the same linears unsharded)."""
    import torch.nn as nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from lychee_fx.passes.linears import group_decode_linears

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(2, 16)
    plain = _graph_of(mlp, x)
    assert len(group_decode_linears(plain, device_type="cpu")) == 2
    torch._dynamo.reset()
    parallelize_module(mlp, init_device_mesh("cpu", (1,)), {"0": ColwiseParallel(), "2": RowwiseParallel()})
    sharded = _graph_of(mlp, x)
    assert group_decode_linears(sharded, device_type="cpu") == []


def test_replay_declines_dtensor_parameters(world_of_one):
    """Under a ``parallelize_module`` plan the graph's parameters are DTensors: lychee's replay
    declines them (the H200 capture failed reading a DTensor's address and the step ran with no
    CUDA graphs), so that the backend keeps Inductor's CUDA-graph trees."""
    import torch.nn as nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from lychee_fx.replay import replay_plan

    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(2, 16)
    plans = []

    def capture(gm, example_inputs, **_):
        plans.append(replay_plan(gm, example_inputs, device_type="cpu"))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(mlp, backend=capture)(x)
    assert plans[-1].reason == ""
    torch._dynamo.reset()
    parallelize_module(mlp, init_device_mesh("cpu", (1,)), {"0": ColwiseParallel(), "2": RowwiseParallel()})
    torch.compile(mlp, backend=capture)(x)
    assert "tensor-subclass inputs (DTensor" in plans[-1].reason
