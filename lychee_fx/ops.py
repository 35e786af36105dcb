"""The op contracts: the ``torch.library`` custom ops that the passes emit for decode steps.

``passes/`` writes these into graphs; ``codegen/`` gives them Triton kernels on CUDA; every
other device runs the vectorised torch implementation in ``lychee_fx.eager_ops``.

    torch.ops.lychee.retrieval_attention(
        q, k, v, mask, sel, heads, scale, block_size, num_blocks, sink, recent, select,
        softcap=0.0, head_bias=None, sink_logits=None
    ) -> (out, sel_out)
    torch.ops.lychee.sparse_attention(
        q, k, v, mask, sel, heads, scale, block_size, softcap=0.0, head_bias=None, sink_logits=None
    ) -> out
    torch.ops.lychee.hybrid_attention(
        q, k, v, mask, sel, ret_heads, spa_heads, scale, block_size, num_blocks, sink, recent, select,
        softcap=0.0, head_bias=None, sink_logits=None
    ) -> (out, sel_out)
    torch.ops.lychee.decode_linear(x, weights, biases) -> [y_0, ...]

Shapes (B batch, Hq = Hkv * G query heads, N cache slots, D query/key head dim, Dv value head
dim, S = num_blocks, R = len(heads)):

    q         (B, Hq, 1, D)      one decode query per head; query head i reads KV head i // G
    k         (B, Hkv, N, D)     the cache, un-expanded, any strides with a unit last stride
    v         (B, Hkv, N, Dv)    likewise; Dv may differ from D (multi-head latent attention)
    mask      (B or 1, N)        bool (True = valid) or additive float, or None (all valid)
    sel       (B, Hkv, S) int32  selected block ids, ascending, -1 padded; None = empty
    heads     int[]              the KV heads this op serves, strictly ascending
    softcap   float              logit soft-cap c > 0 (``c * tanh(x / c)``), 0 for none
    head_bias (B or 1, Hq, N)    finite float bias per query head (ALiBi), or None
    sink_logits (Hq,)          a logit per query head that joins the softmax's denominator only
                               (attention sinks: gpt-oss), or None; -inf is no sink
    out       (B, R * G, 1, Dv)  q's dtype: the query heads of ``heads``, in order
    sel_out   (B, Hkv, S) int32  ``sel`` with the rows of ``heads`` replaced (when ``select``)

Semantics are SPEC 1.1 with ``lychee_fx.reference``'s extensions (the oracle): the logit of
query head i at slot j is ``cap(scale * q_i . k_j + head_bias[i, j]) + mask_bias[j]``, and a
sink logit adds ``exp(sink_logits[i])`` to head i's softmax denominator. A
retrieval op attends over all valid slots and (``select=True``) picks ``S`` blocks per row;
a sparse op attends over the valid slots of the blocks in its rows of ``sel``. An additive
mask's values enter the logits; for selection only its validity counts. Selection scores
are the group's summed ``q . k``, or with a cap or a head bias the group's summed logits
before the mask. A row with no visible slot outputs zeros.

``hybrid_attention`` is one layer's pair, ``cat([retrieval out, sparse out], 1)`` with the
sparse heads reading ``sel`` (not the retrieval part's new rows, which are other heads'): out
(B, (R_ret + R_spa) * G, 1, Dv), sel_out as the retrieval op's (``sel`` where not ``select``).
``passes/pool.py`` writes it on CUDA so that a layer's heads take one launch pair.

``decode_linear`` is ``[F.linear(x, w, b) for w, b in zip(weights, biases)]`` for a few weights
that share one input, so that one kernel launch can serve them (a layer's q, k and v
projections): x (M, K), weights[i] (N_i, K), biases[i] (N_i,) or None, y_i (M, N_i) in x's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from lychee_fx import eager_ops

__all__ = ["retrieval_attention", "sparse_attention", "hybrid_attention", "decode_linear", "check_inputs",
           "check_hybrid_inputs", "NAMESPACE"]

NAMESPACE = "lychee"
LINEAR_MAX_ROWS = 8  # decode_linear's x has at most this many rows (a decode batch) where the passes emit it
LINEAR_MAX_WEIGHTS = 4  # ... and at most this many weights


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    sel: Optional[torch.Tensor],
    heads: Sequence[int],
    block_size: int,
    num_blocks: Optional[int] = None,
    softcap: float = 0.0,
    head_bias: Optional[torch.Tensor] = None,
    sink_logits: Optional[torch.Tensor] = None,
) -> None:
    """Validate the shared inputs of both ops; raises ValueError/TypeError naming both values."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"expected q (B, Hq, 1, D), k and v (B, Hkv, N, D), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    b, hq, qlen, d = q.shape
    if qlen != 1:
        raise ValueError(f"decode ops take one query position, got q {tuple(q.shape)}")
    if k.shape[:3] != v.shape[:3] or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"expected k of shape (B={b}, Hkv, N, D={d}) and v (B={b}, Hkv, N, Dv), got "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise TypeError(
            f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if list(heads) != sorted(set(heads)) or any(not 0 <= h < hkv for h in heads):
        raise ValueError(
            f"heads must be strictly ascending KV head indices in [0, {hkv}), got {list(heads)}"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n = k.shape[2]
    if mask is not None:
        if mask.dim() != 2 or mask.shape[0] not in (1, b) or mask.shape[1] != n:
            raise ValueError(
                f"expected mask of shape (B={b} or 1, N={n}), got {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise TypeError(f"mask must be bool or floating, got {mask.dtype}")
    if not softcap >= 0.0 or softcap == float("inf"):
        raise ValueError(f"softcap must be 0 (none) or a finite positive float, got {softcap}")
    if head_bias is not None:
        if head_bias.dim() != 3 or head_bias.shape[0] not in (1, b) or tuple(head_bias.shape[1:]) != (hq, n):
            raise ValueError(
                f"expected head_bias of shape (B={b} or 1, Hq={hq}, N={n}), got {tuple(head_bias.shape)}"
            )
        if not head_bias.dtype.is_floating_point:
            raise TypeError(f"head_bias must be floating, got {head_bias.dtype}")
    if sink_logits is not None:
        if tuple(sink_logits.shape) != (hq,):
            raise ValueError(f"expected sink_logits of shape (Hq={hq},), got {tuple(sink_logits.shape)}")
        if not sink_logits.dtype.is_floating_point:
            raise TypeError(f"sink_logits must be floating, got {sink_logits.dtype}")
    if sel is not None:
        s = sel.shape[-1] if num_blocks is None else num_blocks
        if sel.dtype != torch.int32 or tuple(sel.shape) != (b, hkv, s):
            raise ValueError(
                f"expected sel int32 of shape (B={b}, Hkv={hkv}, S={s}), got "
                f"{sel.dtype} {tuple(sel.shape)}"
            )


@torch.library.custom_op(f"{NAMESPACE}::retrieval_attention", mutates_args=())
def retrieval_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    sel: Optional[torch.Tensor],
    heads: list[int],
    scale: float,
    block_size: int,
    num_blocks: int,
    sink: int,
    recent: int,
    select: bool,
    softcap: float = 0.0,
    head_bias: Optional[torch.Tensor] = None,
    sink_logits: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of the retrieval KV heads ``heads``, and their new block selection."""
    check_inputs(q, k, v, mask, sel, heads, block_size, num_blocks, softcap, head_bias, sink_logits)
    return eager_ops.retrieval_attention(
        q, k, v, mask, sel, heads, scale, block_size, num_blocks, sink, recent, select, softcap, head_bias, sink_logits
    )


@retrieval_attention.register_fake
def _(q, k, v, mask, sel, heads, scale, block_size, num_blocks, sink, recent, select, softcap=0.0, head_bias=None,
      sink_logits=None):
    b, hq, _, _ = q.shape
    g = hq // k.shape[1]
    out = q.new_empty(b, len(heads) * g, 1, v.shape[-1])
    sel_out = q.new_empty(b, k.shape[1], num_blocks, dtype=torch.int32)
    return out, sel_out


@torch.library.custom_op(f"{NAMESPACE}::sparse_attention", mutates_args=())
def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    sel: torch.Tensor,
    heads: list[int],
    scale: float,
    block_size: int,
    softcap: float = 0.0,
    head_bias: Optional[torch.Tensor] = None,
    sink_logits: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention of the sparse KV heads ``heads`` over the valid slots of their selected blocks."""
    check_inputs(q, k, v, mask, sel, heads, block_size, None, softcap, head_bias, sink_logits)
    return eager_ops.sparse_attention(q, k, v, mask, sel, heads, scale, block_size, softcap, head_bias, sink_logits)


@sparse_attention.register_fake
def _(q, k, v, mask, sel, heads, scale, block_size, softcap=0.0, head_bias=None, sink_logits=None):
    b, hq, _, _ = q.shape
    g = hq // k.shape[1]
    return q.new_empty(b, len(heads) * g, 1, v.shape[-1])


def check_hybrid_inputs(q, k, v, mask, sel, ret_heads: Sequence[int], spa_heads: Sequence[int], block_size: int,
                        num_blocks: int, softcap: float = 0.0, head_bias=None, sink_logits=None) -> None:
    """Validate ``hybrid_attention``'s inputs: ``check_inputs`` for each head list, then its
    own rule: two non-empty, disjoint head lists, and a selection for the sparse heads to read."""
    for heads in (ret_heads, spa_heads):
        check_inputs(q, k, v, mask, sel, heads, block_size, num_blocks, softcap, head_bias, sink_logits)
    if not ret_heads or not spa_heads or set(ret_heads) & set(spa_heads):
        raise ValueError(f"expected non-empty, disjoint ret_heads and spa_heads, got {list(ret_heads)} and "
                         f"{list(spa_heads)}")
    if sel is None:
        raise ValueError("expected a selection sel (B, Hkv, S) for the sparse heads, got None")


@torch.library.custom_op(f"{NAMESPACE}::hybrid_attention", mutates_args=())
def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    sel: torch.Tensor,
    ret_heads: list[int],
    spa_heads: list[int],
    scale: float,
    block_size: int,
    num_blocks: int,
    sink: int,
    recent: int,
    select: bool,
    softcap: float = 0.0,
    head_bias: Optional[torch.Tensor] = None,
    sink_logits: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's retrieval and sparse heads as one op (one pair of launches on CUDA):
    ``out = cat([retrieval_attention(...ret_heads...)[0], sparse_attention(...spa_heads...)], 1)``
    with the sparse heads reading ``sel`` (their rows are not the retrieval heads'), and
    ``sel_out`` = ``sel`` with the rows of ``ret_heads`` replaced by their selection (when
    ``select``)."""
    check_hybrid_inputs(q, k, v, mask, sel, ret_heads, spa_heads, block_size, num_blocks, softcap, head_bias,
                        sink_logits)
    return eager_ops.hybrid_attention(q, k, v, mask, sel, ret_heads, spa_heads, scale, block_size, num_blocks, sink,
                                      recent, select, softcap, head_bias, sink_logits)


@hybrid_attention.register_fake
def _(q, k, v, mask, sel, ret_heads, spa_heads, scale, block_size, num_blocks, sink, recent, select, softcap=0.0,
      head_bias=None, sink_logits=None):
    b, hq, _, _ = q.shape
    g = hq // k.shape[1]
    out = q.new_empty(b, (len(ret_heads) + len(spa_heads)) * g, 1, v.shape[-1])
    return out, torch.empty_like(sel)


def check_linear_inputs(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]]) -> None:
    """Validate ``decode_linear``'s inputs; raises ValueError/TypeError naming both values."""
    if x.dim() != 2:
        raise ValueError(f"expected x of shape (M, K), got {tuple(x.shape)}")
    if not weights or len(biases) != len(weights):
        raise ValueError(f"expected one bias (or None) per weight and at least one weight, got {len(weights)} "
                         f"weights and {len(biases)} biases")
    for w, b in zip(weights, biases):
        if w.dim() != 2 or w.shape[1] != x.shape[1]:
            raise ValueError(f"expected weights of shape (N, K={x.shape[1]}), got {tuple(w.shape)}")
        if w.dtype != x.dtype:
            raise TypeError(f"x and weights must share one dtype, got {x.dtype} and {w.dtype}")
        if b is not None and (tuple(b.shape) != (w.shape[0],) or b.dtype != x.dtype):
            raise ValueError(f"expected a bias of shape ({w.shape[0]},) and dtype {x.dtype}, got "
                             f"{tuple(b.shape)} {b.dtype}")


@torch.library.custom_op(f"{NAMESPACE}::decode_linear", mutates_args=())
def decode_linear(x: torch.Tensor, weights: list[torch.Tensor], biases: list[Optional[torch.Tensor]]) -> list[torch.Tensor]:
    """``F.linear(x, weights[i], biases[i])`` for every i: x (M, K) -> [y_i (M, N_i)]."""
    check_linear_inputs(x, weights, biases)
    return eager_ops.decode_linear(x, weights, biases)


@decode_linear.register_fake
def _(x, weights, biases):
    return [x.new_empty(x.shape[0], w.shape[0]) for w in weights]
