"""``python -m lychee_fx demo``: compile a model with the backend, generate, compare with full
attention.

    python -m lychee_fx demo                          # embedded SmolLM2-135M-Instruct, built-in prompt
    python -m lychee_fx demo --model PATH --prompt-file doc.txt --roles my.roles.json

Loads the model (default: the embedded SmolLM2-135M-Instruct), builds a long prompt (default:
a document of Python's own documentation with a passkey hidden a quarter of the way in and a
question about it at the end), prefills it once, then generates greedily twice from that
cache with ``model.generate``: with full attention, and after ``model.compile(backend=...)``
with the lychee backend and a role map (the shipped learned map when present, else the
stated default). Prints both answers, decode tokens per second, the share of generated
tokens that agree, and which attention sites were rewritten.

Both runs use the same compiler and the same decoding path. ``--path static`` (default): a
static cache and ``generate(compile_config=CompileConfig(backend=...))``, which compiles the
decode step once and on CUDA runs it under CUDA graphs (HF's own fast path); the full attention
run compiles with the same compiler. ``--path dynamic``: a dynamic cache and
``model.compile(backend=...)`` (the plain model for full attention under ``eager``); on a CPU
its cache grows by ``torch.cat`` every token, a copy of the whole cache in every layer (45% of
an eager step's time at 3K tokens, 2026-12-01), which the static cache does not pay. ``--compiler auto``
(default) is ``inductor`` on CUDA, where Inductor turns the lychee ops into generated Triton
kernels, and ``eager`` elsewhere (the backend's rewritten graph run eagerly). The output says
which path and compiler ran, the time to the first tokens (compiling included) and the decode
speed after them, separately. ``--dtype auto`` (default) decodes in bfloat16 on CUDA and in
float32 elsewhere; both runs use it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

__all__ = ["main", "builtin_prompt", "file_prompt"]

# The built-in prompt: a passkey at this depth of a document of about --context tokens.
_DEPTH, _SEED = 0.25, 1


def builtin_prompt(tokenizer, context: int):
    """(ids (1, T), question, expected answer): a passkey a quarter of the way into prose."""
    from lychee_fx.apps.passkey import make_passkey_prompt

    p = make_passkey_prompt(tokenizer, context, num_keys=1, depths=[_DEPTH], seed=_SEED)
    question = "What is magic code number 1? (hidden once, a quarter of the way into the document)"
    return p.input_ids, question, p.passkeys[0]


def file_prompt(tokenizer, path: str):
    """(ids (1, T), None, None) for the text of a UTF-8 file, used verbatim."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompt file not found: {str(file)!r}; expected a UTF-8 text file")
    ids = tokenizer(file.read_text(encoding="utf-8"), return_tensors="pt")["input_ids"]
    if ids.shape[1] < 2:
        raise ValueError(f"the prompt file {str(file)!r} holds {ids.shape[1]} token(s); expected at least 2")
    return ids, None, None


class _Timed:
    """A ``generate`` streamer: a progress bar per token and the time each token arrived."""

    def __init__(self, bar):
        self.bar, self.times, self._prompt_seen = bar, [], False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first streams the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.bar.update(1)

    def end(self) -> None:
        pass


def _generate(model, ids, cache, new_tokens: int, label: str, progress: bool, **kwargs) -> dict:
    """Greedy ``model.generate`` from a prefilled cache; tokens and timing."""
    from lychee_fx.apps.decoding import cache_kwarg
    from lychee_fx.apps.progress import Progress

    counters = torch._dynamo.utils.counters
    counters.clear()
    with Progress(new_tokens, f"generate: {label}", unit="tok", enabled=progress) as bar:
        timed = _Timed(bar)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, streamer=timed,
                                 **{cache_kwarg(model): cache}, **kwargs)
    tokens = out[0, ids.shape[1]:].tolist()
    t = timed.times
    # The first two decode steps compile (a graph for the first KV length, then one with a
    # symbolic length): the steady rate is measured after them.
    warm = 3
    rate = (len(t) - warm) / (t[-1] - t[warm - 1]) if len(t) > warm else float("nan")
    gaps = [b - a for a, b in zip(t[warm - 1 :], t[warm:])]
    slowest = max(range(len(gaps)), key=gaps.__getitem__) if gaps else None
    return {"tokens": tokens, "tokens_per_s": rate, "first_tokens_s": (t[warm - 1] - t0) if len(t) >= warm else float("nan"),
            "median_token_ms": 1000 * statistics.median(gaps) if gaps else float("nan"),
            "slowest_token": None if slowest is None else (warm + slowest + 1, 1000 * gaps[slowest]),
            "compiles": _compile_counts(counters)}


