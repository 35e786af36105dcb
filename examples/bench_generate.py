"""The user's path: ``model.generate()`` with a static cache and ``compile_config``, per token.

    python examples/bench_generate.py --out results/ --jobs [--model llama3-8b] [--contexts 32768,131072]
    python examples/bench_generate.py --tiny --device cpu --out /tmp/x      # a smoke run anywhere

What it times is what a user runs:

    model.generate(ids, attention_mask=..., past_key_values=cache, max_new_tokens=n,
                   do_sample=False, eos_token_id=<the vocabulary's last>, compile_config=CompileConfig(...))

with ``cache`` a ``StaticCache`` whose first ``context - 1`` slots hold random K/V (so the
prompt's prefill is one token: the decode steps are what is timed, and a 128K prompt's 12 s
prefill is not paid per run; generate() then compiles and runs the decode step exactly as
after a real prefill: same cache shape, same graph). Methods: ``hf_compiled``
(``CompileConfig()``: HF's Inductor with CUDA graphs), ``lychee_dense`` (every head retrieval),
``lychee_paper`` (the paper ratio, budget 4096), and variants of it: ``_cublas`` (without
``decode_linear``), ``_trees`` (Inductor's CUDA-graph trees instead of lychee's replay) and
``_fastguards`` (``lychee_fx.compile_config(...)``, the README's path: ``CompileConfig(mode=None,
options={"triton.cudagraphs": True, "guard_filter_fn":
torch.compiler.skip_guard_on_all_nn_modules_unsafe})``, Dynamo keeping no guards on the model
object; ``hf_compiled_fastguards`` is HF's Inductor with the same options, and
``lychee_dense_fastguards`` every head retrieval). Each (method, batch, context) compiles afresh (``torch._dynamo.reset()``), as
a user's process would.

Per row:

- ``ms``: per generated token, (t(n2) - t(n1)) / (n2 - n1) of two generate calls, median of
  ``--repeats`` pairs (the first tokens, prefill included, cancel out);
- the GPU's view of ``--profile-tokens`` tokens (``torch.profiler``): kernel time per token by
  family (``bench_decode.kernel_family``), launch gaps inside the step, and the GPU's idle
  time between steps: the host's share that the GPU waits for (HF syncs every token);
- ``ms_skip_guards``: the same with Dynamo's guards skipped
  (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``): what the guards cost per token;
- with ``--py-spy PATH`` (the py-spy binary), where the host's time goes while generating:
  py-spy samples this process and each sample is filed under HF's loop (its parts), Dynamo,
  AOTAutograd's wrapper, Inductor's CUDA-graph trees, the replay, or waiting for the GPU.

Floor = weights + the KV bytes the row must read, at the copy bandwidth measured in the same
run (``bench_decode.floor_ms``). Prints a table, writes ``bench_generate.json`` and a plot.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from bench_attention import code_info, ints, pyplot
from bench_decode import (BLOCK, BUDGET, MODELS, RECENT, SINK, _Solo, bandwidth, build, floor_ms, kernel_family,
                          machine_barrier, paper_roles, run_jobs)

import lychee_fx

METHODS = ("hf_compiled", "hf_compiled_fastguards", "lychee_dense", "lychee_dense_fastguards", "lychee_paper",
           "lychee_paper_cublas", "lychee_paper_trees", "lychee_paper_fastguards", "lychee_paper_nopool_fastguards")


def compile_config(meth: str, model, opts: dict, device: str):
    """HF's ``CompileConfig`` for a method, and its backend (None for HF's own Inductor).
    Suffixes: ``_fastguards``: ``lychee_fx.compile_config`` (the README's path), or for HF
    compiled the same options (``generate_config.fast_guard_options``) with HF's Inductor;
    ``_cublas``: no ``decode_linear``; ``_trees``: Inductor's CUDA-graph trees; ``_nopool``:
    no pooled layers (``backend(pool=False)``)."""
    from transformers import CompileConfig

    from lychee_fx.generate_config import fast_guard_options

    kind, *flags = meth.split("_")[1:]
    fast = "fastguards" in flags
    be = None
    if meth.startswith("lychee"):
        cfg = model.config
        roles = (paper_roles(cfg.num_hidden_layers, cfg.num_key_value_heads) if kind == "paper"
                 else lychee_fx.HeadRoles.all_retrieval(cfg.num_hidden_layers, cfg.num_key_value_heads))
        be = lychee_fx.backend(roles, linears="cublas" not in flags, pool="nopool" not in flags,
                               cuda_graphs="inductor" if "trees" in flags else "lychee", **opts)
    if be is not None:
        cc = lychee_fx.compile_config(be, fast_guards=fast)
    else:
        cc = CompileConfig(mode=None, options=fast_guard_options()) if fast else CompileConfig()
    if device != "cuda":
        cc._compile_all_devices = True  # HF compiles only on accelerators unless told
    return cc, be


class PrefilledCache:
    """A ``StaticCache`` of ``slots`` slots whose first ``context - 1`` hold random K/V; ``reset()``
    returns it to that state (the slots a generate call wrote are zeroed, the write position
    rewound), so every generate call starts from the same cache."""

    def __init__(self, model, batch: int, context: int, slots: int):
        from transformers import StaticCache

        self.cache = StaticCache(config=model.config, max_cache_len=slots)
        hd = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
        shape = (batch, model.config.num_key_value_heads, 1, hd)
        dev, dt = model.device, model.dtype
        for layer in self.cache.layers:  # allocate each layer's tensors by its own update path
            layer.update(torch.zeros(shape, device=dev, dtype=dt), torch.zeros(shape, device=dev, dtype=dt))
        g = torch.Generator(device=dev).manual_seed(1)
        self.start = context - 1
        for layer in self.cache.layers:
            layer.keys[:, :, : self.start].normal_(generator=g)
            layer.values[:, :, : self.start].normal_(generator=g)
        self.reset()

    def reset(self) -> None:
        for layer in self.cache.layers:
            layer.keys[:, :, self.start:].zero_()
            layer.values[:, :, self.start:].zero_()
            layer.cumulative_length.fill_(self.start)


def generate_s(model, ids, mask, pc: PrefilledCache, n: int, cc, sync) -> float:
    """Seconds of one ``generate`` call of ``n`` new tokens from the prefilled cache."""
    pc.reset()
    sync()
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, past_key_values=pc.cache, **_gen_kwargs(model, n, cc))
    sync()
    t = time.perf_counter() - t
    _check_length(out, ids, n)
    return t


def _gen_kwargs(model, n: int, cc) -> dict:
    """generate()'s arguments as a user's: greedy, ``n`` new tokens, a stopping token (the
    vocabulary's last, which the random model must not emit: ``_check_length``), no
    ``min_new_tokens`` (its logits processors cost 13% of the host's time in the first call)."""
    return dict(max_new_tokens=n, do_sample=False, compile_config=cc, pad_token_id=0,
                eos_token_id=model.config.vocab_size - 1)


def _check_length(out, ids, n: int) -> None:
    if out.shape[-1] != ids.shape[-1] + n:
        raise RuntimeError(f"generate() stopped early: expected {n} new tokens, got {out.shape[-1] - ids.shape[-1]} "
                           "(the model emitted the stopping token); the timing would be wrong")


# py-spy: a sample's innermost frame that matches decides its part, tested innermost first
HOST_PARTS = (
    ("waiting for the GPU", ("synchronize", "_has_unfinished_sequences", "stopcheck.__call__", "item (")),
    ("CUDA-graph replay", ("replay (", "cudagraphlaunch")),
    ("CUDA-graph trees", ("cudagraph_trees.py",)),
    ("Inductor wrapper", ("_inductor/output_code.py", "_inductor/utils.py", "compile_fx.py")),
    ("AOTAutograd wrapper", ("_aot_autograd/",)),
    ("Dynamo (guards, graph inputs)", ("_dynamo/", "torch::dynamo", "guard")),
    ("HF: prepare_inputs (masks)", ("prepare_inputs_for_generation", "create_masks_for_generate", "masking_utils")),
    ("HF: update kwargs", ("_update_model_kwargs_for_generation",)),
    ("HF: stopping criteria", ("stopping_criteria.py",)),
    ("HF: logits processors", ("logits_process.py",)),
    ("HF: model forward (Python)", ("modeling_", "cache_utils.py")),
    ("HF: generate loop", ("_sample (", "generation/utils.py")),
)


def host_parts(raw: Path) -> tuple[dict[str, float], dict[str, int]]:
    """Share of py-spy samples (raw format: 'frame;frame;... count') per part of ``HOST_PARTS``
    among the samples inside ``generate`` (matching is case-blind, innermost frame first), and
    the innermost frames of the samples no part claimed (what "other" is made of)."""
    counts: collections.Counter = collections.Counter()
    unclaimed: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if not n.isdigit() or not any(".generate (" in f and "generation/utils.py" in f for f in frames):
            continue
        part = "other"
        for frame in reversed(frames):
            low = frame.lower()
            hit = next((name for name, keys in HOST_PARTS if any(k in low for k in keys)), None)
            if hit:
                part = hit
                break
        counts[part] += int(n)
        if part == "other":
            unclaimed[";".join(frames[-2:])] += int(n)
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in counts.most_common()}, dict(unclaimed.most_common(12))


def py_spy_generate(py_spy: str, out: Path, run) -> dict | None:
    """Run ``run()`` while py-spy samples this process; returns the parts, or None if py-spy
    could not attach (the reason is printed)."""
    raw = out.with_suffix(".raw")
    for native in (["--native"], []):
        proc = subprocess.Popen([py_spy, "record", "--pid", str(os.getpid()), "--rate", "1000", "--idle", "--nonblocking",
                                 "--format", "raw", "--output", str(raw), *native],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.5)  # attach
        if proc.poll() is not None:
            print(f"py-spy {' '.join(native)} did not attach: {proc.stdout.read()[-300:]}", flush=True)
            continue
        run()
        proc.send_signal(2)  # SIGINT: py-spy writes its file and exits
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if raw.exists():
            parts, unclaimed = host_parts(raw)
            return {"native": bool(native), "parts": parts, "other_frames": unclaimed}
    return None


def _profile_generate(model, ids, mask, pc, n: int, cc):
    from torch.profiler import ProfilerActivity, profile

    pc.reset()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        model.generate(ids, attention_mask=mask, past_key_values=pc.cache, **_gen_kwargs(model, n, cc))
        torch.cuda.synchronize()
    families = collections.Counter()
    kernels = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us = getattr(e, "self_device_time_total", 0) or e.time_range.elapsed_us()
            families[kernel_family(e.name)] += us
            kernels.append(e)
    kernels.sort(key=lambda e: e.time_range.start)
    gaps = [max(b.time_range.start - a.time_range.end, 0) for a, b in zip(kernels, kernels[1:])]
    return prof, families, len(kernels), gaps


def gpu_view(model, ids, mask, pc, n: int, cc, path: Path) -> dict:
    """The GPU's share of a token: kernel time by family (``bench_decode.kernel_family``), the
    number of kernels, and the gaps between kernels split at 40 us (shorter: launch gaps inside
    a step; longer: the GPU idle, waiting for the host), per token as the difference of two
    profiled generate calls of 4 and 4 + ``n`` tokens (the prefill and the first tokens cancel)."""
    _, fam_a, count_a, gaps_a = _profile_generate(model, ids, mask, pc, 4, cc)
    prof, fam_b, count_b, gaps_b = _profile_generate(model, ids, mask, pc, 4 + n, cc)
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=45))

    def split(gaps):
        return sum(g for g in gaps if g <= 40), sum(g for g in gaps if g > 40)

    (short_a, long_a), (short_b, long_b) = split(gaps_a), split(gaps_b)
    fams = {k: (fam_b[k] - fam_a.get(k, 0)) / n for k in fam_b}
    return {
        "us_per_token_by_family": fams,
        "kernel_us_per_token": sum(fams.values()),
        "kernels_per_token": (count_b - count_a) / n,
        "launch_gap_us_per_token": (short_b - short_a) / n,
        "gpu_idle_us_per_token": (long_b - long_a) / n,
    }


