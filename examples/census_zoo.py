"""Tiny random models of every causal-LM type the installed transformers registers.

``tiny_config(model_type)`` shrinks the type's default config (and its sub-configs) to a few
layers of hidden size 64, by the attribute names configs use for sizes; ``build(...)``
instantiates its ``AutoModelForCausalLM`` class with random weights. Nothing is downloaded.
A type whose config or model cannot be made this way raises ``NotBuildable`` with the reason.

Sizes: hidden 64, 4 query heads, 2 KV heads where the type has a KV-head count, head dim 16,
4 decoder layers (2 attention layers of each kind in hybrid patterns), vocabulary 128,
sliding windows of 16 slots (shorter than the census's contexts, so they matter).
"""

from __future__ import annotations

import copy
import warnings

import torch

__all__ = ["NotBuildable", "causal_lm_types", "VARIANTS", "tiny_config", "build", "kv_heads_of"]

VOCAB = 128
LAYERS = 4
WINDOW = 16

# attribute name -> value, applied to every config and sub-config that has the attribute
_SIZES = {
    # widths
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "dim": 64, "embed_dim": 64, "word_embed_proj_dim": 64,
    "intermediate_size": 128, "ffn_dim": 128, "decoder_ffn_dim": 128, "encoder_ffn_dim": 128, "n_inner": 128,
    "ffn_hidden_size": 128, "d_ff": 128, "d_inner": 128, "inner_hidden_size": 128, "mlp_dim": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "shared_intermediate_size": 32,
    "expert_intermediate_size": 32, "moe_ffn_hidden_size": 32, "moe_shared_expert_intermediate_size": 32,
    # heads
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "head_dim": 16, "attention_head_dim": 16, "kv_channels": 16,
    "num_key_value_heads": 2, "num_kv_heads": 2, "n_kv_heads": 2, "multi_query_group_num": 2,
    # multi-head latent attention
    "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16, "qk_head_dim": 24,
    "index_head_dim": 16, "index_n_heads": 2, "index_topk": 16,
    # mixture of experts
    "num_experts": 4, "n_routed_experts": 4, "num_local_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "n_group": 1, "topk_group": 1, "n_shared_experts": 1,
    "num_shared_experts": 1, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    # linear-attention and state-space layers of hybrid models
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "mamba_d_state": 8, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_n_groups": 1, "mamba_chunk_size": 16,
    "mamba_dt_rank": 8, "state_size": 8, "ssm_state_size": 8, "time_step_rank": 8, "chunk_size": 16,
    # lengths and vocabulary
    "vocab_size": VOCAB, "max_position_embeddings": 512, "n_positions": 512, "max_seq_len": 512,
    "n_ctx": 512, "max_sequence_length": 512,
    # layer counts
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "n_layers": LAYERS, "num_layers": LAYERS,
    "decoder_layers": LAYERS, "encoder_layers": LAYERS,
}
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id",
              "cls_token_id", "mask_token_id", "unk_token_id")
_LAYER_LISTS = ("layer_types", "layers_block_type", "attention_layers", "mlp_layer_types", "block_types",
                "layers_type", "hybrid_override_pattern")


# Config variants whose attention differs from the type's default: ``type+name`` -> overrides.
# Per-type settings without which the shrunk default config cannot build a model: Gemma 3n's
# per-layer lists stay at its 35 layers, and its last 15 layers share the KV caches of earlier
# ones (with 4 layers: the last 2 read the caches of the first 2, one of each attention kind).
FIXES = {
    "gemma3n_text": dict(num_kv_shared_layers=2, activation_sparsity_pattern=[0.0] * LAYERS, intermediate_size=[128] * LAYERS),
}

VARIANTS = {
    "falcon+new_decoder_architecture": dict(new_decoder_architecture=True, num_kv_heads=2),  # a cache of expanded heads
    "falcon+alibi": dict(alibi=True),  # ALiBi folded into a per-head SDPA mask
    "falcon+alibi+eager": dict(alibi=True, _attn_implementation="eager"),
}


class NotBuildable(Exception):
    """The type's tiny model could not be made; the message says why."""


