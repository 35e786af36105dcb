"""A tiny Llama whose answer can only be found through chosen KV heads ("planted" heads).

Residual stream (hidden 64): dim 0 marks the needle token, dim 1 marks answer tokens, dims
8.. hold random features of ordinary tokens, dims 4 + i receive planted head i's payload.

- Planted head (layer l, KV head h): its query heads read dim 1 (answer tokens), its key
  reads dim 0 (the needle), both in the lowest-frequency RoPE pair with a huge rope theta,
  so an answer token attends to the needle wherever it is; its value carries dim 0 and
  ``o_proj`` writes it, large, into the payload dim. Sparse, it misses the needle: the
  selections of every other head at index h ignore it (their queries and keys are zero, so
  all scores tie and the lowest blocks win), and its output collapses to zero.
- Every other head: zero query and key (uniform attention), small random value and output
  projections (it matters a little, so the MSE has something to trade); zero MLPs.

The prompt is random ordinary tokens with the needle in the middle; the answer is a few
answer tokens.
"""

from __future__ import annotations

import torch

VOCAB = 96
NEEDLE = 5
ANSWER_TOKENS = (6, 7, 8, 9)
HEAD_DIM = 16
_PAIR = HEAD_DIM // 2 - 1  # the lowest-frequency RoPE dim pair (_PAIR, _PAIR + HEAD_DIM // 2)


def planted_llama(planted: tuple[tuple[int, int], ...], *, layers: int = 6, seed: int = 0):
    """An HF Llama (hidden 64, 4 query heads, 2 KV heads) with ``planted`` (layer, KV head)s."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_theta=1e12,
    )
    if hasattr(cfg, "rope_parameters") and isinstance(cfg.rope_parameters, dict):
        cfg.rope_parameters["rope_theta"] = 1e12
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    g = 2  # query heads per KV head
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in [model.model.norm] + [blk.input_layernorm for blk in model.model.layers] + [
            blk.post_attention_layernorm for blk in model.model.layers
        ]:
            norm.weight.fill_(1.0)
        emb = model.model.embed_tokens.weight  # (V, 64)
        emb[:, 8:] = torch.randn(VOCAB, 56, generator=gen)
        emb[NEEDLE] = 0.0
        emb[NEEDLE, 0] = 8.0
        for t in ANSWER_TOKENS:
            emb[t, 1] = 8.0
        for layer, blk in enumerate(model.model.layers):
            att = blk.self_attn
            att.v_proj.weight[:, 8:] = 0.05 * torch.randn(2 * HEAD_DIM, 56, generator=gen)
            att.o_proj.weight[8:, :] = 0.05 * torch.randn(56, 4 * HEAD_DIM, generator=gen)
        for i, (layer, h) in enumerate(planted):
            att = model.model.layers[layer].self_attn
            att.v_proj.weight[h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0.0
            att.v_proj.weight[h * HEAD_DIM, 0] = 1.0
            att.k_proj.weight[h * HEAD_DIM + _PAIR, 0] = 4.0
            for qh in range(h * g, (h + 1) * g):
                att.q_proj.weight[qh * HEAD_DIM + _PAIR, 1] = 4.0
                att.o_proj.weight[:, qh * HEAD_DIM : (qh + 1) * HEAD_DIM] = 0.0
                att.o_proj.weight[4 + i, qh * HEAD_DIM] = 3.0
    return model


def planted_data(num: int, *, prompt_len: int = 128, answer_len: int = 6, seed: int = 0):
    """``num`` (prompt_ids (1, P), answer_ids (1, A)) pairs, the needle at 40-60% depth."""
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(num):
        prompt = torch.randint(10, VOCAB, (1, prompt_len), generator=gen)
        where = int(torch.randint(int(0.4 * prompt_len), int(0.6 * prompt_len), (1,), generator=gen))
        prompt[0, where] = NEEDLE
        answer = torch.tensor(ANSWER_TOKENS)[torch.randint(0, len(ANSWER_TOKENS), (1, answer_len), generator=gen)]
        pairs.append((prompt, answer))
    return pairs
