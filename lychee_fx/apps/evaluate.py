"""``python -m lychee_fx eval``: quality of lychee decoding against full attention.

    python -m lychee_fx eval                     # the default grid on the embedded model
    python -m lychee_fx eval --quick --out DIR   # a CI-sized smoke run
    python -m lychee_fx eval --model PATH --roles my.roles.json

Tasks (``eval_tasks``): multi-passkey retrieval (exact match) over context lengths and
depths; perplexity of the last M tokens of long prose, scored one decode step at a time;
greedy agreement with full attention over the first T generated tokens. Methods
(``eval_methods``): full attention, lychee, a random map and a TidalDecode schedule with
the same number of retrieval KV heads, and a sink + recent lower bound, at every budget and
block size of the grid, all through the same backend. Writes ``results.json``,
``results.md`` and PNG plots (``eval_report``) to ``--out``.

Every prompt is prefilled once, densely; the dense (plain, uncompiled) model's results are
the reference. The backend runs with ``compiler="eager"`` by default: the same ops as under
Inductor on the CPU, without a compile per configuration. Deterministic given ``--seed``
(greedy decoding; seeded prompts and random maps) on a given machine and thread count.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

__all__ = ["Grid", "DEFAULT", "QUICK", "main", "run_eval"]


@dataclasses.dataclass(frozen=True)
class Grid:
    """What the eval measures; every field has a command-line flag."""

    lengths: tuple[int, ...] = (1024, 2048, 4096, 8000)  # passkey context lengths (tokens)
    prompts_per_length: int = 2
    num_keys: int = 2
    text_length: int = 8000  # tokens of prose per perplexity / agreement window
    texts: int = 2
    score_tokens: int = 64  # M: perplexity over the last M tokens, one decode step each
    agree_tokens: int = 32  # T: greedy tokens compared with full attention
    budgets: tuple[int, ...] = (256, 512, 1024, 2048)
    block_sizes: tuple[int, ...] = (16, 64)
    sink: int = 64
    recent: int = 64
    headline: tuple[int, int] = (1024, 64)  # (budget, block size) of the headline table
    correct_every: int = 16  # SPEC 1.3 variant of lychee at the headline options; 0 = off


DEFAULT = Grid()
QUICK = Grid(
    lengths=(160, 320), prompts_per_length=1, num_keys=2, text_length=320, texts=1, score_tokens=12,
    agree_tokens=12, budgets=(64, 128), block_sizes=(16,), sink=16, recent=16, headline=(128, 16), correct_every=4,
)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lychee_fx eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local path or cached Hugging Face id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--roles", default=None, help="role map JSON for the 'lychee' method (default: the shipped learned map, else the stated default)")
    p.add_argument("--out", default="eval-results", help="output folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a small grid for smoke runs (CI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--compiler", choices=["eager", "inductor"], default="eager", help="backend compiler (default: %(default)s)")
    p.add_argument("--methods", default=None, help="comma-separated subset of: full, lychee, random, tidal, sink+recent")
    p.add_argument("--haystack", default=None, help="UTF-8 text file for passkeys and perplexity (default: Python's pydoc topics)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("grid (defaults: the default grid, or the quick one with --quick)")
    g.add_argument("--lengths", type=_ints)
    g.add_argument("--prompts-per-length", type=int)
    g.add_argument("--num-keys", type=int)
    g.add_argument("--text-length", type=int)
    g.add_argument("--texts", type=int)
    g.add_argument("--score-tokens", type=int)
    g.add_argument("--agree-tokens", type=int)
    g.add_argument("--budgets", type=_ints)
    g.add_argument("--block-sizes", type=_ints)
    g.add_argument("--sink", type=int)
    g.add_argument("--recent", type=int)
    g.add_argument("--headline", type=_ints, help="budget,block_size of the headline table")
    g.add_argument("--correct-every", type=int, help="cache correction period for the variant, 0 = off")
    return p


def _grid(args) -> Grid:
    grid = QUICK if args.quick else DEFAULT
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(Grid) if getattr(args, f.name, None) is not None}
    if "headline" in changes and len(changes["headline"]) != 2:
        raise ValueError(f"--headline takes budget,block_size, got {changes['headline']}")
    return dataclasses.replace(grid, **changes)


def _fit_lengths(grid: Grid, max_positions: int | None) -> Grid:
    """Cap context lengths so that prompt plus generated tokens fit the model's positions."""
    if not max_positions:
        return grid
    room = max_positions - max(grid.agree_tokens, 64)
    if room < 32:
        raise ValueError(f"the model has only {max_positions} positions; expected at least {max(grid.agree_tokens, 64) + 32}")
    lengths = tuple(sorted({min(x, room) for x in grid.lengths}))
    return dataclasses.replace(grid, lengths=lengths, text_length=min(grid.text_length, max_positions - 8))


def _versions() -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "threads": torch.get_num_threads()}


