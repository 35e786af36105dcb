"""The oracle: SPEC 1.1 written plainly, for tests and benchmarks to compare against.

Everything here is eager, readable and slow on purpose: per-row Python over (batch, KV head)
for the selection, then dense attention under a boolean token mask, in float64. It shares no
code with the ops or the kernels (``lychee_fx.eager_ops``, ``lychee_fx.codegen``).

Notation (shapes on tensor lines):

    B    batch                        Hq   query heads       Hkv  KV heads
    G    Hq // Hkv (group size)        N    cache slots       D    head dim
    S    budget // block_size, the length of a selection row

Query head ``i`` belongs to KV head ``i // G`` (what ``repeat_kv`` and ``enable_gqa`` do).

Masks: ``None`` (every slot valid), a bool tensor (``True`` = attend), or a floating tensor
added to the logits, where a value ``<= finfo(dtype).min`` (HF's masked value) or ``-inf``
marks an invalid slot. Any shape that broadcasts to ``(B, 1, 1, N)`` is accepted.

Extensions of SPEC 1.1 (what models beyond SPEC 1.1's shapes need; each reduces to SPEC 1.1
when its feature is absent):

- **Value head dim.** ``v (B, Hkv, N, Dv)`` may have another head dim than ``q`` and ``k``
  (multi-head latent attention: DeepSeek-V2/V3, MiniCPM3); outputs are ``(B, Hq, 1, Dv)``.
  Selection scores use ``q . k`` as before.
- **Logits.** The logit of query head ``i`` (of KV head ``h = i // G``) at slot ``j`` is

      l[i, j] = cap(scale * q_i . k_j + head_bias[i, j]) + mask_bias[j]

  ``head_bias (B or 1, Hq, N)``: an optional finite additive bias per query head (ALiBi-style
  position biases); ``cap(x) = softcap * tanh(x / softcap)`` for a logit soft-cap
  ``softcap > 0`` (Gemma 2), the identity for ``softcap = 0``; ``mask_bias`` the additive
  mask's value (validity still comes from the mask alone: a head bias never makes a slot
  invalid).
- **Selection scores with a cap or a head bias.** The score of slot ``j`` for KV head ``h`` is
  the mean over the group's G query heads of ``cap(scale * q_i . k_j + head_bias[i, j])``: the
  logit before the mask, so a head bias (ALiBi) counts in the selection. Without cap and head
  bias this is ``scale`` times SPEC 1.1's mean of ``q . k``, the same order (scale > 0); the
  functions below then compute SPEC 1.1's score itself, so ties are SPEC 1.1's.
- **Sink logits.** ``sink_logits (Hq,)``: an optional logit per query head with no value
  (gpt-oss's and MiMo-V2's attention sinks): it joins the softmax's denominator and nothing
  else, ``p[i, j] = exp(l[i, j]) / (sum_{j' seen} exp(l[i, j']) + exp(sink_logits[i]))`` and
  ``out_i = sum_j p[i, j] v_j``. It is the same for retrieval and sparse heads (a sparse head
  sees fewer slots, not another sink) and takes no part in the selection; ``-inf`` is no
  sink. A head that sees no slot outputs zeros, as without a sink.
- **KV heads.** The KV heads are the heads of K as the attention reads them once a GQA
  expansion of the cache (``repeat_kv``) is undone; a tiling (``repeat(1, G, 1, 1)``,
  JetMoE) is undone likewise, query heads ``h, h + Hkv, ...`` forming KV head ``h``'s group
  (the functions below take q with each group's heads together: :func:`tiled_query_rows`);
  a cache that itself holds ``r`` copies per KV head (Falcon's new decoder architecture) has
  ``r`` times as many. A role row with ``C`` entries applied to ``Hkv = r * C`` heads gives
  head ``h`` entry ``h // r`` (:func:`roles_for_heads`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lychee_fx.options import DecodeOptions

__all__ = [
    "valid_and_bias",
    "attention_logits",
    "selection_scores",
    "select_from_scores",
    "select_blocks",
    "blocks_to_token_mask",
    "masked_attention",
    "full_attention",
    "roles_for_heads",
    "tiled_query_rows",
    "ReferenceDecoder",
]

_F64 = torch.float64


def valid_and_bias(mask: torch.Tensor | None, batch: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a mask into where attention may look and what it adds to the logits.

    Returns ``valid (B, N)`` bool and ``bias (B, N)`` float64 (0 at bool masks' valid slots,
    the mask's own values for additive masks, 0 at invalid slots: those are excluded, not
    added).
    """
    if mask is None:
        return torch.ones(batch, n, dtype=torch.bool), torch.zeros(batch, n, dtype=_F64)
    m = mask.detach().cpu()
    while m.dim() > 2:  # (B, 1, 1, N) -> (B, N); refuses per-head or per-query masks
        if m.shape[1] != 1:
            raise ValueError(f"reference masks must broadcast to (B, 1, 1, N), got {tuple(mask.shape)}")
        m = m[:, 0]
    m = m.reshape(-1, n).expand(batch, n)  # (B, N)
    if m.dtype == torch.bool:
        return m.clone(), torch.zeros(batch, n, dtype=_F64)
    valid = m > torch.finfo(m.dtype).min
    bias = torch.where(valid, m.to(_F64), torch.zeros((), dtype=_F64))
    return valid, bias


