"""Tell which layer an attention site belongs to, so it reads the right role-map row.

SPEC 1.2 numbers layers in the order attention runs in the forward pass. For a model whose
decoder layers all have attention that is the model's own layer index, read from:

- Dynamo records the module path of every node in ``node.meta["nn_module_stack"]``; its last
  entry is a path such as ``L['args'][0].model.layers.7.self_attn`` or ``L['self'].h[3].attn``.
  The layer is the number after ``layers``, ``h``, ``blocks`` or ``layer``.
- After a graph break the path can lose the number (the resumed frame's stack starts at the
  attention module). The KV cache the attention reads still names it: a cache tensor that is
  a graph input has a source such as ``L['past_key_values'].layers[3].keys`` (HF caches index
  their layers by the attention module's ``layer_idx``).

- A graph that holds one attention module alone (LongCat-Flash breaks between the two
  attentions of each decoder layer, whose module paths are ``self_attn.0`` and
  ``self_attn.1``) can compute K/V from the cache instead of attending over it directly
  (multi-head latent attention expands a latent cache). The cache is still named: K and V
  are computed from one layer's cache inputs, and the graph writes the new token into that
  layer's cache (``cache.update(..., layer_idx)``, the attention's own index:
  ``layer_from_cache_reads``).

A hybrid model's attention layers are some of its decoder layers (1, 3, ...): a map with one
row per decoder layer is read by the index (rows of layers without attention unused); a map
with one row per attention layer, SPEC 1.2's, by graph order when one graph holds them all
(``number_layers``). With no index at all, a graph that holds as many sites as the map has
rows holds every layer, and graph order is the order.
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx

__all__ = ["layer_from_module_stack", "layer_from_cache", "layer_from_cache_reads", "cache_input", "number_layers"]

_LAYER_RE = re.compile(r"(?:^|[.\]'\"])(?:layers|h|blocks|layer)(?:\.|\[['\"]?|\._modules\[['\"])(\d+)")
# a cache tensor's source (``L['past_key_values'].layers[3].keys``) or placeholder name
# (``l_kwargs_past_key_values_layers_3_keys``)
_CACHE_RE = re.compile(r"layers(?:\[|_)(\d+)(?:\]\.|_)(?:keys|values|key_cache|value_cache)")


# a numbered module below the layer (``layers.3.self_attn.1``, ``layers[3]._modules['1']``)
_INDEX_RE = re.compile(r"(?:\.|\[['\"]?|\._modules\[['\"])\d+(?:['\"]?\]|\.|$)")


def layer_from_module_stack(node: fx.Node) -> int | None:
    """The layer number in the deepest module path of ``node``, or None.

    None also where a numbered module sits below the layer (``layers.3.self_attn.1``,
    LongCat-Flash's two attentions per decoder layer): the number is the decoder layer's,
    not the attention's (SPEC 1.2 counts attentions), so it numbers no site by itself.
    """
    stack = node.meta.get("nn_module_stack") or {}
    for entry in reversed(list(stack.values())):
        path = str(entry[0] if isinstance(entry, tuple) else entry)
        found = list(_LAYER_RE.finditer(path))
        if found:
            if _INDEX_RE.search(path, found[-1].end()):
                return None
            return int(found[-1].group(1))
    return None


def cache_input(node: fx.Node | None, depth: int = 3) -> fx.Node | None:
    """The graph input a K or V read comes from: the node itself when it is an input
    (a static cache, read in place), or the cache side of ``cat([cache, new], dim=-2)`` (a
    dynamic cache growing by the new token); None otherwise."""
    for _ in range(depth):
        if not isinstance(node, fx.Node):
            return None
        if node.op in ("placeholder", "get_attr"):
            return node
        if node.op == "call_function" and node.target is torch.cat:
            parts = node.args[0] if node.args else None
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            val = node.meta.get("example_value", node.meta.get("val"))
            if not isinstance(parts, (list, tuple)) or not parts or not isinstance(val, torch.Tensor):
                return None
            if dim % val.dim() != val.dim() - 2:
                return None
            node = parts[0]
            continue
        return None
    return None


def _cache_index(src: fx.Node) -> int | None:
    """The layer index a cache input's source (or name) holds, or None."""
    source = getattr(src.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name  # a method in torch 2.11, a property later
    names = [name, src.name, str(src.target)]
    for name in names:
        found = _CACHE_RE.findall(str(name)) if name else []
        if found:
            return int(found[-1])
    return None


def layer_from_cache(node: fx.Node | None) -> int | None:
    """The layer index in the source (or name) of the cache input K is read from, or None."""
    src = cache_input(node)
    return None if src is None else _cache_index(src)


# where one attention's inputs end: another attention's output (its own cache is not this one's)
_ATTENTION_OUTPUTS = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention,
                      torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax)
_WRITES = ("index_copy_", "copy_", "index_put_", "scatter_")


def _writes_new_token(cache: fx.Node) -> bool:
    """Whether the graph writes into ``cache`` (B, H, N, D): in place (a static cache's
    ``index_copy_``, ``cache[...] = new``) or by growing it along N (a dynamic cache's
    ``cat([cache, new], dim=-2)``)."""
    for user in cache.users:
        if user.op == "call_method" and user.target in _WRITES and user.args[0] is cache:
            return True
        if user.op == "call_function" and user.target is operator.setitem and user.args[0] is cache:
            return True
        if user.op == "call_function" and user.target is torch.cat and cache_input(user, depth=2) is cache:
            return True
    return False


def layer_from_cache_reads(k: fx.Node | None, v: fx.Node | None, limit: int = 400) -> int | None:
    """The layer index of the one cache layer K and V are computed from, where the graph also
    writes the new token into it; None otherwise.

    The inputs of K and V are followed back to graph inputs, not through another attention's
    output (a later layer depends on an earlier one's cache through it). None when they
    reach no cache input, caches of more than one layer, or only caches this graph does not
    write (a layer reading a cache another layer filled), or when the search passes
    ``limit`` nodes.
    """
    seen: set[fx.Node] = set()
    todo = [n for n in (k, v) if isinstance(n, fx.Node)]
    found: set[int] = set()
    written = False
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if len(seen) > limit:
            return None
        if node.op in ("placeholder", "get_attr"):
            index = _cache_index(node)
            if index is not None:
                found.add(index)
                written = written or _writes_new_token(node)
            continue
        if node.op == "call_function" and node.target in _ATTENTION_OUTPUTS:
            continue
        if node.op == "call_method" and node.target == "softmax":
            continue
        todo.extend(node.all_input_nodes)
    return found.pop() if len(found) == 1 and written else None


def number_layers(anchors: list[fx.Node], num_rows: int, keys: list[fx.Node | None] | None = None,
                  values: list[fx.Node | None] | None = None) -> tuple[list[int | None], str]:
    """Layer numbers for the attention sites of one graph, in graph order (``anchors``: each
    site's node that carries its module stack, ``keys`` and ``values``: the K and V each
    reads).

    The model's own layer indices (module path, else the cache input's: the one K is read
    from, else the one K and V are computed from and the graph writes) when they ascend and
    fit the map. When they ascend but do not fit, and the graph holds exactly ``num_rows``
    sites at indices with gaps between them (a hybrid model's attention layers, 1, 3, ...,
    with a map of one row per attention layer), graph order; indices that do not fit
    otherwise are left to the caller, which raises (a map too short for the model, or a graph
    that holds part of it). With no usable indices, or indices that repeat (several
    attentions in one layer) without going back, graph order when the graph holds exactly
    ``num_rows`` sites (all of them, SPEC 1.2's order).

    Returns the numbers (None where unknown) and how they were found: ``"module path"``,
    ``"module path and cache"``, ``"graph order"`` or ``"unknown"``.
    """
    from_paths = [layer_from_module_stack(n) for n in anchors]
    how = "module path"
    if keys is not None and any(x is None for x in from_paths):
        from_paths = [x if x is not None else layer_from_cache(k) for x, k in zip(from_paths, keys)]
        if values is not None:
            from_paths = [x if x is not None else layer_from_cache_reads(k, v)
                          for x, k, v in zip(from_paths, keys, values)]
        how = "module path and cache"
    known = [x for x in from_paths if x is not None]
    ascending = all(a < b for a, b in zip(known, known[1:]))
    if len(known) == len(anchors) and ascending:
        gaps = any(b - a > 1 for a, b in zip(known, known[1:]))
        if known and known[-1] >= num_rows and len(anchors) == num_rows and gaps:
            return list(range(len(anchors))), "graph order"
        return from_paths, how
    if len(anchors) == num_rows and all(a <= b for a, b in zip(known, known[1:])):
        # Every site in one graph, as many as the map has rows: graph order is the order
        # attention runs (SPEC 1.2), also where a layer holds more than one softmax-attention
        # (DiffLlama's two maps, LongCat-Flash's two attentions per layer: indices 0, 0, 1, 1).
        # Indices that go back (attention over an earlier layer's states after a later one)
        # are not a layer order: unknown.
        return list(range(len(anchors))), "graph order"
    return [None] * len(anchors), "unknown"
