"""``python -m lychee_fx eval``: quality of lychee decoding against full attention, with 95%
intervals, at sample sizes that can tell a learned role map from a random one.

    python -m lychee_fx eval                     # the default grid (sized for one H200 run)
    python -m lychee_fx eval --quick --out DIR   # a CI-sized smoke run
    python -m lychee_fx eval --model PATH --roles my.roles.json --maps m6.json,m12.json,m24.json

Tasks (``eval_tasks``): multi-passkey retrieval (exact match) over context lengths and
depths; perplexity of the last M tokens of long prose windows, scored one decode step at a
time; greedy agreement with full attention over the first T generated tokens. Methods
(``eval_methods``): full attention, the learned map over the whole (budget, block size)
grid, random maps (several seeds), a TidalDecode schedule and a DuoAttention-style baseline
with the same retrieval heads, the sink + recent lower bound, extra maps (``--maps``) for
the cost-quality curve, and a cache-correction variant. Intervals (``eval_stats``,
``eval_summary``): seeded percentile bootstrap over prompts / windows, paired against full
attention for the targets. Writes ``results.json``, ``results.md`` and PNG plots
(``eval_report``) to ``--out``.

Prompts of one task and one token length are batched (``--batch``: 32 on CUDA, 1 on the
CPU), prefilled once densely, and every method decodes from a copy of that cache; the dense
(plain, uncompiled) model's results are the reference. The caches stay on the device while
the methods decode, so the batches run in rounds whose caches fit ``--cache-gib`` (one round
unless the grid is large). Each backend method is compiled once per round with
``dynamic=True`` after ``torch._dynamo.reset()``, so every context length and batch size
reuses one graph (a batch of 1 gets its own: Dynamo specialises sizes 0 and 1). The backend
runs with ``compiler="eager"`` by default: the rewritten graph's ops run the Triton kernels
on CUDA, their torch implementations on the CPU. Deterministic given ``--seed`` on a given
machine, thread count and batch size.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["Grid", "DEFAULT", "QUICK", "main", "run_eval", "estimate"]


@dataclasses.dataclass(frozen=True)
class Grid:
    """What the eval measures; every field has a command-line flag."""

    lengths: tuple[int, ...] = (1024, 2048, 4096, 8000)  # passkey context lengths (tokens, exact)
    prompts_per_length: int = 64
    num_keys: int = 2
    text_length: int = 8000  # tokens of prose per perplexity / agreement window
    texts: int = 48
    score_tokens: int = 64  # M: perplexity over the last M tokens, one decode step each
    agree_tokens: int = 32  # T: greedy tokens compared with full attention
    budgets: tuple[int, ...] = (256, 512, 1024, 2048)  # the learned map's budgets
    block_sizes: tuple[int, ...] = (16, 64)  # the learned map's block sizes
    family_budgets: tuple[int, ...] = (256,)  # random, tidal, duo: here and at the headline
    random_seeds: int = 3
    map_budgets: tuple[int, ...] = (256, 1024)  # extra maps (--maps), at the headline block size
    sink: int = 64
    recent: int = 64
    headline: tuple[int, int] = (1024, 64)  # (budget, block size) of the headline table
    correct_every: int = 16  # SPEC 1.3 variant of lychee at the headline options; 0 = off
    batch: int = 0  # rows per decode batch; 0 = 32 on CUDA, 1 on the CPU
    resamples: int = 2000  # bootstrap resamples per interval


DEFAULT = Grid()
QUICK = Grid(
    lengths=(256, 384), prompts_per_length=2, num_keys=2, text_length=320, texts=2, score_tokens=12,
    agree_tokens=12, budgets=(64, 128), block_sizes=(16,), family_budgets=(64,), random_seeds=2, map_budgets=(64, 128),
    sink=16, recent=16, headline=(128, 16), correct_every=4, resamples=1000,
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
    p.add_argument("--methods", default=None, help="comma-separated subset of: full, lychee, map, random, tidal, duo, sink+recent")
    p.add_argument("--maps", default=None, help="comma-separated role map JSON files, each evaluated as method 'map' labelled "
                                               "by its retrieval KV head count (the cost-quality curve)")
    p.add_argument("--haystack", default=None, help="UTF-8 text file for passkeys and perplexity (default: Python's pydoc topics)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--cache-gib", type=float, default=None,
                   help="GiB of prefilled caches held at once: the batches run in rounds that fit it, each round "
                        "prefilled, decoded by the reference and every method, then freed (default: 45%% of the "
                        "GPU's memory on CUDA, no limit on the CPU)")
    g = p.add_argument_group("grid (defaults: the default grid, or the quick one with --quick)")
    g.add_argument("--lengths", type=_ints)
    g.add_argument("--prompts-per-length", type=int)
    g.add_argument("--num-keys", type=int)
    g.add_argument("--text-length", type=int)
    g.add_argument("--texts", type=int)
    g.add_argument("--score-tokens", type=int)
    g.add_argument("--agree-tokens", type=int)
    g.add_argument("--budgets", type=_ints, help="the learned map's budgets")
    g.add_argument("--block-sizes", type=_ints, help="the learned map's block sizes")
    g.add_argument("--family-budgets", type=_ints, help="budgets (besides the headline) of random, tidal and duo")
    g.add_argument("--random-seeds", type=int, help="random maps, one per seed")
    g.add_argument("--map-budgets", type=_ints, help="budgets of the --maps methods")
    g.add_argument("--sink", type=int)
    g.add_argument("--recent", type=int)
    g.add_argument("--headline", type=_ints, help="budget,block_size of the headline table")
    g.add_argument("--correct-every", type=int, help="cache correction period for the variant, 0 = off")
    g.add_argument("--batch", type=int, help="rows per decode batch (default: 32 on CUDA, 1 on the CPU)")
    g.add_argument("--resamples", type=int, help="bootstrap resamples per interval (>= 1000)")
    return p


def _grid(args) -> Grid:
    grid = QUICK if args.quick else DEFAULT
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(Grid) if getattr(args, f.name, None) is not None}
    if "headline" in changes and len(changes["headline"]) != 2:
        raise ValueError(f"--headline takes budget,block_size, got {changes['headline']}")
    for name, low in (("batch", 0), ("resamples", 1000), ("random_seeds", 1), ("prompts_per_length", 1), ("texts", 0)):
        if name in changes and changes[name] < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {changes[name]}")
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


def estimate(methods, batches) -> dict:
    """Batched decode steps: per method (the reference runs the same), in all, and the
    prompt tokens prefilled."""
    per = sum(b.decode_steps for b in batches)
    return {"batches": len(batches), "rows": sum(b.size for b in batches), "steps_per_method": per,
            "methods": len(methods), "steps_total": per * (len(methods) + 1),
            "prefill_tokens": sum(b.size * (b.ids.shape[1] - 1) for b in batches)}


def _load_maps(spec: str | None, layers: int, hkv: int) -> list:
    """(HeadRoles, label) of each file in the comma-separated ``spec``."""
    from lychee_fx.apps.shipped_roles import check_fits
    from lychee_fx.roles import HeadRoles

    out = []
    for path in [x.strip() for x in (spec or "").split(",") if x.strip()]:
        roles = HeadRoles.load(path)
        check_fits(roles, layers, hkv, source=path)
        out.append((roles, f"role map {Path(path).name}"))
    return out


def _run_method(model, m, batches, tok, ref, compiler: str, bar) -> dict:
    """Every batch decoded with method ``m``: per-batch results, costs, graph and trace counts."""
    from lychee_fx.apps.eval_tasks import run_batch

    torch._dynamo.reset()  # a fresh trace per method: no cached graph or recompile count carries over
    torch._dynamo.utils.counters.clear()
    be = m.backend(compiler) if m.uses_backend else None
    step = torch.compile(model, backend=be, dynamic=True) if be is not None else model
    results, costs = [], []
    with m.attention(model):
        for b, r in zip(batches, ref):
            out, cost = run_batch(step, model, b, tok, correct_every=m.correct_every, reference=r, on_step=lambda _: bar.update(1))
            results.append(out)
            costs.append(cost)
    frames = int(torch._dynamo.utils.counters["frames"]["ok"])
    return {"results": results, "costs": costs, "graphs": be.report.graphs if be else 0, "traces": frames,
            "sites": dict(be.report.counters) if be else {}}


def _cost(costs: list[dict], firsts: Sequence[int] = (0,)) -> dict:
    """Seconds, steps and the overhead of the batches in ``firsts`` (each round's first: the
    compile, for a compiled method) over the other batches' median per-step rate."""
    secs = [c["seconds"] for c in costs]
    steps = [c["decode_steps"] for c in costs]
    rest = [s / n for i, (s, n) in enumerate(zip(secs, steps)) if i not in firsts]
    rate = statistics.median(rest) if rest else secs[0] / steps[0]
    over = sum(max(0.0, secs[i] - steps[i] * rate) for i in firsts)
    return {"seconds": sum(secs), "decode_steps": sum(steps), "ms_per_step": 1000 * rate,
            "first_batch_overhead_s": over, "corrections": sum(c["corrected"] for c in costs)}


