"""Small helpers for reading Dynamo FX graphs: fake values, argument access, shape proofs."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = [
    "fake",
    "known_equal",
    "may_equal",
    "known_int",
    "arg",
    "is_call",
    "erase_dead",
    "shape_str",
]


def fake(node: Any) -> torch.Tensor | None:
    """The fake tensor a node produces (Dynamo keeps it in ``example_value``, AOT in ``val``)."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    return val if isinstance(val, torch.Tensor) else None


def known_equal(a: Any, b: Any) -> bool:
    """True only when ``a == b`` holds for every value the shape symbols may take."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - an unprovable comparison is simply not known
        return False


def may_equal(a: Any, b: Any) -> bool:
    """False only when ``a != b`` is proven.

    Dynamo gives each dynamic dimension its own symbol (the K and V caches' lengths are
    ``s14`` and ``s94``) and specialises sizes 0 and 1, so two symbolic sizes that the
    original op needs to agree (SDPA's K and V lengths, a mask's length and the keys') are
    equal whenever the original program runs at all.
    """
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return not bool(statically_known_true(a != b))
    except Exception:  # noqa: BLE001
        return True


def traced_int(x: Any) -> int | None:
    """The value ``x`` had when the graph was traced: a plain int, or a SymInt's hint (the
    example size Dynamo traced with); None when there is none."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        hint = getattr(x.node, "hint", None)
        if hint is not None:
            return int(hint)
    return None


def known_int(x: Any) -> int | None:
    """``x`` as a Python int when it is a constant (a plain int or a SymInt with a fixed value)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        node = x.node
        if node.is_constant() or node.expr.is_number:
            return int(node.expr)
    return None


def shape_str(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given positionally at ``index`` or as a keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_call(node: Any, targets: Iterable[Any] = (), methods: Iterable[str] = ()) -> bool:
    """Whether ``node`` calls one of ``targets`` (call_function) or ``methods`` (call_method)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return any(node.target is t or node.target == t for t in targets)
    if node.op == "call_method":
        return node.target in set(methods)
    return False


def erase_dead(nodes: Iterable[fx.Node], graph: fx.Graph, keep: Callable[[fx.Node], bool] = lambda n: False) -> None:
    """Erase the given nodes once nothing uses them, repeating until no more can go.

    Only nodes named here are erased: FX's own dead-code elimination treats in-place
    method calls (``cache.index_copy_``) as pure and would delete cache updates.
    """
    pending = [n for n in nodes if n.op not in ("placeholder", "output") and not keep(n)]
    changed = True
    while changed:
        changed = False
        for n in list(pending):
            if n.graph is graph and not n.users:
                graph.erase_node(n)
                pending.remove(n)
                changed = True


GETITEM = operator.getitem
