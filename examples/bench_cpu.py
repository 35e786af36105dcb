"""The main job's decode speed on a CPU: lychee against full attention, threads x contexts.

    python examples/bench_cpu.py --out results/ [--contexts 2048,4096,8192] [--threads 1,2] [--compiler eager]

The embedded SmolLM2-135M-Instruct, the demo's built-in passkey prompt at each context and
the demo's defaults (the shipped learned map, budget 1024, block 64, sink and recent 64, the
static path: a static cache and ``generate(compile_config=CompileConfig(backend=...))``, the
same compiler for both). Each context is prefilled once; every (threads, method) decodes from
its own copy of that cache. Per row: tokens/s after the first 3 tokens (each token's arrival
time through a streamer), the first 3 tokens' seconds (compiling included, a fresh Dynamo per
run), and the step's bytes (weights, KV cache, what the sparse heads skip). Prints a table,
writes ``bench_cpu.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
from bench_attention import code_info, ints

import lychee_fx


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--contexts", type=ints, default=[2048, 4096, 8192])
    p.add_argument("--threads", type=ints, default=[1, 2])
    p.add_argument("--compiler", choices=["eager", "inductor"], default="eager")
    p.add_argument("--new-tokens", type=int, default=24)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import transformers
    from transformers import CompileConfig

    from lychee_fx.apps.decoding import clone_cache, prefill_static
    from lychee_fx.apps.demo import _bytes_bound, _generate, builtin_prompt
    from lychee_fx.apps.embedded import kv_heads, load_model, num_layers
    from lychee_fx.apps.shipped_roles import choose_roles

    model, tok = load_model(None)
    roles, roles_text = choose_roles(None, num_layers(model.config), kv_heads(model.config), None)
    opts = lychee_fx.DecodeOptions(budget=1024, block_size=64, sink=64, recent=64)
    info = {"date": datetime.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
            "cores": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
            "compiler": args.compiler, "path": "static", "roles": roles_text, "options": opts.as_dict(), **code_info()}
    rows = []
    for context in args.contexts:
        ids, _, _ = builtin_prompt(tok, context)
        torch.set_num_threads(max(args.threads))
        t = time.perf_counter()
        cache = prefill_static(model, ids[:, :-1], ids.shape[1] + args.new_tokens)
        prefill_s = time.perf_counter() - t
        bound = _bytes_bound(model, roles, opts, ids.shape[1])
        for threads in args.threads:
            torch.set_num_threads(threads)
            got = {}
            for method in ("full", "lychee"):
                torch._dynamo.reset()
                backend = args.compiler if method == "full" else lychee_fx.backend(roles, compiler=args.compiler,
                                                                                    **opts.as_dict())
                cc = CompileConfig(backend=backend)
                cc._compile_all_devices = True
                r = _generate(model, ids, clone_cache(cache), args.new_tokens, method, False, compile_config=cc)
                got[method] = r
                rows.append(dict(context=ids.shape[1], threads=threads, method=method, tokens_per_s=r["tokens_per_s"],
                                 first_tokens_s=r["first_tokens_s"], prefill_s=prefill_s, **bound))
                print(f"context {ids.shape[1]:5d} threads {threads} {method:6s}: {r['tokens_per_s']:6.2f} tokens/s, "
                      f"first 3 tokens {r['first_tokens_s']:.1f} s", flush=True)
            rows[-1]["speedup"] = got["lychee"]["tokens_per_s"] / got["full"]["tokens_per_s"]
            rows[-1]["agreement"] = sum(a == b for a, b in zip(got["full"]["tokens"], got["lychee"]["tokens"])) / len(
                got["full"]["tokens"])
        del cache
        report = {"env": info, "rows": rows}
        (args.out / "bench_cpu.json").write_text(json.dumps(report, indent=1))
    print(table({"env": info, "rows": rows}))


def table(report) -> str:
    out = [f"# main job decode on {report['env']['cpu']}, torch {report['env']['torch']}, compiler "
           f"{report['env']['compiler']}, static path, {report['env']['date']}",
           "| context | threads | full attention tokens/s | lychee tokens/s | lychee / full | first 3 tokens s (full, lychee) "
           "| weights / KV / skipped MB |",
           "|---|---|---|---|---|---|---|"]
    rows = report["rows"]
    for r in rows:
        if r["method"] != "lychee":
            continue
        f = next(x for x in rows if x["method"] == "full" and (x["context"], x["threads"]) == (r["context"], r["threads"]))
        out.append(f"| {r['context']} | {r['threads']} | {f['tokens_per_s']:.2f} | {r['tokens_per_s']:.2f} | "
                   f"{r['speedup']:.2f}x | {f['first_tokens_s']:.1f}, {r['first_tokens_s']:.1f} | "
                   f"{r['weights'] / 1e6:.0f} / {r['kv'] / 1e6:.0f} / {r['skipped'] / 1e6:.0f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
