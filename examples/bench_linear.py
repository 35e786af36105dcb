"""A decode step's linears: ``lychee::decode_linear``'s kernel against cuBLAS, beside the floor.

    python examples/bench_linear.py --out results/ [--model llama3-8b] [--rows 1,4] [--quick]

Cases are one layer's projections of the model (q/k/v, o, gate/up, down) and the LM head, at
M = batch rows. Rows per case: ``cublas`` (one ``F.linear`` per weight, as HF runs them),
``cublas_cat`` (one ``F.linear`` over the weights concatenated: what fusing by concatenation
would give, at the price of a copy of the weights), and ``lychee`` in each launch config of
``codegen.linear.configs`` (one launch for every weight of the case). Each time is the median
of CUDA-graph replays of ``--copies`` calls over as many distinct weight sets (so that the
weights come from memory, not from the 60 MB L2, as they do in a model), divided by the copies.
Floor = bytes of the weights, x and y / copy bandwidth measured in the same run. Every lychee
config is checked against float64 first (a config that computes something else is an error).

Prints the best config per case and a table, writes ``bench_linear.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_attention import bench, copy_bandwidth, env_info, ints

SHAPES = {  # (hidden, intermediate, q features, kv features, vocab)
    "llama3-8b": (4096, 14336, 4096, 1024, 128256),
    "qwen3-8b": (4096, 12288, 4096, 1024, 151936),
    "smollm2-135m": (576, 1536, 576, 192, 49152),
}


def cases(model: str) -> list[tuple[str, int, list[int]]]:
    """(name, K, [N_i]) of one layer's linears and the LM head."""
    h, i, q, kv, vocab = SHAPES[model]
    return [("qkv", h, [q, kv, kv]), ("o", q, [h]), ("gate_up", h, [i, i]), ("down", i, [h]), ("lm_head", h, [vocab])]


def _weights(k: int, ns: list[int], copies: int, dtype) -> list[list[torch.Tensor]]:
    return [[torch.randn(n, k, device="cuda", dtype=dtype) * k**-0.5 for n in ns] for _ in range(copies)]


def _copies(k: int, ns: list[int], elem: int, want: int) -> int:
    """Enough weight sets to read at least 256 MB per replay (4x the L2), at most ``want``."""
    per = k * sum(ns) * elem
    return max(1, min(want, -(-(256 << 20) // per)))


def run_case(name: str, m: int, k: int, ns: list[int], dtype, bw: float, copies: int, cfgs) -> list[dict]:
    from lychee_fx.codegen import linear

    elem = torch.finfo(dtype).bits // 8
    c = _copies(k, ns, elem, copies)
    wsets = _weights(k, ns, c, dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    floor_us = (k * sum(ns) + m * k + m * sum(ns)) * elem / bw * 1e6
    cat = [torch.cat(ws) for ws in wsets]
    rows = []

    def row(method, us, **extra):
        r = dict(case=name, rows=m, k=k, n=ns, method=method, us=us, floor_us=floor_us,
                 pct_of_copy_bw=100 * floor_us / us, **extra)
        rows.append(r)
        return r

    row("cublas", bench(lambda: [F.linear(x, w) for ws in wsets for w in ws]) / c)
    row("cublas_cat", bench(lambda: [F.linear(x, w) for w in cat]) / c)
    ref = [F.linear(x.double(), w.double()) for w in wsets[0]]
    for cfg in cfgs:
        ys = linear.decode_linear(x, wsets[0], [None] * len(ns), config=cfg)
        err = max(((y.double() - r).norm() / r.norm()).item() for y, r in zip(ys, ref))
        if not err < 2e-2:
            raise AssertionError(f"{name} M={m} {cfg}: relative error {err:.2e} against float64")
        us = bench(lambda: [linear.decode_linear(x, ws, [None] * len(ns), config=cfg) for ws in wsets]) / c
        row("lychee", us, config=cfg._asdict(), rel_err=err)
    del wsets, cat
    torch.cuda.empty_cache()
    return rows


def small_grid(m: int) -> list:
    """About 20 configs around what decode GEMVs usually want: narrow tiles, long K steps."""
    from lychee_fx.codegen import linear

    grid = [linear.LinearConfig(bn, bk, 4, s, True) for bn in (16, 32) for bk in (128, 256, 512) for s in (3, 4)]
    grid += [linear.LinearConfig(bn, bk, w, 3, False) for bn in (16, 32) for bk in (128, 256) for w in (4, 8)]
    return [c for c in dict.fromkeys([linear.DEFAULT_CONFIG, *grid]) if c in linear.configs(m, 2) or c == linear.DEFAULT_CONFIG]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--model", choices=list(SHAPES), default="llama3-8b")
    p.add_argument("--rows", type=ints, default=[1, 4])
    p.add_argument("--copies", type=int, default=16)
    p.add_argument("--cases", type=lambda t: t.split(","), default=None, help="subset of qkv,o,gate_up,down,lm_head")
    p.add_argument("--grid", choices=["default", "small", "full"], default="small",
                   help="the default config only; a small grid (about 20 configs); codegen.linear.configs (about 60)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from lychee_fx.codegen import linear

    dtype = torch.bfloat16
    bw = copy_bandwidth()
    report = {"env": {**env_info(), "model": args.model, "copy_bandwidth_TBps": bw / 1e12, "dtype": str(dtype)},
              "rows": []}
    for m in args.rows:
        cfgs = {"default": [linear.DEFAULT_CONFIG], "small": small_grid(m), "full": linear.configs(m, 2)}[args.grid]
        for name, k, ns in cases(args.model):
            if args.cases and name not in args.cases:
                continue
            rows = run_case(name, m, k, ns, dtype, bw, args.copies, cfgs)
            report["rows"].extend(rows)
            (args.out / "bench_linear.json").write_text(json.dumps(report, indent=1))
            best = min((r for r in rows if r["method"] == "lychee"), key=lambda r: r["us"])
            cub = next(r for r in rows if r["method"] == "cublas")
            print(f"M={m} {name:8s} floor {best['floor_us']:7.1f} us | cublas {cub['us']:7.1f} "
                  f"({cub['pct_of_copy_bw']:.0f}%) | cat {rows[1]['us']:7.1f} | lychee best {best['us']:7.1f} "
                  f"({best['pct_of_copy_bw']:.0f}%) {best['config']}", flush=True)
    print(table(report))


def _cell(r: dict | None) -> str:
    return f"{r['us']:.1f} ({r['pct_of_copy_bw']:.0f}%)" if r else "-"


def table(report) -> str:
    out = ["| M | case | floor us | cuBLAS us (% of copy bw) | cuBLAS concatenated | lychee default | lychee best (config) |",
           "|---|---|---|---|---|---|---|"]
    from lychee_fx.codegen import linear

    default = linear.DEFAULT_CONFIG._asdict()
    keys = dict.fromkeys((r["rows"], r["case"]) for r in report["rows"])
    for m, case in keys:
        rs = [r for r in report["rows"] if (r["rows"], r["case"]) == (m, case)]
        get = {r["method"]: r for r in rs if r["method"] != "lychee"}
        lys = [r for r in rs if r["method"] == "lychee"]
        best = min(lys, key=lambda r: r["us"]) if lys else None
        dflt = next((r for r in lys if r["config"] == default), None)
        cell = _cell
        cfg = best["config"] if best else {}
        out.append(f"| {m} | {case} | {rs[0]['floor_us']:.1f} | {cell(get.get('cublas'))} | {cell(get.get('cublas_cat'))} "
                   f"| {cell(dflt)} | {cell(best)} {tuple(cfg.values())} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
