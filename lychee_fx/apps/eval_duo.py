"""A DuoAttention-style baseline for the eval: retrieval KV heads at full attention, every other
KV head attending to the first ``sink`` and the last ``recent`` valid cache slots only
(DuoAttention's "streaming heads", arXiv 2410.10819), in decode steps.

The lychee backend cannot express it (its sparse heads always get top-k blocks), so it
enters the model through transformers' own extension point, as ``lychee_fx.learn.student``
does: ``AttentionInterface.register(name, fn)`` plus ``AttentionMaskInterface.register(name,
sdpa_mask)``, then ``model.set_attn_implementation(name)`` inside :func:`duo_attention`, the
previous implementation restored on exit. No class or ``forward`` is patched.

Decode steps (query length 1) are changed; prefill and every multi-token call (the SPEC 1.3
cache correction) run ordinary SDPA, as the backend leaves them.

Notation: B batch, Hq query heads, Hkv KV heads, G = Hq // Hkv, N cache slots, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lychee_fx.learn.selection import tail_valid
from lychee_fx.roles import HeadRoles

__all__ = ["streaming_keep", "DuoAttention", "duo_attention", "ATTN_NAME"]

ATTN_NAME = "lychee_fx_duo"


def streaming_keep(valid: torch.Tensor, retrieval: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """Which slots each KV head attends to in a decode step.

    ``valid`` (B, N) bool: the slots holding tokens. ``retrieval`` (Hkv,) bool: the heads at
    full attention. Returns keep (B, Hkv, N) bool: retrieval heads keep every valid slot, the
    others the first ``sink`` and the last ``recent`` valid slots (counted among valid slots).
    """
    if valid.dim() != 2 or retrieval.dim() != 1:
        raise ValueError(f"expected valid (B, N) and retrieval (Hkv,), got {tuple(valid.shape)} and {tuple(retrieval.shape)}")
    if sink < 0 or recent < 0:
        raise ValueError(f"sink and recent must be >= 0, got sink={sink}, recent={recent}")
    rank = valid.long().cumsum(-1) - 1  # (B, N) index of a valid slot among the valid ones
    count = valid.sum(-1, keepdim=True)  # (B, 1)
    window = valid & ((rank < sink) | (rank >= count - recent))  # (B, N)
    return torch.where(retrieval.to(valid.device)[None, :, None], valid[:, None, :], window[:, None, :])  # (B, Hkv, N)


class DuoAttention:
    """An HF attention function: ``roles.row(layer)`` KV heads at full attention, the others
    over sink + recent slots in decode steps; SDPA otherwise. Layers are ``module.layer_idx``."""

    def __init__(self, roles: HeadRoles, sink: int, recent: int):
        if sink < 0 or recent < 1:
            raise ValueError(f"expected sink >= 0 and recent >= 1 (the newest token), got sink={sink}, recent={recent}")
        self.roles, self.sink, self.recent = roles, sink, recent
        self._table: torch.Tensor = roles.table  # (L, Hkv) bool, moved to the model's device on first use

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        """query (B, Hq, T, D), key/value (B, Hkv, N, D) -> ((B, T, Hq, D), None)."""
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if query.shape[2] != 1:  # prefill and cache corrections are never changed
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        for name in ("sliding_window", "softcap"):
            if kwargs.get(name) is not None:
                raise ValueError(f"the DuoAttention-style baseline supports plain softmax attention; got {name}={kwargs[name]!r}")
        layer = module.layer_idx
        if not 0 <= layer < self.roles.num_layers:
            raise ValueError(f"attention layer {layer} is outside the role map's {self.roles.num_layers} layers")
        b, hq, _, _ = query.shape
        hkv, n = key.shape[1], key.shape[2]
        if hkv != self.roles.num_kv_heads:
            raise ValueError(f"expected {self.roles.num_kv_heads} KV heads per layer, got key {tuple(key.shape)}")
        valid, bias = tail_valid(attention_mask, b, 1, n, query.device)  # (B, 1, N), (B, 1, N) or None
        if self._table.device != query.device:
            self._table = self._table.to(query.device)
        keep = streaming_keep(valid[:, 0], self._table[layer], self.sink, self.recent)  # (B, Hkv, N)
        mask = keep.repeat_interleave(hq // hkv, dim=1)[:, :, None, :]  # (B, Hq, 1, N)
        if bias is not None:  # a float mask's finite values are a bias on the slots kept
            mask = torch.where(mask, bias[:, None].to(query.dtype), float("-inf"))  # (B, Hq, 1, N)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=hq != hkv)  # (B, Hq, 1, D)
        return out.transpose(1, 2).contiguous(), None


def duo_attention(model, attention: DuoAttention, name: str = ATTN_NAME):
    """Route ``model``'s attention through ``attention`` inside the block, through
    transformers' AttentionInterface; the previous implementation is restored on exit."""
    from lychee_fx.learn.student import routed_attention

    return routed_attention(model, attention, name)
