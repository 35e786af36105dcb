"""Find attention in a Dynamo FX graph, in the forms models use.

1. ``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)``
   (``torch._C._nn`` / ``F.`` / ``aten.``): HF's ``sdpa`` implementation and most
   hand-written modern models. A float ``attn_mask`` with a head dim (ALiBi folded into the
   mask: Falcon, HF's ``position_bias``) is split, where the graph shows how it was built
   (``masked_fill(bias, cond, min)``, ``where(cond, bias, min)``, ``bias + mask``, or an
   ``expand`` of a mask without one), into a mask and a per-head bias.
2. The eager pattern, HF's ``attn_implementation="eager"`` and classic hand-written models:

       scores = matmul(q, k.transpose(-2, -1))               (B, Hq, Lq, N)
             |  baddbmm(bias, q3, k3^T) / bmm(q3, k3^T)       (B * Hq, Lq, N), q3 = q.reshape(B * Hq, Lq, D)
       then, in the order models write them (read as one expression, ``_interpret``):
         * c | / c                  constant (or symbolic scalar) scalings
         + bias                      per-head biases (ALiBi, position biases: a tensor with a head dim)
         tanh, * c                   one logit soft-cap, ``c * tanh(x / c)`` (Gemma 2)
         + mask, masked_fill(m, -inf), where(m, x, -inf)   masks (no head dim), any number
       [scores = cat([scores, sinks (1, Hq, 1, 1).expand(B, Hq, Lq, 1)], -1)]   sink logits (gpt-oss)
       [scores = scores - scores.max(-1, keepdim=True).values]                   a shift softmax ignores
       probs  = softmax(scores, dim=-1) [[..., :-1] with sinks] [.to(dtype)] [dropout(p=0 | training=False)] [view]
       out    = matmul(probs, v) | bmm(probs3, v3)          (B, Hq, Lq, Dv) | (B * Hq, Lq, Dv)

   i.e. logits ``cap(scale * q.k + head_bias) + masks`` and optional sink logits, the ops'
   form (``lychee_fx.ops``).

A site is everything the rewrite needs to know, read off the graph; shape questions (query
length, GQA, mask layout) are answered later by ``rewrite.py`` from the fake tensors. A site
whose scores pass through anything else (a bias added after the cap, a mask that is scaled,
a tensor-valued scale, ``sub``) is still reported, with ``problem`` saying why it cannot be
expressed, so that it is declined rather than silently missed.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from lychee_fx.passes.graph_utils import arg, fake, is_call, known_equal

__all__ = ["AttentionSite", "BiasTerm", "find_attention_sites", "SDPA_TARGETS"]

SDPA_TARGETS = (
    torch._C._nn.scaled_dot_product_attention,
    F.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
)
_MATMUL = (torch.matmul, operator.matmul)
_BMM = (torch.bmm,)
_BADDBMM = (torch.baddbmm,)
_SOFTMAX = (torch.softmax, F.softmax, torch.ops.aten._softmax.default)
_MUL = (operator.mul, operator.imul, torch.mul)
_DIV = (operator.truediv, operator.itruediv, torch.div, torch.true_divide)
_ADD = (operator.add, operator.iadd, torch.add)
_WHERE = (torch.where,)
_TANH = (torch.tanh,)
_CASTS = ("to", "float", "type", "half", "bfloat16", "double", "type_as", "contiguous")
_DROPOUT = (F.dropout, torch.dropout)
_RESHAPES = ("view", "reshape")
# Added to (or filled into) a score, these values mean "never attend".
_MASKED_FILL_LIMIT = -1e30


@dataclasses.dataclass(frozen=True)
class BiasTerm:
    """A per-head additive term of the logits: ``coef * node`` where ``node`` broadcasts
    against the scores (4-D ``(B, Hq, Lq, N)``, or 3-D ``(B * Hq, Lq, N)`` when ``merged``);
    ``groups > 1``: ``node`` has one row per KV head, repeated for the G query heads of each
    (a bias expanded by ``repeat_kv`` like K)."""

    node: fx.Node
    coef: float = 1.0
    merged: bool = False
    groups: int = 1


@dataclasses.dataclass
class AttentionSite:
    """One attention call in the graph, as found (before any shape analysis)."""

    kind: str  # "sdpa" | "eager"
    out: fx.Node  # its output (B, Hq, Lq, Dv), or (B * Hq, Lq, Dv) when merged_heads: the node replaced
    anchor: fx.Node  # the node whose module stack names the layer (sdpa call / softmax)
    q: fx.Node
    k: fx.Node  # as attention reads it: (B, Hq or Hkv, N, D)
    v: fx.Node | None  # None only for a site that can never be rewritten
    mask: fx.Node | None = None  # the first of ``masks`` (kept for callers that read one)
    mask_kind: str = "none"  # "none" | "mask" (SDPA-style bool/additive) | "fill" (True = masked)
    # every mask the logits get, as (node, kind): kind "mask" (bool True = valid, or additive
    # float) or "fill" (bool True = masked)
    masks: tuple[tuple[fx.Node, str], ...] = ()
    head_bias: tuple[BiasTerm, ...] = ()  # summed, added before the cap
    softcap: float = 0.0  # the logit soft-cap c (0: none)
    # sink logits (attention sinks: gpt-oss, MiMo-V2): a node of Hq elements, (1, Hq, 1, 1) as
    # the model broadcasts it, whose exp joins each query head's softmax denominator
    sink_logits: fx.Node | None = None
    scale: float | None = None  # None: 1/sqrt(D) (unless scale_nodes)
    # Python-scalar nodes the scale also multiplies (False) or divides (True) by: under
    # dynamic=True, Dynamo turns float attributes such as HF's ``self.scaling`` into SymFloats.
    scale_nodes: tuple[tuple[fx.Node, bool], ...] = ()
    dropout: float = 0.0
    is_causal: bool = False
    enable_gqa: bool = False
    merged_heads: bool = False  # the eager form on (B * Hq, Lq, N) scores (baddbmm / bmm)
    chain: tuple[fx.Node, ...] = ()  # nodes made dead by the rewrite (output first)
    problem: str | None = None  # why the pattern cannot be expressed, if it cannot

    def __post_init__(self):
        if self.mask is not None and not self.masks:
            self.masks = ((self.mask, self.mask_kind),)
        if self.masks and self.mask is None:
            self.mask, self.mask_kind = self.masks[0]


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


def _fill_value(x) -> float | None:
    """A fill constant: a number, or a ``torch.tensor(number)`` node (GPT-Neo's mask value)."""
    if isinstance(x, fx.Node) and x.op == "call_function" and x.target is torch.tensor and x.args:
        return _const(x.args[0])
    return _const(x)


def _is_masking(value: float | None) -> bool:
    return value is not None and (value == -math.inf or value <= _MASKED_FILL_LIMIT)


def _head_dim(node, merged: bool) -> int | None:
    """How many entries a term has along the scores' head dim (1: shared by every head)."""
    f = fake(node)
    if f is None:
        return None
    if merged:
        return None if f.dim() != 3 else (1 if known_equal(f.shape[0], 1) else 2)
    if f.dim() < 2:
        return 1
    shape = [1] * (4 - f.dim()) + list(f.shape)
    return 1 if known_equal(shape[1], 1) else 2


# ---- SDPA ----------------------------------------------------------------------------------


def _strip(node):
    """Through casts and ``contiguous`` calls to the node that made the value."""
    while is_call(node, methods=_CASTS) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _split_sdpa_mask(mask: fx.Node) -> tuple[tuple, tuple] | None:
    """A float SDPA mask with a head dim, as (masks, head-bias terms), where the graph shows
    how it was made; None when it does not. A mask expanded like K (``repeat_kv``, Doge's
    per-KV-head dynamic mask) is split at its un-expanded source."""
    from lychee_fx.passes.gqa import fold_kv_expansion

    folded = fold_kv_expansion(_strip(mask))
    if folded is not None:
        inner = _split_sdpa_mask(folded.base)
        if inner is None:
            return None
        masks, terms = inner
        return masks, tuple(dataclasses.replace(t, groups=t.groups * folded.groups) for t in terms)
    node = _strip(mask)
    if is_call(node, targets=(torch.masked_fill,), methods=("masked_fill",)):
        bias, cond, value = node.args[0], arg(node, 1, "mask"), _const(arg(node, 2, "value"))
        if _is_masking(value) and _head_dim(cond, False) == 1:
            return ((cond, "fill"),), (BiasTerm(bias),)
    if is_call(node, targets=_WHERE):
        cond, a, b = node.args[:3]
        if _is_masking(_fill_value(b)) and _head_dim(cond, False) == 1 and isinstance(a, fx.Node):
            return ((cond, "mask"),), (BiasTerm(a),)
    if is_call(node, targets=_ADD, methods=("add",)) and len(node.args) == 2:
        a, b = node.args
        if all(isinstance(x, fx.Node) for x in (a, b)):
            ha, hb = _head_dim(a, False), _head_dim(b, False)
            if ha == 2 and hb == 1:
                return ((b, "mask"),), (BiasTerm(a),)
            if hb == 2 and ha == 1:
                return ((a, "mask"),), (BiasTerm(b),)
    if is_call(node, methods=("expand",), targets=(torch.Tensor.expand,)):
        src = node.args[0]
        if isinstance(src, fx.Node) and _head_dim(src, False) == 1:
            return ((src, "mask"),), ()
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
    masks, terms = (((mask, "mask"),), ()) if isinstance(mask, fx.Node) else ((), ())
    if isinstance(mask, fx.Node) and _head_dim(mask, False) == 2:
        masks, terms = _split_sdpa_mask(mask) or (masks, terms)
    site = AttentionSite(
        "sdpa", node, node, q, k, v, masks=masks, head_bias=terms,
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


# ---- the eager pattern ----------------------------------------------------------------------


def _transposed_key(kt: fx.Node, rank: int = 4) -> fx.Node | None:
    """``k.transpose(-2, -1)`` (any spelling of the last two dims) or ``k.mT`` -> k."""
    if is_call(kt, targets=(torch.transpose,), methods=("transpose",)):
        dims = {d % rank for d in kt.args[1:3] if isinstance(d, int)}
        src = kt.args[0]
        if dims == {rank - 2, rank - 1} and isinstance(src, fx.Node) and fake(src) is not None and fake(src).dim() == rank:
            return src
    if kt.op == "call_function" and kt.target is getattr and kt.args[1] == "mT":
        return kt.args[0]
    if rank == 4 and is_call(kt, targets=(torch.permute,), methods=("permute",)):
        dims = kt.args[1] if isinstance(kt.args[1], (tuple, list)) else kt.args[1:]
        if tuple(d % 4 for d in dims) == (0, 1, 3, 2):
            return kt.args[0]
    return None


def _unmerged(node) -> fx.Node | None:
    """``x.reshape(B * H, L, D)`` (or ``view``) of a 4-D ``x (B, H, L, D)`` -> x, by shape."""
    if not is_call(node, targets=(torch.reshape,), methods=_RESHAPES):
        return None
    src = node.args[0]
    s, o = fake(src), fake(node)
    if s is None or o is None or s.dim() != 4 or o.dim() != 3:
        return None
    if known_equal(o.shape[0], s.shape[0] * s.shape[1]) and known_equal(o.shape[1], s.shape[2]) and known_equal(o.shape[2], s.shape[3]):
        return src
    return None


def _splits_heads(node) -> bool:
    """``x.view(B, H, L, N)`` of a 3-D ``x (B * H, L, N)``: the inverse of ``_unmerged``."""
    if not is_call(node, targets=(torch.reshape,), methods=_RESHAPES):
        return False
    s, o = fake(node.args[0]), fake(node)
    return (s is not None and o is not None and s.dim() == 3 and o.dim() == 4
            and known_equal(s.shape[0], o.shape[0] * o.shape[1]) and known_equal(s.shape[2], o.shape[3]))


def _same_shape_view(node) -> bool:
    """A ``view`` / ``reshape`` that keeps the shape (Falcon's ``scores.view(B, H, L, N)``)."""
    if not is_call(node, targets=(torch.reshape,), methods=_RESHAPES) or not isinstance(node.args[0], fx.Node):
        return False
    s, o = fake(node.args[0]), fake(node)
    return (s is not None and o is not None and s.dim() == o.dim()
            and all(known_equal(a, b) for a, b in zip(s.shape, o.shape)))


def _merges_heads(node) -> bool:
    s, o = fake(node.args[0]) if node.args else None, fake(node)
    return (is_call(node, targets=(torch.reshape,), methods=_RESHAPES) and s is not None and o is not None
            and s.dim() == 4 and o.dim() == 3 and known_equal(o.shape[0], s.shape[0] * s.shape[1]))


def _qk(node) -> tuple | None:
    """The q @ k^T that starts a score chain: (q, k, merged, bias term or None, alpha)."""
    if is_call(node, targets=_MATMUL, methods=("matmul",)):
        q, kt = node.args[0], node.args[1]
        if isinstance(q, fx.Node) and isinstance(kt, fx.Node) and fake(node) is not None and fake(node).dim() == 4:
            k = _transposed_key(kt)
            return None if k is None else (q, k, False, None, 1.0)
        return None
    if is_call(node, targets=_BMM, methods=("bmm",)) or is_call(node, targets=_BADDBMM, methods=("baddbmm",)):
        bad = is_call(node, targets=_BADDBMM, methods=("baddbmm",))
        if bad:
            bias = arg(node, 0, "input")
            q3, kt3 = arg(node, 1, "batch1"), arg(node, 2, "batch2")
            beta, alpha = _const(node.kwargs.get("beta", 1.0)), _const(node.kwargs.get("alpha", 1.0))
        else:
            bias, (q3, kt3), beta, alpha = None, node.args[:2], 1.0, 1.0
        if not (isinstance(q3, fx.Node) and isinstance(kt3, fx.Node)) or beta is None or alpha is None:
            return None
        k3 = _transposed_key(kt3, rank=3)
        q, k = _unmerged(q3), None if k3 is None else _unmerged(k3)
        if q is None or k is None:
            return None
        zeros = isinstance(bias, fx.Node) and is_call(bias, targets=(torch.zeros, torch.zeros_like))
        term = BiasTerm(bias, beta, merged=True) if isinstance(bias, fx.Node) and beta and not zeros else None
        return q, k, True, term, alpha
    return None


def _reaches_qk(node: fx.Node, depth: int = 12) -> bool:
    cur = node
    for _ in range(depth):
        if not isinstance(cur, fx.Node):
            return False
        if _qk(cur) is not None:
            return True
        nxt = [a for a in cur.args if isinstance(a, fx.Node) and fake(a) is not None and fake(a).dim() in (3, 4)]
        if is_call(cur, targets=_WHERE) and len(cur.args) == 3:
            nxt = [a for a in cur.args[1:] if isinstance(a, fx.Node) and fake(a) is not None and fake(a).dim() in (3, 4)]
        if not nxt:
            return False
        cur = nxt[0] if len(nxt) == 1 or _reaches_qk(nxt[0], 4) else nxt[1]
    return False


@dataclasses.dataclass
class _Step:
    """One operation of the score chain, softmax side last after reversal."""

    op: str  # "cast" | "split" | "scale" | "tanh" | "term" | "mask" | "other"
    node: fx.Node
    value: object = None  # scale: (const or None, scalar node or None, is_div); term/mask: (node, kind)


def _score_steps(src: fx.Node, src_users: int = 1) -> tuple[list[_Step], fx.Node | None, tuple | None, str | None]:
    """Walk back from softmax's input to q @ k^T; returns the steps (qk side first), the
    q @ k^T node and its ``_qk`` reading, and the first problem seen. ``src_users``: the
    users ``src`` itself may have (2 when a max-shift reads it besides the subtraction)."""
    steps: list[_Step] = []
    problem = None
    cur = src
    for _ in range(24):
        if not isinstance(cur, fx.Node):
            return steps, None, None, problem
        qk = _qk(cur)
        if qk is not None:
            steps.reverse()
            return steps, cur, qk, problem
        if len(cur.users) != (src_users if cur is src else 1):
            problem = problem or f"the attention scores are also used by {len(cur.users) - 1} other node(s)"
        if cur.kwargs.get("alpha", 1) != 1 or cur.kwargs.get("rounding_mode") is not None:
            problem = problem or f"scores pass through {cur.format_node()}"
        if is_call(cur, methods=_CASTS):
            steps.append(_Step("cast", cur))
            cur = cur.args[0]
        elif _splits_heads(cur):
            steps.append(_Step("split", cur))
            cur = cur.args[0]
        elif _same_shape_view(cur):
            steps.append(_Step("cast", cur))
            cur = cur.args[0]
        elif is_call(cur, targets=_MUL + _DIV, methods=("mul", "div", "mul_", "div_")):
            a, b = cur.args[0], cur.args[1]
            is_div = cur.target in _DIV or cur.target in ("div", "div_")
            a_scores = isinstance(a, fx.Node) and not _scalar_node(a)
            tensor, other = (a, b) if a_scores else (b, a)
            if not isinstance(tensor, fx.Node) or (is_div and tensor is not a):
                problem = problem or f"scores are scaled by a non-constant ({cur.format_node()})"
                tensor = a if isinstance(a, fx.Node) else b
                steps.append(_Step("other", cur))
            elif _const(other) is not None:
                steps.append(_Step("scale", cur, (1.0 / _const(other) if is_div else _const(other), None, False)))
            elif _scalar_node(other):
                steps.append(_Step("scale", cur, (None, other, is_div)))
            else:
                problem = problem or f"scores are scaled by a tensor ({cur.format_node()})"
                steps.append(_Step("other", cur))
            cur = tensor
        elif is_call(cur, targets=_ADD, methods=("add", "add_")):
            a, b = cur.args[0], cur.args[1]
            score_side, other = (a, b) if isinstance(a, fx.Node) and _reaches_qk(a) else (b, a)
            if not isinstance(other, fx.Node):
                problem = problem or f"a constant is added to the scores ({other!r})"
                steps.append(_Step("other", cur))
            else:
                merged = fake(cur) is not None and fake(cur).dim() == 3  # added to (B * Hq, Lq, N) scores
                per_head = _head_dim(other, merged) == 2
                split = _split_sdpa_mask(other) if per_head and not merged else None
                if split is not None:  # a per-head mask made of a bias and a mask (Falcon's ALiBi mask)
                    masks, terms = split
                    steps += [_Step("mask", cur, (m, kind, False)) for m, kind in masks]
                    steps += [_Step("term", cur, (t.node, "mask", False, t.groups)) for t in terms]
                else:
                    steps.append(_Step("term" if per_head else "mask", cur, (other, "mask", merged)))
            cur = score_side
        elif is_call(cur, targets=(torch.masked_fill,), methods=("masked_fill", "masked_fill_")):
            value = _const(arg(cur, 2, "value"))
            cond = arg(cur, 1, "mask")
            if not _is_masking(value):
                problem = problem or f"masked_fill with a finite value ({arg(cur, 2, 'value')!r})"
                steps.append(_Step("other", cur))
            elif _head_dim(cond, False) != 1:
                problem = problem or "a per-head masked_fill"
                steps.append(_Step("other", cur))
            else:
                steps.append(_Step("mask", cur, (cond, "fill", False)))
            cur = cur.args[0]
        elif is_call(cur, targets=_WHERE) and len(cur.args) == 3:
            cond, a, b = cur.args
            if isinstance(a, fx.Node) and _reaches_qk(a) and _is_masking(_fill_value(b)):
                steps.append(_Step("mask", cur, (cond, "mask", False)))
                cur = a
            elif isinstance(b, fx.Node) and _reaches_qk(b) and _is_masking(_fill_value(a)):
                steps.append(_Step("mask", cur, (cond, "fill", False)))
                cur = b
            else:
                problem = problem or f"scores pass through {_describe(cur)}, which the ops cannot express"
                steps.append(_Step("other", cur))
                cur = a if isinstance(a, fx.Node) and _reaches_qk(a) else b
            if not isinstance(cond, fx.Node) or _head_dim(cond, False) != 1:
                problem = problem or "a per-head where mask"
        elif is_call(cur, targets=_TANH, methods=("tanh",)):
            steps.append(_Step("tanh", cur))
            cur = cur.args[0]
        else:
            # Anything else (sub, clamp, ...): find the matmul to report the site.
            problem = problem or f"scores pass through {_describe(cur)}, which the ops cannot express"
            steps.append(_Step("other", cur))
            flat = [x for a in cur.args for x in (a if isinstance(a, (list, tuple)) else (a,))]  # cat's list of tensors
            nxt = [a for a in flat if isinstance(a, fx.Node) and fake(a) is not None and fake(a).dim() in (3, 4)]
            if not nxt:
                return steps, None, None, problem
            cur = nxt[0]
    return steps, None, None, problem


@dataclasses.dataclass
class _Logits:
    """``_interpret``'s reading of a score chain: ``cap(scale * q.k + sum(terms)) + masks``."""

    scale: float = 1.0
    scale_nodes: list = dataclasses.field(default_factory=list)
    terms: list = dataclasses.field(default_factory=list)  # BiasTerm
    masks: list = dataclasses.field(default_factory=list)  # (node, kind)
    softcap: float = 0.0
    problem: str | None = None


def _interpret(steps: list[_Step], first_term: BiasTerm | None, alpha: float) -> _Logits:
    """Read the score chain (qk side first) as the ops' logits, or say why it is not one."""
    out = _Logits(scale=alpha)
    if first_term is not None:
        out.terms.append(first_term)
    phase = "inner"  # "inner": before any tanh or mask; "capped": after tanh; "masked": after a mask
    outer = 1.0  # the factor applied after tanh

    def fail(why: str) -> None:
        out.problem = out.problem or why

    for st in steps:
        if st.op in ("cast", "split"):
            continue
        if st.op == "scale":
            c, node, is_div = st.value
            if phase == "inner":
                if c is not None:
                    out.scale *= c
                    out.terms = [dataclasses.replace(t, coef=t.coef * c) for t in out.terms]
                else:
                    if out.terms:
                        fail("a position bias is scaled by a non-constant")
                    out.scale_nodes.append((node, is_div))
            elif phase == "capped" and c is not None:
                outer *= c
            elif phase == "capped":
                fail("the soft-cap is scaled by a non-constant")
            else:
                fail("the mask is added before the scores are scaled")
        elif st.op == "tanh":
            if phase != "inner":
                fail("scores pass through 'tanh' after a mask or a second time")
            phase = "capped"
        elif st.op == "term":
            node, _, merged, *groups = st.value
            if phase != "inner":
                fail("a position bias is added after the soft-cap or a mask")
            out.terms.append(BiasTerm(node, 1.0, merged, *groups))
        elif st.op == "mask":
            node, kind, _ = st.value
            phase = "masked"
            out.masks.append((node, kind))
        else:
            fail(f"scores pass through {_describe(st.node)}, which the ops cannot express")
    if any(st.op == "tanh" for st in steps):
        if not outer > 0:
            fail(f"a soft-cap of {outer} (not positive)")
        elif out.scale_nodes:
            fail("a soft-capped score with a non-constant scale")
        else:
            # outer * tanh(s * qk + t) = c * tanh((c * s * qk + c * t) / c), c = outer
            out.softcap = outer
            out.scale *= outer
            out.terms = [dataclasses.replace(t, coef=t.coef * outer) for t in out.terms]
    return out


def _dropout_ok(node: fx.Node) -> tuple[bool, str | None]:
    p = arg(node, 1, "p", 0.5)
    training = arg(node, 2, "training", True)
    if training is False or p == 0 or p == 0.0:
        return True, None
    return False, f"dropout with p={p} in training mode"


def _last_dim(node: fx.Node, dim) -> bool:
    f = fake(node)
    return isinstance(dim, int) and f is not None and f.dim() == 4 and dim % 4 == 3


def _max_shift(node) -> tuple[fx.Node, list[fx.Node]] | None:
    """``x - x.max(dim=-1, keepdim=True).values`` (or ``amax``) -> (x, the shift's nodes): a
    shift softmax does not see (gpt-oss, MiMo-V2 subtract it for low-precision range)."""
    if not is_call(node, targets=(operator.sub, torch.sub), methods=("sub",)) or len(node.args) != 2:
        return None
    x, m = node.args
    if not isinstance(x, fx.Node) or not isinstance(m, fx.Node) or node.kwargs:
        return None
    nodes = [node, m]
    if is_call(m, targets=(operator.getitem,)) and m.args[1] == 0 or (m.op == "call_function" and m.target is getattr
                                                                       and m.args[1] == "values"):
        m = m.args[0]
        nodes.append(m)
    else:
        if not is_call(m, targets=(torch.amax,), methods=("amax",)):
            return None
    if not is_call(m, targets=(torch.max, torch.amax), methods=("max", "amax")) or m.args[0] is not x:
        return None
    dim = arg(m, 1, "dim")
    keep = arg(m, 2, "keepdim", False)
    if not _last_dim(x, dim) or keep is not True:
        return None
    return x, nodes


def _sink_concat(node) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
    """``cat([scores, sinks.reshape(1, -1, 1, 1).expand(B, -1, Lq, -1)], dim=-1)`` -> (scores,
    the sinks as (1, Hq, 1, 1), the concatenation's nodes): a logit per query head appended
    to every row (gpt-oss's attention sinks)."""
    if not is_call(node, targets=(torch.cat, torch.concat, torch.concatenate)):
        return None
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = arg(node, 1, "dim", 0)
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not all(isinstance(p, fx.Node) for p in parts):
        return None
    scores, col = parts
    if not _last_dim(scores, dim) or fake(col) is None or fake(col).dim() != 4 or not known_equal(fake(col).shape[3], 1):
        return None
    nodes = [node]
    base = col
    while is_call(base, targets=(torch.Tensor.expand,), methods=("expand", "expand_as")) or is_call(base, methods=_CASTS):
        nodes.append(base)
        base = base.args[0]
    f = fake(base)
    if not isinstance(base, fx.Node) or f is None or f.dim() != 4:
        return None
    if not all(known_equal(f.shape[i], 1) for i in (0, 2, 3)) or not known_equal(f.shape[1], fake(scores).shape[1]):
        return None
    return scores, base, nodes


def _drops_sink(node) -> bool:
    """``probs[..., :-1]``: the appended sink column dropped."""
    if not is_call(node, targets=(operator.getitem,)) or len(node.args) != 2:
        return False
    idx = node.args[1]
    if not isinstance(idx, tuple):
        return False
    if len(idx) == 2 and idx[0] is Ellipsis:
        last = idx[1]
    elif len(idx) == 4 and all(x == slice(None) for x in idx[:3]):
        last = idx[3]
    else:
        return False
    return isinstance(last, slice) and last.start is None and last.stop == -1 and last.step is None


def _eager_site(softmax: fx.Node) -> AttentionSite | None:
    """Match q @ k^T -> score chain -> softmax -> probs @ v around one softmax node (with an
    optional max-shift and sink logits between the score chain and the softmax)."""
    src = softmax.args[0]
    dim = arg(softmax, 1, "dim")
    out_fake = fake(softmax)
    if not isinstance(src, fx.Node) or out_fake is None or out_fake.dim() != 4:
        return None
    if dim is None or dim % 4 != 3:
        return None

    pre: list[fx.Node] = []  # between the score chain and the softmax: a max-shift, a sink concatenation
    src_users = 1
    shifted = _max_shift(src)
    if shifted is not None:
        src, nodes = shifted
        pre += nodes
        src_users = 2  # the subtraction and the max
    sink = _sink_concat(src)
    sink_node = None
    if sink is not None:
        if len(src.users) != src_users:
            return None
        src, sink_node, nodes = sink
        pre += nodes
        src_users = 1

    steps, qk_node, qk, problem = _score_steps(src, src_users)
    if qk is None:
        return None
    q, k, merged, first_term, alpha = qk
    if merged and not any(st.op == "split" for st in steps):
        return None  # 3-D scores that never reach a 4-D softmax: not this pattern
    logits = _interpret(steps, first_term, alpha)
    problem = problem or logits.problem
    # Nodes made dead by the rewrite: the chain, q @ k^T, k's transpose (and, in the 3-D
    # form, the q and k reshapes); erase_dead leaves any that something else still uses.
    chain = pre + [st.node for st in reversed(steps)] + [qk_node]
    operands = [x for x in (*qk_node.args, *qk_node.kwargs.values()) if isinstance(x, fx.Node)]
    for x in operands:
        if fake(x) is not None and fake(x).dim() in (3, 4) and x is not q and x is not k:
            chain.append(x)
            chain += [y for y in x.args if isinstance(y, fx.Node) and y is not k and fake(y) is not None
                      and fake(y).dim() == 3]

    # Forwards: softmax -> [the sink column dropped] casts / dropout / merge view -> matmul(probs, v).
    fwd = [softmax]
    cur = softmax
    if sink_node is not None:
        (nxt,) = cur.users if len(cur.users) == 1 else (None,)
        if nxt is None or not _drops_sink(nxt):
            return AttentionSite("eager", softmax, softmax, q, k, None, masks=tuple(logits.masks), scale=logits.scale,
                                 problem=problem or "sink logits appended whose probabilities are not dropped after the softmax")
        fwd.append(nxt)
        cur = nxt
    for _ in range(8):
        if len(cur.users) != 1:
            problem = problem or "the attention probabilities are also used elsewhere"
            break
        (nxt,) = cur.users
        bmm = merged and is_call(nxt, targets=_BMM, methods=("bmm",)) and fake(nxt) is not None and fake(nxt).dim() == 3
        mm = is_call(nxt, targets=_MATMUL, methods=("matmul",)) and fake(nxt) is not None and fake(nxt).dim() == 4
        if (bmm or mm) and nxt.args[0] is cur:
            v = nxt.args[1]
            if bmm:  # probs (B * Hq, 1, N) @ v (B * Hq, N, Dv)
                v = _unmerged(v) if isinstance(v, fx.Node) else None
                chain.append(nxt.args[1])
            out_merged = bool(bmm)
            if not isinstance(v, fx.Node):
                return None
            return AttentionSite(
                "eager", nxt, softmax, q, k, v, masks=tuple(logits.masks), head_bias=tuple(logits.terms),
                softcap=logits.softcap, scale=logits.scale, scale_nodes=tuple(logits.scale_nodes),
                merged_heads=out_merged, chain=tuple(dict.fromkeys((nxt, *reversed(fwd), *chain))), problem=problem,
                sink_logits=sink_node,
            )
        if is_call(nxt, methods=_CASTS) or (merged and _merges_heads(nxt)) or _same_shape_view(nxt):
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
        "eager", softmax, softmax, q, k, None, masks=tuple(logits.masks), scale=logits.scale,
        problem=problem or "no matmul with V after the softmax",
    )


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
