"""End-to-end decode speed: one token per step through a whole HF model with a static cache.

    python examples/bench_decode.py --out results/ [--model llama3-8b|qwen3-8b] [--quick]
    python examples/bench_decode.py --tiny --device cpu --out /tmp/x     # a smoke run anywhere

Random bf16 weights in the model's shape (no internet on the GPU machine), a static cache of
``context + 16 + steps`` slots filled with random K/V, decode steps timed from position
``context`` (so a step attends to ``context + 1`` slots). Rows: HF eager (sdpa);
``torch.compile`` default and reduce-overhead; lychee with every head retrieval (the dense
path through lychee's kernels); lychee at the paper's ratio (1 retrieval KV head in 8, layer
0 all retrieval) with budget 4096. Each compiled row is one
``torch.compile(..., dynamic=True)`` reused across contexts (the cache length is symbolic),
CUDA graphs per shape under reduce-overhead. Two times per row: ``ms``, one step with the
host waiting for it (median over steps of CUDA events: what a loop that samples on the host
pays per token, HF ``generate`` among them), and ``loop_ms``, per token of greedy steps back
to back with the tokens kept on the GPU (the host's work overlaps the GPU's).

Each method is compiled once, warmed up per batch size on a short cache (a batch of 1 is
specialised, so batch 4 compiles again), then timed at every context. Compiling an 8B model
takes minutes per method; ``--jobs`` runs one process per method so that all compile at
once on the machine's cores, then times them one after another (a lock; a barrier first so
no compile competes with a timed step). Each process holds its own weights (16 GB for
Llama-3-8B) and a worker's rows are saved as it goes (``bench_decode.<method>.partial.json``).
GPU memory is then (methods x weights) + the largest cache: Llama-3-8B at batch 4 and 128K
(a 68.7 GB cache) leaves room for 4 methods on an H200, not 5.

    python examples/bench_decode.py --out $OUT --jobs --profile       # the full grid, one device call

Floor = (weights read per token + KV bytes the row must read) / copy bandwidth, measured by
each method's process when it takes the GPU (rows carry it); the embedding table is not
counted (one row is read), the LM head is.
Prints a table, writes ``bench_decode.json`` and ``bench_decode.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import queue as queue_mod
import threading
import time
from pathlib import Path

import torch
from bench_attention import code_info, copy_bandwidth, ints, pyplot, split_config

import lychee_fx
from lychee_fx.apps.decoding import cache_kwarg, forward_takes

MODELS = {
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "tiny": dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, vocab_size=1000),
}
BUDGET, BLOCK, SINK, RECENT = 4096, 64, 128, 256
DEFAULT_METHODS = ("hf_eager", "compile_default", "compile_reduce_overhead", "lychee_dense", "lychee_paper")
METHODS = (*DEFAULT_METHODS, "lychee_paper_frozen", "lychee_paper_nopool")
# Compile settings per compiled method: reduce-overhead = CUDA graphs. ``lychee_paper_frozen`` (only
# when asked for) also folds the weights into the graph as constants (Inductor ``freezing``), the
# host-time experiment of [Note: guard cost]: on the H200 it made the host's time per step 21 ms
# instead of 3 (Llama-3-8B shape, 2026-11-30), so it is not in the default grid.
# ``lychee_paper_nopool``: the paper ratio with ``backend(pool=False)`` (a layer's retrieval and
# sparse ops as two launch pairs and a cat: passes/pool.py), to time pooling in the loop.
COMPILE_KW = {"compile_default": {}, "lychee_paper_frozen": {"options": {"triton.cudagraphs": True, "freezing": True}}}


def build(name: str, max_len: int, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(MODELS[name])
    cfg = AutoConfig.for_model(spec.pop("model_type"), max_position_embeddings=max_len + 64, **spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    return model


def paper_roles(num_layers: int, hkv: int) -> lychee_fx.HeadRoles:
    """1 retrieval KV head in 8 overall, layer 0 all retrieval, the rest one head per layer
    (rotating index) until the count is reached: the paper's 32 of 256 for Llama-3-8B."""
    table = torch.zeros(num_layers, hkv, dtype=torch.bool)
    table[0] = True
    left = num_layers * hkv // 8 - hkv
    for layer in range(1, num_layers):
        if left <= 0:
            break
        table[layer, layer % hkv] = True
        left -= 1
    return lychee_fx.HeadRoles(table, meta={"schedule": "paper ratio (1 in 8), layer 0 retrieval"})


