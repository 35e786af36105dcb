"""Tensor parallelism: which KV heads of the role map the graph on this rank reads.

Under ``torch.distributed`` tensor parallelism (HF ``from_pretrained(..., tp_plan="auto")``,
``torch.distributed.tensor.parallel.parallelize_module``) the K and V projections are sharded
colwise: their weights are ``Shard(0)`` over a group of ``T`` ranks, so rank ``r`` computes
the ``r``-th contiguous block of output features, which for a head-major projection is the
block of KV heads ``[r * h, (r + 1) * h)``, ``h = Hkv / T``. The graph Dynamo traces on that
rank reads ``h`` KV heads per layer, and its attention must read columns
``r * h .. (r + 1) * h - 1`` of the ``(L, Hkv)`` role map. No selection crosses ranks: a
sparse head reuses the selection of the retrieval head with its own KV index, which lives on
its rank, so SPEC 1.1 decomposes column by column.

Per graph (``shard_for_graph``), with ``h`` read off the graph (``passes.kv_heads``):

    h == Hkv                  the whole map (one process; or a plan that leaves attention
                              unsharded, as HF's Phi3 and OLMo2 plans do)
    h * T == Hkv              columns [r * h, (r + 1) * h) of the map
    anything else             TensorParallelMismatch naming the rank, T, h and Hkv

The group ``(r, T)`` comes, in this order, from ``lychee_fx.backend(..., tp=...)`` (a
``DeviceMesh``, a ``ProcessGroup`` or ``(rank, size)``), from the graph's DTensor inputs (the
parameters that the plan sharded, all along one mesh dimension), or from the process group
that the graph's functional collectives name (tensor parallelism written with plain tensors
and ``all_reduce``). Without ``torch.distributed`` (or in a world of one) nothing changes.
Assumed, and not provable from a graph: a rank's heads are one contiguous block, as ``Shard``
of a head-major projection gives; a plan that interleaves heads over ranks is not supported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from lychee_fx.passes.kv_heads import decode_kv_heads
from lychee_fx.passes.rewrite import RoleMapMismatch
from lychee_fx.report import SiteReport
from lychee_fx.roles import HeadRoles

__all__ = ["TPGroup", "HeadShard", "TensorParallelMismatch", "coerce_tp", "find_group", "shard_for_graph"]

TP_ARG = "tp=<DeviceMesh | ProcessGroup | (rank, size)>"
_COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d_functional")


class TensorParallelMismatch(RoleMapMismatch):
    """The KV heads a rank reads cannot be matched to columns of the role map."""


@dataclasses.dataclass(frozen=True)
class TPGroup:
    """This rank's place in its tensor-parallel group, and where that was learned."""

    rank: int
    size: int
    source: str

    def where(self) -> str:
        return f"rank {self.rank} of {self.size} ({self.source})"


@dataclasses.dataclass(frozen=True)
class HeadShard:
    """The columns of the role map that this rank's graph reads, as global KV head indices."""

    rank: int
    size: int
    kv_heads: tuple[int, ...]  # global KV heads, ascending; local head i is kv_heads[i]
    num_kv_heads: int  # the role map's Hkv
    source: str

    def columns(self, roles: HeadRoles) -> HeadRoles:
        """The ``(L, len(kv_heads))`` role map this rank's graph applies."""
        return HeadRoles(roles.table[:, list(self.kv_heads)], meta=roles.meta)

    def to_global(self, site: SiteReport) -> SiteReport:
        """A site report with its head lists in role-map (global) indices."""
        return dataclasses.replace(
            site,
            retrieval_heads=tuple(self.kv_heads[h] for h in site.retrieval_heads),
            sparse_heads=tuple(self.kv_heads[h] for h in site.sparse_heads),
        )

    def line(self) -> str:
        held = f"KV heads {list(self.kv_heads)} of the role map's {self.num_kv_heads}"
        if len(self.kv_heads) == self.num_kv_heads:
            held = f"all {self.num_kv_heads} KV heads of the role map (this rank's attention is not sharded)"
        return f"rank {self.rank} of {self.size} holds {held}; from {self.source}"


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() else None


def _group_of(group: Any, source: str) -> TPGroup:
    dist = _dist()
    return TPGroup(dist.get_rank(group), dist.get_world_size(group), source)


def _mesh_dim_group(mesh: Any, dim: int, source: str) -> TPGroup:
    names = mesh.mesh_dim_names
    name = f" {names[dim]!r}" if names else ""
    return TPGroup(mesh.get_local_rank(dim), mesh.size(dim), f"{source}, mesh dim {dim}{name} of {mesh.size(dim)} ranks")


def coerce_tp(tp: Any) -> TPGroup | None:
    """Validate ``backend(tp=...)``: None (find it), a DeviceMesh (1-D, or with a dim named
    ``"tp"``), a ProcessGroup, or ``(rank, size)`` ints."""
    if tp is None:
        return None
    if isinstance(tp, (tuple, list)):
        if len(tp) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in tp):
            raise TypeError(f"tp as a sequence must be (rank, size), two ints, got {tp!r}")
        rank, size = tp
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"tp=(rank, size) needs size >= 1 and 0 <= rank < size, got rank={rank}, size={size}")
        return TPGroup(rank, size, f"tp=({rank}, {size})")
    dist = _dist()
    if dist is not None:
        from torch.distributed.device_mesh import DeviceMesh

        if isinstance(tp, DeviceMesh):
            if tp.ndim == 1:
                return _mesh_dim_group(tp, 0, "tp=DeviceMesh")
            names = tp.mesh_dim_names or ()
            if "tp" not in names:
                raise ValueError(
                    f"tp: a DeviceMesh of {tp.ndim} dims must name one dim 'tp', got dim names {names or None}"
                )
            return _mesh_dim_group(tp, names.index("tp"), "tp=DeviceMesh")
        if isinstance(tp, dist.ProcessGroup):
            return _group_of(tp, "tp=ProcessGroup")
    raise TypeError(f"tp must be None, a DeviceMesh, a ProcessGroup or (rank, size), got {type(tp).__name__}")


