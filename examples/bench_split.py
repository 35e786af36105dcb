"""The split kernels alone: which ``launch.SplitConfig`` (slots per tile, warps, stages) and
split size is fastest, beside the byte floor and the default config.

    python examples/bench_split.py --out results/

Why: end to end, the retrieval split of a one-head layer took 28 to 52 us at 128K in
different processes, with the same code. Inductor tunes a user kernel once per compiled
kernel, at its first run, whatever size that run has; this sweep shows how much the config
and the split size are worth at the sizes the decode graph runs.

Llama-3-8B attention shape (Hq 32, Hkv 8, D 128, bf16), block 64, budget 4096. Cases: the
retrieval op of a paper-ratio layer (one retrieval KV head, with selection) and of a dense
layer (all 8 heads, no selection), and the sparse op of the 7 other heads, at batch 1 and 4.
Contexts default to 8K and 128K plus 26 slots (the decode rows' cache: context + prompt +
steps, so 2049 blocks at 128K). Each point is the median of CUDA-graph replays of the split
stage alone, of the reduce or merge stage alone ("tail") and of the whole op (split + tail).
``--masks`` times each case also under the (B, N) mask that HF's decode graph passes
([Note: decode masks]): a one-head retrieval split ran 1.3 to 1.6x slower with it on the
H200 (2026-11-30d). Every config must compute what the default computes. "default" rows
launch as compiled graphs do (``launch.DEFAULT_SPLIT_CONFIG``; before 2026-11-30c these rows
were "autotuned": Triton's autotuner keyed without the cache length, which tuned on the first
case of a run and kept that choice for every later case, [Note: split defaults] in launch).
Floor = K and V bytes the op must read / copy bandwidth measured in the same run.

Prints a table, writes ``bench_split.json`` (after every row: a run cut short keeps what it timed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench_attention import (BLOCK, BUDGET, D, HKV, HQ, RECENT, SINK, bench, copy_bandwidth, env_info, ints,
                             ints_or_auto, split_config)

# (label, batch, op, heads): op "retrieval" selects when it is not every head (as the pass emits)
CASES = (
    ("B=1 retrieval, 1 head", 1, "retrieval", [0]),
    ("B=1 retrieval, 8 heads", 1, "retrieval", list(range(HKV))),
    ("B=1 sparse, 7 heads", 1, "sparse", list(range(1, HKV))),
    ("B=4 retrieval, 1 head", 4, "retrieval", [0]),
    ("B=4 retrieval, 8 heads", 4, "retrieval", list(range(HKV))),
    ("B=4 sparse, 7 heads", 4, "sparse", list(range(1, HKV))),
)


def _plan(op: str, q, k, v, mask, heads, sel_prev, split_config, split_size):
    from lychee_fx.codegen import launch

    if op == "retrieval":
        select = len(heads) < HKV
        return launch.retrieval_plan(q, k, v, mask, sel_prev if select else None, heads, D**-0.5, BLOCK,
                                     BUDGET // BLOCK, SINK, RECENT, select, split_size=split_size,
                                     split_config=split_config)
    return launch.sparse_plan(q, k, v, mask, sel_prev, heads, D**-0.5, BLOCK, split_size=split_size,
                              split_config=split_config)


# [Note: decode masks] HF's decode graph passes a (B, N) bool mask, True up to the current
# position: the static cache holds room for the steps still to come. These masks do the same,
# with the last MASK_ROOM slots not yet written; "additive" is the float form of that mask;
# "bool_half" is a static cache filled to half its length.
MASKS = ("none", "bool", "additive", "bool_half")
MASK_ROOM = 16


def decode_mask(kind: str, b: int, n: int, device="cuda", dtype=torch.bfloat16):
    """(B, N) mask of ``kind`` (one of MASKS; "none" is None): valid but for the last MASK_ROOM
    slots (the first N // 2 alone for "bool_half"); "additive" in ``dtype``, finfo.min where
    invalid."""
    if kind == "none":
        return None
    filled = n // 2 if kind == "bool_half" else n - MASK_ROOM
    valid = (torch.arange(n, device=device) < filled).expand(b, n).contiguous()
    if kind.startswith("bool"):
        return valid
    return torch.zeros((b, n), dtype=dtype, device=device).masked_fill(~valid, torch.finfo(dtype).min)


def floor_bytes(b: int, n: int, op: str, heads: list[int]) -> int:
    slots = n if op == "retrieval" else min(n, BUDGET)
    return b * len(heads) * slots * 2 * D * 2  # K and V, bf16


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--contexts", type=ints, default=[8218, 131098])
    p.add_argument("--splits", type=ints_or_auto, default=[None, 512],
                   help="split sizes in slots; auto = launch.split_plan's")
    p.add_argument("--configs", type=lambda t: [] if t == "default" else [split_config(c) for c in t.split(",")],
                   default=None, help="configs to time beside the default, e.g. 64x4x3,128x4x2 (default: every "
                   "one that fits; 'default': none)")
    p.add_argument("--masks", type=lambda t: t.split(","), default=["none"],
                   help=f"masks to time, some of {','.join(MASKS)}: none, or (B, N) as the decode graph passes it")
    p.add_argument("--cases", type=ints, default=list(range(len(CASES))),
                   help="indices into: " + "; ".join(c[0] for c in CASES))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from lychee_fx.codegen import launch

    configs = launch.split_configs(BLOCK, D, 2)
    if misfit := [m for m in args.masks if m not in MASKS]:
        raise SystemExit(f"--masks {misfit}: expected some of {list(MASKS)}")
    if args.configs is not None:
        if misfit := [c for c in args.configs if c not in configs]:
            raise SystemExit(f"--configs {misfit} are not among the tuned configs: expected some of {configs}")
        configs = args.configs
    bandwidth = copy_bandwidth()
    rows = []
    torch.manual_seed(0)
    for n in args.contexts:
        for label, b, op, heads in [CASES[i] for i in args.cases]:
            q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(b, HKV, n, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)  # its own bytes: an alias of k would be read from L2
            blocks = torch.arange(BUDGET // BLOCK, dtype=torch.int32, device="cuda")
            blocks = torch.where(blocks < -(-n // BLOCK), blocks, -1)  # a short cache has fewer blocks: -1 pads
            sel_prev = blocks.expand(b, HKV, -1).contiguous()
            floor_us = floor_bytes(b, n, op, heads) / bandwidth * 1e6
            for mask_kind in args.masks:
                mask = decode_mask(mask_kind, b, n)
                expect = _plan(op, q, k, v, mask, heads, sel_prev, None, None).run()
                for split_size in args.splits:
                    for cfg in [None, *configs]:
                        plan = _plan(op, q, k, v, mask, heads, sel_prev, cfg, split_size)
                        got = plan.run()
                        _check(got, expect, f"{label}, mask {mask_kind}, {cfg}, split {split_size}")
                        split_us = bench(dict(plan.stages)["split"], rep=100)
                        tail_us = bench(plan.stages[-1][1], rep=100)  # the reduce or merge stage replayed alone
                        op_us = bench(plan.run, rep=100)
                        rows.append(dict(case=label, context=n, batch=b, op=op, heads=len(heads), mask=mask_kind,
                                         split_size=split_size, config=cfg._asdict() if cfg else "default",
                                         split_us=split_us, tail_us=tail_us, op_us=op_us, floor_us=floor_us))
                        print(f"{n:7d} {label:24s} mask {mask_kind:8s} split {str(split_size or 'auto'):>4s} "
                              f"{_name(rows[-1]['config']):16s} split {split_us:7.2f} us, {plan.stages[-1][0]} alone "
                              f"{tail_us:7.2f}, op {op_us:7.2f} us (floor {floor_us:6.2f})", flush=True)
                        _write(args.out, bandwidth, rows)  # every row so far: a run cut short keeps them
            del q, k, v
    print(_table(_write(args.out, bandwidth, rows)))


def _write(out: Path, bandwidth: float, rows: list[dict]) -> dict:
    report = {"env": env_info(), "copy_bandwidth_TBps": bandwidth / 1e12, "rows": rows}
    (out / "bench_split.json").write_text(json.dumps(report, indent=1))
    return report


def _check(got, expect, what: str) -> None:
    got, expect = (got, expect) if isinstance(got, tuple) else ((got,), (expect,))
    torch.testing.assert_close(got[0], expect[0], rtol=2e-2, atol=2e-2, msg=lambda m: f"{what}: {m}")
    if len(got) > 1 and not torch.equal(got[1], expect[1]):
        raise SystemExit(f"{what} selects differently from the default config")


def _name(cfg) -> str:
    if cfg in ("default", "autotuned"):  # "autotuned": rows of 2026-11-30b, before the default
        return cfg
    return f"{cfg['block_n']} / {cfg['num_warps']} w / {cfg['num_stages']} st"


def _table(report: dict) -> str:
    """Per (context, case): the default op, the best and the worst config and split by op time."""
    out = ["| context | case | mask | floor us | default (auto split) op us | best op us | best config, split "
           "| worst op us |",
           "|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in report["rows"]:
        groups.setdefault((r["context"], r["case"], r.get("mask", "none")), []).append(r)
    for (n, case, mask), rs in groups.items():
        tuned = next(r for r in rs if r["config"] in ("default", "autotuned") and r["split_size"] is None)
        best = min(rs, key=lambda r: r["op_us"])
        worst = max(r["op_us"] for r in rs)
        out.append(f"| {n} | {case} | {mask} | {tuned['floor_us']:.2f} | {tuned['op_us']:.2f} | {best['op_us']:.2f} | "
                   f"{_name(best['config'])}, {best['split_size'] or 'auto'} | {worst:.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