def static_cache(model, batch: int, slots: int):
    """A static cache of ``slots`` slots filled with random K/V, by the cache's own update path."""
    from transformers import StaticCache

    try:
        cache = StaticCache(config=model.config, max_cache_len=slots)
    except TypeError:  # older signature
        cache = StaticCache(config=model.config, max_batch_size=batch, max_cache_len=slots,
                            device=model.device, dtype=model.dtype)
    with torch.no_grad():
        model(**step_inputs(model, cache, batch, 0))
    layers = getattr(cache, "layers", None)
    tensors = [(l.keys, l.values) for l in layers] if layers is not None else list(zip(cache.key_cache, cache.value_cache))
    g = torch.Generator(device=model.device).manual_seed(1)
    for k, v in tensors:
        k.normal_(generator=g)
        v.normal_(generator=g)
    return cache


def set_position(cache, pos: int) -> None:
    """Make the next step write slot ``pos`` and attend to slots ``[0, pos]``.

    [Note: cache position] transformers >= 5.24 dropped the ``cache_position`` argument: a
    static layer keeps its write position in a tensor (``cumulative_length``) that every call
    advances and that also sizes the causal mask. Older versions take ``cache_position`` per
    call (``step_inputs`` passes it where ``forward`` names it). Without this reset a step on
    5.24 would attend to as many slots as calls made so far, not to the context timed."""
    for layer in getattr(cache, "layers", None) or []:
        length = getattr(layer, "cumulative_length", None)
        if isinstance(length, torch.Tensor):
            length.fill_(pos)


def step_inputs(model, cache, batch: int, pos: int, ids: torch.Tensor | None = None) -> dict:
    """The keyword arguments of one decode step writing position ``pos`` (random ids (B, 1)
    unless given), after ``set_position``."""
    dev = model.device
    set_position(cache, pos)
    if ids is None:
        ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=dev)
    cp = torch.full((1,), pos, dtype=torch.long, device=dev)
    kw = dict(input_ids=ids, use_cache=True, position_ids=cp.expand(batch, 1), **{cache_kwarg(model): cache})
    if forward_takes(model, "cache_position"):
        kw["cache_position"] = cp
    return kw


def time_step(fn, model, cache, batch: int, pos: int, steps: int) -> dict:
    """One decode step at ``pos``, the host waiting for each: ``first_s`` (seconds of the
    first call), ``ms`` (median milliseconds per later step, CUDA events around the call) and
    ``host_ms`` (median wall time of the call itself, without waiting for the GPU: what
    Python, guards and launches cost on the host; close to ``ms`` means the step is
    host-bound). A loop that samples on the host (HF ``generate`` checks its stopping
    criteria every token) pays ``ms`` per token."""
    dev = model.device
    kw = step_inputs(model, cache, batch, pos)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.no_grad():
        t0 = time.perf_counter()
        fn(**kw)
        sync()
        first = time.perf_counter() - t0
        for _ in range(3):
            set_position(cache, pos)
            fn(**kw)
        times, host = [], []
        for _ in range(steps):
            set_position(cache, pos)
            sync()
            if dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                t = time.perf_counter()
                fn(**kw)
                host.append(1e3 * (time.perf_counter() - t))
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn(**kw)
                times.append(1e3 * (time.perf_counter() - t))
                host.append(times[-1])
    return dict(first_s=first, ms=_median(times), host_ms=_median(host))


