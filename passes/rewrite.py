"""Rewrite decode attention into lychee retrieval and sparse ops (SPEC 1.1).

For each graph Dynamo hands the backend:

1. find every attention site (``find_attention``), number its layer (``layers``);
2. prove what a rewrite needs from the fake tensors: one query position, no dropout, a
   constant scale, K/V un-expandable to ``(B, Hkv, N, D)`` (``gqa``; V may have a head dim of
   its own), masks that are one row of ``N`` slots per batch entry (several are combined into
   one), per-head biases that are one row per query head; otherwise decline, leaving the site
   as it was. K/V read straight from a cache that holds ``r`` copies of each of the role
   map's KV heads (Falcon's new decoder architecture) are taken as they are: the cache's
   heads are the KV heads, head ``h`` reading role column ``h // r`` (``reference``'s
   extension). K/V tiled by ``repeat(1, G, 1, 1)`` (JetMoE: query head ``t * Hkv + h``
   reads KV head ``h``) fold back too; the ops then get q with each group's heads together
   and the output rows go back to the model's order;
3. walk the decode sites in forward order, tracking which KV indices have a selection yet
   (SPEC 1.1: a sparse head with none acts as retrieval), and replace each site by

       ret, sel' = lychee.retrieval_attention(q, k, v, mask, sel, R_heads, ...)   # R_heads != []
       spa       = lychee.sparse_attention(q, k, v, mask, sel', S_heads, ...)     # S_heads != []
       out       = cat([ret, spa], dim=1)[:, query-head order]                     # (B, Hq, 1, D)

   with ``sel`` (B, Hkv, S) int32 flowing from site to site; the first site of a graph starts
   with none. Role rows enter as literal ``int[]`` arguments.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from lychee_fx import ops as lychee_ops  # noqa: F401 - registers torch.ops.lychee
from lychee_fx.options import DecodeOptions
from lychee_fx.passes.find_attention import AttentionSite, BiasTerm, find_attention_sites
from lychee_fx.passes.gqa import fold_kv_expansion
from lychee_fx.passes.graph_utils import (erase_dead, fake, is_call, known_equal, known_int, may_equal, shape_str,
                                         traced_int)
from lychee_fx.passes.layers import cache_input, number_layers
from lychee_fx.report import DECLINED, REWRITTEN, SiteReport
from lychee_fx.roles import HeadRoles

__all__ = ["rewrite_decode_attention", "RoleMapMismatch"]

log = logging.getLogger("lychee_fx")

RETRIEVAL = torch.ops.lychee.retrieval_attention.default
SPARSE = torch.ops.lychee.sparse_attention.default


class RoleMapMismatch(ValueError):
    """The role map does not fit the model's attention layers or heads."""


class _Decline(Exception):
    pass


@dataclasses.dataclass
class _Plan:
    """A decode site the ops can express, with every input proven."""

    site: AttentionSite
    q: fx.Node  # (B, Hq, 1, D)
    k: fx.Node  # (B, Hkv, N, D)
    v: fx.Node
    hkv: int
    groups: int
    n: Any  # N, an int or a SymInt
    scale: float  # the constant part; site.scale_nodes hold any symbolic factors
    extra_dead: tuple[fx.Node, ...]  # GQA expansion nodes made dead by the rewrite
    copies: int = 1  # cache heads per role-map column (a cache holding expanded heads)
    mismatch: str = ""  # why the role map does not fit this site's KV heads (raised unless declined anyway)
    tiled: bool = False  # K/V tiled by repeat: query head t * Hkv + h reads KV head h (gqa)


