"""Fold grouped-query K/V expansion back to the un-expanded cache.

HF's ``repeat_kv`` copies each KV head G times before attention when a mask is present:

    base (B, Hkv, N, D) -> getitem[:, :, None] / unsqueeze(2) -> (B, Hkv, 1, N, D)
                        -> expand(B, Hkv, G, N, D) -> reshape/view (B, Hkv * G, N, D)

and a few models use ``repeat_interleave(G, dim=1)``. Both map query head ``i`` to KV head
``i // G``, which is what the lychee ops assume, so the ops can read ``base`` directly and the
copy disappears.

JetMoE tiles instead: ``base.repeat(1, G, 1, 1)`` (B, Hkv, N, D) -> (B, G * Hkv, N, D) maps
query head ``i`` to KV head ``i % Hkv``. Asked for (``tiling=True``), that fold is returned
with ``tiled=True``: the caller must then hand the ops the query heads regrouped, head
``t * Hkv + h`` at row ``h * G + t``, and put the output rows back (``rewrite``). Every step
is proven from the fake tensors' shapes; anything else is left alone (the caller then sees
K/V with Hq heads and no fold).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from lychee_fx.passes.graph_utils import GETITEM, arg, fake, is_call, known_equal, known_int

__all__ = ["Folded", "fold_kv_expansion"]


@dataclasses.dataclass(frozen=True)
class Folded:
    base: fx.Node  # (B, Hkv, N, D)
    groups: int  # G
    chain: tuple[fx.Node, ...]  # the expansion nodes, outermost first (erasable once unused)
    tiled: bool = False  # query head i reads KV head i % Hkv (``repeat``), not i // G


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(known_equal(x, y) for x, y in zip(a, b))


def _is_unsqueeze2(node: fx.Node) -> fx.Node | None:
    """``base[:, :, None]`` or ``base.unsqueeze(2)`` -> base, checked by shape."""
    src = None
    if is_call(node, targets=(GETITEM,)):
        idx = node.args[1]
        if isinstance(idx, tuple) and len(idx) >= 3 and idx[2] is None:
            full = slice(None, None, None)
            rest = idx[:2] + idx[3:]
            if all(x == full or x is Ellipsis for x in rest):
                src = node.args[0]
    elif is_call(node, targets=(torch.unsqueeze,), methods=("unsqueeze",)):
        if arg(node, 1, "dim") == 2:
            src = node.args[0]
    if not isinstance(src, fx.Node):
        return None
    s, o = fake(src), fake(node)
    if s is None or o is None or s.dim() != 4:
        return None
    return src if _same_shape(o.shape, (*s.shape[:2], 1, *s.shape[2:])) else None


def _repeat_sizes(node: fx.Node) -> tuple | None:
    """The sizes of ``x.repeat(*sizes)`` / ``x.repeat(sizes)``, or None."""
    if not is_call(node, targets=(torch.Tensor.repeat,), methods=("repeat",)) or node.kwargs:
        return None
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = tuple(sizes[0])
    return tuple(sizes)


def fold_kv_expansion(node: fx.Node, tiling: bool = False) -> Folded | None:
    """If ``node`` (B, Hq, N, D) is a GQA expansion of a (B, Hkv, N, D) tensor, return it;
    with ``tiling``, also a ``repeat(1, G, 1, 1)`` tiling (``Folded.tiled``)."""
    out = fake(node)
    if out is None or out.dim() != 4:
        return None

    sizes = _repeat_sizes(node) if tiling else None
    if sizes is not None:
        src = node.args[0]
        s = fake(src)
        if len(sizes) != 4 or not all(isinstance(x, int) for x in sizes) or s is None or s.dim() != 4:
            return None
        reps = sizes[1]
        if (sizes[0], sizes[2], sizes[3]) != (1, 1, 1) or reps < 1:
            return None
        if _same_shape(out.shape, (s.shape[0], s.shape[1] * reps, *s.shape[2:])):
            # one KV head (or G = 1): the tiling is also a plain expansion
            return Folded(src, reps, (node,), tiled=reps > 1 and known_int(s.shape[1]) != 1)
        return None

    if is_call(node, targets=(torch.repeat_interleave,), methods=("repeat_interleave",)):
        src = node.args[0]
        reps = arg(node, 1, "repeats")
        dim = arg(node, 2, "dim")
        s = fake(src)
        if isinstance(reps, int) and dim == 1 and s is not None and s.dim() == 4:
            if _same_shape(out.shape, (s.shape[0], s.shape[1] * reps, *s.shape[2:])):
                return Folded(src, reps, (node,))
        return None

    if not is_call(node, targets=(torch.reshape,), methods=("reshape", "view")):
        return None
    expanded = node.args[0]
    if not is_call(expanded, methods=("expand",), targets=(torch.Tensor.expand,)):
        return None
    e = fake(expanded)
    if e is None or e.dim() != 5:
        return None
    unsq = expanded.args[0]
    base = _is_unsqueeze2(unsq) if isinstance(unsq, fx.Node) else None
    if base is None:
        return None
    b = fake(base)
    groups = e.shape[2]
    if not isinstance(groups, int):
        return None
    if not _same_shape(e.shape, (b.shape[0], b.shape[1], groups, b.shape[2], b.shape[3])):
        return None
    if not _same_shape(out.shape, (b.shape[0], b.shape[1] * groups, b.shape[2], b.shape[3])):
        return None
    return Folded(base, groups, (node, expanded, unsq))