def time_loop(fn, model, cache, batch: int, pos: int, steps: int) -> float:
    """Milliseconds per token of ``steps`` greedy steps back to back from ``pos``, the tokens
    kept on the GPU: step i + 1 feeds step i's argmax at position ``pos + i + 1`` and the host
    syncs once, at the end. The host then prepares step i + 1 while the GPU runs step i, so
    a token costs max(host, GPU) rather than their sum (``time_step``'s ``ms``). The cache
    needs ``steps`` free slots from ``pos``."""
    dev = model.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
    with torch.no_grad():
        for timed in (False, True):  # a warm-up pass, then the timed one
            kw = step_inputs(model, cache, batch, pos, ids)
            sync()
            t = time.perf_counter()
            cp = kw.get("cache_position", kw["position_ids"][0])
            for _ in range(steps):
                ids = fn(**kw).logits[:, -1].argmax(-1, keepdim=True)
                cp = cp + 1  # the same shapes and strides as step_inputs' tensors: no guard fails
                kw.update(input_ids=ids, position_ids=cp.expand(batch, 1))
                if "cache_position" in kw:
                    kw["cache_position"] = cp
            sync()
    return 1e3 * (time.perf_counter() - t) / steps


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def skip_guards():
    """``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``: the compiled model runs
    without evaluating Dynamo's guards. [Note: guard cost] Under ``dynamic=True`` an HF model
    with a static cache carries ~370 symbolic-shape guards evaluated in Python on every call
    (cache sizes and strides against ``max_cache_len``, per-layer ``scaling``, ...): about
    3 ms per step on this project's 2-core CI machine, but only 0.0-0.6 ms on the H200's host
    (Llama-3-8B shape), where the other ~1.5 ms of host time per step is Dynamo, the AOT wrapper
    and the CUDA-graph tree. A decode loop whose shapes do not change may skip the guards; rows
    timed this way say so (``ms_skip_guards``)."""
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


def _pin_kernel_configs(args) -> None:
    """Set ``--split-config`` and ``--select-config`` in this process: ``main`` does, and each
    ``--jobs`` worker again, as a spawned process starts from the module's defaults (the configs
    key Inductor's graph cache, ``backend.kernel_settings``)."""
    split, select = getattr(args, "split_config", None), getattr(args, "select_config", None)
    if split is None and select is None:
        return
    from lychee_fx.codegen import launch

    if split is not None:
        launch.SPLIT_CONFIG = split
    if select is not None:
        launch.SELECT_CONFIG = select


def select_config_arg(text: str):
    """``--select-config early_exit=0,digit_bits=4`` as a ``launch.SelectConfig``: the fields named
    (ints; 0/1 for the flags), the rest as the launcher's default has them."""
    from lychee_fx.codegen import launch

    fields = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name not in launch.SelectConfig._fields or not value.isdigit():
            raise argparse.ArgumentTypeError(f"expected <field>=<int> with field in {launch.SelectConfig._fields}, "
                                             f"got {part!r}")
        default = getattr(launch.SELECT_CONFIG, name)
        fields[name] = bool(int(value)) if isinstance(default, bool) else int(value)
    return launch.SELECT_CONFIG._replace(**fields)


def split_config_arg(text: str):
    """``--split-config retrieval=64x4x3,sparse=128x4x2`` (slots per tile x warps x stages) as a
    ``launch.SplitConfigs``; a kernel left out keeps its default."""
    from lychee_fx.codegen import launch

    pinned = {}
    for part in text.split(","):
        name, _, cfg = part.partition("=")
        if name not in launch.SplitConfigs._fields:
            raise argparse.ArgumentTypeError(f"expected <kernel>=<block_n>x<warps>x<stages> with kernel in "
                                             f"{launch.SplitConfigs._fields}, got {part!r}")
        pinned[name] = split_config(cfg)
    return launch.SplitConfigs(**pinned)