def run_eval(args, grid: Grid, progress: bool) -> dict:
    """Load, prefill, run the reference and every method; the results as a dict."""
    from lychee_fx.apps.decoding import pick_device
    from lychee_fx.apps.embedded import kv_heads, load_model, num_layers
    from lychee_fx.apps.eval_methods import FAMILIES, build_methods
    from lychee_fx.apps.eval_tasks import build_passkey_items, build_text_items, prefill_items, run_item, summarise
    from lychee_fx.apps.passkey import haystack_text
    from lychee_fx.apps.progress import Progress
    from lychee_fx.apps.shipped_roles import choose_roles, learned_map

    t_start = time.perf_counter()
    device = pick_device(args.device)
    model, tok = load_model(args.model, device=device)
    cfg = model.config
    layers, hkv = num_layers(cfg), kv_heads(cfg)
    grid = _fit_lengths(grid, getattr(cfg, "max_position_embeddings", None))
    lychee_roles, lychee_label = choose_roles(args.model, layers, hkv, args.roles)
    learned, learned_where = learned_map(args.model)
    families = FAMILIES if args.methods is None else tuple(x.strip() for x in args.methods.split(",") if x.strip())
    methods = build_methods(
        lychee_roles, lychee_label, budgets=grid.budgets, block_sizes=grid.block_sizes, sink=grid.sink,
        recent=grid.recent, headline=grid.headline, correct_every=grid.correct_every, seed=args.seed, families=families,
    )

    hay = haystack_text(args.haystack)
    items = build_passkey_items(tok, grid.lengths, grid.prompts_per_length, grid.num_keys, args.seed, hay)
    items += build_text_items(tok, grid.text_length, grid.texts, grid.score_tokens, grid.agree_tokens, args.seed, hay)
    for it in items:
        it.ids = it.ids.to(device)
        if it.targets is not None:
            it.targets = it.targets.to(device)

    with Progress(sum(it.context - 1 for it in items), "prefill (dense, once per prompt)", unit="tok", enabled=progress) as bar:
        prefill_items(model, items, progress=bar.update)
    per_method = sum(it.steps + it.agree_steps for it in items)
    with Progress(per_method, "reference (full attention, plain model)", unit="step", enabled=progress) as bar:
        for it in items:
            it.ref = run_item(model, model, it, tok, on_step=lambda _: bar.update(1))
    reference = summarise(items, [it.ref for it in items])

    runs = []
    with Progress(per_method * len(methods), "methods", unit="step", enabled=progress) as bar:
        for m in methods:
            bar.set_description(m.key)
            torch._dynamo.reset()  # a fresh trace per backend: no cached graph or recompile count carries over
            be = m.backend(args.compiler)
            step = torch.compile(model, backend=be)
            t0 = time.perf_counter()
            results = [run_item(step, model, it, tok, correct_every=m.correct_every, on_step=lambda _: bar.update(1)) for it in items]
            runs.append({**m.as_dict(), "seconds": time.perf_counter() - t0, **summarise(items, results),
                         "sites": dict(be.report.counters), "graphs": be.report.graphs,
                         "items": [_item_record(it, r) for it, r in zip(items, results)]})
    torch._dynamo.reset()
    return {
        "command": "python -m lychee_fx eval " + shlex.join(args.argv),
        "date": datetime.date.today().isoformat(),
        "seconds": time.perf_counter() - t_start,
        "versions": _versions(),
        "model": {"name": args.model or "smollm2-135m (embedded)", "layers": layers, "kv_heads": hkv,
                  "query_heads": cfg.num_attention_heads, "max_positions": getattr(cfg, "max_position_embeddings", None),
                  "dtype": str(next(model.parameters()).dtype), "device": str(device)},
        "compiler": args.compiler, "seed": args.seed,
        "grid": dataclasses.asdict(grid),
        "learned_map": {"present": learned is not None, "where": learned_where},
        "lychee_map": lychee_label,
        "reference": {**reference, "items": [_item_record(it, it.ref) for it in items]},
        "runs": runs,
    }


def _item_record(item, result: dict) -> dict:
    rec = {"name": item.name, "context": item.context, **item.meta}
    keep = ("found", "text", "score") if item.task == "passkey" else ("nll", "tokens")
    rec.update({k: result[k] for k in keep})
    rec["ms_per_step"] = 1000 * sum(result["seconds"]) / max(1, len(result["seconds"]))
    return rec


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    from lychee_fx.apps.eval_report import write_report

    try:
        grid = _grid(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        data = run_eval(args, grid, progress=not args.no_progress)
    except (FileNotFoundError, ModuleNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    paths = write_report(data, out)
    text = paths["markdown"].read_text()
    start = text.find("## Headline")
    print(text[start : text.find("\nWhat the methods are", start)].rstrip())
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {data['seconds']:.0f} s")
    return 0