def _compile_counts(counters) -> dict:
    """What Dynamo and Inductor did during one generate call: frames and graphs compiled, and
    the times Inductor skipped CUDA graphs (``TORCH_LOGS=perf_hints`` prints why)."""
    frames = int(counters["frames"]["ok"])
    return {"frames": frames, "unique_graphs": int(counters["stats"]["unique_graphs"]),
            "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"])}


def _site_lines(report) -> list[str]:
    """Compact: counts, then the roles of the last graph's rewritten sites by layer."""
    c = report.counters
    lines = [f"{c['found']} attention site(s) in {report.graphs} graph(s): {c['rewritten']} rewritten, {c['declined']} declined"]
    for key, n in sorted(c.items()):
        if key.startswith("declined: "):
            lines.append(f"  {n} x {key}")
    last = [s for s in report.rewritten if s.graph == max(x.graph for x in report.rewritten)] if report.rewritten else []
    if last:
        cells = []
        for s in sorted(last, key=lambda s: s.layer):
            heads = s.kv_heads or (max(s.retrieval_heads + s.sparse_heads) + 1)
            cells.append("".join("R" if h in s.retrieval_heads else "s" for h in range(heads)))
        n = last[0].kv_len if last[0].kv_len.isdigit() else "symbolic"
        lines.append(f"  graph {last[0].graph}, KV heads by layer (R retrieval, s sparse; KV length {n}):")
        for i in range(0, len(cells), 10):
            lines.append("    " + " ".join(f"{i + j:>2}:{cell}" for j, cell in enumerate(cells[i : i + 10])))
    return lines


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lychee_fx demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local path or cached Hugging Face id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompt-file", default=None, help="a UTF-8 text file used verbatim as the prompt")
    p.add_argument("--context", type=int, default=3000, help="tokens of the built-in prompt (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=40, help="tokens to generate (default: %(default)s)")
    p.add_argument("--roles", default=None, help="role map JSON (default: the shipped learned map, else the stated default)")
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--recent", type=int, default=64)
    p.add_argument("--compiler", choices=["auto", "eager", "inductor"], default="auto",
                   help="for both runs (default: inductor on CUDA, else eager)")
    p.add_argument("--path", choices=["auto", "static", "dynamic"], default="auto",
                   help="static: static cache and generate(compile_config=...) (CUDA graphs on CUDA); dynamic: "
                        "dynamic cache and model.compile (default: static)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", *_DTYPES], default="auto",
                   help="the model's weights and cache: bfloat16 on CUDA and float32 elsewhere under auto (default)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print every attention site")
    return p