def bandwidth(device: str) -> float:
    """Copy bandwidth, bytes read + written per second: on CUDA ``bench_attention.copy_bandwidth``
    (median of CUDA-graph replays; the kernel benchmarks' floors use it too); on the CPU, ten
    timed copies. Until 2026-11-30c a CUDA worker timed ten copies from the host, and workers
    of one call read 2.9 to 4.2 TB/s."""
    if device == "cuda":
        return copy_bandwidth()
    x = torch.randn(2**26, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    torch.neg(x, out=y)
    t = time.perf_counter()
    for _ in range(10):
        torch.neg(x, out=y)
    return 2 * x.numel() * x.element_size() * 10 / (time.perf_counter() - t)


def floor_ms(model, batch: int, context: int, roles: lychee_fx.HeadRoles | None, bw: float, budget: int = BUDGET) -> float:
    cfg = model.config
    emb = model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) - emb.numel() * emb.element_size()
    if model.get_output_embeddings().weight is emb:  # tied: the LM head reads the table
        weights += emb.numel() * emb.element_size()
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_slot = 2 * hd * 2  # K and V, bf16
    hkv = cfg.num_key_value_heads
    if roles is None:
        kv = cfg.num_hidden_layers * hkv * context
    else:
        r = roles.num_retrieval
        kv = r * context + (cfg.num_hidden_layers * hkv - r) * min(budget, context)
    return (weights + batch * kv * per_slot) / bw * 1e3


