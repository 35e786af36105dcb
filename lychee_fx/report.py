"""What the backend did to each attention site: found, rewritten or declined, and why."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

__all__ = ["SiteReport", "CompileReport", "REWRITTEN", "DECLINED"]

REWRITTEN = "rewritten"
DECLINED = "declined"


@dataclasses.dataclass(frozen=True)
class SiteReport:
    """One attention site of one compiled graph."""

    graph: int  # index of the graph in compile order
    node: str  # the FX node that computed the attention output
    kind: str  # "sdpa" | "eager"
    layer: int | None  # role-map row, None when it could not be told
    status: str  # REWRITTEN | DECLINED
    reason: str = ""  # why it was declined (empty when rewritten)
    query_len: str = "?"
    query_heads: int | None = None
    kv_heads: int | None = None
    kv_len: str = "?"
    retrieval_heads: tuple[int, ...] = ()  # effective (SPEC 1.1: unfilled sparse heads count)
    sparse_heads: tuple[int, ...] = ()
    select: bool = False  # whether this layer's retrieval heads compute a new selection

    def line(self) -> str:
        where = f"graph {self.graph} layer {self.layer if self.layer is not None else '?'} ({self.kind}, {self.node})"
        if self.status == REWRITTEN:
            return (
                f"{where}: rewritten; retrieval KV heads {list(self.retrieval_heads)}, "
                f"sparse {list(self.sparse_heads)}{', selects' if self.select else ''}"
            )
        return f"{where}: declined: {self.reason}"


@dataclasses.dataclass
class CompileReport:
    """Every site of every graph a backend compiled, in order."""

    sites: list[SiteReport] = dataclasses.field(default_factory=list)
    graphs: int = 0
    restarts: int = 0  # compiles that raised (Dynamo restarts): their sites are not listed
    ops_after_aot: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    linear_groups: list = dataclasses.field(default_factory=list)  # passes.linears.LinearGroup per decode_linear
    cuda_graphs: list = dataclasses.field(default_factory=list)  # (graph, how) for graphs run under CUDA graphs
    pooled_layers: int = 0  # layers whose retrieval and sparse ops became one hybrid_attention (passes/pool.py)
    # Under tensor parallelism: the role-map columns this rank reads (a tensor_parallel.HeadShard);
    # site head lists are then in role-map indices. None in a single process.
    shard: Any = None

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == REWRITTEN]

    @property
    def declined(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == DECLINED]

    @property
    def counters(self) -> collections.Counter:
        """``found``, ``rewritten``, ``declined`` and ``declined: <reason>`` counts."""
        c = collections.Counter(found=len(self.sites))
        for s in self.sites:
            c[s.status] += 1
            if s.status == DECLINED:
                c[f"declined: {s.reason}"] += 1
        return c

    def summary(self) -> str:
        c = self.counters
        head = (
            f"lychee_fx: {self.graphs} graph(s), {c['found']} attention site(s): "
            f"{c['rewritten']} rewritten, {c['declined']} declined"
        )
        shard = [f"  {self.shard.line()}"] if self.shard is not None else []
        lines = [head, *shard, *("  " + s.line() for s in self.sites)]
        for graph, how in self.cuda_graphs:
            lines.append(f"  graph {graph}: CUDA graphs by {how}")
        if self.linear_groups:
            n = sum(len(g.nodes) for g in self.linear_groups)
            lines.append(f"  {n} linear(s) run as {len(self.linear_groups)} decode_linear launch(es)")
        if self.pooled_layers:
            lines.append(f"  {self.pooled_layers} layer(s) with retrieval and sparse heads in one launch pair")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