def plan_rounds(batches, per_token: int, limit: float | None) -> list[list[int]]:
    """Consecutive groups of batch indices whose prefilled caches (prompt tokens x
    ``per_token`` bytes) stay within ``limit`` bytes; one group when ``limit`` is None. A batch
    larger than the limit alone makes a round of its own (the out-of-memory message then says
    what to lower)."""
    rounds: list[list[int]] = [[]]
    held = 0
    for i, b in enumerate(batches):
        need = b.size * (b.ids.shape[1] - 1) * per_token
        if rounds[-1] and limit is not None and held + need > limit:
            rounds.append([])
            held = 0
        rounds[-1].append(i)
        held += need
    return rounds


def run_eval(args, grid: Grid, progress: bool, on_method=None) -> dict:
    """Load, batch, prefill, run the reference and every method; the results as a dict. The
    batches run in rounds whose prefilled caches fit ``--cache-gib`` (``plan_rounds``): each
    round is prefilled, decoded by the reference and every method, then freed; a method's
    results are the rounds' in batch order, as one round would give them.

    ``on_method``, when given, is called after each method of the last round with the results
    so far (the same dict, ``partial`` saying how many methods are done), so that a run cut
    short (a time limit, an interrupt) keeps what it measured."""
    from lychee_fx.apps.decoding import pick_device
    from lychee_fx.apps.embedded import kv_heads, load_model, num_layers
    from lychee_fx.apps.eval_methods import FAMILIES, build_methods
    from lychee_fx.apps.eval_summary import check_targets, summarise
    from lychee_fx.apps.eval_tasks import (build_passkey_items, build_text_items, cache_bytes, make_batches,
                                           prefill_batches, run_batch)
    from lychee_fx.apps.passkey import haystack_text
    from lychee_fx.apps.progress import Progress
    from lychee_fx.apps.shipped_roles import choose_roles, learned_map

    t_start = time.perf_counter()
    device = pick_device(args.device)
    model, tok = load_model(args.model, device=device)
    t_load = time.perf_counter() - t_start
    cfg = model.config
    layers, hkv = num_layers(cfg), kv_heads(cfg)
    grid = _fit_lengths(grid, getattr(cfg, "max_position_embeddings", None))
    batch = grid.batch or (32 if device.type == "cuda" else 1)
    lychee_roles, lychee_label = choose_roles(args.model, layers, hkv, args.roles)
    learned, learned_where = learned_map(args.model)
    maps = _load_maps(args.maps, layers, hkv)
    families = FAMILIES if args.methods is None else tuple(x.strip() for x in args.methods.split(",") if x.strip())
    methods = build_methods(
        lychee_roles, lychee_label, budgets=grid.budgets, block_sizes=grid.block_sizes, sink=grid.sink,
        recent=grid.recent, headline=grid.headline, family_budgets=grid.family_budgets, correct_every=grid.correct_every,
        seed=args.seed, random_seeds=grid.random_seeds, families=families, maps=maps, map_budgets=grid.map_budgets,
    )

    hay = haystack_text(args.haystack)
    items = build_passkey_items(tok, grid.lengths, grid.prompts_per_length, grid.num_keys, args.seed, hay)
    if grid.texts:
        items += build_text_items(tok, grid.text_length, grid.texts, grid.score_tokens, grid.agree_tokens, args.seed, hay)
    batches = make_batches(items, batch)
    est = estimate(methods, batches)
    per_token = _kv_bytes_per_token(model)
    limit = _cache_limit(args.cache_gib, device)
    rounds = plan_rounds(batches, per_token, limit)
    print(f"eval: {est['methods']} methods + the reference, {est['rows']} prompts in {est['batches']} batches (batch {batch}), "
          f"{est['steps_per_method']} batched decode steps per method, {est['steps_total']} in all; "
          f"{est['prefill_tokens']} prompt tokens to prefill (their caches: about "
          f"{est['prefill_tokens'] * per_token / 2**30:.1f} GiB, held "
          + (f"in {len(rounds)} rounds of at most {limit / 2**30:.1f} GiB" if len(rounds) > 1 else "for the whole run")
          + f"); model loaded in {t_load:.0f} s", file=sys.stderr)

    kw = {"seed": args.seed, "resamples": grid.resamples}
    nb = len(batches)
    ref, ref_costs = [None] * nb, [None] * nb
    got = [{"results": [None] * nb, "costs": [None] * nb, "graphs": 0, "traces": 0, "sites": {}} for _ in methods]
    firsts = [idx[0] for idx in rounds]
    runs: list[dict] = []
    t_prefill = 0.0
    reference = ref_cost = None

    def results() -> dict:
        return {
            "command": "python -m lychee_fx eval " + shlex.join(args.argv),
            "date": datetime.date.today().isoformat(),
            "seconds": time.perf_counter() - t_start,
            "partial": {"methods_done": len(runs), "methods": len(methods)},
            "timing": {"load_s": t_load, "prefill_s": t_prefill, "reference_s": ref_cost["seconds"],
                       "methods_s": sum(r["seconds"] for r in runs)},
            "estimate": {**est, "batch": batch, "rounds": len(rounds)},
            "versions": _versions(),
            "model": {"name": args.model or "smollm2-135m (embedded)", "layers": layers, "kv_heads": hkv,
                      "query_heads": cfg.num_attention_heads, "max_positions": getattr(cfg, "max_position_embeddings", None),
                      "dtype": str(next(model.parameters()).dtype), "device": str(device)},
            "compiler": args.compiler, "seed": args.seed,
            "grid": {**dataclasses.asdict(grid), "batch": batch},
            "learned_map": {"present": learned is not None, "where": learned_where},
            "lychee_map": lychee_label,
            "reference": reference,
            "runs": runs,
            "targets": {f"{b}/{bs}": check_targets(runs, b, bs, **kw) for b, bs in _target_points(grid)},
        }

    steps_of = [b.decode_steps for b in batches]
    for r_i, idx in enumerate(rounds):
        last = r_i == len(rounds) - 1
        sub = [batches[i] for i in idx]
        where = "" if len(rounds) == 1 else f" (round {r_i + 1} of {len(rounds)})"
        t0 = time.perf_counter()
        with _memory_hint(sub, len(rounds), device, "prefilling" + where), \
                Progress(sum(b.size * (b.ids.shape[1] - 1) for b in sub), "prefill (dense, once per batch)" + where,
                         unit="tok", enabled=progress) as bar:
            prefill_batches(model, sub, device, progress=bar.update)
        t_prefill += time.perf_counter() - t0
        held = cache_bytes(sub)
        print(f"prefilled caches held on {device.type}{where}: {held / 2**30:.1f} GiB"
              + (f" of {torch.cuda.get_device_properties(device).total_memory / 2**30:.1f}" if device.type == "cuda" else ""),
              file=sys.stderr)
        with _memory_hint(sub, len(rounds), device, "decoding the reference" + where), \
                Progress(sum(steps_of[i] for i in idx), "reference (plain model)" + where, unit="step", enabled=progress) as bar:
            for i in idx:
                out, ref_costs[i] = run_batch(model, model, batches[i], tok, on_step=lambda _: bar.update(1))
                for r in out:
                    if "nll" in r:
                        r["agreement"], r["first_divergence"] = 1.0, len(r["tokens"])
                ref[i] = out
        if last:
            ref_cost = _cost(ref_costs, firsts)
            print(f"reference: {ref_cost['ms_per_step']:.1f} ms per batched step; the methods at that rate: "
                  f"~{ref_cost['ms_per_step'] * est['steps_per_method'] * est['methods'] / 1000:.0f} s, plus a compile each"
                  + ("" if len(rounds) == 1 else " per round"), file=sys.stderr)
            ref_records = _records(batches, ref)
            reference = {**summarise(ref_records, **kw), **ref_cost, "items": ref_records}
        with _memory_hint(sub, len(rounds), device, "decoding the methods" + where), \
                Progress(sum(steps_of[i] for i in idx) * len(methods), "methods" + where, unit="step", enabled=progress) as bar:
            for m, acc in zip(methods, got):
                bar.set_description(m.key)
                one = _run_method(model, m, sub, tok, [ref[i] for i in idx], args.compiler, bar)
                for k, i in enumerate(idx):
                    acc["results"][i], acc["costs"][i] = one["results"][k], one["costs"][k]
                acc["graphs"] += one["graphs"]
                acc["traces"] += one["traces"]
                acc["sites"] = one["sites"]  # the same sites in every round: one compile per round of the same model
                if not last:
                    continue
                records = _records(batches, acc["results"])
                runs.append({**m.as_dict(), **_cost(acc["costs"], firsts), **summarise(records, **kw),
                             "graphs": acc["graphs"], "traces": acc["traces"], "sites": acc["sites"], "items": records})
                r = runs[-1]
                print(f"method {len(runs)}/{len(methods)} {m.key}: {r['seconds']:.0f} s ({r['ms_per_step']:.1f} ms per "
                      f"batched step, first-batch overhead {r['first_batch_overhead_s']:.0f} s)", file=sys.stderr)
                if on_method is not None and len(runs) < len(methods):
                    on_method(results())
        for b in sub:
            b.cache = None  # the next round's caches take this memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
    torch._dynamo.reset()
    return results()