def _settings(args):
    name = "tiny" if args.tiny else args.model
    contexts = args.contexts or ([256] if args.tiny else [32768, 131072])
    batches = args.batches or [1]
    opts = dict(budget=128, block_size=16, sink=16, recent=32) if args.tiny else dict(
        budget=BUDGET, block_size=BLOCK, sink=SINK, recent=RECENT)
    return name, contexts, batches, opts


def measure(meth: str, args, lock=None, barrier=None) -> tuple[list[dict], dict]:
    """Rows of one method: per (batch, context) a fresh compile, then the timed calls."""
    lock, barrier = lock or _Solo(), barrier or _Solo()
    name, contexts, batches, opts = _settings(args)
    n1, n2 = args.tokens
    slots = {c: c + n2 + 8 for c in contexts}
    model = build(name, max(slots.values()), args.device)
    cc, be = compile_config(meth, model, opts, args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    rows = []
    first = True
    mine = args.contexts_for.get(meth, contexts)
    for b in batches:
        for n in contexts:
            if n not in mine:  # keep step with the workers that run this point: the same two waits
                _wait(barrier)
                _wait(barrier)
                continue
            torch._dynamo.reset()
            pc = PrefilledCache(model, b, n, slots[n])
            ids = torch.randint(3, model.config.vocab_size, (b, n), device=args.device)
            mask = torch.ones_like(ids)
            t = time.perf_counter()
            generate_s(model, ids, mask, pc, 3, cc, sync)  # prefill, compile, CUDA-graph recording
            compile_s = time.perf_counter() - t
            generate_s(model, ids, mask, pc, 3, cc, sync)
            print(f"{meth:22s} B={b} N={n:6d}: compiled and warmed up in {compile_s:.1f} s", flush=True)
            _wait(barrier)  # every worker has compiled this point: no compile runs beside a timed call
            shared = None
            if first and args.sync_dir is not None:
                shared = machine_barrier(args.sync_dir, args.sync_count, args.sync_wait, meth)
            first = False
            with lock:
                bw = bandwidth(args.device)
                pairs = []
                for _ in range(args.repeats):
                    a = generate_s(model, ids, mask, pc, n1, cc, sync)
                    z = generate_s(model, ids, mask, pc, n2, cc, sync)
                    pairs.append((z - a) / (n2 - n1) * 1e3)
                ms = sorted(pairs)[len(pairs) // 2]
                row = dict(method=meth, batch=b, context=n, ms=ms, ms_pairs=pairs, tokens=[n1, n2],
                           tokens_per_s=b * 1e3 / ms, compile_s=compile_s, copy_bandwidth_TBps=bw / 1e12,
                           floor_ms=floor_ms(model, b, n, paper_roles(model.config.num_hidden_layers,
                                                                      model.config.num_key_value_heads)
                                             if "paper" in meth else None, bw, opts["budget"]))
                if shared:
                    row["machine_barrier"] = shared
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):  # [Note: guard cost]
                    a = generate_s(model, ids, mask, pc, n1, cc, sync)
                    z = generate_s(model, ids, mask, pc, n2, cc, sync)
                row["ms_skip_guards"] = (z - a) / (n2 - n1) * 1e3
                if args.device == "cuda":
                    row["gpu"] = gpu_view(model, ids, mask, pc, args.profile_tokens, cc,
                                          args.out / f"profile_{meth}_B{b}_N{n}.txt")
                if args.py_spy:
                    spy = py_spy_generate(args.py_spy, args.out / f"pyspy_{meth}_B{b}_N{n}",
                                          lambda: generate_s(model, ids, mask, pc, n2, cc, sync))
                    if spy:
                        row["host"] = spy
                if be is not None:
                    row["sites"] = dict(be.report.counters)
                    row["linear_launches"] = len(be.report.linear_groups)
                rows.append(row)
                (args.out / f"bench_generate.{meth}.partial.json").write_text(json.dumps(rows, indent=1))
                g = row.get("gpu", {})
                print(f"{meth:22s} B={b} N={n:6d}: {ms:7.2f} ms/token (pairs {', '.join(f'{p:.2f}' for p in pairs)}), "
                      f"floor {row['floor_ms']:.2f}"
                      + (f"; GPU: kernels {g['kernel_us_per_token'] / 1e3:.2f} ms, gaps "
                         f"{g['launch_gap_us_per_token'] / 1e3:.2f}, idle {g['gpu_idle_us_per_token'] / 1e3:.2f}"
                         if g else ""), flush=True)
            del pc, ids, mask
            if args.device == "cuda":
                torch.cuda.empty_cache()
            _wait(barrier)  # every worker has timed this point before the next compiles start
    del model
    return rows, {}


def _wait(barrier) -> None:
    try:
        barrier.wait()
    except threading.BrokenBarrierError:  # another worker failed: go on alone
        pass


def _worker(meth, args, lock, barrier, results):
    try:
        results.put((meth, *measure(meth, args, lock, barrier)))
    except BaseException as e:  # the parent reports it; a dead worker must not hang the barrier
        barrier.abort()
        import traceback

        traceback.print_exc()  # now: a parent killed at its time limit never reports the queue
        sys.stderr.flush()
        results.put((meth, None, f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--model", choices=list(MODELS), default="llama3-8b")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--contexts", type=ints, default=None)
    p.add_argument("--batches", type=ints, default=None)
    p.add_argument("--tokens", type=ints, default=[8, 72], help="n1,n2: new tokens of the two timed calls")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile-tokens", type=int, default=16)
    p.add_argument("--methods", type=lambda x: x.split(","), default=["hf_compiled", "lychee_paper"])
    p.add_argument("--contexts-for", type=lambda x: dict((m, [int(c) for c in cs.split("+")]) for m, cs in
                                                         (part.split("=") for part in x.split(","))), default={},
                   help="method=c1+c2,...: the contexts a method runs at (default: all of --contexts); the others "
                        "wait for them at each point")
    p.add_argument("--py-spy", default=None, help="path of the py-spy binary: sample the host while generating")
    p.add_argument("--jobs", action="store_true", help="one process per method: compiles run at once, timing one "
                                                       "method at a time")
    p.add_argument("--sync-dir", type=Path, default=None)
    p.add_argument("--sync-count", type=int, default=0)
    p.add_argument("--sync-wait", type=float, default=180.0)
    args = p.parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; expected names from {list(METHODS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    import transformers

    name, contexts, batches, opts = _settings(args)
    info = {"date": datetime.date.today().isoformat(), "model": name, "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
            "torch": torch.__version__, "transformers": transformers.__version__, "lychee": opts,
            "tokens": args.tokens, "methods": args.methods, "entry_point": "model.generate(compile_config=...)",
            **code_info()}
    results = {}
    if args.jobs:
        results = run_jobs(_worker, args.methods, args)
    else:
        for meth in args.methods:
            results[meth] = measure(meth, args)
    rows = []
    for meth in args.methods:
        got, err = results[meth]
        if got is None:
            print(f"{meth}: FAILED: {err}", flush=True)
            info[f"{meth}_error"] = err
            continue
        rows.extend(got)
    report = {"env": info, "rows": rows}
    (args.out / "bench_generate.json").write_text(json.dumps(report, indent=1))
    print(table(report))
    plot(report, args.out / "bench_generate.png")


def table(report) -> str:
    rows = report["rows"]
    get = {(r["method"], r["batch"], r["context"]): r for r in rows}
    out = [f"# generate() per token, {report['env']['model']}, {report['env']['gpu']}, torch {report['env']['torch']}, "
           f"transformers {report['env']['transformers']}, {report['env']['date']}",
           "| B | N | method | ms/token | vs HF compiled | floor ms | x floor | guards skipped ms | GPU kernels ms "
           "| launch gaps ms | GPU idle (host) ms | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hf = get.get(("hf_compiled", r["batch"], r["context"]))
        g = r.get("gpu", {})
        cell = lambda k: f"{g[k] / 1e3:.2f}" if k in g else ""  # noqa: E731
        out.append(f"| {r['batch']} | {r['context']} | {r['method']} | {r['ms']:.2f} | "
                   f"{hf['ms'] / r['ms'] if hf else float('nan'):.2f}x | {r['floor_ms']:.2f} | {r['ms'] / r['floor_ms']:.2f} "
                   f"| {r.get('ms_skip_guards', float('nan')):.2f} | {cell('kernel_us_per_token')} | {cell('launch_gap_us_per_token')} | {cell('gpu_idle_us_per_token')} "
                   f"| {r['compile_s']:.0f} |")
    hosts = [r for r in rows if "host" in r]
    if hosts:
        out.append("\nHost time while generating (py-spy, share of samples):")
        for r in hosts:
            parts = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["host"]["parts"].items() if v >= 0.01)
            out.append(f"- {r['method']} B={r['batch']} N={r['context']}: {parts}")
    return "\n".join(out)


def plot(report, path: Path) -> None:
    plt = pyplot()
    if plt is None or not report["rows"]:
        return
    rows = report["rows"]
    keys = list(dict.fromkeys((r["batch"], r["context"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(keys) * len(methods) / 2, 4))
    width = 0.8 / len(methods)
    for i, meth in enumerate(methods):
        xs, ys = [], []
        for j, key in enumerate(keys):
            r = next((r for r in rows if r["method"] == meth and (r["batch"], r["context"]) == key), None)
            if r:
                xs.append(j + i * width)
                ys.append(r["ms"])
        ax.bar(xs, ys, width, label=meth)
    for j, key in enumerate(keys):
        for r in rows:
            if (r["batch"], r["context"]) == key and r["method"] in ("lychee_paper", "hf_compiled"):
                style = "k--" if r["method"] == "lychee_paper" else "k:"
                ax.plot([j - 0.1, j + 0.9], [r["floor_ms"]] * 2, style)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], [f"B={b}, {n // 1024}K" for b, n in keys])
    ax.set_yscale("log")
    ax.set_ylabel("ms per generated token (generate())")
    ax.legend(fontsize=7)
    ax.set_title(f"{report['env']['model']} generate(), {report['env']['gpu']}, {report['env']['date']}\n"
                 "dashed: paper-ratio floor, dotted: dense floor", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