def _check_head_bias(head_bias: torch.Tensor, b: int, hq: int, n: int) -> torch.Tensor:
    """head_bias (B or 1, Hq, N) -> float64 on the CPU, checked."""
    if head_bias.dim() != 3 or head_bias.shape[0] not in (1, b) or tuple(head_bias.shape[1:]) != (hq, n):
        raise ValueError(f"head_bias must have shape (B={b} or 1, Hq={hq}, N={n}), got {tuple(head_bias.shape)}")
    return head_bias.detach().cpu().to(_F64)


def attention_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
    head_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The logits before the mask, per query head: ``cap(scale * q . k + head_bias)``.

    q (B, Hq, 1, D), k (B, Hkv, N, D), head_bias (B or 1, Hq, N) or None
    -> (B, Hkv, G, N) float64 (query head ``h * G + g`` at ``[:, h, g]``).
    """
    b, hq, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    qg = q.to(_F64).reshape(b, hkv, g, d)  # (B, Hkv, G, D)
    x = torch.einsum("bhgd,bhnd->bhgn", qg, k.to(_F64)) * scale  # (B, Hkv, G, N)
    if head_bias is not None:
        x = x + _check_head_bias(head_bias, b, hq, n).reshape(-1, hkv, g, n)
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    return x


def selection_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float | None = None,
    softcap: float = 0.0,
    head_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Position scores: SPEC 1.1's mean over a group's G query heads of ``q . k_j``; with a cap
    or a head bias, the mean of :func:`attention_logits` instead (module docstring).

    q (B, Hq, 1, D), k (B, Hkv, N, D) -> (B, Hkv, N) float64.
    """
    if softcap or head_bias is not None:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return attention_logits(q, k, scale, softcap, head_bias).mean(dim=2)
    b, hq, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    qg = q.to(_F64).reshape(b, hkv, g, d)  # (B, Hkv, G, D)
    dots = torch.einsum("bhgd,bhnd->bhgn", qg, k.to(_F64))  # (B, Hkv, G, N)
    return dots.mean(dim=2)  # (B, Hkv, N)