def _kv_bytes_per_token(model) -> int:
    """K and V bytes one token adds to a cache of every layer (layers x 2 x KV heads x head dim)."""
    cfg = model.config
    from lychee_fx.apps.embedded import kv_heads, num_layers

    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * num_layers(cfg) * kv_heads(cfg) * head_dim * next(model.parameters()).element_size()


class EvalMemoryError(RuntimeError):
    """The device ran out of memory; the message says what the eval held and what to lower."""


def _cache_limit(gib: float | None, device) -> float | None:
    """Bytes of prefilled caches one round may hold: ``gib`` when given, else 45% of the GPU's
    memory on CUDA (the rest for the model, one batch's working copy and the methods'
    temporaries: on the H200 a 1.84M-token grid, 79 GiB of float32 caches, ran out in its
    first method) and no limit on the CPU."""
    if gib is not None:
        if gib <= 0:
            raise ValueError(f"--cache-gib must be > 0, got {gib}")
        return gib * 2**30
    if device.type == "cuda":
        return 0.45 * torch.cuda.get_device_properties(device).total_memory
    return None


@contextlib.contextmanager
def _memory_hint(batches, rounds: int, device, what: str):
    """Turn an out-of-memory error into one that says what the eval holds: a round's prefilled
    caches stay on the device while the reference and every method decode from them, so the
    round's prompt tokens, not one batch, set the memory it needs."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        from lychee_fx.apps.eval_tasks import cache_bytes

        held = cache_bytes([b for b in batches if b.cache is not None])
        rows = sum(b.size for b in batches)
        raise EvalMemoryError(
            f"{device.type} ran out of memory while {what}: the eval keeps the prefilled caches of the round's "
            f"{len(batches)} batches ({rows} prompts, {rounds} round(s) in all; {held / 2**30:.1f} GiB prefilled so far) "
            f"on the device, besides one batch's working copy; expected a round whose caches fit, got one that does "
            f"not. Lower --cache-gib (more, smaller rounds), --batch (the working copy), or the grid "
            f"(--prompts-per-length, --texts, --lengths). The device said: {str(e).splitlines()[0]}") from e


def _target_points(grid: Grid) -> list[tuple[int, int]]:
    """The headline, then each family budget at the headline block size."""
    pts = [tuple(grid.headline)]
    pts += [(b, grid.headline[1]) for b in grid.family_budgets if (b, grid.headline[1]) not in pts]
    return pts


def _records(batches, results) -> list[dict]:
    """One record per item (in batch order) from per-batch results."""
    out = []
    for b, res in zip(batches, results):
        for it, r in zip(b.items, res):
            rec = {"name": it.name, "task": it.task, "context": it.context, **it.meta}
            rec.update({k: r[k] for k in ("found", "text", "score", "nll", "tokens", "agreement", "first_divergence") if k in r})
            out.append(rec)
    return out


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
        data = run_eval(args, grid, progress=not args.no_progress, on_method=lambda d: write_report(d, args.out))
    except (FileNotFoundError, ModuleNotFoundError, ValueError, EvalMemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    paths = write_report(data, out)
    text = paths["markdown"].read_text()
    start = text.find("## Headline")
    print(text[start : text.find("\nWhat the methods are", start)].rstrip())
    start = text.find("## Targets")
    if start >= 0:
        print("\n" + text[start : text.find("\n## ", start + 3)].rstrip())
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {data['seconds']:.0f} s")
    return 0
