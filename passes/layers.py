"""Tell which layer an attention site belongs to, so it reads the right role-map row.

Dynamo records the module path of every node in ``node.meta["nn_module_stack"]``; its last
entry is a path such as ``L['args'][0].model.layers.7.self_attn`` or ``L['self'].h[3].attn``.
The layer is the number after ``layers``, ``h``, ``blocks`` or ``layer``. After a graph break
the path can lose the number; then sites are numbered in graph order, which is right only
when the graph holds every attention layer of the model.
"""

from __future__ import annotations

import re

import torch.fx as fx

__all__ = ["layer_from_module_stack", "number_layers"]

_LAYER_RE = re.compile(r"(?:^|[.\]'\"])(?:layers|h|blocks|layer)(?:\.|\[['\"]?|\._modules\[['\"])(\d+)")


def layer_from_module_stack(node: fx.Node) -> int | None:
    """The layer number in the deepest module path of ``node``, or None."""
    stack = node.meta.get("nn_module_stack") or {}
    for entry in reversed(list(stack.values())):
        path = entry[0] if isinstance(entry, tuple) else str(entry)
        found = _LAYER_RE.findall(str(path))
        if found:
            return int(found[-1])
    return None


def number_layers(anchors: list[fx.Node], num_rows: int) -> tuple[list[int | None], str]:
    """Layer numbers for the attention sites of one graph, in graph order.

    Returns the numbers (None where unknown) and how they were found: ``"module path"``,
    ``"graph order"`` (no usable path, and exactly ``num_rows`` sites) or ``"unknown"``.
    """
    from_paths = [layer_from_module_stack(n) for n in anchors]
    if all(x is not None for x in from_paths) and all(a < b for a, b in zip(from_paths, from_paths[1:])):
        return from_paths, "module path"
    if len(anchors) == num_rows:
        return list(range(len(anchors))), "graph order"
    return [None] * len(anchors), "unknown"