def run(args) -> dict:
    import lychee_fx
    from lychee_fx.apps.decoding import clone_cache, pick_device, prefill
    from lychee_fx.apps.embedded import kv_heads, load_model, num_layers
    from lychee_fx.apps.progress import Progress
    from lychee_fx.apps.shipped_roles import choose_roles

    progress = not args.no_progress
    if args.new_tokens < 1:
        raise ValueError(f"--new-tokens must be >= 1, got {args.new_tokens}")
    # Options are checked before the model loads: errors come in seconds, not minutes.
    options = lychee_fx.DecodeOptions(budget=args.budget, block_size=args.block_size, sink=args.sink, recent=args.recent)
    device = pick_device(args.device)
    compiler = args.compiler if args.compiler != "auto" else ("inductor" if device.type == "cuda" else "eager")
    path = args.path if args.path != "auto" else "static"
    dtype = _DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, device=device, dtype=dtype)
    cfg = model.config
    roles, roles_text = choose_roles(args.model, num_layers(cfg), kv_heads(cfg), args.roles)
    if args.prompt_file:
        ids, question, expected = file_prompt(tok, args.prompt_file)
    else:
        ids, question, expected = builtin_prompt(tok, args.context)
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit and ids.shape[1] + args.new_tokens > limit:
        raise ValueError(f"prompt ({ids.shape[1]} tokens) + --new-tokens ({args.new_tokens}) exceeds the model's "
                         f"{limit} positions; expected at most {limit} (use a shorter prompt or --context)")
    ids = ids.to(device)
    print(f"model: {args.model or 'smollm2-135m (embedded SmolLM2-135M-Instruct)'}: {num_layers(cfg)} layers, "
          f"{cfg.num_attention_heads} query heads, {kv_heads(cfg)} KV heads; {device}, {str(dtype).removeprefix('torch.')}, loaded in {time.perf_counter() - t0:.0f} s")
    print(f"prompt: {ids.shape[1]} tokens" + (f"; question: {question}" if question else f" from {args.prompt_file}"))
    print(f"roles: {roles!r}\n  {roles_text}")
    print(f"lychee options: budget {options.budget}, block size {options.block_size}, sink {options.sink}, recent {options.recent}")
    print(f"path: {_PATHS[path]}; compiler {compiler}\n")

    be = lychee_fx.backend(roles, compiler=compiler, **options.as_dict())
    if path == "static":
        full, lychee, prefill_s = _run_static(model, ids, args.new_tokens, compiler, be, progress)
    else:
        t1 = time.perf_counter()
        with Progress(ids.shape[1] - 1, "prefill (once, shared by both runs)", unit="tok", enabled=progress) as bar:
            cache = prefill(model, ids[:, :-1], progress=bar.update)
        prefill_s = time.perf_counter() - t1
        torch._dynamo.reset()
        if compiler == "inductor":
            model.compile(backend="inductor")
        full = _generate(model, ids, clone_cache(cache), args.new_tokens, "full attention", progress)
        torch._dynamo.reset()
        model.compile(backend=be)
        lychee = _generate(model, ids, clone_cache(cache), args.new_tokens, "lychee", progress)
    torch._dynamo.reset()
    bound = _bytes_bound(model, roles, options, ids.shape[1])
    return {"tok": tok, "full": full, "lychee": lychee, "report": be.report, "expected": expected, "path": path,
            "bound": bound,
            "compiler": compiler, "device": str(device), "threads": torch.get_num_threads(),
            "prefill_s": prefill_s, "prompt_tokens": ids.shape[1], "seconds": time.perf_counter() - t0}