@dataclasses.dataclass(frozen=True)
class _Found:
    group: TPGroup | None
    why_not: str = ""  # when group is None: what the graph holds instead


def _dtensor_groups(tensors: Sequence[Any]) -> dict[tuple[int, ...], TPGroup]:
    """The groups the DTensors among ``tensors`` are sharded over, keyed by their global ranks."""
    from torch.distributed.tensor import DTensor

    dist = _dist()
    out: dict[tuple[int, ...], TPGroup] = {}
    for x in tensors:
        if not isinstance(x, DTensor):
            continue
        mesh = x.device_mesh
        for dim, placement in enumerate(x.placements):
            if placement.is_shard():
                ranks = tuple(dist.get_process_group_ranks(mesh.get_group(dim)))
                out.setdefault(ranks, _mesh_dim_group(mesh, dim, "the device mesh of the graph's DTensor parameters"))
    return out


def _collective_groups(graph: fx.Graph) -> dict[tuple[int, ...], TPGroup]:
    """The process groups the graph's functional collectives (``_c10d_functional``) name."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    dist = _dist()
    out: dict[tuple[int, ...], TPGroup] = {}
    for node in graph.nodes:
        # Dynamo's graphs call the OpOverloadPacket (no .namespace); str() is "ns.op[.overload]".
        is_op = isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))
        if node.op != "call_function" or not is_op or str(node.target).split(".")[0] not in _COLLECTIVE_NAMESPACES:
            continue
        names = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, str)]
        if not names:
            continue
        try:
            pg = _resolve_process_group(names[-1])
        except (KeyError, ValueError, RuntimeError):
            continue
        op, ranks = str(node.target).split(".")[1], tuple(dist.get_process_group_ranks(pg))
        out.setdefault(ranks, _group_of(pg, f"the process group of the graph's {op} (global ranks {list(ranks)})"))
    return out


def find_group(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> _Found:
    """This rank's tensor-parallel group, from the graph: DTensor inputs first, then collectives."""
    dist = _dist()
    if dist is None or not dist.is_initialized():
        return _Found(None, "torch.distributed is not initialized")
    for what, groups in (
        ("DTensor inputs", lambda: _dtensor_groups([*example_inputs, *gm.parameters(), *gm.buffers()])),
        ("collectives", lambda: _collective_groups(gm.graph)),
    ):
        found = groups()
        if len(found) == 1:
            return _Found(next(iter(found.values())))
        if len(found) > 1:
            listed = "; ".join(f"global ranks {list(r)}" for r in found)
            return _Found(None, f"the graph's {what} span {len(found)} process groups ({listed})")
    return _Found(None, "the graph holds no DTensor input sharded over a mesh and no collective naming a process group")


def shard_for_graph(
    gm: fx.GraphModule, example_inputs: Sequence[Any], roles: HeadRoles, tp: TPGroup | None
) -> HeadShard | None:
    """The role-map columns this rank's graph reads, or None when it reads the map as it is in
    a single process (the pass then checks the map as it always has).

    Raises TensorParallelMismatch when the graph's decode attention reads a number of KV heads
    that neither equals the map's nor divides it over the ranks of the tensor-parallel group.
    """
    counts = decode_kv_heads(gm.graph)
    hkv = roles.num_kv_heads
    definite = sorted({c.kv_heads for c in counts if c.definite})
    heads = definite or sorted({c.kv_heads for c in counts})
    if len(heads) != 1:
        # No decode attention, or layers that read different numbers of heads: the pass
        # checks each site against the whole map (and raises where one does not fit it).
        return None
    h = heads[0]
    found = _Found(tp) if tp is not None else find_group(gm, example_inputs)
    group = found.group
    if h == hkv:
        if group is None or group.size == 1:
            return None
        return HeadShard(group.rank, group.size, tuple(range(hkv)), hkv, group.source)
    if group is None:
        dist = _dist()
        if definite and dist is not None and dist.is_initialized() and dist.get_world_size() > 1:
            raise TensorParallelMismatch(
                f"this graph reads {h} KV heads per layer and the role map has {hkv}, but which of them this "
                f"rank (global rank {dist.get_rank()} of {dist.get_world_size()}) holds cannot be told: "
                f"{found.why_not}; pass {TP_ARG} to lychee_fx.backend"
            )
        return None  # one process: the pass raises its RoleMapMismatch
    if group.size == 1:
        return None
    if h * group.size == hkv:
        return HeadShard(group.rank, group.size, tuple(range(group.rank * h, (group.rank + 1) * h)), hkv, group.source)
    if not definite:
        return None
    why = f"; {hkv} KV heads do not divide over {group.size} ranks" if hkv % group.size else ""
    raise TensorParallelMismatch(
        f"{group.where()} reads {h} KV heads per layer, so its {group.size} ranks hold {h * group.size} KV "
        f"heads, but the role map has {hkv}{why}; expected a role map of {h * group.size} KV heads per layer"
    )
