"""A tiny random Llama with a small BPE tokenizer, saved as a local model folder: what the
demo and eval tests load through ``--model PATH`` (the same path as any local model)."""

from __future__ import annotations

from pathlib import Path

import torch

LAYERS, HEADS, KV_HEADS = 3, 4, 2


def make_tiny_lm_dir(path: Path, *, seed: int = 0, max_positions: int = 1024) -> Path:
    """Train a 384-token byte-level BPE on Python's pydoc topics, build a random Llama
    (hidden 64, 3 layers, 4 query / 2 KV heads) for it, and save both to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lychee_fx.apps.passkey import haystack_text

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([haystack_text()[:100_000]], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    cfg = LlamaConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=max_positions,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    path.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(path)
    model.save_pretrained(path)
    return path
