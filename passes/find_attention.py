"""Find attention in a Dynamo FX graph, in the two forms models use.

1. ``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)``
   (``torch._C._nn`` / ``F.`` / ``aten.``): HF's ``sdpa`` implementation and most
   hand-written modern models.
2. The eager pattern, HF's ``attn_implementation="eager"`` and classic hand-written models:

       scores = matmul(q, k.transpose(-2, -1))      (B, Hq, Lq, N)
       scores = scores * c | scores / c              any number of constant scalings
       scores = scores + mask | masked_fill(cond, -inf)   at most one mask, after scaling
       probs  = softmax(scores, dim=-1) [.to(dtype)] [dropout(p=0 | training=False)]
       out    = matmul(probs, v)                      (B, Hq, Lq, D)

A site is everything the rewrite needs to know, read off the graph; shape questions (query
length, GQA, mask layout) are answered later by ``rewrite.py`` from the fake tensors. A
site whose scores pass through anything else (``tanh`` soft-capping, a bias added before
scaling, a tensor-valued scale) is still reported, with ``problem`` saying why it cannot be
expressed, so that it is declined rather than silently missed.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from lychee_fx.passes.graph_utils import arg, fake, is_call

__all__ = ["AttentionSite", "find_attention_sites", "SDPA_TARGETS"]

SDPA_TARGETS = (
    torch._C._nn.scaled_dot_product_attention,
    F.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
)
_MATMUL = (torch.matmul, operator.matmul)
_SOFTMAX = (torch.softmax, F.softmax, torch.ops.aten._softmax.default)
_MUL = (operator.mul, operator.imul, torch.mul)
_DIV = (operator.truediv, operator.itruediv, torch.div, torch.true_divide)
_CASTS = ("to", "float", "type", "half", "bfloat16", "double", "type_as", "contiguous")
_DROPOUT = (F.dropout, torch.dropout)
# Added to (or filled into) a score, these values mean "never attend".
_MASKED_FILL_LIMIT = -1e30


@dataclasses.dataclass
class AttentionSite:
    """One attention call in the graph, as found (before any shape analysis)."""

    kind: str  # "sdpa" | "eager"
    out: fx.Node  # its output (B, Hq, Lq, D): the node the rewrite replaces
    anchor: fx.Node  # the node whose module stack names the layer (sdpa call / softmax)
    q: fx.Node
    k: fx.Node  # as attention reads it: (B, Hq or Hkv, N, D)
    v: fx.Node | None  # None only for a site that can never be rewritten
    mask: fx.Node | None = None
    mask_kind: str = "none"  # "none" | "mask" (SDPA-style bool/additive) | "fill" (True = masked)
    scale: float | None = None  # None: 1/sqrt(D) (unless scale_nodes)
    # Python-scalar nodes the scale also multiplies (False) or divides (True) by: under
    # dynamic=True, Dynamo turns float attributes such as HF's ``self.scaling`` into SymFloats.
    scale_nodes: tuple[tuple[fx.Node, bool], ...] = ()
    dropout: float = 0.0
    is_causal: bool = False
    enable_gqa: bool = False
    chain: tuple[fx.Node, ...] = ()  # nodes made dead by the rewrite (output first)
    problem: str | None = None  # why the pattern cannot be expressed, if it cannot


def _scalar_node(x) -> bool:
    """A node that produces a Python scalar (a SymFloat or SymInt), not a tensor."""
    if not isinstance(x, fx.Node):
        return False
    val = x.meta.get("example_value", x.meta.get("val"))
    return isinstance(val, (torch.SymFloat, torch.SymInt, float, int)) and not isinstance(val, bool)


def _const(x) -> float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    return None


def _sdpa_site(node: fx.Node) -> AttentionSite | None:
    q, k, v = node.args[0], node.args[1], node.args[2]
    if not all(isinstance(x, fx.Node) for x in (q, k, v)):
        return None
    mask = arg(node, 3, "attn_mask")
    dropout = arg(node, 4, "dropout_p", 0.0)
    causal = arg(node, 5, "is_causal", False)
    scale = arg(node, 6, "scale", None)
    gqa = arg(node, 7, "enable_gqa", False)
    site = AttentionSite(
        "sdpa", node, node, q, k, v,
        mask=mask if isinstance(mask, fx.Node) else None,
        mask_kind="mask" if isinstance(mask, fx.Node) else "none",
        enable_gqa=bool(gqa) if isinstance(gqa, bool) else False,
        chain=(node,),
    )
    if mask is not None and not isinstance(mask, fx.Node):
        site.problem = f"attn_mask is not a tensor ({mask!r})"
    if isinstance(dropout, (int, float)):
        site.dropout = float(dropout)
    else:
        site.problem = "dropout_p is not a constant"
    if isinstance(causal, bool):
        site.is_causal = causal
    else:
        site.problem = "is_causal is not a constant"
    if not isinstance(gqa, bool):
        site.problem = "enable_gqa is not a constant"
    if scale is None or _const(scale) is not None:
        site.scale = None if scale is None else _const(scale)
    elif _scalar_node(scale):
        site.scale, site.scale_nodes = 1.0, ((scale, False),)
    else:
        site.problem = "scale is not a constant"
    return site


def _transposed_key(kt: fx.Node) -> fx.Node | None:
    """``k.transpose(-2, -1)`` (any spelling of the last two dims) or ``k.mT`` -> k."""
    if is_call(kt, targets=(torch.transpose,), methods=("transpose",)):
        dims = {d % 4 for d in kt.args[1:3] if isinstance(d, int)}
        src = kt.args[0]
        if dims == {2, 3} and isinstance(src, fx.Node) and fake(src) is not None and fake(src).dim() == 4:
            return src
    if kt.op == "call_function" and kt.target is getattr and kt.args[1] == "mT":
        return kt.args[0]
    if is_call(kt, targets=(torch.permute,), methods=("permute",)):
        dims = kt.args[1] if isinstance(kt.args[1], (tuple, list)) else kt.args[1:]
        if tuple(d % 4 for d in dims) == (0, 1, 3, 2):
            return kt.args[0]
    return None


def _dropout_ok(node: fx.Node) -> tuple[bool, str | None]:
    p = arg(node, 1, "p", 0.5)
    training = arg(node, 2, "training", True)
    if training is False or p == 0 or p == 0.0:
        return True, None
    return False, f"dropout with p={p} in training mode"


def _eager_site(softmax: fx.Node) -> AttentionSite | None:
    """Match matmul -> scale -> mask -> softmax -> matmul around one softmax node."""
    src = softmax.args[0]
    dim = arg(softmax, 1, "dim")
    out_fake = fake(softmax)
    if not isinstance(src, fx.Node) or out_fake is None or out_fake.dim() != 4:
        return None
    if dim is None or dim % 4 != 3:
        return None

    # Backwards: the score chain from softmax's input to the q @ k^T matmul.
    problem = None
    scale = 1.0
    scale_nodes = []
    mask = None
    mask_kind = "none"
    seen_scale = False  # walking backwards: a scaling seen before the mask add
    chain = []
    cur = src
    for _ in range(16):
        if not isinstance(cur, fx.Node):
            return None
        if is_call(cur, targets=_MATMUL, methods=("matmul",)):
            break
        if len(cur.users) != 1:
            problem = problem or f"the attention scores are also used by {len(cur.users) - 1} other node(s)"
        chain.append(cur)
        if cur.kwargs.get("alpha", 1) != 1 or cur.kwargs.get("rounding_mode") is not None:
            problem = problem or f"scores pass through {cur.format_node()}"
        if is_call(cur, methods=_CASTS):
            cur = cur.args[0]
            continue
        if is_call(cur, targets=_MUL + _DIV, methods=("mul", "div", "mul_", "div_")):
            a, b = cur.args[0], cur.args[1]
            is_div = cur.target in _DIV or cur.target in ("div", "div_")
            a_scores = isinstance(a, fx.Node) and not _scalar_node(a)
            tensor, other = (a, b) if a_scores else (b, a)
            if not isinstance(tensor, fx.Node) or (is_div and tensor is not a):
                problem = problem or f"scores are scaled by a non-constant ({cur.format_node()})"
                tensor = a if isinstance(a, fx.Node) else b
            elif _const(other) is not None:
                seen_scale = True
                scale *= 1.0 / _const(other) if is_div else _const(other)
            elif _scalar_node(other):
                seen_scale = True
                scale_nodes.append((other, is_div))
            else:
                problem = problem or f"scores are scaled by a tensor ({cur.format_node()})"
            cur = tensor
            continue
        if is_call(cur, targets=(operator.add, operator.iadd, torch.add), methods=("add", "add_")):
            a, b = cur.args[0], cur.args[1]
            # The score side leads back to the matmul; the other side is the mask.
            fa, fb = fake(a), fake(b)
            score_side, other = (a, b) if fa is not None and fa.dim() == 4 and _reaches_matmul(a) else (b, a)
            if not isinstance(other, fx.Node):
                problem = problem or f"a constant is added to the scores ({other!r})"
            elif mask is not None:
                problem = problem or "two masks are added to the scores"
            elif seen_scale:
                problem = problem or "the mask is added before the scores are scaled"
            else:
                mask, mask_kind = other, "mask"
            cur = score_side
            continue
        if is_call(cur, targets=(torch.masked_fill,), methods=("masked_fill",)):
            value = _const(arg(cur, 2, "value"))
            cond = arg(cur, 1, "mask")
            if value is None or not (value == -math.inf or value <= _MASKED_FILL_LIMIT):
                problem = problem or f"masked_fill with a finite value ({arg(cur, 2, 'value')!r})"
            elif mask is not None:
                problem = problem or "two masks are applied to the scores"
            else:
                mask, mask_kind = cond, "fill"
            cur = cur.args[0]
            continue
        # Anything else (tanh soft-capping, biases, ...): find the matmul to report the site.
        problem = problem or f"scores pass through {_describe(cur)}, which the ops cannot express"
        nxt = [a for a in cur.args if isinstance(a, fx.Node) and fake(a) is not None and fake(a).dim() == 4]
        if not nxt:
            return None
        cur = nxt[0]
    else:
        return None
    qk = cur
    if not isinstance(qk, fx.Node) or not is_call(qk, targets=_MATMUL, methods=("matmul",)):
        return None
    q, kt = qk.args[0], qk.args[1]
    if not isinstance(q, fx.Node) or not isinstance(kt, fx.Node):
        return None
    k = _transposed_key(kt)
    if k is None:
        return None
    chain += [qk, kt]

    # Forwards: softmax -> casts / dropout -> matmul(probs, v).
    fwd = [softmax]
    cur = softmax
    for _ in range(6):
        if len(cur.users) != 1:
            problem = problem or "the attention probabilities are also used elsewhere"
            break
        (nxt,) = cur.users
        if is_call(nxt, targets=_MATMUL, methods=("matmul",)) and nxt.args[0] is cur:
            v = nxt.args[1]
            if not isinstance(v, fx.Node):
                return None
            return AttentionSite(
                "eager", nxt, softmax, q, k, v, mask=mask, mask_kind=mask_kind, scale=scale,
                scale_nodes=tuple(scale_nodes), chain=(nxt, *reversed(fwd), *chain), problem=problem,
            )
        if is_call(nxt, methods=_CASTS):
            fwd.append(nxt)
            cur = nxt
            continue
        if is_call(nxt, targets=_DROPOUT):
            ok, why = _dropout_ok(nxt)
            problem = problem if ok else (problem or why)
            fwd.append(nxt)
            cur = nxt
            continue
        problem = problem or f"the probabilities pass through {_describe(nxt)}"
        break
    # Found q @ k^T -> softmax but not the second matmul: report it, never rewrite it.
    return AttentionSite(
        "eager", softmax, softmax, q, k, None, mask=mask, mask_kind=mask_kind, scale=scale,
        problem=problem or "no matmul with V after the softmax",
    )


def _reaches_matmul(node: fx.Node, depth: int = 8) -> bool:
    cur = node
    for _ in range(depth):
        if not isinstance(cur, fx.Node):
            return False
        if is_call(cur, targets=_MATMUL, methods=("matmul",)):
            return True
        nxt = [a for a in cur.args if isinstance(a, fx.Node) and fake(a) is not None and fake(a).dim() == 4]
        if not nxt:
            return False
        cur = nxt[0]
    return False


def _describe(node: fx.Node) -> str:
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    return f"'{name}'"


def find_attention_sites(graph: fx.Graph) -> list[AttentionSite]:
    """Every attention site in graph order."""
    sites = []
    for node in graph.nodes:
        if node.op == "call_function" and any(node.target is t for t in SDPA_TARGETS):
            site = _sdpa_site(node)
        elif is_call(node, targets=_SOFTMAX, methods=("softmax",)):
            site = _eager_site(node)
        else:
            continue
        if site is not None:
            sites.append(site)
    return sites