class _Solo:
    """Stands in for the lock and barrier of a worker when methods run in one process."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait(self):
        return 0


def _settings(args):
    name = "tiny" if args.tiny else args.model
    contexts = args.contexts or ([256, 1024] if args.tiny else [8192, 131072] if args.quick else [8192, 32768, 65536, 131072])
    batches = args.batches or ([1] if args.quick or args.tiny else [1, 4])
    opts = dict(budget=128, block_size=16, sink=16, recent=32) if args.tiny else dict(
        budget=BUDGET, block_size=BLOCK, sink=SINK, recent=RECENT)
    return name, contexts, batches, opts


def measure(meth: str, args, bw: float, lock=None, barrier=None) -> tuple[list[dict], dict]:
    """Rows of one method over every (batch, context), and its site counters.

    Phase 1 compiles: one warm-up step per batch size on a short cache (``dynamic=True`` keeps
    the cache length symbolic, so longer contexts reuse the graph). Then ``barrier`` (every
    worker has compiled, the CPUs are quiet) and, under ``lock`` (one method on the GPU at a
    time), the timed steps."""
    lock, barrier = lock or _Solo(), barrier or _Solo()
    name, contexts, batches, opts = _settings(args)
    model = build(name, max(contexts) + 16 + args.steps, args.device)
    cfg = model.config
    paper = meth.startswith("lychee_paper")
    roles = (paper_roles(cfg.num_hidden_layers, cfg.num_key_value_heads) if paper
             else lychee_fx.HeadRoles.all_retrieval(cfg.num_hidden_layers, cfg.num_key_value_heads))
    be = lychee_fx.backend(roles, pool=not meth.endswith("_nopool"), **opts) if meth.startswith("lychee") else None
    torch._dynamo.reset()
    kw = COMPILE_KW.get(meth, {"mode": "reduce-overhead"})
    fn = model if meth == "hf_eager" else torch.compile(model, backend=be or "inductor", dynamic=True, **kw)
    compile_s = {}
    warm = min(1024, min(contexts))
    for b in batches:
        cache = static_cache(model, b, warm + 16)
        compile_s[b] = time_step(fn, model, cache, b, warm, 1)["first_s"]
        print(f"{meth:26s} B={b}: compiled in {compile_s[b]:.1f} s (warm-up at N={warm})", flush=True)
        del cache
    try:
        barrier.wait()
    except threading.BrokenBarrierError:  # another worker failed: time this one anyway
        pass
    shared = None
    if args.sync_dir is not None:
        shared = machine_barrier(args.sync_dir, args.sync_count, args.sync_wait, meth)
    rows, errors = [], []
    with lock:
        if args.device == "cuda":  # measured on a quiet GPU: the one before the workers started may
            bw = bandwidth(args.device)  # have shared it with another run's start (PRE, tests)
        for b in batches:
            for n in contexts:
                print(f"{meth:26s} B={b} N={n:6d}: timing", flush=True)
                try:
                    cache = static_cache(model, b, n + 16 + args.steps)
                    t = time_step(fn, model, cache, b, n, args.steps)
                except torch.OutOfMemoryError as e:  # free it before the next worker takes the GPU
                    cache = None
                    torch.cuda.empty_cache()
                    print(f"{meth:26s} B={b} N={n:6d}: out of memory ({str(e).splitlines()[0]})", flush=True)
                    errors.append(dict(batch=b, context=n, error="out of memory"))
                    continue
                ms = t["ms"]
                row = dict(method=meth, batch=b, context=n, ms=ms, host_ms=t["host_ms"], tokens_per_s=b * 1e3 / ms,
                           copy_bandwidth_TBps=bw / 1e12,
                           loop_ms=time_loop(fn, model, cache, b, n, args.steps),
                           first_call_s=t["first_s"], compile_s=compile_s[b],
                           floor_ms=floor_ms(model, b, n, roles if paper else None, bw, opts["budget"]))
                if shared:
                    row["machine_barrier"] = shared
                if meth != "hf_eager":
                    with skip_guards():
                        t = time_step(fn, model, cache, b, n, args.steps)
                    row.update(ms_skip_guards=t["ms"], host_ms_skip_guards=t["host_ms"])
                if args.profile and meth != "hf_eager" and (b, n) == (batches[-1], contexts[-1]):
                    row["profile"] = profile_step(fn, model, cache, b, n, args.out / f"profile_{meth}_B{b}_N{n}.txt")
                rows.append(row)
                (args.out / f"bench_decode.{meth}.partial.json").write_text(json.dumps(rows, indent=1))
                print(f"{meth:26s} B={b} N={n:6d}: {ms:8.2f} ms/token, host {row['host_ms']:.2f}, loop {row['loop_ms']:.2f}"
                      + (f"; guards skipped {row['ms_skip_guards']:.2f}, host {row['host_ms_skip_guards']:.2f}"
                         if "ms_skip_guards" in row else "")
                      + f" (floor {row['floor_ms']:.2f}), first call {row['first_call_s']:.1f} s", flush=True)
                del cache
                if args.device == "cuda":
                    torch.cuda.empty_cache()
        del fn, model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    sites = dict(be.report.counters) if be is not None else {}
    if errors:
        sites["errors"] = errors
    return rows, sites


def machine_barrier(sync_dir: Path, count: int, wait_s: float, name: str) -> str | None:
    """Wait until ``count`` participants (every worker of every bench_decode run on the
    machine, and whatever else the caller counts in, e.g. a test run) have put a file in
    ``sync_dir``, or ``wait_s`` seconds: several runs at once (one per GPU) then time only
    after every compile is done, so that no compile competes with a timed step for the host's
    cores (on a 2-GPU H200 machine such contention tripled ``host ms``).

    Returns None when everyone arrived, else what happened ("7 of 8 after 120 s"): the rows
    timed after it carry it, since whatever had not arrived (a compile, or a PRE benchmark on
    the same GPU) may have run beside them."""
    import os

    sync_dir.mkdir(parents=True, exist_ok=True)
    (sync_dir / f"{name}.{os.getpid()}").touch()
    t0 = time.perf_counter()
    while len(list(sync_dir.iterdir())) < count and time.perf_counter() - t0 < wait_s:
        time.sleep(0.5)
    arrived = len(list(sync_dir.iterdir()))
    what = f"{arrived} of {count} after {time.perf_counter() - t0:.0f} s"
    print(f"{name:26s} machine barrier: {what}", flush=True)
    return None if arrived >= count else what


def _worker(meth, args, bw, lock, barrier, results):
    if args.dump_after:
        import faulthandler

        faulthandler.dump_traceback_later(args.dump_after, exit=False)  # a hung worker says where
    try:
        _pin_kernel_configs(args)  # a spawned process: the module's defaults until set here
        results.put((meth, *measure(meth, args, bw, lock, barrier)))
    except BaseException as e:  # the parent reports it; a dead worker must not hang the barrier
        barrier.abort()
        results.put((meth, None, f"{type(e).__name__}: {e}"))


def run_jobs(worker, methods: list[str], *worker_args) -> dict[str, tuple]:
    """One spawned process per method, ``worker(method, *worker_args, lock, barrier, queue)``,
    sharing a lock (one times at a time) and a barrier; returns {method: (rows, extra)} as the
    workers put them on the queue, or (None, why) for a worker that died without reporting
    (killed for memory, say), whose death also breaks the barrier for the others."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    lock, barrier, queue = ctx.Lock(), ctx.Barrier(len(methods)), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(m, *worker_args, lock, barrier, queue)) for m in methods]
    for proc in procs:
        proc.start()
    results: dict[str, tuple] = {}
    while len(results) < len(procs):
        try:
            meth, rows, extra = queue.get(timeout=5)
            results[meth] = (rows, extra)
        except queue_mod.Empty:
            for meth, proc in zip(methods, procs):
                if meth not in results and proc.exitcode not in (None, 0):
                    results[meth] = (None, f"worker exited with code {proc.exitcode}")
                    barrier.abort()
    for proc in procs:
        proc.join()
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--model", choices=list(MODELS), default="llama3-8b")
    p.add_argument("--tiny", action="store_true", help="the tiny model, short contexts (smoke test)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--contexts", type=ints, default=None)
    p.add_argument("--batches", type=ints, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--methods", type=lambda x: x.split(","), default=None,
                   help="comma-separated subset and order of: " + ", ".join(METHODS) + " (default: " + ", ".join(DEFAULT_METHODS) + ")")
    p.add_argument("--profile", action="store_true",
                   help="at the last (batch, context) of each compiled method, profile 3 steps (kernel table) "
                        "and the host side of 5 (cProfile): profile_<method>_B<b>_N<n>.txt")
    p.add_argument("--jobs", action="store_true",
                   help="one process per method: all compile at once (an 8B model takes minutes each), then "
                        "they time one after another on a quiet machine; each holds its own weights on the GPU")
    p.add_argument("--sync-dir", type=Path, default=None,
                   help="with --sync-count: a folder shared by every run on the machine; workers time only "
                        "after --sync-count participants have arrived there (or --sync-wait seconds)")
    p.add_argument("--sync-count", type=int, default=0)
    p.add_argument("--sync-wait", type=float, default=120.0)
    p.add_argument("--split-config", type=split_config_arg, default=None,
                   help="split kernels' configs other than launch.DEFAULT_SPLIT_CONFIG, e.g. "
                        "retrieval=64x4x3,sparse=128x4x2 (slots per tile x warps x stages)")
    p.add_argument("--select-config", type=select_config_arg, default=None,
                   help="selection config fields other than launch.SELECT_CONFIG's, e.g. early_exit=0")
    p.add_argument("--dump-after", type=float, default=0.0,
                   help="with --jobs: each worker prints every thread's stack after this many seconds (0: never)")
    args = p.parse_args(argv)
    name, contexts, batches, opts = _settings(args)
    chosen = args.methods or list(DEFAULT_METHODS)
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; expected names from {list(METHODS)}")
    if args.sync_dir is not None and not args.jobs and len(chosen) > 1:
        raise SystemExit(f"--sync-dir needs --jobs with {len(chosen)} methods: without it the methods "
                         "compile one after another and the first would wait at the barrier for the rest")
    args.out.mkdir(parents=True, exist_ok=True)

    import transformers

    _pin_kernel_configs(args)  # recorded by code_info below
    bw = bandwidth(args.device)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    info = {
        "date": datetime.date.today().isoformat(), "model": name, "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        "torch": torch.__version__, "transformers": transformers.__version__, "copy_bandwidth_TBps": bw / 1e12,
        "lychee": opts, "steps": args.steps, "jobs": bool(args.jobs), "methods": chosen,
        **code_info(),
    }
    if any(m.startswith("lychee_paper") for m in chosen):  # lychee_paper_frozen runs the same roles
        spec = MODELS[name]
        info["paper_roles"] = paper_roles(spec["num_hidden_layers"], spec["num_key_value_heads"]).to_json_obj()["retrieval"]
    results: dict[str, tuple] = {}
    if args.jobs:
        results = run_jobs(_worker, chosen, args, bw)
    else:
        for meth in chosen:
            results[meth] = measure(meth, args, bw)
    rows = []
    for meth in chosen:  # the order asked for, whatever order the workers finished in
        got, sites = results[meth]
        if got is None:
            print(f"{meth}: FAILED: {sites}", flush=True)
            info[f"{meth}_error"] = sites
            continue
        rows.extend(got)
        if sites:
            info[f"{meth}_sites"] = sites
            print(f"{meth}: {sites}")
    report = {"env": info, "rows": rows}
    (args.out / "bench_decode.json").write_text(json.dumps(report, indent=1))
    print(table(report))
    plot(report, args.out / "bench_decode.png")


