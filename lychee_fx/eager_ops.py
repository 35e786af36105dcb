"""Vectorised torch implementations of the decode ops (the contracts in ``ops.py``).

These run on any device that has no generated kernel (CPU, and CUDA outside Inductor). No
Python loops over tokens, blocks or heads: every step is a batched tensor op; attention
itself is ``scaled_dot_product_attention`` with a group's query heads as its query rows.
Numerics: logits and selection scores are accumulated in float32 (float64 for float64
inputs); the output is in the query's dtype. A soft-cap needs the logits themselves, so
attention with one is written out (matmul, tanh, softmax, matmul) in the accumulation dtype.

Notation: B batch, Hq query heads, Hkv KV heads, G = Hq // Hkv, R = len(heads) (the KV heads
one op serves), N cache slots, D query/key head dim, Dv value head dim, bs block size,
nb = ceil(N / bs) cache blocks, S selection length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["valid_mask", "retrieval_attention", "sparse_attention", "hybrid_attention", "select_blocks", "select_from_scores",
           "decode_linear"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def valid_mask(mask: torch.Tensor | None, batch: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """mask (B|1, N) bool / additive, or None -> valid (B, N) bool and bias (B, N) or None.

    An additive mask's slots at or below ``finfo(dtype).min`` (or -inf) are invalid; its
    other values are added to the logits.
    """
    if mask is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device), None
    mask = mask.expand(batch, n)
    if mask.dtype == torch.bool:
        return mask, None
    valid = mask > torch.finfo(mask.dtype).min
    return valid, torch.where(valid, mask, torch.zeros((), dtype=mask.dtype, device=device))


def _may_read_back(t: torch.Tensor) -> bool:
    """Whether shortcuts that read a value back to the host are allowed: on the CPU only, so
    that a CUDA graph can still capture this implementation (the kernels decline some
    inputs, e.g. block sizes that are not powers of 2, and Inductor then calls this)."""
    return t.device.type == "cpu"


def _run(heads: Sequence[int]) -> slice | None:
    """``heads`` as a slice when they are consecutive and ascending (a view, no copy)."""
    h = list(heads)
    return slice(h[0], h[-1] + 1) if h and h == list(range(h[0], h[-1] + 1)) else None


def _pick(x: torch.Tensor, heads: Sequence[int]) -> torch.Tensor:
    """x (B, Hkv, ...) -> (B, R, ...): a view for a run of heads, else a copy of those heads."""
    run = _run(heads)
    return x[:, run] if run is not None else x[:, list(heads)]


def _group_queries(q: torch.Tensor, hkv: int, heads: Sequence[int]) -> torch.Tensor:
    """q (B, Hq, 1, D) -> (B, R, G, D): the query heads of the KV heads in ``heads``."""
    b, hq, _, d = q.shape
    return _pick(q.reshape(b, hkv, hq // hkv, d), heads)  # (B, R, G, D)


def _head_bias_rows(head_bias: torch.Tensor | None, b: int, hkv: int, heads: Sequence[int]) -> torch.Tensor | None:
    """head_bias (B or 1, Hq, N) -> (B, R, G, N): the rows of the query heads of ``heads``."""
    if head_bias is None:
        return None
    n = head_bias.shape[-1]
    rows = _pick(head_bias.reshape(head_bias.shape[0], hkv, -1, n), heads)  # (B or 1, R, G, N)
    return rows.expand(b, *rows.shape[1:])


def _sink_rows(sink_logits: torch.Tensor | None, hkv: int, heads: Sequence[int]) -> torch.Tensor | None:
    """sink_logits (Hq,) -> (1, R, G): the sink logits of the query heads of ``heads``."""
    if sink_logits is None:
        return None
    return _pick(sink_logits.reshape(1, hkv, -1), heads)  # (1, R, G)


def _logits(qg: torch.Tensor, k: torch.Tensor, scale: float, softcap: float, head_bias: torch.Tensor | None) -> torch.Tensor:
    """cap(scale * q . k + head_bias) in the accumulation dtype: qg (B, R, G, D), k (B, R, M, D),
    head_bias (B, R, G, M) or None -> (B, R, G, M)."""
    acc = _acc_dtype(qg.dtype)
    x = torch.matmul(qg.to(acc), k.to(acc).transpose(-1, -2)) * scale  # (B, R, G, M)
    if head_bias is not None:
        x = x + head_bias.to(acc)
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    return x


def _attend(
    qg: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    see: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    *,
    finite_unseen: bool = False,
    softcap: float = 0.0,
    head_bias: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention. qg (B, R, G, D), k (B, R, M, D), v (B, R, M, Dv), see (B, R, M)
    bool, bias (B, R, M) or None, head_bias (B, R, G, M) or None, sink (1, R, G) sink logits
    or None -> (B, R, G, Dv) in qg's dtype; a row that sees no slot gives 0.

    The R heads are SDPA's heads and the G queries of a group its query positions, so each
    K/V row is read once for its whole group; SDPA accumulates in float32 (float64 for
    float64). Slots outside ``see`` never reach the math, even when they hold NaN or inf:
    when any slot is unseen, K and V are zeroed there first (a copy; caches without unseen
    slots pay nothing), unless the caller vouches that they hold finite values
    (``finite_unseen``: copies of valid slots), which the mask then removes exactly."""
    everything = _may_read_back(see) and bool(see.all())
    if not everything and not finite_unseen:
        k = torch.where(see[..., None], k, torch.zeros((), dtype=k.dtype))
        v = torch.where(see[..., None], v, torch.zeros((), dtype=v.dtype))
    if softcap or sink is not None:
        x = _logits(qg, k, scale, softcap, head_bias)  # (B, R, G, M)
        if bias is not None:
            x = x + bias[:, :, None, :].to(x.dtype)
        x = x.masked_fill(~see[:, :, None, :], float("-inf"))
        if sink is None:
            probs = torch.softmax(x, dim=-1).nan_to_num(0.0)  # a row that sees nothing: 0
        else:  # the sink joins the denominator only: softmax over [x, sink], its column dropped
            col = sink.to(x.dtype)[..., None].expand(x.shape[0], -1, -1, 1)  # (B, R, G, 1)
            probs = torch.softmax(torch.cat([x, col], dim=-1), dim=-1)[..., :-1].nan_to_num(0.0)
        return torch.matmul(probs, v.to(x.dtype)).to(qg.dtype)
    if head_bias is not None:
        add = head_bias if bias is None else head_bias + bias[:, :, None, :]
        mask = torch.where(see[:, :, None, :], add.to(qg.dtype), float("-inf"))  # (B, R, G, M)
    elif bias is not None:
        mask = torch.where(see, bias.to(qg.dtype), float("-inf"))[:, :, None, :]  # (B, R, 1, M)
    else:
        mask = None if everything else see[:, :, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    if not everything:
        out = torch.where(see.any(dim=-1)[..., None, None], out, torch.zeros((), dtype=out.dtype))
    return out


def select_blocks(
    qg: torch.Tensor,
    k: torch.Tensor,
    valid: torch.Tensor,
    block_size: int,
    num_blocks: int,
    sink: int,
    recent: int,
    *,
    scale: float = 1.0,
    softcap: float = 0.0,
    head_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """SPEC 1.1 selection for R rows per batch entry; with a cap or a head bias the score is
    the group's summed logits before the mask (``lychee_fx.reference``).

    qg (B, R, G, D), k (B, R, N, D), valid (B, N), head_bias (B, R, G, N) or None
    -> (B, R, S) int32, ascending, -1 padded.
    """
    if softcap or head_bias is not None:
        score = _logits(qg, k, scale, softcap, head_bias).sum(dim=2)  # (B, R, N)
        return select_from_scores(score, valid, block_size, num_blocks, sink, recent)
    acc = _acc_dtype(qg.dtype)
    # Position score: sum over the group of q.k (the mean up to a positive factor), as the
    # group's summed query (1, D) @ k^T (D, N): CPU BLAS is several times faster this way
    # round than k (N, D) @ (D, 1).
    score = torch.matmul(qg.to(acc).sum(dim=2)[:, :, None, :], k.to(acc).transpose(-1, -2))[:, :, 0]  # (B, R, N)
    return select_from_scores(score, valid, block_size, num_blocks, sink, recent)


def select_from_scores(
    score: torch.Tensor,
    valid: torch.Tensor,
    block_size: int,
    num_blocks: int,
    sink: int,
    recent: int,
) -> torch.Tensor:
    """SPEC 1.1 selection from position scores, for any leading dims ``L`` (e.g. (B,) or
    (B, T) for T query positions, each with its own valid slots).

    score (*L, R, N) float, valid (*L, N) bool -> (*L, R, S) int32, ascending, -1 padded.
    Scores at invalid slots are ignored.
    """
    lead, (r, n) = score.shape[:-2], score.shape[-2:]
    if valid.shape != (*lead, n):
        raise ValueError(
            f"valid must have shape {(*lead, n)} to match score {tuple(score.shape)}, "
            f"got {tuple(valid.shape)}"
        )
    score = score.reshape(-1, r, n)  # (B, R, N), B = prod(L)
    valid = valid.reshape(-1, n)  # (B, N)
    b = score.shape[0]
    nb = -(-n // block_size)
    pad = nb * block_size - n
    score = score.masked_fill(~valid[:, None, :], float("-inf"))
    score = torch.nn.functional.pad(score, (0, pad), value=float("-inf"))
    block_score = score.view(b, r, nb, block_size).amax(dim=-1)  # (B, R, nb)

    valid_p = torch.nn.functional.pad(valid, (0, pad), value=False)  # (B, nb * bs)
    has_valid = valid_p.view(b, nb, block_size).any(dim=-1)  # (B, nb)
    rank = valid_p.cumsum(dim=-1) - 1  # rank among valid slots, (B, nb * bs)
    count = valid_p.sum(dim=-1, keepdim=True)  # (B, 1)
    forced_pos = valid_p & ((rank < sink) | (rank >= count - recent))
    forced = forced_pos.view(b, nb, block_size).any(dim=-1)  # (B, nb)

    # Forced blocks first, then candidates by score; stable sort sends ties to the lower id.
    key = torch.where(forced[:, None, :], float("inf"), block_score)
    key = key.masked_fill(~has_valid[:, None, :], float("-inf"))  # (B, R, nb)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :num_blocks]
    taken_ok = torch.gather(has_valid[:, None, :].expand(b, r, nb), 2, order)  # (B, R, min(nb, S))
    ids = torch.where(taken_ok, order, nb)  # empty picks sort last
    ids = torch.sort(ids, dim=-1).values
    ids = torch.where(ids == nb, -1, ids).to(torch.int32)
    if ids.shape[-1] < num_blocks:
        ids = torch.nn.functional.pad(ids, (0, num_blocks - ids.shape[-1]), value=-1)
    return ids.reshape(*lead, r, num_blocks)


def retrieval_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    sel: torch.Tensor | None,
    heads: Sequence[int],
    scale: float,
    block_size: int,
    num_blocks: int,
    sink: int,
    recent: int,
    select: bool,
    softcap: float = 0.0,
    head_bias: torch.Tensor | None = None,
    sink_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention for the retrieval KV heads in ``heads``, and their new selection.

    q (B, Hq, 1, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv), mask (B|1, N) or None,
    sel (B, Hkv, S) or None, head_bias (B|1, Hq, N) or None, sink_logits (Hq,) or None
    -> out (B, R * G, 1, Dv) in q's
    dtype, sel_out (B, Hkv, S) int32 (rows of ``heads`` replaced when ``select``, the others
    copied from ``sel``, or -1 without one).
    """
    b, hq, _, d = q.shape
    hkv, n, dv = k.shape[1], k.shape[2], v.shape[-1]
    valid, bias = valid_mask(mask, b, n, q.device)  # (B, N), (B, N) | None
    qg = _group_queries(q, hkv, heads)  # (B, R, G, D)
    ks, vs = _pick(k, heads), _pick(v, heads)  # (B, R, N, D)
    r = len(heads)
    # Slots past the last valid one of every row (a static cache's empty tail) are cut off,
    # as views: no row attends there, and _attend need not mask (copy) them.
    m = n
    if _may_read_back(valid):
        used = valid.any(dim=0)  # (N,): slots valid in some row
        m = n - int(used.flip(0).to(torch.uint8).argmax()) if bool(used.any()) else n
    see = valid[:, None, :m].expand(b, r, m)
    bias_r = None if bias is None else bias[:, None, :m].expand(b, r, m)
    hb = _head_bias_rows(head_bias, b, hkv, heads)  # (B, R, G, N) | None
    out = _attend(qg, ks[:, :, :m], vs[:, :, :m], see, bias_r, scale, softcap=softcap,
                  head_bias=None if hb is None else hb[..., :m], sink=_sink_rows(sink_logits, hkv, heads))  # (B, R, G, Dv)
    out = out.to(q.dtype).reshape(b, r * (hq // hkv), 1, dv)

    if sel is None:
        sel_out = torch.full((b, hkv, num_blocks), -1, dtype=torch.int32, device=q.device)
    else:
        sel_out = sel.clone()
    if select and r:
        new = select_blocks(qg, ks, valid, block_size, num_blocks, sink, recent, scale=scale, softcap=softcap,
                            head_bias=hb)  # (B, R, S)
        sel_out[:, list(heads)] = new
    return out, sel_out


def _gather_slots(x: torch.Tensor, heads: Sequence[int], pos: torch.Tensor) -> torch.Tensor:
    """x (B, Hkv, N, D), pos (B, R, M) slot indices -> (B, R, M, D): rows ``pos`` of the heads
    ``heads``. A contiguous cache is read as one ``index_select`` of whole rows (on a CPU 2.2x
    faster than advanced indexing with broadcast index tensors, 2026-12-01); other layouts
    take the advanced index."""
    b, hkv, n, d = x.shape
    r, m = pos.shape[1], pos.shape[2]
    if not x.is_contiguous():
        bi = torch.arange(b, device=x.device)[:, None, None]
        hi = torch.tensor(list(heads), device=x.device)[None, :, None]
        return x[bi, hi, pos]
    base = (torch.arange(b, device=x.device)[:, None, None] * hkv
            + torch.tensor(list(heads), device=x.device)[None, :, None]) * n  # (B, R, 1)
    return x.reshape(b * hkv * n, d).index_select(0, (pos + base).reshape(-1)).view(b, r, m, d)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    sel: torch.Tensor,
    heads: Sequence[int],
    scale: float,
    block_size: int,
    softcap: float = 0.0,
    head_bias: torch.Tensor | None = None,
    sink_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the sparse KV heads in ``heads`` over the valid slots of their blocks.

    q (B, Hq, 1, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv), mask (B|1, N) or None,
    sel (B, Hkv, S) int32, head_bias (B|1, Hq, N) or None, sink_logits (Hq,) or None
    -> (B, R * G, 1, Dv) in q's dtype.
    Only ``S * block_size`` slots per row are read.
    """
    b, hq, _, d = q.shape
    hkv, n, dv = k.shape[1], k.shape[2], v.shape[-1]
    r = len(heads)
    valid, bias = valid_mask(mask, b, n, q.device)  # (B, N), (B, N) | None
    qg = _group_queries(q, hkv, heads)  # (B, R, G, D)
    blocks = _pick(sel, heads).long()  # (B, R, S)
    offs = torch.arange(block_size, device=q.device)
    pos = (blocks[..., None] * block_size + offs).reshape(b, r, -1)  # (B, R, M = S * bs)
    in_range = (blocks[..., None] >= 0).expand(-1, -1, -1, block_size).reshape(b, r, -1) & (pos < n)
    bi = torch.arange(b, device=q.device)[:, None, None]  # (B, 1, 1)
    see = in_range & valid[bi, torch.where(in_range, pos, 0)]  # (B, R, M)
    # Unseen picks read the row's first valid slot instead (finite by contract), so the
    # gathered K/V need no masking copy; the mask removes them exactly.
    anchor = valid.to(torch.uint8).argmax(dim=-1)[:, None, None]  # (B, 1, 1)
    pos = torch.where(see, pos, anchor)
    kg, vg = _gather_slots(k, heads, pos), _gather_slots(v, heads, pos)  # (B, R, M, D): only the selected slots
    bias_g = None if bias is None else bias[bi, pos]
    hb = _head_bias_rows(head_bias, b, hkv, heads)  # (B, R, G, N) | None
    if hb is not None:
        hb = torch.gather(hb, 3, pos[:, :, None, :].expand(-1, -1, hb.shape[2], -1))  # (B, R, G, M)
    out = _attend(qg, kg, vg, see, bias_g, scale, finite_unseen=True, softcap=softcap, head_bias=hb,
                  sink=_sink_rows(sink_logits, hkv, heads))  # (B, R, G, Dv)
    return out.to(q.dtype).reshape(b, r * (hq // hkv), 1, dv)


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    sel: torch.Tensor,
    ret_heads: Sequence[int],
    spa_heads: Sequence[int],
    scale: float,
    block_size: int,
    num_blocks: int,
    sink: int,
    recent: int,
    select: bool,
    softcap: float = 0.0,
    head_bias: torch.Tensor | None = None,
    sink_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's pair (``ops.hybrid_attention``): the two ops above, their outputs concatenated.

    -> out (B, (R_ret + R_spa) * G, 1, Dv) in q's dtype (the retrieval heads' groups first),
    sel_out (B, Hkv, S) int32 as ``retrieval_attention``'s with ``sel``.
    """
    ret, sel_out = retrieval_attention(q, k, v, mask, sel, ret_heads, scale, block_size, num_blocks, sink, recent, select,
                                       softcap, head_bias, sink_logits)
    spa = sparse_attention(q, k, v, mask, sel, spa_heads, scale, block_size, softcap, head_bias, sink_logits)
    return torch.cat([ret, spa], dim=1), sel_out


def decode_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """``lychee::decode_linear`` off the kernel's path: one ``F.linear`` per weight."""
    return [torch.nn.functional.linear(x, w, b) for w, b in zip(weights, biases)]
