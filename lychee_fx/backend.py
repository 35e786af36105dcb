"""The ``torch.compile`` backend: validate once, rewrite each Dynamo graph, hand it to Inductor.

    compiled = torch.compile(model, backend=lychee_fx.backend(roles, budget=4096))
    model.compile(backend=lychee_fx.backend(roles))      # the form generate() honours

Per graph: ``passes.rewrite`` replaces decode attention with lychee ops, the site report is
appended to ``backend.report``, then ``compile_fx`` compiles the graph with config patches
given per compile (never written globally): the ``mode`` / ``options`` that
``torch.compile`` forwards, and a post-grad pass whose ``uuid()`` keys Inductor's FX-graph
cache on the lychee sources, the role map and the options, so that no graph compiled under
other kernels, roles or options is ever served from the cache.
"""

from __future__ import annotations

import collections
import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from lychee_fx.options import DecodeOptions
from lychee_fx.passes.linears import group_decode_linears
from lychee_fx.passes.pool import pool_layer_attention
from lychee_fx.passes.rewrite import rewrite_decode_attention
from lychee_fx.replay import GraphReplay, replay_plan
from lychee_fx.report import CompileReport
from lychee_fx.roles import HeadRoles, RolesLike
from lychee_fx.tensor_parallel import coerce_tp, shard_for_graph

__all__ = ["backend", "LycheeBackend", "source_digest"]

log = logging.getLogger("lychee_fx")

_COMPILERS = ("inductor", "eager")
_CUDA_GRAPHS = ("lychee", "inductor")