def causal_lm_types() -> list[str]:
    """Every model type with an ``AutoModelForCausalLM`` class, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _cycle_pattern(pattern: list, n: int) -> list:
    """``n`` entries that keep every kind of ``pattern`` (in order of first appearance)."""
    kinds = list(dict.fromkeys(pattern))
    return [kinds[i % len(kinds)] for i in range(n)]


def _shrink(cfg, depth: int = 0) -> None:
    """Set size attributes in place, recursing into sub-configs."""
    from transformers import PretrainedConfig

    if depth > 3:
        return
    names = set(vars(cfg)) | set(getattr(cfg, "attribute_map", {}))
    for name, value in _SIZES.items():
        current = getattr(cfg, name, None) if name in names else False
        derived = current is None and name in ("head_dim", "num_key_value_heads")  # None: derived, set it
        if derived or (isinstance(current, int) and not isinstance(current, bool)):
            try:
                setattr(cfg, name, value)
            except Exception:  # noqa: BLE001 - a read-only property: leave it
                pass
    if getattr(cfg, "q_lora_rank", None):
        cfg.q_lora_rank = 32
    if isinstance(vars(cfg).get("qk_rope_head_dim"), int) and "head_dim" in vars(cfg):
        cfg.head_dim = cfg.qk_rope_head_dim  # MLA configs: head_dim is the rotary part
    if isinstance(vars(cfg).get("kv_lora_rank"), int) and isinstance(vars(cfg).get("num_key_value_heads"), int):
        cfg.num_key_value_heads = cfg.num_attention_heads  # MLA expands its latent cache to every head
    if getattr(cfg, "sliding_window", None):
        cfg.sliding_window = WINDOW
    if getattr(cfg, "window_size", None) and isinstance(cfg.window_size, int):
        cfg.window_size = WINDOW
    if getattr(cfg, "attention_chunk_size", None):
        cfg.attention_chunk_size = WINDOW
    for name in ("attn_layer_period", "expert_layer_period"):  # Jamba-style periods
        if isinstance(getattr(cfg, name, None), int):
            setattr(cfg, name, 2)
    for name in ("attn_layer_offset", "expert_layer_offset"):
        if isinstance(getattr(cfg, name, None), int):
            setattr(cfg, name, 1)
    n = getattr(cfg, "num_hidden_layers", None) if "num_hidden_layers" in names else None
    for name in _LAYER_LISTS:
        value = vars(cfg).get(name)
        if isinstance(value, (list, tuple)) and n and len(value) != n and value:
            setattr(cfg, name, _cycle_pattern(list(value), n))
        elif isinstance(value, str) and n and len(value) != n and value:
            setattr(cfg, name, "".join(_cycle_pattern(list(value), n)))
    if isinstance(vars(cfg).get("attention_types"), list):  # GPT-Neo: [[["global", "local"], 12]]
        kinds = [k for pattern, _ in cfg.attention_types for k in pattern]
        cfg.attention_types = [[kinds, max(1, (n or LAYERS) // len(kinds))]]
        if hasattr(cfg, "attention_layers"):
            cfg.attention_layers = _cycle_pattern(kinds, n or LAYERS)
    for name in ("mlp_only_layers", "no_rope_layers"):
        value = vars(cfg).get(name)
        if isinstance(value, list) and value and n:
            setattr(cfg, name, [x for x in value if isinstance(x, int) and x < n] if name == "mlp_only_layers"
                    else _cycle_pattern(value, n))
    for name in _TOKEN_IDS:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not 0 <= value < VOCAB:
            setattr(cfg, name, min(3, VOCAB - 1))
        elif isinstance(value, list):
            setattr(cfg, name, [x if 0 <= x < VOCAB else 2 for x in value if isinstance(x, int)])
    for name, value in list(vars(cfg).items()):
        if isinstance(value, PretrainedConfig):
            _shrink(value, depth + 1)
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = True
    if hasattr(cfg, "is_decoder"):
        cfg.is_decoder = True


def tiny_config(model_type: str):
    """The type's default config, shrunk (see the module docstring); ``type+variant`` (a key
    of ``VARIANTS``) applies that variant's overrides on top."""
    from transformers import AutoConfig

    overrides = VARIANTS.get(model_type, {})
    model_type = model_type.split("+")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cfg = AutoConfig.for_model(model_type)
        except Exception as e:  # noqa: BLE001 - any failure is a reason to report
            raise NotBuildable(f"default config: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
        cfg = copy.deepcopy(cfg)
        try:
            _shrink(cfg)
        except Exception as e:  # noqa: BLE001 - a config that refuses small sizes
            raise NotBuildable(f"tiny config: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
        for name, value in {**FIXES.get(model_type, {}), **overrides}.items():
            setattr(cfg, name, value)
    return cfg


def build(model_type: str, *, dtype=torch.float64, attn: str | None = None, seed: int = 0):
    """A tiny random ``AutoModelForCausalLM`` of ``model_type`` in eval mode (``attn``: an
    attention implementation, None for the type's default)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type)
    torch.manual_seed(seed)
    attn = attn or VARIANTS.get(model_type, {}).get("_attn_implementation")
    kw = {} if attn is None else {"attn_implementation": attn}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, **kw)
        except Exception as e:  # noqa: BLE001
            raise NotBuildable(f"model: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}") from None
    return model.eval()


def kv_heads_of(config) -> int | None:
    """The KV heads the config declares (what a user builds a role map for), if it says."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    if getattr(text, "multi_query", False):
        return 1
    heads = next((getattr(text, n) for n in ("num_attention_heads", "n_head", "n_heads", "num_heads")
                  if isinstance(getattr(text, n, None), int)), None)
    return heads if isinstance(heads, int) and heads > 0 else None