def profile_step(fn, model, cache, batch: int, pos: int, path: Path) -> dict:
    """Kernel list of 3 decode steps (CUPTI sees kernels inside CUDA graphs): the full table
    goes to ``path``; returns microseconds per step by kernel family."""
    from torch.profiler import ProfilerActivity, profile

    kw = step_inputs(model, cache, batch, pos)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn(**kw)
        torch.cuda.synchronize()
    events = prof.key_averages()
    path.write_text(events.table(sort_by="cuda_time_total", row_limit=40) + "\n\n" + host_profile(fn, kw))
    families = dict.fromkeys(KERNEL_FAMILIES, 0.0)
    for e in events:
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        families[kernel_family(e.key)] += us / 3
    return families


KERNEL_FAMILIES = ("retrieval_split", "retrieval_reduce", "sparse_split", "merge", "sdpa", "gemm", "other")


def kernel_family(name: str) -> str:
    """Which part of a decode step a CUDA kernel is: one of lychee's kernels, HF's attention
    (SDPA kernels and the Inductor kernels fused around them, e.g. GQA's expanded K and V),
    a GEMM (cuBLAS, cuBLASLt, CUTLASS, Inductor's matmul templates, lychee's decode_linear)
    or other."""
    name = name.lower()
    lychee = next((f for f in KERNEL_FAMILIES[:4] if f"{f}_kernel" in name), None)
    if lychee:
        return lychee
    if any(t in name for t in ("sdpa", "scaled_dot_product", "flash", "fmha")):
        return "sdpa"
    if any(t in name for t in ("gemm", "cutlass", "nvjet", "cublas", "triton_tem_fused_mm", "triton_tem_fused_addmm",
                               "decode_linear")):
        return "gemm"
    return "other"


