"""Stacks of bare attention layers in the forms models write them, for pass and property tests.

Each layer takes one decode query and its own cache:

    q (B, Hq, Lq, D), k/v (B, Hkv, N, D), mask None / (B, 1, 1, N) bool / additive
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import lychee_fx


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """HF's repeat_kv: (B, Hkv, N, D) -> (B, Hkv * G, N, D)."""
    b, h, n, d = x.shape
    if groups == 1:
        return x
    return x[:, :, None, :, :].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


class AttnLayer(nn.Module):
    """``form``: "gqa" (SDPA, enable_gqa), "repeat_kv" (SDPA on expanded K/V),
    "eager" (matmul-scale-mask-softmax-matmul), "opt" (q pre-scaled, SDPA scale=1.0),
    "tile" (SDPA on K/V tiled by ``repeat(1, G, 1, 1)``, JetMoE's: query head ``t * Hkv + h``
    reads KV head ``h``)."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def forward(self, q, k, v, mask):
        g = q.shape[1] // k.shape[1]
        if self.form == "gqa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=g > 1)
        if self.form == "opt":
            q = q * q.shape[-1] ** -0.5
            return F.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), attn_mask=mask, scale=1.0)
        if self.form == "tile":
            return F.scaled_dot_product_attention(q, k.repeat(1, g, 1, 1), v.repeat(1, g, 1, 1), attn_mask=mask)
        if self.form == "repeat_kv":
            return F.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), attn_mask=mask)
        scores = torch.matmul(q, repeat_kv(k, g).transpose(2, 3)) * q.shape[-1] ** -0.5
        if mask is not None:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, p=0.0, training=False)
        return torch.matmul(probs, repeat_kv(v, g))


class Stack(nn.Module):
    def __init__(self, layers: int, form: str | list[str]):
        super().__init__()
        forms = [form] * layers if isinstance(form, str) else form
        self.layers = nn.ModuleList(AttnLayer(f) for f in forms)

    def forward(self, qs, ks, vs, mask):
        """qs (L, B, Hq, 1, D), ks/vs (L, B, Hkv, N, D) -> (L, B, Hq, 1, D)."""
        return torch.stack([layer(qs[i], ks[i], vs[i], mask) for i, layer in enumerate(self.layers)])


def mask4d(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask[:, None, None, :]


def reference_stack(qs, ks, vs, mask, roles, opts):
    """The stack decoded by the oracle, layer by layer (float64)."""
    dec = lychee_fx.reference.ReferenceDecoder(opts)
    return torch.stack([dec(qs[i], ks[i], vs[i], mask, roles.row(i)) for i in range(qs.shape[0])])


def untiled_reference(qs, ks, vs, mask, roles, opts):
    """The oracle on K/V tiled by ``repeat(1, G, 1, 1)``: query head ``t * Hkv + h`` is member
    ``t`` of KV head ``h``'s group, so the reference gets q with each group's heads together
    and its output rows go back: (L, B, Hq, 1, D)."""
    rows = lychee_fx.reference.tiled_query_rows(qs.shape[2], ks.shape[2])
    return reference_stack(qs[:, :, rows], ks, vs, mask, roles, opts)[:, :, torch.argsort(rows)]


class Capture:
    """A backend that runs lychee's and keeps each rewritten graph for inspection."""

    def __init__(self, inner):
        self.inner, self.graphs = inner, []

    def __call__(self, gm, example_inputs, **kw):
        fn = self.inner(gm, example_inputs, **kw)
        self.graphs.append(gm)
        return fn

    @property
    def report(self):
        return self.inner.report


def census(gm) -> dict[str, int]:
    """How many call_function nodes of each kind a graph holds."""
    out: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method"):
            name = str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", str(n.target))
            if "lychee" in str(n.target):
                name = str(n.target)
            out[name] = out.get(name, 0) + 1
    return out