def source_digest() -> str:
    """Hash of every source file of lychee_fx, its passes and its codegen: names the code a
    compiled graph or a benchmark result came from (it keys Inductor's cache too)."""
    import lychee_fx
    import lychee_fx.codegen
    import lychee_fx.passes

    h = hashlib.sha256()
    for pkg in (lychee_fx, lychee_fx.passes, lychee_fx.codegen):
        for path in sorted(Path(pkg.__file__).parent.glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def kernel_settings() -> str:
    """The CUDA kernels' process-wide launch settings (``launch.SELECT_CONFIG`` and
    ``launch.SPLIT_CONFIG``, which a benchmark may pin at run time), as they are now: they key
    Inductor's cache beside the sources, so that a graph compiled under other settings is
    never served. Empty without Triton (the ops then run their torch implementations)."""
    try:
        from lychee_fx.codegen import launch
    except ImportError:
        return ""
    return f"{tuple(launch.SELECT_CONFIG)}|{tuple(launch.SPLIT_CONFIG)}"


def _custom_graph_pass_base():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    return CustomGraphPass


class _LycheeOpCensus(_custom_graph_pass_base()):
    """A post-grad pass that counts the lychee ops Inductor receives (proof that they
    survived AOT tracing undecomposed) and keys the FX-graph cache through ``uuid()``.

    Runs an inner user pass first when ``options`` carried one. On a cache hit Inductor runs
    no pass, so the census counts only graphs compiled afresh.
    """

    def __init__(self, key: str, census: collections.Counter, inner: Any = None):
        self.key, self.census, self.inner = key, census, inner

    def __call__(self, graph: fx.Graph) -> None:
        if self.inner is not None:
            self.inner(graph)
        for node in graph.nodes:
            if node.op == "call_function" and getattr(node.target, "namespace", None) == "lychee":
                self.census[str(node.target)] += 1

    def uuid(self) -> Any:
        inner = None
        if self.inner is not None:
            inner = self.inner.uuid() if hasattr(self.inner, "uuid") else None
            if inner is None:
                return None  # an un-keyable user pass: Inductor then bypasses the cache
        return f"lychee_fx:{self.key}:{kernel_settings()}:{inner}"


class LycheeBackend:
    """A ``torch.compile`` backend that rewrites decode attention per a role map.

    Attributes:
        roles: the validated :class:`HeadRoles`.
        options: the validated :class:`DecodeOptions`.
        report: a :class:`CompileReport` of every attention site of every compiled graph.
        tp: the tensor-parallel group given to :func:`backend` (a ``TPGroup``), or None.
    """

    def __init__(self, roles: RolesLike, options: DecodeOptions, *, compiler: str = "inductor",
                 linears: bool = True, cuda_graphs: str = "lychee", tp: Any = None, pool: bool = True):
        if compiler not in _COMPILERS:
            raise ValueError(f"compiler must be one of {_COMPILERS}, got {compiler!r}")
        if cuda_graphs not in _CUDA_GRAPHS:
            raise ValueError(f"cuda_graphs must be one of {_CUDA_GRAPHS}, got {cuda_graphs!r}")
        if not isinstance(linears, bool):
            raise TypeError(f"linears must be a bool, got {type(linears).__name__} ({linears!r})")
        if not isinstance(pool, bool):
            raise TypeError(f"pool must be a bool, got {type(pool).__name__} ({pool!r})")
        self.roles = HeadRoles.coerce(roles)
        self.tp = coerce_tp(tp)
        self.options = options
        self.compiler = compiler
        self.linears = linears
        self.pool = pool
        self.cuda_graphs = cuda_graphs
        self.report = CompileReport()
        self._warned_rows = False
        self._key = hashlib.sha256(
            f"{source_digest()}|{self.roles.digest()}|{sorted(options.as_dict().items())}|{torch.__version__}".encode()
        ).hexdigest()[:24]

    def __deepcopy__(self, memo: dict) -> LycheeBackend:
        # HF's CompileConfig.to_dict() deep-copies its backend before torch.compile: a copy
        # would compile with the same settings but report into a report nobody holds.
        # Roles and options are immutable, so sharing the object is safe.
        return self

    def __copy__(self) -> LycheeBackend:
        return self

    @property
    def cache_key(self) -> str:
        """What keys Inductor's cache for graphs this backend compiles."""
        return self._key

    def __repr__(self) -> str:
        o = self.options
        return (
            f"lychee_fx.backend({self.roles!r}, budget={o.budget}, block_size={o.block_size}, "
            f"sink={o.sink}, recent={o.recent}, compiler={self.compiler!r}, linears={self.linears}, "
            f"pool={self.pool}, cuda_graphs={self.cuda_graphs!r})"
        )

    def __call__(
        self,
        gm: fx.GraphModule,
        example_inputs: Sequence[Any],
        mode: str | None = None,
        options: dict[str, Any] | None = None,
        **unused: Any,
    ) -> Callable[..., Any]:
        index = self.report.graphs
        plan = replay_plan(gm, example_inputs)  # before the passes: Dynamo's fake tensors are all there
        # Tensor parallelism: this rank's graph reads some columns of the map (lychee_fx.tensor_parallel).
        shard = shard_for_graph(gm, example_inputs, self.roles, self.tp)
        roles = self.roles if shard is None else shard.columns(self.roles)
        sites = rewrite_decode_attention(gm, roles, self.options, graph_index=index)
        if shard is not None:
            sites = [shard.to_global(s) for s in sites]
            if shard != self.report.shard:
                log.info("lychee_fx: graph %d: %s", index, shard.line())
        for s in sites:
            if s.status == "declined":
                log.info("lychee_fx: %s", s.line())
        log.info(
            "lychee_fx: graph %d: %d attention site(s), %d rewritten",
            index, len(sites), sum(s.status == "rewritten" for s in sites),
        )
        seen = {s.layer for s in [*self.report.sites, *sites] if s.layer is not None}
        if seen and max(seen) + 1 < self.roles.num_layers and not self._warned_rows:
            # Not an error: a graph break can hide deeper layers from this graph.
            self._warned_rows = True
            log.warning(
                "lychee_fx: the role map has %d layers but the attention compiled so far stops at layer %d; "
                "if the model has %d layers the map does not fit it", self.roles.num_layers, max(seen), max(seen) + 1,
            )
        if self.compiler == "eager":
            compiled = gm.forward
        else:
            from torch._inductor.compile_fx import compile_fx

            from lychee_fx import codegen

            if codegen.available():
                codegen.register()  # CUDA graphs get Triton kernels; other devices are unchanged
                if self.linears:
                    groups = group_decode_linears(gm, graph_index=index)
                    self.report.linear_groups.extend(groups)
                    if groups:
                        log.info("lychee_fx: graph %d: %d linear(s) in %d decode_linear launch(es)", index,
                                 sum(len(g.nodes) for g in groups), len(groups))
                if self.pool:
                    pooled = pool_layer_attention(gm)
                    self.report.pooled_layers += pooled
                    if pooled:
                        log.info("lychee_fx: graph %d: %d layer(s) pooled into hybrid_attention", index, pooled)
            patches = self.config_patches(mode, options)
            graphs = bool(patches.get("triton.cudagraphs"))
            replay = graphs and self.cuda_graphs == "lychee" and not plan.reason
            if replay:
                patches["triton.cudagraphs"] = False  # the whole compiled callable is captured instead
            try:
                compiled = compile_fx(gm, example_inputs, config_patches=patches)
            except BaseException:
                # Dynamo restarts a trace from inside the compiler (TensorifyScalarRestartAnalysis
                # with dynamic=True on HF models) and calls the backend again with the new
                # graph: this attempt compiled nothing, so its sites stay out of the report.
                self.report.restarts += 1
                raise
            if replay:
                entry = len(self.report.cuda_graphs)  # where this graph's line goes, below

                def failed(why: str, entry=entry, index=index) -> None:
                    self.report.cuda_graphs[entry] = (index, f"none: lychee replay's capture failed ({why})")

                compiled = GraphReplay(compiled, plan, on_fail=failed)
            if graphs:
                how = "lychee replay" if replay else "Inductor's CUDA-graph trees" + (
                    f" ({plan.reason})" if self.cuda_graphs == "lychee" else "")
                self.report.cuda_graphs.append((index, how))
                log.info("lychee_fx: graph %d: CUDA graphs by %s", index, how)
        self.report.graphs += 1
        self.report.sites.extend(sites)
        if shard is not None:
            self.report.shard = shard
        return compiled

    def config_patches(self, mode: str | None, options: dict[str, Any] | None) -> dict[str, Any]:
        """Inductor config for one compile: the mode's options, the user's, and the cache key."""
        patches: dict[str, Any] = {}
        if mode not in (None, "default"):
            from torch._inductor import list_mode_options

            patches.update(list_mode_options(mode))
        patches.update(options or {})
        patches["post_grad_custom_post_pass"] = _LycheeOpCensus(
            self._key, self.report.ops_after_aot, patches.get("post_grad_custom_post_pass")
        )
        return patches


def backend(
    roles: RolesLike,
    *,
    budget: int = 4096,
    block_size: int = 64,
    sink: int = 128,
    recent: int = 256,
    compiler: str = "inductor",
    linears: bool = True,
    cuda_graphs: str = "lychee",
    tp: Any = None,
    pool: bool = True,
) -> LycheeBackend:
    """A ``torch.compile`` backend that decodes with LycheeDecode's hybrid heads.

    Args:
        roles: role map ``(num_layers, num_kv_heads)``, True = retrieval: a
            :class:`HeadRoles`, a bool tensor, nested lists of bools, or a JSON path.
        budget: tokens each sparse head attends to; a positive multiple of ``block_size``.
        block_size: cache slots per selection block (1 = token-level selection).
        sink, recent: the first / last valid positions every selection keeps.
        compiler: ``"inductor"`` (default) or ``"eager"`` (run the rewritten graph as is;
            for debugging and fast tests).
        linears: with Inductor on CUDA, run a decode step's linears (at most 8 rows) as
            ``lychee::decode_linear``: the projections that share an input (q, k and v; gate
            and up) in one kernel launch (``passes/linears.py``). False keeps cuBLAS.
        pool: with Inductor on CUDA, run a layer's retrieval and sparse heads as one
            ``lychee::hybrid_attention`` (``passes/pool.py``): one split launch and one
            reduce launch per layer instead of two of each and a concatenation. False keeps
            the two ops.
        cuda_graphs: when CUDA graphs are asked for (``mode="reduce-overhead"``, which HF's
            ``CompileConfig`` passes, or ``options={"triton.cudagraphs": True}``): ``"lychee"``
            replays each graph that ``replay.replay_plan`` admits as one CUDA graph with little
            host work per call (``lychee_fx/replay.py``), the others through Inductor's
            CUDA-graph trees; ``"inductor"`` uses the trees for all.
        tp: under tensor parallelism, the group the KV heads are sharded over: a
            ``DeviceMesh`` (1-D, or with a dim named ``"tp"``), a ``ProcessGroup`` or
            ``(rank, size)``. None (default): found from the graph (its DTensor parameters
            or collectives) when ``torch.distributed`` is initialized; each rank then applies
            its block of role-map columns (``lychee_fx.tensor_parallel``).

    All checks run here, outside traced code; errors name the expected and actual values.
    """
    opts = DecodeOptions(budget=budget, block_size=block_size, sink=sink, recent=recent)
    return LycheeBackend(roles, opts, compiler=compiler, linears=linears, cuda_graphs=cuda_graphs, tp=tp, pool=pool)
