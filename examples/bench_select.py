"""Block selection alone: which ``launch.SelectConfig`` (radix digit width, warps, key width,
tile) is fastest.

    python examples/bench_select.py --out results/

Llama-3-8B attention shape at 128K (2048 blocks of 64 per row), budget 4096 (64 blocks), sink
128, recent 256; rows = batch x 8 retrieval KV heads for batch 1 and 4, and the single row of
a layer with one retrieval head. Each config times the reduce stage launched with its
selection programs only (``retrieval_plan(..., merge=False)``), median of CUDA-graph replays;
every config must select exactly what the first config selects. Prints a table,
writes ``bench_select.json`` and ``bench_select.png``. Target (issue #3): under 5 us for 8 rows.

Each config compiles its own reduce kernel: about 15 s per (case, config) on the H200, so the
default grid (6 configs x 3 cases) takes about 4 to 5 minutes; ``--digit-bits`` and ``--warps`` cut it,
``--early-exit 0,1`` doubles it. Selection alone is not what the decode graph sees: right after
the split kernel the reduce launch took twice its time alone without the early exit
(select_kernel [Note: alone and end to end]); bench_split.py times that order.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from bench_attention import BLOCK, BUDGET, D, HKV, HQ, RECENT, SINK, bench, env_info, ints, ints_or_auto, pyplot

CONTEXT = 131072
CASES = (("B=1, 1 head", 1, [0]), ("B=1, 8 heads", 1, list(range(HKV))), ("B=4, 8 heads", 4, list(range(HKV))))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--context", type=int, default=CONTEXT)
    add_config_args(p, digit_bits=[1, 2, 4], warps=[4, 8], keys=["wide"], early_exit=[1])
    p.add_argument("--merge", action="store_true",
                   help="time the whole reduce launch (the head-dim merge programs beside selection), as the "
                        "decode graph runs it: the kernel then carries both codes, registers too")
    p.add_argument("--cases", type=ints, default=list(range(len(CASES))),
                   help="indices into: " + "; ".join(c[0] for c in CASES))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from lychee_fx.codegen import launch

    configs = select_configs(args)
    rows = []
    torch.manual_seed(0)
    for label, b, heads in [CASES[i] for i in args.cases]:
        q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, HKV, args.context, D, device="cuda", dtype=torch.bfloat16)
        common = (q, k, k, None, None, heads, D**-0.5, BLOCK, BUDGET // BLOCK, SINK, RECENT, True)
        expect = None
        for cfg in configs:
            plan = launch.retrieval_plan(*common, merge=args.merge, select_config=cfg)
            sel = plan.run()[1]  # split (block scores) then selection
            if expect is None:
                expect = sel.clone()
            if not torch.equal(sel, expect):
                raise SystemExit(f"{cfg} selects differently from {configs[0]} for {label}")
            us = bench(dict(plan.stages)["reduce"])
            rows.append(dict(case=label, rows=b * len(heads), **cfg._asdict(), us=us))
            print(f"{label:14s} {_name(cfg._asdict())}: {us:6.2f} us", flush=True)
        del q, k
    report = {"env": env_info(), "context": args.context, "blocks_per_row": args.context // BLOCK,
              "default": launch.SELECT_CONFIG._asdict(), "with_merge": args.merge, "rows": rows}
    (args.out / "bench_select.json").write_text(json.dumps(report, indent=1))
    print(_table(report))
    _plot(report, args.out / "bench_select.png")


def add_config_args(p: argparse.ArgumentParser, *, digit_bits: list[int], warps: list[int], keys: list[str],
                    early_exit: list[int]) -> None:
    """The grid of ``launch.SelectConfig`` fields to run, with its defaults (``select_configs`` builds it)."""
    p.add_argument("--digit-bits", type=ints, default=digit_bits)
    p.add_argument("--warps", type=ints, default=warps)
    p.add_argument("--keys", type=lambda x: x.split(","), default=keys, help="wide (int64), narrow (uint32)")
    p.add_argument("--chunks", type=ints_or_auto, default=[None],
                   help="selection tiles in blocks; auto = the row's length rounded up to a power of 2")
    p.add_argument("--early-exit", type=ints, default=early_exit,
                   help="1: the radix select stops once the selected set is fixed (select_kernel [Note: early exit])")


def select_configs(args) -> list:
    """Every ``launch.SelectConfig`` of the grid that ``add_config_args`` parsed."""
    from lychee_fx.codegen import launch

    return [launch.SelectConfig(db, w, keys == "wide", chunk, bool(early))
            for db, w, keys, chunk, early in itertools.product(args.digit_bits, args.warps, args.keys, args.chunks,
                                                               args.early_exit)]


def key_width(wide: bool) -> str:
    return "int64" if wide else "uint32"


def _name(cfg: dict) -> str:
    """A config's label: digit bits, warps, key width, tile, early exit (rows of older runs lack
    the last three)."""
    chunk = cfg.get("chunk") or "auto"
    early = " / early exit" if cfg.get("early_exit") else ""
    return (f"{cfg['digit_bits']} bit / {cfg['num_warps']} w / {key_width(cfg.get('wide_keys', True))} / "
            f"tile {chunk}{early}")


def _grid(report):
    """(cases, config labels, {(case, label): us}), in run order."""
    rows = report["rows"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    cfgs = list(dict.fromkeys(_name(r) for r in rows))
    return cases, cfgs, {(r["case"], _name(r)): r["us"] for r in rows}


def _table(report) -> str:
    cases, cfgs, get = _grid(report)
    env = report["env"]
    what = "Reduce launch (merge and selection)" if report.get("with_merge") else "Selection alone"
    out = [f"# {what}, {report['blocks_per_row']} blocks per row: {env['gpu']}, torch {env['torch']}, "
           f"triton {env['triton']}, {env['date']}; microseconds (median of CUDA graph replays)",
           "| config | " + " | ".join(cases) + " |", "|---|" + "---|" * len(cases)]
    for cfg in cfgs:
        out.append(f"| {cfg} | " + " | ".join(f"{get[(c, cfg)]:.2f}" if (c, cfg) in get else "" for c in cases) + " |")
    return "\n".join(out)


def _plot(report, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    cases, cfgs, get = _grid(report)
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(cases)
    for i, c in enumerate(cases):
        ax.bar([j + i * width for j in range(len(cfgs))], [get.get((c, cfg), 0.0) for cfg in cfgs], width, label=c)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cfgs))], cfgs, fontsize=6, rotation=30, ha="right")
    ax.axhline(5.0, color="k", ls=":", label="target, 8 rows")
    ax.set_ylabel("microseconds")
    ax.set_title(f"selection alone, {report['blocks_per_row']} blocks per row, {report['env']['gpu']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
