"""Group the small linears of a decode step that share an input into ``lychee::decode_linear``.

A decode step multiplies a few rows (batch x 1 token) by every weight of the model, so each
projection reads its weight once and does little else: its time is bytes / bandwidth plus a
launch. Linears that read the same input (a layer's q, k and v projections; gate and up)
become one op, one kernel launch on CUDA, with the weights left as they are:

    y_i = linear(x, W_i, b_i)            x (*lead, K), prod(lead) = M <= ops.LINEAR_MAX_ROWS
      ->  ys = lychee.decode_linear(reshape(x, (M, K)), [W_0, ...], [b_0, ...])
          y_i = reshape(ys[i], (*lead, N_i))

The semantics are ``F.linear``'s exactly (the op's other implementations are ``F.linear``);
only the kernel and the order of the float32 accumulation differ. A linear is left alone when
its input has more rows, a symbolic row count or another device than CUDA, when its weight is
not a (N, K) matrix with unit stride along K in the input's dtype, when a weight of the
group is computed after the group's first linear (the op could not be placed), or when an
operand is a tensor subclass: a DTensor of a ``parallelize_module`` plan would reach the op,
which has no sharding rule.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from lychee_fx import ops as lychee_ops
from lychee_fx.passes.graph_utils import arg, fake, is_call, known_int

__all__ = ["group_decode_linears", "LinearGroup"]

DECODE_LINEAR = torch.ops.lychee.decode_linear.default
_LINEARS = (torch._C._nn.linear, torch.nn.functional.linear)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True)
class LinearGroup:
    """Linears that now run as one ``decode_linear``: their nodes' names and output widths."""

    graph: int
    nodes: tuple[str, ...]
    rows: int  # M
    in_features: int  # K
    out_features: tuple[int, ...]  # N_i


def _candidate(node: fx.Node, device_type: str) -> tuple[fx.Node, fx.Node, fx.Node | None, tuple[int, ...], int] | None:
    """(x, weight, bias, lead, K) when ``node`` is a linear the op takes (x (*lead, K)), else None."""
    if not is_call(node, _LINEARS):
        return None
    x, w, b = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
    xf, wf = fake(x), fake(w)
    bf = fake(b) if b is not None else None
    if xf is None or wf is None or (b is not None and bf is None):
        return None
    if any(is_traceable_wrapper_subclass(t) for t in (xf, wf, bf) if t is not None):
        return None  # a DTensor (tensor parallelism): no sharding rule for the op
    if xf.device.type != device_type or xf.dtype not in _DTYPES or xf.dim() < 1 or wf.dim() != 2:
        return None
    k = known_int(xf.shape[-1])
    lead = [known_int(s) for s in xf.shape[:-1]]
    if k is None or any(s is None for s in lead):
        return None
    m = math.prod(lead)
    if not 1 <= m <= lychee_ops.LINEAR_MAX_ROWS:
        return None
    if known_int(wf.shape[1]) != k or known_int(wf.shape[0]) is None or wf.dtype != xf.dtype:
        return None
    if wf.device != xf.device or known_int(wf.stride(1)) != 1 or (k > 1 and known_int(xf.stride(-1)) != 1):
        return None
    if bf is not None and (bf.dim() != 1 or bf.dtype != xf.dtype or known_int(bf.stride(0)) != 1):
        return None
    return x, w, b, tuple(lead), k


def _set_fake(node: fx.Node, value) -> None:
    node.meta["example_value"] = value


def group_decode_linears(gm: fx.GraphModule, *, graph_index: int = 0, device_type: str = "cuda",
                         singles: bool = True) -> list[LinearGroup]:
    """Rewrite ``gm`` in place; returns the groups made. ``singles``: a linear whose input no
    other linear shares becomes a one-weight op too. ``device_type`` is where inputs must
    live (``"cuda"``; tests on CPU pass ``"cpu"``)."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    by_input: dict[tuple[fx.Node, bool], list[tuple[fx.Node, fx.Node, fx.Node | None, int, int]]] = {}
    for node in graph.nodes:
        c = _candidate(node, device_type)
        if c is not None:
            by_input.setdefault((c[0], c[2] is not None), []).append((node, *c[1:]))
    groups = []
    for (x, _), members in by_input.items():
        for start in range(0, len(members), lychee_ops.LINEAR_MAX_WEIGHTS):
            chunk = members[start:start + lychee_ops.LINEAR_MAX_WEIGHTS]
            if len(chunk) == 1 and not singles:
                continue
            first = chunk[0][0]
            if any(order[dep] > order[first] for _, w, b, _, _ in chunk for dep in (w, b) if dep is not None):
                continue  # a weight computed after the first linear: no place for the op
            groups.append(_rewrite(graph, x, chunk, graph_index))
    if groups:
        graph.lint()
        gm.recompile()
    return groups


def _rewrite(graph: fx.Graph, x: fx.Node, chunk, graph_index: int) -> LinearGroup:
    first = chunk[0][0]
    lead, k = chunk[0][3], chunk[0][4]
    m = math.prod(lead)
    xf = fake(x)
    mode = getattr(xf, "fake_mode", None)
    outs = [fake(node) for node, *_ in chunk]
    with graph.inserting_before(first):
        x2 = graph.call_function(torch.reshape, (x, (m, k)))
        ys = graph.call_function(DECODE_LINEAR, (x2, [w for _, w, _, _, _ in chunk], [b for _, _, b, _, _ in chunk]))
        if mode is not None:
            with mode:
                _set_fake(x2, torch.reshape(xf, (m, k)))
                _set_fake(ys, [torch.empty(m, o.shape[-1], dtype=o.dtype, device=o.device) for o in outs])
        news = []
        for i, (node, *_rest) in enumerate(chunk):
            n_i = int(outs[i].shape[-1])
            y = graph.call_function(operator.getitem, (ys, i))
            if mode is not None:
                with mode:
                    _set_fake(y, torch.empty(m, n_i, dtype=outs[i].dtype, device=outs[i].device))
            y = graph.call_function(torch.reshape, (y, (*lead, n_i)))
            y.meta.update(node.meta)
            news.append(y)
    for (node, *_), y in zip(chunk, news):
        node.replace_all_uses_with(y)
        graph.erase_node(node)
    return LinearGroup(graph_index, tuple(n.name for n, *_ in chunk), m, k,
                       tuple(int(o.shape[-1]) for o in outs))