def host_profile(fn, kw: dict, calls: int = 5) -> str:
    """Where the host's time of a step goes: cProfile of ``calls`` steps (the GPU work is
    asynchronous and not in it), functions by own time and by cumulative time. cProfile
    slows Python several-fold, so read shares, not absolute times."""
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    with torch.no_grad():
        fn(**kw)
        torch.cuda.synchronize()
        pr.enable()
        for _ in range(calls):
            fn(**kw)
        pr.disable()
        torch.cuda.synchronize()
    text = io.StringIO()
    stats = pstats.Stats(pr, stream=text)
    text.write(f"# host profile of {calls} steps, by own time\n")
    stats.sort_stats("tottime").print_stats(30)
    text.write(f"# host profile of {calls} steps, by cumulative time\n")
    stats.sort_stats("cumulative").print_stats(30)
    return text.getvalue()


def table(report) -> str:
    """Markdown table: each row against HF eager and HF compiled (reduce-overhead) at the same
    (batch, context), per step (host waiting for each step) and per token of a decode loop
    that keeps tokens on the GPU (``time_loop``), each also as a share of the floor; the
    guards-skipped column times the per-step path without Dynamo's guards ([Note: guard cost])."""
    rows = report["rows"]
    get = {(r["method"], r["batch"], r["context"]): r for r in rows}
    nan = float("nan")

    def ratio(other, r, key):
        return other[key] / r[key] if other and key in other and key in r else nan

    out = [f"# {report['env']['model']} decode step, {report['env']['gpu']}, torch {report['env']['torch']}, {report['env']['date']}",
           "| B | N | method | ms/token | host ms | tokens/s | vs HF eager | vs HF compiled (r-o) | % of floor "
           "| loop ms/token | loop vs HF compiled loop | loop % of floor | guards skipped ms | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eager = get.get(("hf_eager", r["batch"], r["context"]))
        comp = get.get(("compile_reduce_overhead", r["batch"], r["context"]))
        loop = r.get("loop_ms")
        mark = " (!)" if r.get("machine_barrier") else ""
        out.append(
            f"| {r['batch']} | {r['context']} | {r['method']}{mark} | {r['ms']:.2f} | {r.get('host_ms', nan):.2f} "
            f"| {r['tokens_per_s']:.1f} | {ratio(eager, r, 'ms'):.2f}x | {ratio(comp, r, 'ms'):.2f}x "
            f"| {100 * r['floor_ms'] / r['ms']:.0f}% "
            + (f"| {loop:.2f} | {ratio(comp, r, 'loop_ms'):.2f}x | {100 * r['floor_ms'] / loop:.0f}% " if loop else "| | | ")
            + f"| {r.get('ms_skip_guards', nan):.2f} | {r.get('compile_s', r['first_call_s']):.1f} |"
        )
    if any(r.get("machine_barrier") for r in rows):
        out.append("\n(!) timed after an incomplete machine barrier: another compile or PRE may have run beside it")
    return "\n".join(out)


def plot(report, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    batches = sorted({r["batch"] for r in report["rows"]})
    if not batches:
        return
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for meth in dict.fromkeys(r["method"] for r in report["rows"]):
            rs = [r for r in report["rows"] if r["method"] == meth and r["batch"] == b]
            line, = ax.plot([r["context"] for r in rs], [r["ms"] for r in rs], "-o", label=meth, markersize=4)
            if rs and all("loop_ms" in r for r in rs):
                ax.plot([r["context"] for r in rs], [r["loop_ms"] for r in rs], "--", color=line.get_color(),
                        alpha=0.6, label=f"{meth}, decode loop")
        for name, paper, style in (("dense", False, "k:x"), ("paper ratio", True, "k--+")):
            floors = {r["context"]: r["floor_ms"] for r in report["rows"]
                      if r["batch"] == b and r["method"].startswith("lychee_paper") == paper}
            ctx = sorted(floors)
            ax.plot(ctx, [floors[c] for c in ctx], style, label=f"floor ({name})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms per token")
        ax.set_title(f"batch {b}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{report['env']['model']} decode, {report['env']['gpu']}, {report['env']['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
