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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lychee_fx.options import DecodeOptions

__all__ = [
    "valid_and_bias",
    "selection_scores",
    "select_blocks",
    "blocks_to_token_mask",
    "masked_attention",
    "full_attention",
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


def selection_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Position scores of SPEC 1.1: the mean over a group's G query heads of ``q . k_j``.

    q (B, Hq, 1, D), k (B, Hkv, N, D) -> (B, Hkv, N) float64.
    """
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


def select_blocks(
    q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, opts: DecodeOptions
) -> torch.Tensor:
    """A retrieval head's new selection.

    q (B, Hq, 1, D), k (B, Hkv, N, D), valid (B, N) bool -> sel (B, Hkv, S) int32, each row
    ascending block ids padded with -1.
    """
    scores = selection_scores(q, k)  # (B, Hkv, N)
    b, hkv, _ = scores.shape
    sel = torch.full((b, hkv, opts.num_blocks), -1, dtype=torch.int32)
    for bi in range(b):
        row_valid = valid[bi].tolist()
        for h in range(hkv):
            chosen = _select_row(scores[bi, h].tolist(), row_valid, opts)
            sel[bi, h, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return sel


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


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_mask: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Dense softmax attention of each query head over the slots its KV head may see.

    q (B, Hq, 1, D), k/v (B, Hkv, N, D), token_mask (B, Hkv, N) bool, bias (B, N)
    -> (B, Hq, 1, D) float64. A row with no visible slot gives zeros; what unseen slots hold
    (even NaN) does not matter.
    """
    b, hq, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    qg = q.to(_F64).reshape(b, hkv, g, d)  # (B, Hkv, G, D)
    logits = torch.einsum("bhgd,bhnd->bhgn", qg, k.to(_F64)) * scale  # (B, Hkv, G, N)
    logits = logits + bias[:, None, None, :]
    see = token_mask[:, :, None, :]  # (B, Hkv, 1, N)
    logits = logits.masked_fill(~see, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # empty rows -> 0
    v_seen = torch.where(token_mask[..., None], v.to(_F64), 0.0)  # unseen slots never count
    out = torch.einsum("bhgn,bhnd->bhgd", probs, v_seen)  # (B, Hkv, G, D)
    return out.reshape(b, hq, 1, d)


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact attention over all valid slots: q (B, Hq, 1, D), k/v (B, Hkv, N, D) -> (B, Hq, 1, D) f64."""
    b, n = q.shape[0], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    valid, bias = valid_and_bias(mask, b, n)
    token_mask = valid[:, None, :].expand(b, k.shape[1], n)
    return masked_attention(q, k, v, token_mask, bias, scale)


class ReferenceDecoder:
    """SPEC 1.1 across the attention layers of one decoding step.

    Call it once per attention layer, in forward order, then :meth:`reset` before the next
    forward pass (the selection starts empty at the first attention of every pass).

    >>> dec = ReferenceDecoder(DecodeOptions(budget=64, block_size=8, sink=8, recent=8))
    >>> # out = dec(q, k, v, mask, roles_row=(True, False))  # per layer
    """

    def __init__(self, opts: DecodeOptions):
        self.opts = opts
        self.reset()

    def reset(self) -> None:
        self.sel: torch.Tensor | None = None  # (B, Hkv, S) int32
        self.filled: list[bool] = []  # per KV head: has a retrieval head at this index run?
        self.last_roles: tuple[bool, ...] = ()  # effective roles of the last layer (for tests)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        roles_row: Sequence[bool],
        scale: float | None = None,
    ) -> torch.Tensor:
        """One decode attention layer: q (B, Hq, 1, D), k/v (B, Hkv, N, D) -> (B, Hq, 1, D) f64,
        computed on the CPU and returned on q's device."""
        device = q.device
        q, k, v = (x.detach().cpu() for x in (q, k, v))
        mask = None if mask is None else mask.detach().cpu()
        b, hq, qlen, d = q.shape
        hkv, n = k.shape[1], k.shape[2]
        if qlen != 1:
            raise ValueError(f"the reference decodes one query position, got query length {qlen}")
        if len(roles_row) != hkv:
            raise ValueError(f"roles_row must have {hkv} entries (KV heads), got {len(roles_row)}")
        scale = d**-0.5 if scale is None else scale
        if self.sel is None:
            self.sel = torch.full((b, hkv, self.opts.num_blocks), -1, dtype=torch.int32)
            self.filled = [False] * hkv
        valid, bias = valid_and_bias(mask, b, n)  # (B, N), (B, N)

        # A sparse head whose twin has not run yet acts as a retrieval head (SPEC 1.1).
        retrieval = [bool(r) or not self.filled[h] for h, r in enumerate(roles_row)]
        self.last_roles = tuple(retrieval)

        # Sparse heads see the valid slots of the blocks selected before this layer.
        old_sel_mask = blocks_to_token_mask(self.sel, n, self.opts.block_size)  # (B, Hkv, N)
        full_mask = valid[:, None, :].expand(b, hkv, n)  # (B, Hkv, N)
        is_ret = torch.tensor(retrieval)[None, :, None]  # (1, Hkv, 1)
        token_mask = torch.where(is_ret, full_mask, full_mask & old_sel_mask)
        out = masked_attention(q, k, v, token_mask, bias, scale)  # (B, Hq, 1, D)

        # Retrieval heads then replace the selection of their index.
        new_sel = select_blocks(q, k, valid, self.opts)  # (B, Hkv, S)
        for h, r in enumerate(retrieval):
            if r:
                self.sel[:, h] = new_sel[:, h]
                self.filled[h] = True
        return out.to(device)
