"""SPEC 1.1 decoding run inside an eager HF model, independently of the pass: the census's oracle.

The semantics are ``lychee_fx.reference``'s (with its documented extensions: value head dim,
soft-cap, per-head bias, sink logits, cache-held KV heads); this module only finds each decode attention
of a running model and hands it to the reference, with no FX graph and no code of
``lychee_fx.passes`` or ``lychee_fx.ops``. Two ways in, one per kind of model:

- ``InterfaceAttention``: models that call attention through transformers'
  ``ALL_ATTENTION_FUNCTIONS`` get it as their attention implementation (the library's own
  extension point). A decode call gets q, k, v, the mask, the scaling and any ``softcap`` /
  ``position_bias`` as keyword arguments; prefill runs the model's own implementation.
- ``InterceptMode``: models that do not (Bloom, MPT, GPT-Neo, Falcon, ...) run under a
  ``TorchFunctionMode``. A decode-shaped ``scaled_dot_product_attention`` call is computed by
  the reference; a decode-shaped softmax over the last dim receives the model's own logits
  ``l (B, Hq, 1, N)`` (scale, biases, soft-cap and mask already applied) and returns SPEC
  1.1's probabilities: the reference's selection from ``mean_g l`` (``reference`` module
  docstring: the logit before the mask; HF masks add 0 at valid slots, and a slot is invalid
  where ``l <= -1e30``: masked with some dtype's ``finfo.min``, which models fill in before
  a cast as often as after), then softmax over the slots each head may see. The model's own
  ``probs @ v`` finishes the layer.

K/V that arrive as a tiling of the role map's KV heads (JetMoE's ``repeat(1, r, 1, 1)``
after the cache: query head ``t * C + h`` reads cache head ``h``), found from the values
(``tiling``), are handed to the reference un-tiled, with each KV head's query heads together.

Layers are numbered by the order of decode attention calls in one forward pass (SPEC 1.2);
``start_step()`` starts a pass. Layers listed in ``dense_layers`` (those the backend left
dense) and sliding-window layers run the model's own dense attention and neither read nor
write selections; attention sinks (``s_aux``: gpt-oss, MiMo-V2) go to the reference as its
sink logits. At the layers in ``restarts`` the selection
starts empty again, as it does in the backend at a graph break: one compiled graph cannot
hand its selection to the next (``passes.rewrite``), so the first layers after a break act
as retrieval until a retrieval head of their own graph has selected.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lychee_fx import reference as R
from lychee_fx.options import DecodeOptions
from lychee_fx.roles import HeadRoles

__all__ = ["Oracle", "InterfaceAttention", "InterceptMode", "OracleCannotExpress", "MASKED"]

MASKED = -1e30  # a logit at or below this is a masked slot (exp gives exactly 0 in any float dtype)


class OracleCannotExpress(Exception):
    """The model's attention has a form the oracle does not model (the census then reports it)."""