def _select_row(
    scores: list[float], valid: list[bool], opts: DecodeOptions
) -> list[int]:
    """One (batch, KV head) row of SPEC 1.1's selection, as a sorted list of block ids."""
    bs, s = opts.block_size, opts.num_blocks
    positions = [j for j, ok in enumerate(valid) if ok]  # valid slots, ascending
    if not positions:
        return []
    forced_positions = positions[: opts.sink] + positions[max(0, len(positions) - opts.recent):]
    forced = sorted({j // bs for j in forced_positions})
    block_score: dict[int, float] = {}
    for j in positions:
        blk = j // bs
        block_score[blk] = max(block_score.get(blk, float("-inf")), scores[j])
    others = [blk for blk in block_score if blk not in forced]
    others.sort(key=lambda blk: (-block_score[blk], blk))  # best first, ties to the lower id
    chosen = forced + others[: max(0, s - len(forced))]
    return sorted(chosen)


def select_from_scores(scores: torch.Tensor, valid: torch.Tensor, opts: DecodeOptions) -> torch.Tensor:
    """SPEC 1.1's selection from position scores.

    scores (B, Hkv, N), valid (B, N) bool -> sel (B, Hkv, S) int32, each row ascending block
    ids padded with -1. Scores at invalid slots are never read.
    """
    b, hkv, _ = scores.shape
    scores = scores.detach().cpu().to(_F64)
    sel = torch.full((b, hkv, opts.num_blocks), -1, dtype=torch.int32)
    for bi in range(b):
        row_valid = valid[bi].tolist()
        for h in range(hkv):
            chosen = _select_row(scores[bi, h].tolist(), row_valid, opts)
            sel[bi, h, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return sel


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    valid: torch.Tensor,
    opts: DecodeOptions,
    *,
    scale: float | None = None,
    softcap: float = 0.0,
    head_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """A retrieval head's new selection.

    q (B, Hq, 1, D), k (B, Hkv, N, D), valid (B, N) bool -> sel (B, Hkv, S) int32, each row
    ascending block ids padded with -1.
    """
    return select_from_scores(selection_scores(q, k, scale, softcap, head_bias), valid, opts)


def blocks_to_token_mask(sel: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    """sel (B, Hkv, S) block ids -> (B, Hkv, N) bool, True on every slot of a selected block."""
    b, hkv, _ = sel.shape
    out = torch.zeros(b, hkv, n, dtype=torch.bool)
    for bi in range(b):
        for h in range(hkv):
            for blk in sel[bi, h].tolist():
                if blk >= 0:
                    out[bi, h, blk * block_size : (blk + 1) * block_size] = True
    return out


def _check_sink_logits(sink_logits: torch.Tensor, hq: int) -> torch.Tensor:
    """sink_logits (Hq,) -> float64 on the CPU, checked."""
    if tuple(sink_logits.shape) != (hq,):
        raise ValueError(f"sink_logits must have shape (Hq={hq},), got {tuple(sink_logits.shape)}")
    return sink_logits.detach().cpu().to(_F64)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_mask: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
    head_bias: torch.Tensor | None = None,
    sink_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense softmax attention of each query head over the slots its KV head may see.

    q (B, Hq, 1, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv), token_mask (B, Hkv, N) bool,
    bias (B, N), head_bias (B or 1, Hq, N) or None, sink_logits (Hq,) or None
    -> (B, Hq, 1, Dv) float64. A row with no visible slot gives zeros; what unseen slots hold
    (even NaN) does not matter.
    """
    b, hq = q.shape[:2]
    hkv, dv = k.shape[1], v.shape[-1]
    logits = attention_logits(q, k, scale, softcap, head_bias)  # (B, Hkv, G, N)
    logits = logits + bias[:, None, None, :]
    see = token_mask[:, :, None, :]  # (B, Hkv, 1, N)
    logits = logits.masked_fill(~see, float("-inf"))
    if sink_logits is None:
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # empty rows -> 0
    else:  # the sink's exp joins each row's denominator: softmax over [logits, sink], sink column dropped
        sink = _check_sink_logits(sink_logits, hq).reshape(1, hkv, -1, 1).expand(b, -1, -1, 1)  # (B, Hkv, G, 1)
        probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1].nan_to_num(0.0)
        probs = torch.where(see.any(dim=-1, keepdim=True), probs, 0.0)  # a head that sees nothing: zeros
    v_seen = torch.where(token_mask[..., None], v.to(_F64), 0.0)  # unseen slots never count
    out = torch.einsum("bhgn,bhnd->bhgd", probs, v_seen)  # (B, Hkv, G, Dv)
    return out.reshape(b, hq, 1, dv)


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float = 0.0,
    head_bias: torch.Tensor | None = None,
    sink_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention over all valid slots: q (B, Hq, 1, D), k (B, Hkv, N, D),
    v (B, Hkv, N, Dv) -> (B, Hq, 1, Dv) float64."""
    b, n = q.shape[0], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    valid, bias = valid_and_bias(mask, b, n)
    token_mask = valid[:, None, :].expand(b, k.shape[1], n)
    return masked_attention(q, k, v, token_mask, bias, scale, softcap, head_bias, sink_logits)


def roles_for_heads(roles_row: Sequence[bool], hkv: int) -> tuple[bool, ...]:
    """A role row for ``hkv`` KV heads: as is when it has ``hkv`` entries; a row of ``C``
    entries with ``hkv = r * C`` gives head ``h`` entry ``h // r`` (a cache holding ``r``
    copies of each KV head); anything else is an error."""
    c = len(roles_row)
    if c == hkv:
        return tuple(bool(x) for x in roles_row)
    if c < 1 or hkv % c:
        raise ValueError(f"roles_row must have {hkv} entries (KV heads) or a divisor of {hkv}, got {c}")
    r = hkv // c
    return tuple(bool(roles_row[h // r]) for h in range(hkv))


def tiled_query_rows(hq: int, hkv: int) -> torch.Tensor:
    """For K/V tiled by ``repeat(1, G, 1, 1)`` (query head ``t * Hkv + h`` reads KV head
    ``h``): (Hq,) long, the model's query head at each row ``h * G + t`` of q as the functions
    here take it (each KV head's group together). ``x[:, rows]`` regroups q (B, Hq, ...);
    ``out[:, argsort(rows)]`` puts the output rows back in the model's order."""
    if hkv < 1 or hq % hkv:
        raise ValueError(f"expected a query head count divisible by {hkv} KV heads, got {hq}")
    return torch.arange(hq).reshape(hq // hkv, hkv).T.reshape(-1)


class ReferenceDecoder:
    """SPEC 1.1 across the attention layers of one decoding step.

    Call it once per attention layer, in forward order, then :meth:`reset` before the next
    forward pass (the selection starts empty at the first attention of every pass).

    >>> dec = ReferenceDecoder(DecodeOptions(budget=64, block_size=8, sink=8, recent=8))
    >>> # out = dec(q, k, v, mask, roles_row=(True, False))  # per layer

    A caller that computes a layer's logits itself (an attention it observes in a model) uses
    the steps of ``__call__`` one by one: :meth:`effective_roles`, :meth:`token_mask`, then
    :meth:`commit` with the new selection of the layer's retrieval heads.
    """

    def __init__(self, opts: DecodeOptions):
        self.opts = opts
        self.reset()

    def reset(self) -> None:
        self.sel: torch.Tensor | None = None  # (B, Hkv, S) int32
        self.filled: list[bool] = []  # per KV head: has a retrieval head at this index run?
        self.last_roles: tuple[bool, ...] = ()  # effective roles of the last layer (for tests)

    def effective_roles(self, roles_row: Sequence[bool], b: int, hkv: int) -> tuple[bool, ...]:
        """The layer's roles per KV head: a sparse head whose twin has not run yet in this
        forward pass acts as a retrieval head (SPEC 1.1). ``roles_row`` may have a divisor of
        ``hkv`` entries (:func:`roles_for_heads`)."""
        row = roles_for_heads(roles_row, hkv)
        if self.sel is None:
            self.sel = torch.full((b, hkv, self.opts.num_blocks), -1, dtype=torch.int32)
            self.filled = [False] * hkv
        if tuple(self.sel.shape[:2]) != (b, hkv):
            raise ValueError(
                f"every layer of one forward pass must have the same batch and KV heads: expected "
                f"(B={self.sel.shape[0]}, Hkv={self.sel.shape[1]}), got (B={b}, Hkv={hkv})"
            )
        retrieval = tuple(bool(r) or not self.filled[h] for h, r in enumerate(row))
        self.last_roles = retrieval
        return retrieval

    def token_mask(self, valid: torch.Tensor, retrieval: Sequence[bool]) -> torch.Tensor:
        """valid (B, N) -> (B, Hkv, N) bool: where each KV head's queries may look. Retrieval
        heads see every valid slot; sparse heads the valid slots of the blocks selected before
        this layer."""
        b, n = valid.shape
        hkv = len(retrieval)
        old_sel_mask = blocks_to_token_mask(self.sel, n, self.opts.block_size)  # (B, Hkv, N)
        full_mask = valid[:, None, :].expand(b, hkv, n)  # (B, Hkv, N)
        is_ret = torch.tensor(list(retrieval))[None, :, None]  # (1, Hkv, 1)
        return torch.where(is_ret, full_mask, full_mask & old_sel_mask)

    def commit(self, new_sel: torch.Tensor, retrieval: Sequence[bool]) -> None:
        """Retrieval heads replace the selection of their index: new_sel (B, Hkv, S)."""
        for h, r in enumerate(retrieval):
            if r:
                self.sel[:, h] = new_sel[:, h]
                self.filled[h] = True

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        roles_row: Sequence[bool],
        scale: float | None = None,
        softcap: float = 0.0,
        head_bias: torch.Tensor | None = None,
        sink_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One decode attention layer: q (B, Hq, 1, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv),
        head_bias (B or 1, Hq, N) or None, sink_logits (Hq,) or None -> (B, Hq, 1, Dv) f64,
        computed on the CPU and returned on q's device."""
        device = q.device
        q, k, v = (x.detach().cpu() for x in (q, k, v))
        mask = None if mask is None else mask.detach().cpu()
        b, hq, qlen, d = q.shape
        hkv, n = k.shape[1], k.shape[2]
        if qlen != 1:
            raise ValueError(f"the reference decodes one query position, got query length {qlen}")
        scale = d**-0.5 if scale is None else scale
        retrieval = self.effective_roles(roles_row, b, hkv)
        valid, bias = valid_and_bias(mask, b, n)  # (B, N), (B, N)
        token_mask = self.token_mask(valid, retrieval)  # (B, Hkv, N)
        out = masked_attention(q, k, v, token_mask, bias, scale, softcap, head_bias, sink_logits)  # (B, Hq, 1, Dv)
        new_sel = select_blocks(q, k, valid, self.opts, scale=scale, softcap=softcap, head_bias=head_bias)
        self.commit(new_sel, retrieval)
        return out.to(device)