def _bytes_bound(model, roles, options, context: int) -> dict:
    """What a decode step reads at ``context`` tokens: weights and KV cache bytes, the KV bytes
    the sparse heads skip, and the speed-up that skipping them alone could give (the step's
    other costs unchanged): a model whose step is weight-bound cannot gain much."""
    from lychee_fx.apps.embedded import kv_heads

    cfg = model.config
    elem = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) * elem
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_head = 2 * context * hd * elem  # K and V of one KV head
    kv = roles.num_layers * kv_heads(cfg) * per_head
    sparse = roles.num_layers * kv_heads(cfg) - roles.num_retrieval
    skipped = sparse * per_head * max(0.0, 1 - options.budget / context)
    return {"weights": weights, "kv": kv, "skipped": skipped, "max_speedup": (weights + kv) / (weights + kv - skipped),
            "group": cfg.num_attention_heads // kv_heads(cfg)}


# --dtype auto: bfloat16 on CUDA (the precision a GPU decodes in: half the bytes, and no float32
# GEMMs, which run without TF32 unless the user asks), float32 on a CPU
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_PATHS = {
    "static": "static cache, generate(compile_config=lychee_fx.compile_config(...)): the decode step "
              "compiled once (CUDA graphs on CUDA, no Dynamo guards through the model object)",
    "dynamic": "dynamic cache, model.compile(backend=...), then generate()",
}


def _run_static(model, ids, new_tokens: int, compiler: str, be, progress: bool):
    """Both runs on HF's compiled path: a static cache prefilled once (each run decodes from its
    own copy), ``generate(compile_config=...)`` with the compiler for full attention and the
    lychee backend for lychee, both with ``generate_config.fast_guard_options`` (what
    ``lychee_fx.compile_config`` sets: the same host work per token on both sides)."""
    from transformers import CompileConfig

    from lychee_fx.apps.decoding import clone_cache, prefill_static
    from lychee_fx.generate_config import fast_guard_options

    t1 = time.perf_counter()
    cache = prefill_static(model, ids[:, :-1], ids.shape[1] + new_tokens)
    prefill_s = time.perf_counter() - t1
    runs = {}
    for label, backend in (("full attention", compiler), ("lychee", be)):
        torch._dynamo.reset()
        # CUDA graphs are an Inductor option; the eager backend takes none (it would warn)
        cc = CompileConfig(backend=backend, mode=None, options=fast_guard_options(cuda_graphs=compiler == "inductor"))
        if ids.device.type != "cuda":
            cc._compile_all_devices = True  # HF compiles only on accelerators unless told
        runs[label] = _generate(model, ids, clone_cache(cache), new_tokens, label, progress, compile_config=cc)
    return runs["full attention"], runs["lychee"], prefill_s


def _print_results(res: dict, verbose: bool) -> None:
    from lychee_fx.apps.decoding import agreement

    tok, full, ly = res["tok"], res["full"], res["lychee"]
    print()
    for name, r in (("full attention", full), ("lychee", ly)):
        text = tok.decode(r["tokens"], skip_special_tokens=True)
        found = "" if res["expected"] is None else ("  [correct]" if res["expected"] in text else "  [passkey missing]")
        print(f"{name:>14}: {text!r}{found}")
    if res["expected"] is not None:
        print(f"{'expected':>14}: {res['expected']!r}")
    share, first = agreement(full["tokens"], ly["tokens"])
    print(f"\nagreement: {share:.1%} of generated tokens equal full attention's "
          f"({len(ly['tokens'])} vs {len(full['tokens'])} tokens; first difference at token {first})")
    ratio = ly["tokens_per_s"] / full["tokens_per_s"] if full["tokens_per_s"] else float("nan")
    where = f"{res['device']}" + (f", {res['threads']} threads" if res["device"] == "cpu" else "")
    print(f"decode speed: full attention {full['tokens_per_s']:.1f} tokens/s, lychee {ly['tokens_per_s']:.1f} tokens/s "
          f"({ratio:.2f}x) at {res['prompt_tokens']} tokens of context, after the first 3 tokens ({where}, "
          f"{res['path']} path, compiler {res['compiler']})")
    print(f"first 3 tokens (compiling included): full attention {full['first_tokens_s']:.1f} s, "
          f"lychee {ly['first_tokens_s']:.1f} s")
    for name, r in (("full attention", full), ("lychee", ly)):
        slow = r["slowest_token"]
        c = r["compiles"]
        print(f"  {name}: median token {r['median_token_ms']:.2f} ms" + (f", slowest token {slow[0]} at {slow[1]:.1f} ms" if slow else "")
              + f"; Dynamo compiled {c['unique_graphs']} graph(s) in {c['frames']} frame(s)"
              + (f", Inductor skipped CUDA graphs {c['cudagraph_skips']} time(s)" if c.get("cudagraph_skips") else ""))
    b = res["bound"]
    print(f"a decode step reads {b['weights'] / 1e6:.0f} MB of weights and {b['kv'] / 1e6:.0f} MB of KV cache; "
          f"lychee's sparse heads skip {b['skipped'] / 1e6:.0f} MB of it: at most {b['max_speedup']:.2f}x from reading "
          f"less" + (" (a weight-bound step: little to gain at this context)" if b["max_speedup"] < 1.15 else ""))
    if res["path"] == "static" and b["group"] > 1:
        print(f"  (full attention does more than read the cache once here: with a static cache HF copies K and V "
              f"for each of the {b['group']} query heads of a group before attention, which lychee's rewrite folds "
              f"away; a speed-up beyond the bound above comes from that)")
    print(f"prefill: {res['prompt_tokens'] - 1} tokens in {res['prefill_s']:.1f} s; total {res['seconds']:.0f} s\n")
    print("lychee_fx: " + "\n".join(_site_lines(res["report"])))
    if verbose:
        print(res["report"].summary())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        res = run(args)
    except (FileNotFoundError, ModuleNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_results(res, args.verbose)
    return 0
