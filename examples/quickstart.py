"""Quickstart: compile a tiny random Llama with the lychee backend, generate, compare.

    python examples/quickstart.py [--layers 4] [--prompt 512] [--new 32] [--compiler inductor]

Prints the attention-site report, decode speed with and without lychee, and agreement with
full attention twice: with every head retrieval (must match exactly) and with one retrieval
KV head per layer (sparse decoding: close, not identical).
"""

from __future__ import annotations

import argparse
import time

import torch

import lychee_fx


def tiny_llama(layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def generate(model, ids, new_tokens):
    """Greedy decoding; returns tokens, stacked logits and decode seconds per token."""
    model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up: compiles prefill and decode
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    dt = (time.perf_counter() - t0) / new_tokens
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits), dt


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--compiler", choices=["inductor", "eager"], default="inductor")
    args = p.parse_args(argv)

    ids = torch.randint(0, 512, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    model = tiny_llama(args.layers)
    ref_tokens, ref_logits, ref_dt = generate(model, ids, args.new)
    print(f"full attention (eager HF): {1 / ref_dt:7.1f} tokens/s")

    opts = dict(budget=128, block_size=16, sink=16, recent=32)
    for name, roles in (
        ("all heads retrieval", lychee_fx.HeadRoles.all_retrieval(args.layers, 2)),
        ("1 of 2 KV heads retrieval", lychee_fx.HeadRoles.first_k(args.layers, 2, 1)),
    ):
        torch._dynamo.reset()
        model = tiny_llama(args.layers)
        be = lychee_fx.backend(roles, compiler=args.compiler, **opts)
        model.compile(backend=be)
        tokens, logits, dt = generate(model, ids, args.new)
        agree = (tokens == ref_tokens).float().mean().item()
        first = (tokens != ref_tokens).nonzero()
        diverge = int(first[0, 1]) if len(first) else args.new
        err = (logits[:diverge] - ref_logits[:diverge]).abs().max().item() if diverge else float("nan")
        print(f"\nlychee, {name} (budget {opts['budget']}, block {opts['block_size']}):")
        print(f"  {1 / dt:7.1f} tokens/s; {agree:.1%} of tokens agree with full attention; "
              f"max |logit diff| before the first divergence: {err:.2e}")
        print("  " + be.report.summary().replace("\n", "\n  "))


if __name__ == "__main__":
    main()
