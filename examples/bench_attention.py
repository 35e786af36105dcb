"""Decode attention on one layer: SDPA baselines against lychee's kernels, beside the byte floor.

    python examples/bench_attention.py --out results/   [--quick]

Llama-3-8B attention shape (Hq 32, Hkv 8, D 128, bf16), one query per sequence, contexts 4K to
128K, batch 1, 4, 8; lychee with 8, 4, 2, 1 and 0 retrieval KV heads of 8 (budget 4096,
block 64, sink 128, recent 256). Every time is the median of CUDA-graph replays
(``triton.testing.do_bench_cudagraph``), so launch gaps are excluded for every method alike.

Floor = bytes that must be read (K and V of retrieval heads over all N slots, of sparse heads
over min(budget, N) slots) / the copy bandwidth measured in the same run (bytes read +
written by a device-to-device copy). TB/s = those bytes / measured time.

Prints a table per batch, writes ``bench_attention.json`` and ``bench_attention.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

HQ, HKV, D = 32, 8, 128
BUDGET, BLOCK, SINK, RECENT = 4096, 64, 128, 256
L2_BYTES = 60 * 2**20


def ints(text: str) -> list[int]:
    """An argparse type: comma-separated ints."""
    return [int(v) for v in text.split(",")]


def ints_or_auto(text: str) -> list[int | None]:
    """An argparse type: comma-separated ints, ``auto`` (None) for the launcher's own choice."""
    return [None if v == "auto" else int(v) for v in text.split(",")]


def split_config(text: str):
    """An argparse type: one split-kernel config as ``<block_n>x<warps>x<stages>`` (``64x4x3``),
    a ``launch.SplitConfig``."""
    from lychee_fx.codegen import launch

    nums = text.split("x")
    if len(nums) != 3 or not all(n.isdigit() for n in nums):
        raise argparse.ArgumentTypeError(f"expected <block_n>x<warps>x<stages>, e.g. 64x4x3, got {text!r}")
    return launch.SplitConfig(*map(int, nums))


def code_info() -> dict:
    """Which lychee code produced a result: the digest of its sources and the CUDA kernels'
    launch settings (2026-11-30's rows ran selection variants that were not recorded)."""
    from lychee_fx.backend import source_digest

    info = {"lychee_sources": source_digest()}
    try:
        from lychee_fx.codegen import launch
    except ImportError:  # no Triton: the ops run their torch implementations
        return info
    pinned = launch.SPLIT_CONFIG._asdict()
    return dict(info, select_config=launch.SELECT_CONFIG._asdict(),
                split_config={k: v and v._asdict() for k, v in pinned.items()},  # None: the default below
                default_split_config={k: v._asdict() for k, v in launch.DEFAULT_SPLIT_CONFIG._asdict().items()})


def env_info() -> dict:
    import triton

    p = torch.cuda.get_device_properties(0)
    return {
        "date": datetime.date.today().isoformat(),
        "gpu": p.name,
        "sms": p.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dtype": "bfloat16",
        "shape": {"Hq": HQ, "Hkv": HKV, "D": D},
        "lychee": {"budget": BUDGET, "block_size": BLOCK, "sink": SINK, "recent": RECENT},
        **code_info(),
        "timing": "median of CUDA graph replays, triton.testing.do_bench_cudagraph",
    }


