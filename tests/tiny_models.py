"""Tiny models for the tests: HF decoders from configs, two hand-written decoders, and the
eager SPEC 1.1 decode (``lychee_fx.reference``) plugged into each of them.

HF models get the reference through transformers' own ``AttentionInterface`` registry (the
library's extension point, not a patch); the hand-written models take an ``attention``
callable in their constructor.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lychee_fx.options import DecodeOptions
from lychee_fx.reference import ReferenceDecoder
from lychee_fx.roles import HeadRoles

VOCAB = 96

# name -> (model_type, config kwargs, number of KV heads)
HF_SPECS = {
    "llama": ("llama", dict(num_key_value_heads=2), 2),
    "qwen3": ("qwen3", dict(num_key_value_heads=2, head_dim=16), 2),
    "qwen2": ("qwen2", dict(num_key_value_heads=2), 2),
    "mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=None), 2),
    "phi3": ("phi3", dict(num_key_value_heads=2, pad_token_id=0), 2),
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=3, n_head=4, n_positions=512), 4),
}


def hf_model(name: str, *, layers: int = 3, attn: str = "sdpa", dtype=torch.float32, seed: int = 0):
    """A tiny random HF causal LM (hidden 64, 4 query heads) and its number of KV heads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra, hkv = HF_SPECS[name]
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    common.update(extra)
    cfg = AutoConfig.for_model(model_type, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype).eval()
    return model, hkv


class HFReferenceAttention:
    """An HF attention function: SDPA for prefill, ``ReferenceDecoder`` for decode steps.

    Register it with :func:`register_hf_reference`, then select it with
    ``model.set_attn_implementation("lychee_reference")``.
    """

    def __init__(self, roles: HeadRoles, opts: DecodeOptions):
        self.roles, self.decoder = roles, ReferenceDecoder(opts)

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if query.shape[2] != 1:  # prefill is never changed
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        layer = module.layer_idx
        if layer == 0:
            self.decoder.reset()
        out = self.decoder(query, key, value, attention_mask, self.roles.row(layer), scaling)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register_hf_reference(roles: HeadRoles, opts: DecodeOptions) -> str:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    name = "lychee_reference"
    AttentionInterface.register(name, HFReferenceAttention(roles, opts))
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


# ---- hand-written decoders -------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, manual: bool, attention=None):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.hd, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.manual = manual
        self.attention = attention  # (q, k, v, valid, layer) -> y, replaces decode attention

    def forward(self, x, cache_k, cache_v, valid, layer: int):
        b, t, c = x.shape
        h = self.ln1(x)
        q = self.q(h).view(b, t, self.heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k, v = self.kv(h).view(b, t, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4)
        k = torch.cat([cache_k, k], dim=2)  # (B, Hkv, N, hd)
        v = torch.cat([cache_v, v], dim=2)
        if t == 1 and self.attention is not None:
            y = self.attention(q, k, v, valid, layer)
        elif self.manual:
            # Classic manual attention: GQA by repeat_interleave, padding by masked_fill.
            g = self.heads // self.kv_heads
            kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
            att = (q @ kk.transpose(-2, -1)) * (1.0 / math.sqrt(self.hd))
            n = kk.shape[2]
            causal = torch.ones(t, n, dtype=torch.bool, device=x.device).tril(n - t)
            keep = causal[None, None] & valid[:, None, None, :]
            att = att.masked_fill(keep == 0, torch.finfo(att.dtype).min)
            att = F.softmax(att, dim=-1)
            y = att @ vv
        else:
            # nanoGPT-style: SDPA with is_causal for the prompt, GQA by enable_gqa.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=self.heads != self.kv_heads)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x)), k, v


class TinyDecoder(nn.Module):
    """A hand-written decoder with an explicit KV cache.

    ``manual=False``: nanoGPT-style SDPA (``is_causal`` on the prompt). ``manual=True``:
    matmul -> scale -> masked_fill -> softmax -> matmul, with a padding mask.
    """

    def __init__(self, *, layers=3, dim=64, heads=4, kv_heads=2, manual=False, attention=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.kv_heads, self.hd = kv_heads, dim // heads
        self.emb = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(1024, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, kv_heads, manual, attention) for _ in range(layers))
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def empty_cache(self, batch: int, dtype=torch.float32):
        z = torch.zeros(batch, self.kv_heads, 0, self.hd, dtype=dtype)
        return [(z, z) for _ in self.blocks]

    def forward(self, ids, cache, valid):
        """ids (B, T), cache [(k, v)] each (B, Hkv, N0, hd), valid (B, N0 + T) bool."""
        n0 = cache[0][0].shape[2]
        pos = torch.arange(n0, n0 + ids.shape[1], device=ids.device)
        x = self.emb(ids) + self.pos(pos)
        new = []
        for i, blk in enumerate(self.blocks):
            x, k, v = blk(x, cache[i][0], cache[i][1], valid, i)
            new.append((k, v))
        return self.head(x), new


def reference_attention(roles: HeadRoles, opts: DecodeOptions):
    """An ``attention`` callable for :class:`TinyDecoder` that decodes per SPEC 1.1."""
    dec = ReferenceDecoder(opts)

    def attend(q, k, v, valid, layer):
        if layer == 0:
            dec.reset()
        return dec(q, k, v, valid, roles.row(layer)).to(q.dtype)

    return attend


def tiny_generate(model, prompt, valid, steps: int, step_fn=None):
    """Greedy decoding with an explicit cache; returns tokens (B, steps) and logits list."""
    step_fn = model if step_fn is None else step_fn
    cache = model.empty_cache(prompt.shape[0], dtype=next(model.parameters()).dtype)
    logits, cache = model(prompt, cache, valid)
    tokens, all_logits = [], []
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        tokens.append(nxt)
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
        logits, cache = step_fn(nxt, cache, valid)
        all_logits.append(logits[:, -1])
    return torch.cat(tokens, 1), all_logits
