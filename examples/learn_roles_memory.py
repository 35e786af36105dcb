"""What role learning costs at long contexts on an 8B-shaped model: peak GPU memory, seconds
per training step and prefill seconds, per prompt context.

    python examples/learn_roles_memory.py --out learn_roles_memory.json                 # Llama-3-8B shape, 8K and 16K, CUDA
    python examples/learn_roles_memory.py --tiny --device cpu --out /tmp/memory.json    # a smoke run anywhere

The model: random bf16 weights from a ``LlamaConfig`` (nothing is downloaded) of Llama-3-8B's
shape (hidden 4096, MLP 14336, 32 layers, 32 query / 8 KV heads, head dim 128, vocab 128256),
or with ``--tiny`` a 4-layer toy. Per context: one prompt of random tokens and a random answer
of ``--answer`` tokens, through :func:`lychee_fx.learn.train.profile_steps`, which runs
learn_roles' own path: the prefill (full attention, no gradients, the prompt's cache kept) and
the training step (the student over the teacher-forced answer, the backward to the gates,
AdamW), ``--warmup`` untimed steps then ``--steps`` timed ones, each synchronised.

Reported per context: prefill seconds; the median step's seconds (and every timed step);
``torch.cuda.max_memory_allocated`` over the prefill and over the steps (the resident
weights and the prefilled example included), and the weights alone. A context that runs out
of GPU memory is reported as such and the next one still runs. Prints a table and writes JSON
with the machine, versions, shapes, dtype and training options.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch
from bench_attention import code_info, ints
from bench_decode import MODELS as DECODE_MODELS

MODELS = {
    # the decode benchmarks' Llama-3-8B shape (one definition), as LlamaConfig arguments
    "llama3-8b": {k: v for k, v in DECODE_MODELS["llama3-8b"].items() if k != "model_type"},
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
# Training options: the 8B runs use the paper's block size with a budget well below 8K; the
# toy keeps the same proportions at its short contexts.
OPTIONS = {
    "llama3-8b": dict(budget=2048, block_size=64, sink=64, recent=256),
    "tiny": dict(budget=64, block_size=16, sink=16, recent=16),
}
CONTEXTS = {"llama3-8b": [8192, 16384], "tiny": [256, 512]}
GIB = 1 << 30


def build(name: str, max_len: int, device: torch.device, dtype: torch.dtype):
    """A random-weight Llama of shape ``MODELS[name]``, built on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(max_position_embeddings=max_len, **MODELS[name])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    p.add_argument("--tiny", action="store_true", help="the toy model and short contexts (smoke run)")
    p.add_argument("--contexts", type=ints, default=None, help="prompt tokens, comma-separated (default: 8192,16384; tiny: 256,512)")
    p.add_argument("--answer", type=int, default=32, help="teacher-forced answer tokens")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per context")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="bfloat16", help="float32 or bfloat16")
    p.add_argument("--count", type=int, default=None, help="retrieval KV heads (default: 1 in 8)")
    p.add_argument("--budget", type=int, default=None, help="training decode budget (default: 2048; tiny: 64)")
    p.add_argument("--block-size", type=int, default=None, help="(default: 64; tiny: 16)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Every context's measurements and the run's description (the JSON written)."""
    import transformers

    from lychee_fx.learn import LearnConfig
    from lychee_fx.learn.cli import DTYPES, resolve_device
    from lychee_fx.learn.train import profile_steps

    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    if args.answer < 1:
        raise ValueError(f"--answer must be >= 1 token, got {args.answer}")
    device = resolve_device(args.device)
    name = "tiny" if args.tiny else "llama3-8b"
    contexts = args.contexts or CONTEXTS[name]
    if min(contexts) < 1:
        raise ValueError(f"--contexts must be positive token counts, got {contexts}")
    opts = dict(OPTIONS[name])
    if args.budget is not None:
        opts["budget"] = args.budget
    if args.block_size is not None:
        opts["block_size"] = args.block_size
    config = LearnConfig(count=args.count, seed=args.seed, **opts)
    model = build(name, max(contexts) + args.answer, device, getattr(torch, args.dtype))
    shape = MODELS[name]
    info = {
        "date": datetime.date.today().isoformat(), "entry_point": "lychee_fx.learn.train.profile_steps",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "transformers": transformers.__version__, "model": name, "shape": shape,
        "dtype": args.dtype, "answer_tokens": args.answer, "steps": args.steps, "warmup": args.warmup,
        "options": config.options().as_dict(), "count": config.target_count(shape["num_hidden_layers"], shape["num_key_value_heads"]),
        **code_info(),
    }
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for context in contexts:
        prompt = torch.randint(3, shape["vocab_size"], (1, context), generator=gen)  # (1, P)
        answer = torch.randint(3, shape["vocab_size"], (1, args.answer), generator=gen)  # (1, A)
        try:
            prof = profile_steps(model, prompt, answer, config=config, steps=args.steps, warmup=args.warmup)
        except torch.cuda.OutOfMemoryError as e:
            rows.append({"context": context, "oom": str(e).splitlines()[0]})
            torch.cuda.empty_cache()
            continue
        prof.pop("records")
        rows.append({"context": context, **prof})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {**info, "rows": rows}


def table(result: dict) -> str:
    def gib(x):
        return "-" if x is None else f"{x / GIB:.2f}"

    lines = [
        f"{result['model']} {result['dtype']} on {result['device']}, answer {result['answer_tokens']} tokens, "
        f"options {result['options']}, median of {result['steps']} steps after {result['warmup']} warm-up",
        f"{'context':>8} {'prefill s':>10} {'step s':>8} {'peak step GiB':>14} {'peak prefill GiB':>17} {'weights GiB':>12}",
    ]
    for row in result["rows"]:
        if "oom" in row:
            lines.append(f"{row['context']:>8} out of memory: {row['oom']}")
            continue
        lines.append(
            f"{row['context']:>8} {row['prefill_s']:>10.3f} {row['median_step_s']:>8.3f} {gib(row['peak_step_bytes']):>14} "
            f"{gib(row['peak_prefill_bytes']):>17} {gib(row['weights_bytes']):>12}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