class Oracle:
    """The SPEC 1.1 state of one decoding step, fed layer by layer.

    Attributes:
        calls: per decode attention call of the current pass, ``(layer, kind, kv_heads, dense,
            decoder_index)`` (``layer``: forward order; ``decoder_index``: the attention module's
            ``layer_idx`` where the attention interface saw it, else None).
    """

    def __init__(self, roles: HeadRoles | None, opts: DecodeOptions, dense_layers: Iterable[int] = (),
                 restarts: Iterable[int] = ()):
        self.roles, self.opts = roles, opts
        self.dense_layers = frozenset(dense_layers)
        self.restarts = frozenset(restarts)
        self.decoder = R.ReferenceDecoder(opts)
        self.calls: list[tuple[int, str, int, bool, int | None]] = []
        self.layer = 0

    def start_step(self) -> None:
        self.decoder.reset()
        self.calls, self.layer = [], 0

    def _next(self, kind: str, hkv: int, dense: bool, decoder_index: int | None = None) -> tuple[int, bool]:
        layer = self.layer
        self.layer += 1
        if layer in self.restarts:
            self.decoder.reset()
        dense = dense or self.roles is None or layer in self.dense_layers
        self.calls.append((layer, kind, hkv, dense, decoder_index))
        if not dense and layer >= self.roles.num_layers:
            raise OracleCannotExpress(f"decode attention call {layer} beyond the role map's {self.roles.num_layers} rows")
        return layer, dense

    def attend(self, q, k, v, mask, scale, softcap=0.0, head_bias=None, kind="sdpa", dense=False, decoder_index=None,
               sink_logits=None):
        """One decode layer from its inputs: q (B, Hq, 1, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv),
        mask None / (B or 1, 1 or Hq, 1, N) / (B, N), head_bias (B or 1, Hq, N) or None,
        sink_logits (Hq,) or None -> (B, Hq, 1, Dv) in q's dtype, or None for a layer that runs
        dense."""
        layer, dense = self._next(kind, k.shape[1], dense, decoder_index)
        if dense:
            return None
        if mask is not None and mask.dim() == 4 and mask.shape[1] != 1:
            mask, extra = split_per_head_mask(mask[..., -1:, :])
            head_bias = extra if head_bias is None else (head_bias if extra is None else head_bias + extra)
        tiles = tiling(k, v, self.roles.num_kv_heads)
        if tiles > 1:  # query head t * C + h reads KV head h: hand the reference the groups
            c = k.shape[1] // tiles
            rows = R.tiled_query_rows(q.shape[1], c)  # row h * r + t <- head t * C + h
            if head_bias is not None:
                head_bias = head_bias.expand(-1, q.shape[1], -1)[:, rows]
            if sink_logits is not None:
                sink_logits = sink_logits.reshape(-1)[rows]
            out = self.decoder(q[:, rows], k[:, :c], v[:, :c], mask, self.roles.row(layer), scale, softcap, head_bias,
                               sink_logits)
            return out[:, torch.argsort(rows)].to(q.dtype)
        out = self.decoder(q, k, v, mask, self.roles.row(layer), scale, softcap, head_bias,
                           None if sink_logits is None else sink_logits.reshape(-1))
        return out.to(q.dtype)

    def probs(self, logits: torch.Tensor, hkv: int, dtype: torch.dtype) -> torch.Tensor | None:
        """SPEC 1.1 probabilities from a layer's final logits (B, Hq, 1, N) (or None: dense)."""
        b, hq, _, n = logits.shape
        layer, dense = self._next("softmax", hkv, False)
        if dense:
            return None
        x = logits.detach().cpu().to(torch.float64)[:, :, 0]  # (B, Hq, N)
        invalid = x <= MASKED
        if not bool((invalid == invalid[:, :1]).all()):
            raise OracleCannotExpress("slots valid for some heads and not for others")
        valid = ~invalid[:, 0]  # (B, N)
        g = hq // hkv
        retrieval = self.decoder.effective_roles(self.roles.row(layer), b, hkv)
        token_mask = self.decoder.token_mask(valid, retrieval)  # (B, Hkv, N)
        see = token_mask.repeat_interleave(g, dim=1)  # (B, Hq, N)
        probs = torch.softmax(x.masked_fill(~see, -math.inf), dim=-1).nan_to_num(0.0)
        scores = torch.where(valid[:, None, :], x, 0.0).reshape(b, hkv, g, n).mean(dim=2)  # (B, Hkv, N)
        self.decoder.commit(R.select_from_scores(scores, valid, self.opts), retrieval)
        return probs[:, :, None, :].to(dtype).to(logits.device)


def tiling(k: torch.Tensor, v: torch.Tensor, columns: int) -> int:
    """``r`` where K and V (B, r * C, N, D), ``C = columns``, are their first C heads tiled r
    times (``x[:, :C].repeat(1, r, 1, 1)``, JetMoE), else 1: read from the values.

    A cache holding copies of its heads side by side (``repeat_interleave``, Falcon's new
    decoder architecture) is not a tiling; with one column (C = 1) both readings give the
    same tensors and the copies are taken as the cache's own heads (``reference``'s reading).
    """
    hk = k.shape[1]
    if columns <= 1 or hk <= columns or hk % columns:
        return 1
    r = hk // columns
    tiled = all(torch.equal(x, x[:, :columns].repeat(1, r, 1, 1)) for x in (k, v))
    side_by_side = all(torch.equal(x, x[:, ::r].repeat_interleave(r, dim=1)) for x in (k, v))
    return r if tiled and not side_by_side else 1