def bench(fn, rep: int = 200) -> float:
    """Median microseconds of CUDA-graph replays of ``fn``."""
    import triton

    fn()  # warm-up: autotuning and compilation stay out of the capture
    torch.cuda.synchronize()
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy by an SM kernel, bytes read + written per second. (A plain
    ``copy_`` is a memcpy, which CUDA graphs hand to the slower copy engines.)"""
    x = torch.randn(2**29, dtype=torch.bfloat16, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    us = bench(lambda: torch.neg(x, out=y), rep=100)
    return 2 * x.numel() * x.element_size() / (us * 1e-6)


def sdpa_fn(q, k, v, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def run():
        with sdpa_kernel(kind):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    try:
        run()
        return run, "enable_gqa"
    except RuntimeError:
        ke, ve = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)

        def run_expanded():
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(q, ke, ve)

        run_expanded()
        return run_expanded, "expanded K/V (no GQA support)"


def lychee_layer(q, k, v, sel_prev, n_retrieval: int):
    """(plans, run) for one layer with the first ``n_retrieval`` KV heads retrieval."""
    from lychee_fx.codegen import launch

    scale = D**-0.5
    plans = []
    ret = list(range(n_retrieval))
    spa = list(range(n_retrieval, HKV))
    if ret:
        # the dense row (all retrieval) has no later consumer: no selection, like the pass emits
        select = n_retrieval < HKV
        plans.append(("retrieval", launch.retrieval_plan(q, k, v, None, sel_prev if select else None, ret, scale,
                                                         BLOCK, BUDGET // BLOCK, SINK, RECENT, select)))
    if spa:
        plans.append(("sparse", launch.sparse_plan(q, k, v, None, sel_prev, spa, scale, BLOCK)))

    def run():
        for _, p in plans:
            p.run()

    return plans, run


def floor_bytes(b: int, n: int, n_retrieval: int) -> int:
    per_slot = 2 * D * 2  # K and V, bf16
    return b * per_slot * (n_retrieval * n + (HKV - n_retrieval) * min(BUDGET, n))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--quick", action="store_true", help="two contexts, batch 1 only")
    p.add_argument("--contexts", type=ints, default=None)
    p.add_argument("--batches", type=ints, default=None)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from lychee_fx.codegen import launch

    torch.manual_seed(0)
    info = env_info()
    bw = copy_bandwidth()
    info["copy_bandwidth_TBps"] = bw / 1e12
    contexts = args.contexts or ([8192, 131072] if args.quick else [4096, 16384, 32768, 65536, 131072])
    batches = args.batches or ([1] if args.quick else [1, 4, 8])
    rows = []
    for b in batches:
        for n in contexts:
            q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(b, HKV, n, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(b, HKV, n, D, device="cuda", dtype=torch.bfloat16)
            row = {"batch": b, "context": n, "l2_resident": floor_bytes(b, n, HKV) < L2_BYTES}
            ref = None
            for name in ("flash", "cudnn"):
                fn, how = sdpa_fn(q, k, v, name)
                row[f"sdpa_{name}_us"] = bench(fn)
                row[f"sdpa_{name}_how"] = how
                ref = fn() if ref is None else ref
            sel = launch.retrieval_attention(q, k, v, None, None, list(range(HKV)), D**-0.5, BLOCK, BUDGET // BLOCK,
                                             SINK, RECENT, True)[1]
            for nr in (8, 4, 2, 1, 0):
                plans, run = lychee_layer(q, k, v, sel, nr)
                key = f"lychee_r{nr}"
                row[f"{key}_us"] = bench(run)
                row[f"{key}_floor_us"] = floor_bytes(b, n, nr) / bw * 1e6
                row[f"{key}_TBps"] = floor_bytes(b, n, nr) / (row[f"{key}_us"] * 1e-6) / 1e12
                row[f"{key}_stages_us"] = {f"{op}.{stage}": bench(fn) for op, plan in plans for stage, fn in plan.stages}
                if nr == 8:
                    out = plans[0][1].outputs[0]
                    row["dense_rel_err_vs_sdpa"] = float((out.float() - ref.float()).norm() / ref.float().norm())
            # the reduce stage of all 8 heads with and without selection, and selection alone
            common = (q, k, v, None, None, list(range(HKV)), D**-0.5, BLOCK, BUDGET // BLOCK, SINK, RECENT)
            with_sel = launch.retrieval_plan(*common, True)
            no_sel = launch.retrieval_plan(*common, False)
            sel_only = launch.retrieval_plan(*common, True, merge=False)
            with_sel.run(), no_sel.run(), sel_only.run()
            row["reduce_with_selection_us"] = bench(dict(with_sel.stages)["reduce"])
            row["reduce_merge_only_us"] = bench(dict(no_sel.stages)["reduce"])
            row["selection_us"] = bench(dict(sel_only.stages)["reduce"])
            rows.append(row)
            print(_line(row), flush=True)
            (args.out / "bench_attention.json").write_text(json.dumps({"env": info, "rows": rows}, indent=1))
            del q, k, v
            torch.cuda.empty_cache()
    report = {"env": info, "rows": rows}
    (args.out / "bench_attention.json").write_text(json.dumps(report, indent=1))
    print(_table(report))
    _plot(report, args.out / "bench_attention.png")


def _line(r) -> str:
    return (f"B={r['batch']} N={r['context']}: cudnn {r['sdpa_cudnn_us']:.1f} us, flash {r['sdpa_flash_us']:.1f}, "
            + ", ".join(f"r{n} {r[f'lychee_r{n}_us']:.1f}" for n in (8, 4, 2, 1, 0)))


def _table(report) -> str:
    env = report["env"]
    out = [f"# Decode attention, one layer: {env['gpu']}, torch {env['torch']}, triton {env['triton']}, "
           f"{env['date']}; copy bandwidth {env['copy_bandwidth_TBps']:.2f} TB/s; microseconds (median of CUDA graph replays)"]
    head = ("| B | N | SDPA flash | SDPA cuDNN | lychee 8/8 (dense) | floor | 4/8 | 2/8 | 1/8 | floor 1/8 | 0/8 | floor 0/8 "
            "| cuDNN / 1/8 | cuDNN / 0/8 | select |")
    out += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in report["rows"]:
        sel = r.get("selection_us", r["reduce_with_selection_us"] - r["reduce_merge_only_us"])
        out.append(
            f"| {r['batch']} | {r['context'] // 1024}K{'*' if r['l2_resident'] else ''} | {r['sdpa_flash_us']:.1f} | {r['sdpa_cudnn_us']:.1f} "
            f"| {r['lychee_r8_us']:.1f} ({r['lychee_r8_TBps']:.2f} TB/s) | {r['lychee_r8_floor_us']:.1f} "
            f"| {r['lychee_r4_us']:.1f} | {r['lychee_r2_us']:.1f} | {r['lychee_r1_us']:.1f} | {r['lychee_r1_floor_us']:.1f} "
            f"| {r['lychee_r0_us']:.1f} | {r['lychee_r0_floor_us']:.1f} "
            f"| {r['sdpa_cudnn_us'] / r['lychee_r1_us']:.1f}x | {r['sdpa_cudnn_us'] / r['lychee_r0_us']:.1f}x | {sel:.1f} |"
        )
    out.append("`*` K/V fit in L2: repeated replays read them from cache. select = the selection programs alone, 8 rows (older results: reduce stage with selection minus without).")
    return "\n".join(out)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (and a line saying so) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return None
    return plt


def _plot(report, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    batches = sorted({r["batch"] for r in report["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    for ax, b in zip(axes[0], batches):
        rows = [r for r in report["rows"] if r["batch"] == b]
        xs = [r["context"] for r in rows]
        for key, label, style in (("sdpa_flash_us", "SDPA flash", "k--"), ("sdpa_cudnn_us", "SDPA cuDNN", "k-"),
                                  ("lychee_r8_us", "lychee 8/8 retrieval (dense)", "C0-o"),
                                  ("lychee_r1_us", "lychee 1/8 retrieval", "C1-o"), ("lychee_r0_us", "lychee 0/8 (all sparse)", "C2-o"),
                                  ("lychee_r8_floor_us", "floor, dense", "C0:"), ("lychee_r1_floor_us", "floor, 1/8", "C1:")):
            ax.plot(xs, [r[key] for r in rows], style, label=label, markersize=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("microseconds per layer")
        ax.set_title(f"batch {b}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    env = report["env"]
    fig.suptitle(f"decode attention, Hq 32 / Hkv 8 / D 128 bf16, {env['gpu']}, {env['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