def _plan(site: AttentionSite, num_kv_cols: int) -> _Plan:
    """Prove the site is a decode attention the ops express; raise _Decline otherwise."""
    if site.problem:
        raise _Decline(site.problem)
    qf, kf, vf = fake(site.q), fake(site.k), fake(site.v)
    if qf is None or kf is None or vf is None:
        raise _Decline("the shapes of q, k or v are unknown")
    if qf.dim() != 4 or kf.dim() != 4 or vf.dim() != 4:
        raise _Decline(f"expected 4-D q, k, v, got {qf.dim()}-D, {kf.dim()}-D, {vf.dim()}-D")
    b, hq, lq, d = qf.shape
    if not known_equal(lq, 1):
        raise _Decline(f"prefill: query length {lq} (only decode, length 1, is rewritten)")
    if site.dropout:
        raise _Decline(f"dropout_p={site.dropout}")
    if site.is_causal:
        raise _Decline("is_causal=True with one query attends only to slot 0 (SDPA's top-left causal mask)")
    q_node, k_node = site.q, site.k
    if not (qf.dtype == kf.dtype == vf.dtype):
        # GPT-Neo casts q and k (not v) to float32 before the dot products: read the
        # un-cast q and k when they have v's dtype (the cast was exact, or the ops are then
        # more precise than the model's dot products, never less)
        q_src, k_src = _uncast(site.q), _uncast(site.k)
        if q_src is not None and k_src is not None and fake(q_src).dtype == fake(k_src).dtype == vf.dtype:
            q_node, k_node = q_src, k_src
            qf, kf = fake(q_node), fake(k_node)
    if not (qf.dtype == kf.dtype == vf.dtype) or not qf.dtype.is_floating_point:
        raise _Decline(f"q, k, v dtypes differ or are not floating: {qf.dtype}, {kf.dtype}, {vf.dtype}")
    if known_int(d) is None:
        raise _Decline(f"head dim {d} is not a constant")
    d = known_int(d)
    if known_int(hq) is None:
        raise _Decline(f"query heads {hq} is not a constant")
    hq = known_int(hq)

    k, v, extra = k_node, site.v, ()
    fk, fv = fold_kv_expansion(k_node, tiling=True), fold_kv_expansion(site.v, tiling=True)
    folded = fk is not None and fv is not None and fk.groups == fv.groups and fk.tiled == fv.tiled
    tiled = folded and fk.tiled
    if folded:
        k, v, extra = fk.base, fv.base, fk.chain + fv.chain
        kf, vf = fake(k), fake(v)
    if tiled and (site.head_bias or site.sink_logits is not None):
        what = "a per-head bias" if site.head_bias else "sink logits"
        raise _Decline(f"{what} with K/V tiled by repeat (query head i reading KV head i % Hkv)")
    hk = known_int(kf.shape[1])
    if hk is None or hk < 1 or hq % hk:
        raise _Decline(f"K has {kf.shape[1]} heads for {hq} query heads")
    if not folded and site.kind == "sdpa" and hk not in (1, hq) and not site.enable_gqa:
        raise _Decline(f"K has {hk} heads for {hq} query heads without enable_gqa")
    if not all(may_equal(a, c) for a, c in zip(kf.shape[:3], vf.shape[:3])):
        raise _Decline(f"K {shape_str(kf.shape)} and V {shape_str(vf.shape)} shapes differ")
    if known_int(vf.shape[3]) is None:
        raise _Decline(f"value head dim {vf.shape[3]} is not a constant")
    if not may_equal(kf.shape[0], b) or not known_equal(kf.shape[3], d) or known_equal(kf.shape[0], 1) != known_equal(b, 1):
        raise _Decline(f"K {shape_str(kf.shape)} does not match q {shape_str(qf.shape)} (batch broadcast or head-dim change)")
    copies, mismatch = 1, ""
    if hk != num_kv_cols:
        from_cache = cache_input(k) is not None and cache_input(v) is not None
        if not folded and hk % num_kv_cols == 0 and from_cache:
            copies = hk // num_kv_cols  # the cache holds expanded heads: they are the KV heads
        elif not folded and hk == hq and hq % num_kv_cols == 0:
            raise _Decline(
                f"K/V arrive with {hq} heads, expanded by an op the pass cannot fold back to the "
                f"role map's {num_kv_cols} KV heads"
            )
        else:
            # raised by the caller unless the site is declined for another reason first
            # (a sliding-window layer with heads of its own keeps its attention anyway)
            mismatch = (
                f"the role map has {num_kv_cols} KV heads per layer, but this attention reads "
                f"{hk} KV heads (K {shape_str(kf.shape)}, {hq} query heads)"
            )
    for mask, kind in site.masks:
        _check_mask(mask, kind, b, kf.shape[2])
    for term in site.head_bias:
        _check_head_bias(term, b, hq, kf.shape[2])
    if site.sink_logits is not None:
        sf = fake(site.sink_logits)
        if sf is None or not sf.dtype.is_floating_point or known_int(sf.numel()) != hq:
            raise _Decline(f"sink logits {None if sf is None else shape_str(sf.shape)} are not one per query head ({hq})")
    scale = d**-0.5 if site.scale is None and not site.scale_nodes else site.scale
    if not scale > 0:
        raise _Decline(f"scale {scale} is not positive")
    if site.softcap and not 0 < site.softcap < float("inf"):
        raise _Decline(f"soft-cap {site.softcap} is not a finite positive number")
    return _Plan(site, q_node, k, v, hk, hq // hk, kf.shape[2], float(scale), extra, copies, mismatch, tiled)


def _unexpanded(k: fx.Node | None) -> fx.Node | None:
    """K as the cache holds it: the source of a GQA expansion or tiling, else K itself (where
    ``layers.layer_from_cache`` reads the cache's layer index)."""
    folded = fold_kv_expansion(k, tiling=True) if isinstance(k, fx.Node) else None
    return folded.base if folded is not None else k


def _uncast(node: fx.Node) -> fx.Node | None:
    """The tensor a ``.to(dtype)`` / ``.float()`` cast (only a dtype change) was made from."""
    if is_call(node, methods=("float", "double", "half", "bfloat16")) and len(node.args) == 1:
        src = node.args[0]
    elif is_call(node, methods=("to",)) and len(node.args) == 2 and isinstance(node.args[1], torch.dtype) and not node.kwargs:
        src = node.args[0]
    else:
        return None
    s, o = fake(src), fake(node)
    if s is None or o is None or tuple(s.shape) != tuple(o.shape):
        return None
    return src


def _emit_scale(plan: _Plan, add) -> float | fx.Node:
    """The scale as an op argument: a float, or a node computing the symbolic product."""
    out: float | fx.Node = plan.scale
    for node, is_div in plan.site.scale_nodes:
        term = add(operator.truediv, (1.0, node)) if is_div else node
        out = term if isinstance(out, float) and out == 1.0 else add(operator.mul, (out, term))
    return out


def _check_mask(mask: fx.Node, kind: str, b: Any, n: Any) -> None:
    """Prove a mask is one row of N slots per batch entry (or one for all)."""
    mf = fake(mask)
    if mf is None:
        raise _Decline("the mask's shape is unknown")
    shape = list(mf.shape)
    if not 1 <= len(shape) <= 4:
        raise _Decline(f"mask of rank {len(shape)}")
    if known_equal(shape[-1], 1) and not known_equal(n, 1):
        raise _Decline(f"mask of length 1 broadcast over {n} keys")
    if not may_equal(shape[-1], n):
        raise _Decline(f"mask length {shape[-1]} differs from the KV length {n}")
    lead = [1] * (4 - len(shape)) + shape[:-1]  # (batch, heads, query)
    if not known_equal(lead[2], 1) or not known_equal(lead[1], 1):
        raise _Decline(f"per-head or per-query mask {shape_str(mf.shape)}")
    if not (known_equal(lead[0], 1) or (may_equal(lead[0], b) and not known_equal(b, 1))):
        raise _Decline(f"mask batch {lead[0]} is neither 1 nor {b}")
    if kind == "fill":
        if mf.dtype != torch.bool:
            raise _Decline(f"masked_fill condition of dtype {mf.dtype}")
    elif mf.dtype != torch.bool and not mf.dtype.is_floating_point:
        raise _Decline(f"mask of dtype {mf.dtype}")


def _check_head_bias(term: BiasTerm, b: Any, hq: int, n: Any) -> None:
    """Prove a per-head bias is one row of N slots per query head (per batch entry, or one
    for all): (B or 1, Hq, 1, N) against 4-D scores, (B * Hq, 1, N) against 3-D ones."""
    tf = fake(term.node)
    if tf is None or not tf.dtype.is_floating_point:
        raise _Decline("a position bias of unknown shape or not floating")
    shape = list(tf.shape)
    if term.merged:
        if len(shape) != 3 or not known_equal(shape[1], 1) or not may_equal(shape[0], b * hq):
            raise _Decline(f"position bias {shape_str(tf.shape)} against (B * Hq, 1, N) scores")
    else:
        if len(shape) > 4:
            raise _Decline(f"position bias of rank {len(shape)}")
        shape = [1] * (4 - len(shape)) + shape
        if not known_equal(shape[1] * term.groups, hq) or not known_equal(shape[2], 1):
            raise _Decline(f"position bias {shape_str(tf.shape)} is not one row per query head")
        if not (known_equal(shape[0], 1) or (may_equal(shape[0], b) and not known_equal(b, 1))):
            raise _Decline(f"position bias batch {shape[0]} is neither 1 nor {b}")
    if known_equal(shape[-1], 1) and not known_equal(n, 1):
        raise _Decline(f"position bias of length 1 broadcast over {n} keys")
    if not may_equal(shape[-1], n):
        raise _Decline(f"position bias length {shape[-1]} differs from the KV length {n}")


def _emit_one_mask(mask: fx.Node, kind: str, add) -> fx.Node:
    """A checked mask as (B or 1, N): bool (True = valid) or additive float."""
    node = mask
    rank = fake(node).dim()
    if rank == 1:
        node = add(torch.unsqueeze, (node, 0))
    elif rank > 2:
        node = add(torch.flatten, (node, 0, -2))
    if kind == "fill":
        node = add(torch.logical_not, (node,))
    return node


def _emit_mask(site: AttentionSite, add) -> fx.Node | None:
    """The site's (checked) masks combined into one (B or 1, N) mask: bool masks ANDed; with
    any additive mask, the additive ones summed (finfo.min + finfo.min is -inf: still invalid)
    and -inf where a bool mask says invalid."""
    if not site.masks:
        return None
    parts = [(_emit_one_mask(m, kind, add), fake(m).dtype == torch.bool or kind == "fill") for m, kind in site.masks]
    bools = [node for node, is_bool in parts if is_bool]
    floats = [node for node, is_bool in parts if not is_bool]
    out = None
    for node in floats:
        out = node if out is None else add(operator.add, (out, node))
    if out is None:
        for node in bools:
            out = node if out is None else add(torch.logical_and, (out, node))
        return out
    for node in bools:
        out = add(torch.where, (node, out, float("-inf")))
    return out


def _emit_head_bias(site: AttentionSite, hq: int, add) -> fx.Node | None:
    """The site's (checked) per-head bias terms summed, as (B or 1, Hq, N)."""
    out = None
    for term in site.head_bias:
        node = term.node
        if term.merged:  # (B * Hq, 1, N) -> (B, Hq, N)
            node = add(torch.unflatten, (node, 0, (-1, hq)))
        else:
            for _ in range(4 - fake(node).dim()):
                node = add(torch.unsqueeze, (node, 0))
        node = add(torch.select, (node, 2, 0))  # (B or 1, Hq, N); (B or 1, Hkv, N) with groups
        if term.groups > 1:
            node = add(torch.repeat_interleave, (node, term.groups), {"dim": 1})
        if term.coef != 1.0:
            node = add(operator.mul, (node, term.coef))
        out = node if out is None else add(operator.add, (out, node))
    return out


def _emit_sink_logits(site: AttentionSite, hq: int, add) -> fx.Node | None:
    """The site's sink logits as (Hq,) (checked: one per query head, broadcast as (1, Hq, 1, 1))."""
    if site.sink_logits is None:
        return None
    return add(torch.reshape, (site.sink_logits, (hq,)))


def _group_member(p: _Plan, i: int) -> tuple[int, int]:
    """Query head ``i`` of the model -> (its KV head h, its place t in h's group)."""
    return (i % p.hkv, i // p.hkv) if p.tiled else (i // p.groups, i % p.groups)


def _query_rows(p: _Plan) -> list[int]:
    """Row ``h * G + t`` of the ops' q: the model's query head that is member t of group h."""
    where = {_group_member(p, i): i for i in range(p.hkv * p.groups)}
    return [where[(h, t)] for h in range(p.hkv) for t in range(p.groups)]


def _output_rows(p: _Plan, order: list[int]) -> list[int]:
    """Per query head of the model, its row in the ops' output (B, Hq, 1, Dv): the groups of
    the KV heads in ``order`` (retrieval then sparse), G rows each."""
    pos = {h: n for n, h in enumerate(order)}
    return [pos[h] * p.groups + t for h, t in (_group_member(p, i) for i in range(p.hkv * p.groups))]


def _index(add, rows: list[int], like: fx.Node) -> fx.Node:
    """``rows`` as a long tensor built inside the graph (a literal: SPEC 5, no attached buffer)."""
    return add(torch.tensor, (rows,), {"dtype": torch.long, "device": fake(like).device})


class _NodeAdder:
    """Creates nodes before ``anchor`` and gives each a fake value (Inductor's pre-grad
    passes read ``example_value``), computed under the graph's fake mode."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, meta_from: fx.Node):
        self.graph, self.anchor, self.meta_from = graph, anchor, meta_from

    def __call__(self, target, args, kwargs=None) -> fx.Node:
        kwargs = kwargs or {}
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in self.meta_from.meta:
                node.meta[key] = self.meta_from.meta[key]
        fake_args = fx.node.map_arg(args, lambda n: n.meta.get("example_value", n.meta.get("val")))
        fake_kwargs = fx.node.map_arg(kwargs, lambda n: n.meta.get("example_value", n.meta.get("val")))
        mode = getattr(fake(self.anchor), "fake_mode", None)
        if mode is not None:
            with mode:
                node.meta["example_value"] = target(*fake_args, **fake_kwargs)
        return node


def _needs_selection(roles: Sequence[tuple[bool, ...]]) -> list[bool]:
    """Per site (effective roles in forward order): does the next site at the index of one
    of its retrieval heads read that head's selection (as a sparse head)?"""
    out = []
    for i in range(len(roles)):
        need = False
        for h in (h for h, r in enumerate(roles[i]) if r):
            for j in range(i + 1, len(roles)):
                if roles[j][h]:
                    break  # overwritten before anyone reads it
                need = True
                break
        out.append(need)
    return out


def rewrite_decode_attention(
    gm: fx.GraphModule, roles: HeadRoles, opts: DecodeOptions, graph_index: int = 0
) -> list[SiteReport]:
    """Rewrite ``gm`` in place; return one report per attention site, in graph order.

    Raises RoleMapMismatch when the role map does not fit the model.
    """
    graph = gm.graph
    sites = find_attention_sites(graph)
    layers, how = number_layers([s.anchor for s in sites], roles.num_layers, [_unexpanded(s.k) for s in sites],
                                [_unexpanded(s.v) for s in sites])
    reports: list[SiteReport | None] = [None] * len(sites)
    plans: list[tuple[int, _Plan]] = []

    def decline(i: int, why: str, plan: _Plan | None = None) -> None:
        s = sites[i]
        qf, kf = fake(s.q), fake(plan.k if plan else s.k)
        reports[i] = SiteReport(
            graph_index, s.out.name, s.kind, layers[i], DECLINED, why,
            query_len=str(qf.shape[2]) if qf is not None and qf.dim() == 4 else "?",
            query_heads=known_int(qf.shape[1]) if qf is not None and qf.dim() == 4 else None,
            kv_heads=known_int(kf.shape[1]) if kf is not None and kf.dim() == 4 else None,
            kv_len=str(kf.shape[2]) if kf is not None and kf.dim() == 4 else "?",
        )
        log.info("lychee_fx: declined %s", reports[i].line())

    for i, site in enumerate(sites):
        layer = layers[i]
        if layer is not None and layer >= roles.num_layers:
            raise RoleMapMismatch(
                f"the role map has {roles.num_layers} layers, but attention site "
                f"{site.out.name} is layer {layer} (from its {how}); expected a map with one "
                "row per attention layer of the model, or, for a model whose attention layers "
                "are some of its decoder layers and do not all run in one graph, one row per "
                "decoder layer (rows of layers without attention are not read)"
            )
        try:
            plan = _plan(site, roles.num_kv_heads)
        except _Decline as e:
            decline(i, str(e))
            continue
        if layer is None:
            decline(i, "layer index unknown: the module path names no layer and this graph "
                       f"does not hold all {roles.num_layers} attention layers")
            continue
        plans.append((i, plan))
    if how == "graph order" and sites:
        log.info("lychee_fx: graph %d numbered its %d attention layers by graph order", graph_index, len(sites))

    # Sliding-window (or chunked) layers keep a cache of their own length, whose slots do
    # not line up with the other layers' blocks: they keep their attention. With a static
    # cache they are the layers shorter than the longest; with a growing cache, the layers
    # whose length is a constant while others' are symbolic, or (under dynamic=True, a window
    # already full when the graph was traced) a symbol traced at a shorter size.
    ints = [known_int(p.n) for _, p in plans]
    if any(x is None for x in ints) and any(x is not None for x in ints):
        growing = next(str(p.n) for (_, p), x in zip(plans, ints) if x is None)
        why = "KV length {} is fixed while other layers' grows ({}): sliding-window or chunked attention"
        for (i, p), x in zip(plans, ints):
            if x is not None:
                decline(i, why.format(x, growing), p)
        plans = [ip for ip, x in zip(plans, ints) if x is None]
    # Lengths that differ (as constants, or as symbols by the sizes they were traced at: under
    # dynamic=True a window already full is a symbol of its own): the longest are the full
    # layers. Equal traced sizes under different symbols (automatic dynamic gives each cache
    # input its own) stay together.
    sizes = [traced_int(p.n) for _, p in plans]
    if len(set(sizes)) > 1:
        longest = max(x for x in sizes if x is not None)
        keep = next(p.n for (_, p), x in zip(plans, sizes) if x == longest)
        for (i, p), x in zip(plans, sizes):
            if x == longest:
                continue
            if known_int(p.n) is not None and known_int(keep) is not None:
                why = f"KV length {x} differs from the longest layer's ({longest})"
            else:
                why = f"KV length {p.n} (traced at {x}) is shorter than the longest layers' {keep} (traced at {longest})"
            decline(i, why + ": sliding-window or chunked attention", p)
        plans = [ip for ip, x in zip(plans, sizes) if x == longest]

    for i, p in plans:  # a layer that attention keeps for no other reason must fit the map
        if p.mismatch:
            raise RoleMapMismatch(p.mismatch)

    # One selection (B, Hkv, S) flows through the graph: every rewritten site reads Hkv heads.
    heads = [p.hkv for _, p in plans]
    if heads and len(set(heads)) > 1:
        common = max(set(heads), key=heads.count)
        for i, p in plans:
            if p.hkv != common:
                decline(i, f"{p.hkv} KV heads where the graph's other layers have {common}", p)
        plans = [ip for ip in plans if ip[1].hkv == common]

    # Effective roles (SPEC 1.1): a sparse head with no selection yet acts as retrieval.
    effective: list[tuple[bool, ...]] = []
    filled: set[int] = set()
    for i, p in plans:
        row = roles.row(layers[i])
        row = tuple(row[h // p.copies] for h in range(p.hkv))  # a cache of expanded heads
        eff = tuple(bool(r) or h not in filled for h, r in enumerate(row))
        filled |= {h for h, r in enumerate(eff) if r}
        effective.append(eff)
    selects = _needs_selection(effective)

    sel: fx.Node | None = None
    for (i, p), eff, select in zip(plans, effective, selects):
        site = p.site
        add = _NodeAdder(graph, site.out, site.anchor)
        mask = _emit_mask(site, add)
        scale = _emit_scale(p, add)
        head_bias = _emit_head_bias(site, p.hkv * p.groups, add)
        sinks = _emit_sink_logits(site, p.hkv * p.groups, add)
        # the extensions as trailing arguments, only where a site has them: plain graphs are unchanged
        ext = (float(site.softcap), head_bias) if site.softcap or head_bias is not None or sinks is not None else ()
        ext += (sinks,) if sinks is not None else ()
        ret_heads = [h for h, r in enumerate(eff) if r]
        spa_heads = [h for h, r in enumerate(eff) if not r]
        q = p.q
        if p.tiled:  # the ops read group h at rows [h*G, (h+1)*G): (B, Hq, 1, D) regrouped
            q = add(torch.index_select, (q, 1, _index(add, _query_rows(p), q)))
        parts = []
        if ret_heads:
            res = add(RETRIEVAL, (q, p.k, p.v, mask, sel if select else None, ret_heads, scale, opts.block_size,
                                  opts.num_blocks, opts.sink, opts.recent, select, *ext))
            parts.append(add(operator.getitem, (res, 0)))
            if select:
                sel = add(operator.getitem, (res, 1))
        if spa_heads:
            parts.append(add(SPARSE, (q, p.k, p.v, mask, sel, spa_heads, scale, opts.block_size, *ext)))
        out = parts[0] if len(parts) == 1 else add(torch.cat, (parts, 1))
        perm = _output_rows(p, ret_heads + spa_heads)
        if perm != sorted(perm):
            out = add(torch.index_select, (out, 1, _index(add, perm, p.q)))
        if site.merged_heads:  # the 3-D form: (B, Hq, 1, Dv) -> (B * Hq, 1, Dv)
            out = add(torch.flatten, (out, 0, 1))
        site.out.replace_all_uses_with(out)
        erase_dead([*site.chain, *p.extra_dead], graph)
        qf = fake(p.q)
        reports[i] = SiteReport(
            graph_index, site.out.name, site.kind, layers[i], REWRITTEN,
            query_len="1", query_heads=known_int(qf.shape[1]), kv_heads=p.hkv, kv_len=str(p.n),
            retrieval_heads=tuple(ret_heads), sparse_heads=tuple(spa_heads), select=select,
        )
        log.debug("lychee_fx: %s", reports[i].line())

    graph.lint()
    gm.recompile()
    return [r for r in reports if r is not None]