def split_per_head_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A mask with a head dim (B or 1, Hq, 1, N) -> (validity (B or 1, N) bool, head bias
    (B or 1, Hq, N) or None), when every head has the same valid slots."""
    m = mask[:, :, -1]  # (B, Hq, N)
    if m.dtype == torch.bool:
        if not bool((m == m[:, :1]).all()):
            raise OracleCannotExpress(f"a per-head bool mask {tuple(mask.shape)}")
        return m[:, 0], None
    invalid = m <= torch.finfo(m.dtype).min
    if not bool((invalid == invalid[:, :1]).all()):
        raise OracleCannotExpress("slots valid for some heads and not for others")
    return ~invalid[:, 0], torch.where(invalid, torch.zeros((), dtype=m.dtype), m)


def _module_eager(module):
    """The eager attention function of the module's own modeling file."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    return fn


class InterfaceAttention:
    """A transformers attention function: the model's own ``base`` implementation for prefill
    and dense layers, the oracle for decode steps. Register it with :meth:`register`."""

    NAME = "lychee_census_oracle"

    def __init__(self, oracle: Oracle, base: str):
        self.oracle, self.base = oracle, base

    def register(self) -> str:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        AttentionInterface.register(self.NAME, self)
        AttentionMaskInterface.register(self.NAME, ALL_MASK_ATTENTION_FUNCTIONS[self.base if self.base in
                                                                                 ALL_MASK_ATTENTION_FUNCTIONS else "sdpa"])
        return self.NAME

    def _fallback(self, module):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if self.base == "eager" or self.base not in ALL_ATTENTION_FUNCTIONS:
            return _module_eager(module)
        return ALL_ATTENTION_FUNCTIONS[self.base]

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if query.shape[2] != 1 or kwargs.get("is_causal") is True and query.shape[2] > 1:
            return self._fallback(module)(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        n = key.shape[2]
        mask = None if attention_mask is None else attention_mask[..., :n]
        sinks = kwargs.get("s_aux", kwargs.get("sinks"))  # attention sinks: one logit per query head (gpt-oss)
        window = kwargs.get("sliding_window")
        dense = window is not None and bool(window)
        bias = kwargs.get("position_bias")
        head_bias = None
        if bias is not None:
            head_bias = bias[..., -1, :n].expand(query.shape[0] if bias.shape[0] != 1 else 1, query.shape[1], n)
        out = self.oracle.attend(query, key, value, mask, scaling, softcap=kwargs.get("softcap") or 0.0,
                                 head_bias=head_bias, kind="interface", dense=dense,
                                 decoder_index=getattr(module, "layer_idx", None), sink_logits=sinks)
        if out is None:
            return self._fallback(module)(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        return out.transpose(1, 2).contiguous(), None


_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax)
_MATMUL = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm)


class InterceptMode(TorchFunctionMode):
    """Runs decode attention of models that bypass the attention interface through the oracle."""

    def __init__(self, oracle: Oracle, kv_heads: int | None = None):
        super().__init__()
        self.oracle, self.kv_heads = oracle, kv_heads
        self._last_k_heads: int | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SDPA:
            q, k, v = args[:3]
            if q.dim() == 4 and q.shape[2] == 1:
                out = self._sdpa(q, k, v, *args[3:], **kwargs)
                if out is not None:
                    return out
        elif func in _SOFTMAX:
            x = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[2] == 1 and x.shape[3] > 1 and dim in (-1, 3):
                dtype = kwargs.get("dtype") or (args[2] if len(args) > 2 else None) or x.dtype
                hkv = self._last_k_heads or self.kv_heads or x.shape[1]
                out = self.oracle.probs(x, hkv if x.shape[1] % hkv == 0 else x.shape[1], dtype)
                if out is not None:
                    return out
        out = func(*args, **kwargs)
        if func in _MATMUL and isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[2] == 1:
            k_t = args[1]
            if isinstance(k_t, torch.Tensor) and k_t.dim() == 4 and k_t.shape[-1] == out.shape[-1]:
                self._last_k_heads = k_t.shape[1]  # q @ k^T: the heads of K as attention reads it
        return out

    def _sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if dropout_p or is_causal:
            raise OracleCannotExpress(f"decode SDPA with dropout_p={dropout_p}, is_causal={is_causal}")
        n = k.shape[2]
        mask = None if attn_mask is None else attn_mask[..., :n]
        return self.oracle.attend(q, k, v, mask, scale, kind="sdpa")
