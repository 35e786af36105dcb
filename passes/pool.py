"""Pool a layer's retrieval and sparse ops into one ``lychee::hybrid_attention`` (CUDA).

``rewrite`` turns a decode attention site whose KV heads are of both kinds into

    res      = lychee.retrieval_attention(q, k, v, mask, sel_in, R_heads, ...)
    ret      = res[0]; sel' = res[1]            (sel' only where the site selects)
    spa      = lychee.sparse_attention(q, k, v, mask, sel_s, S_heads, ...)   # sel_s: sel' or sel_in
    out      = cat([ret, spa], 1)

On CUDA each op is a split launch and a reduce launch, and the cat a third kernel; the sparse
heads' launches are short (a few thousand slots) and run after the retrieval heads' long
ones. This pass writes the four nodes as

    out, sel' = lychee.hybrid_attention(q, k, v, mask, sel_in', R_heads, S_heads, ...)

(``sel_in'``: ``sel_in`` where the site selects, else ``sel_s``), whose kernels run a
layer's retrieval and sparse splits in one launch and both merges with the selection in a
second (``attention_kernels`` [Note: pooled layers]). The values are the same: the sparse
heads' rows of ``sel'`` are ``sel_in``'s, as the retrieval op replaces only its own heads'.

A pair is left as it is unless: both ops read the same q, k, v, mask, scale, block size and
extension arguments; the cat is the only user of both outputs and joins them in that order
along dim 1; the sparse op reads ``sel'`` or (a site that does not select) ``sel_in``; q is
on ``device_type`` and the pooled kernel has a config for its head dims
(``launch.pooled_config``; CPU graphs are never pooled: the ops' torch implementations gain
nothing from it).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from lychee_fx import ops as lychee_ops  # noqa: F401 - registers torch.ops.lychee
from lychee_fx.passes.graph_utils import fake

__all__ = ["pool_layer_attention", "HYBRID"]

RETRIEVAL = torch.ops.lychee.retrieval_attention.default
SPARSE = torch.ops.lychee.sparse_attention.default
HYBRID = torch.ops.lychee.hybrid_attention.default


def _getitems(node: fx.Node) -> dict[int, fx.Node] | None:
    """``node``'s users by index when all of them are ``operator.getitem`` (else None)."""
    out = {}
    for u in node.users:
        if u.target is not operator.getitem or u.args[0] is not node:
            return None
        out[u.args[1]] = u
    return out


def _poolable_config(q: fx.Node, v: fx.Node, block_size: int) -> bool:
    from lychee_fx.codegen import launch

    qf, vf = fake(q), fake(v)
    return qf is not None and vf is not None and launch.pooled_config(qf, vf, block_size) is not None


def _pair(spa: fx.Node, device_type: str):
    """(retrieval node, its getitems by index, the cat, the selection the sparse heads read)
    for a sparse op that pools with a retrieval op, else None."""
    sel_s = spa.args[4]
    ext_s = tuple(spa.args[8:])
    cats = list(spa.users)
    if len(cats) != 1 or cats[0].target is not torch.cat or spa.kwargs:
        return None
    cat = cats[0]
    parts = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if dim != 1 or not isinstance(parts, (list, tuple)) or len(parts) != 2 or parts[1] is not spa:
        return None
    ret = parts[0]
    if not (isinstance(ret, fx.Node) and ret.target is operator.getitem and ret.args[1] == 0):
        return None
    res = ret.args[0]
    if not (isinstance(res, fx.Node) and res.target is RETRIEVAL) or res.kwargs:
        return None
    items = _getitems(res)
    if items is None or items.get(0) is not ret or len(ret.users) != 1:
        return None
    a = res.args
    if tuple(a[:4]) != tuple(spa.args[:4]) or a[6] != spa.args[6] or a[7] != spa.args[7] or tuple(a[12:]) != ext_s:
        return None
    select = a[11]
    if select:  # the sparse heads read sel'; their rows are sel_in's
        if sel_s is not items.get(1) or a[4] is None:
            return None
        sel = a[4]
    else:  # the retrieval op got no selection or the sparse op's
        if sel_s is None or a[4] not in (None, sel_s):
            return None
        sel = sel_s
    qf = fake(a[0])
    if qf is None or qf.device.type != device_type or not _poolable_config(a[0], a[2], a[7]):
        return None
    return res, items, cat, sel


def pool_layer_attention(gm: fx.GraphModule, *, device_type: str = "cuda") -> int:
    """Rewrite ``gm`` in place; return how many layers were pooled. ``device_type``: where q
    must live (tests on a CPU pass ``"cpu"``)."""
    graph = gm.graph
    pooled = 0
    for spa in [n for n in graph.nodes if n.op == "call_function" and n.target is SPARSE]:
        found = _pair(spa, device_type)
        if found is None:
            continue
        res, items, cat, sel = found
        a = res.args
        with graph.inserting_before(res):
            hyb = graph.call_function(HYBRID, (a[0], a[1], a[2], a[3], sel, list(a[5]), list(spa.args[5]), *a[6:]))
            out = graph.call_function(operator.getitem, (hyb, 0))
            new_sel = graph.call_function(operator.getitem, (hyb, 1))
        hyb.meta.update(res.meta)
        mode = getattr(fake(a[0]), "fake_mode", None)
        if mode is not None:
            with mode:
                outf, self_f = fake(cat), fake(sel)
                hyb.meta["example_value"] = (torch.empty_like(outf), torch.empty_like(self_f))
                out.meta["example_value"] = torch.empty_like(outf)
                new_sel.meta["example_value"] = torch.empty_like(self_f)
        cat.replace_all_uses_with(out)
        if 1 in items:
            items[1].replace_all_uses_with(new_sel)
        for node in (cat, spa, items.get(1), items[0], res):
            if node is not None:
                graph.erase_node(node)
        pooled += 1
    if pooled:
        graph.lint()
        gm.recompile()
    return pooled
