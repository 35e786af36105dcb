"""``python -m lychee_fx learn-roles``: learn a role map with HardKuma gates and save it.

    python -m lychee_fx learn-roles --model smollm2-135m --out roles.json
    python -m lychee_fx learn-roles --count 12 --device cuda --dtype bfloat16 --out roles.json

Writes the role map (JSON, with the gate values and a training summary in ``meta``), a
JSON-lines training log next to it, and a checkpoint that a rerun of the same command
resumes from.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "DTYPES", "resolve_device"]

# --dtype values. float16 is left out: its gradients overflow without loss scaling.
DTYPES = ("float32", "bfloat16")


def resolve_device(text: str | None):
    """The torch device for ``--device``: None = cuda when available, else cpu. Raises
    ``ValueError`` naming the expected values and the one given."""
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be 'cpu', 'cuda' or 'cuda:N', got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {text} needs a CUDA GPU, but torch {torch.__version__} sees none "
                "(torch.cuda.is_available() is False); expected --device cpu here"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: expected a GPU index below {torch.cuda.device_count()}, got {device.index}")
    return device


def build_parser() -> argparse.ArgumentParser:
    from lychee_fx.learn.config import LearnConfig

    d = LearnConfig()
    p = argparse.ArgumentParser(prog="python -m lychee_fx learn-roles", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (embedded), a local model directory or .gguf, or a cached HF id")
    p.add_argument("--out", required=True, help="where to write the role map (JSON)")
    p.add_argument("--count", type=int, default=None, help="retrieval KV heads (default: 1 in 8 of all KV heads)")
    p.add_argument("--no-force-layer0", dest="force_layer0", action="store_false", help="do not force layer 0 retrieval")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--lambda-init", type=float, default=d.lambda_init)
    p.add_argument("--lambda-growth", type=float, default=d.lambda_growth)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--budget", type=int, default=d.budget, help="training decode budget in tokens")
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--sink", type=int, default=d.sink)
    p.add_argument("--recent", type=int, default=d.recent)
    p.add_argument("--prompts", type=int, default=16, help="number of training prompts")
    p.add_argument("--context", type=int, nargs=2, default=(1024, 2048), metavar=("LOW", "HIGH"), help="prompt length range in tokens")
    p.add_argument("--keys", type=int, default=3, help="passkeys per prompt")
    p.add_argument("--haystack", default=None, help="UTF-8 text file to hide passkeys in (default: Python's pydoc topics)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: OUT.ckpt); resumed from when present")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--log", default=None, help="JSON-lines training log (default: OUT.log.jsonl)")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--device", default=None, help="where the model runs: cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="float32", help=f"the model's weights: {' or '.join(DTYPES)} (the loss is float32 either way)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)

    import torch

    from lychee_fx.apps.embedded import load_model
    from lychee_fx.learn.config import LearnConfig
    from lychee_fx.learn.data import passkey_training_data
    from lychee_fx.learn.readout import gate_report
    from lychee_fx.learn.train import learn_roles
    from lychee_fx.apps.passkey import haystack_text

    config = LearnConfig(
        count=args.count, force_layer0=args.force_layer0, steps=args.steps, lr=args.lr,
        weight_decay=args.weight_decay, lambda_init=args.lambda_init, lambda_growth=args.lambda_growth,
        seed=args.seed, budget=args.budget, block_size=args.block_size, sink=args.sink,
        recent=args.recent, log_every=args.log_every, checkpoint_every=args.checkpoint_every,
    )
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    dtype = getattr(torch, args.dtype)
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt = Path(args.checkpoint) if args.checkpoint else out.with_name(out.name + ".ckpt")
    log_path = Path(args.log) if args.log else out.with_name(out.name + ".log.jsonl")
    for path in (out, ckpt, log_path):
        path.parent.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_model(None if args.model == "smollm2-135m" else args.model, dtype=dtype, device=device)
    data = passkey_training_data(
        tokenizer, num_prompts=args.prompts, context_tokens=tuple(args.context), num_keys=args.keys,
        seed=args.seed, haystack=None if args.haystack is None else haystack_text(args.haystack),
    )
    resumed = ckpt.exists()
    with open(log_path, "a" if resumed else "w") as log_file:
        def log(record: dict) -> None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

        roles = learn_roles(model, data, config=config, checkpoint=ckpt, log=log, progress=args.progress)

    meta = roles.meta
    meta["command"] = "python -m lychee_fx learn-roles " + shlex.join(argv)
    meta["model"] = args.model
    meta["data"].update(source="passkey prompts", keys=args.keys, context=list(args.context),
                        haystack=args.haystack or "pydoc_data.topics")
    roles = type(roles)(roles.table, meta=meta)
    roles.save(out)
    print(gate_report(torch.tensor(meta["gate_mean"]), roles.table))
    final = meta.get("final", {})
    print(
        f"{roles!r}\nsteps {meta['steps']}, {meta['wall_time_s']} s; final loss {final.get('loss', float('nan')):.4g}, "
        f"relative MSE {final.get('rel_mse', float('nan')):.4g}, density {final.get('density', float('nan')):.4f} "
        f"(target {roles.num_retrieval}/{roles.table.numel()} = {roles.density:.4f}); "
        f"{meta['above_half']} gates with mean > 0.5\nwrote {out} (log {log_path}, checkpoint {ckpt})"
    )
    return 0
