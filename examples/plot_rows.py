"""Bars of bench_decode rows at one context, from one or more device calls: a panel per
(model, batch), two bars per row (ms per synced step, ms per token of the decode loop), and
the dense and paper-ratio floors as lines.

    python examples/plot_rows.py --out rows.png --context 131072 \\
        call2=run0/bench_decode.json call6=run0/bench_decode.json

A ``label=path`` argument tags its bars with the label (say, which call timed them): rows of
different calls are not one run, and the plot says so. A row that appears in several files
is drawn once per file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_attention import pyplot
from bench_decode import METHODS as METHOD_ORDER


def load(specs: list[str], context: int) -> list[dict]:
    """Rows at ``context`` of each ``[label=]path``, each with its file's model, GPU, date and label."""
    rows = []
    for spec in specs:
        label, _, path = spec.rpartition("=")
        report = json.loads(Path(path).read_text())
        env = report["env"]
        for r in report["rows"]:
            if r["context"] == context:
                rows.append({**r, "model": env["model"], "gpu": env["gpu"], "date": env["date"], "label": label})
    if not rows:
        raise SystemExit(f"no row at context {context} in {specs}")
    return rows


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        raise SystemExit("matplotlib is not installed")
    from matplotlib.ticker import FuncFormatter

    panels = list(dict.fromkeys((r["model"], r["batch"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4), squeeze=False)
    for ax, (model, batch) in zip(axes[0], panels):
        rs = sorted((r for r in rows if (r["model"], r["batch"]) == (model, batch)),
                    key=lambda r: (METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER else 99, r["label"]))
        xs = range(len(rs))
        step = ax.bar([x - 0.2 for x in xs], [r["ms"] for r in rs], 0.4, label="synced step")
        loop = ax.bar([x + 0.2 for x in xs], [r.get("loop_ms", 0.0) for r in rs], 0.4, label="decode loop")
        for bars in (step, loop):
            ax.bar_label(bars, fmt="%.1f", fontsize=6)
        for name, paper, style in (("dense", False, ":"), ("paper ratio", True, "--")):
            floors = [r["floor_ms"] for r in rs if r["method"].startswith("lychee_paper") == paper]
            if floors:
                ax.axhline(floors[0], color="k", linestyle=style, linewidth=0.8, label=f"floor ({name})")
        ax.set_xticks(list(xs), [r["method"].replace("compile_reduce_overhead", "HF compiled")
                                 + (f"\n({r['label']})" if r["label"] else "") for r in rs], fontsize=7, rotation=20)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if f"{y:g}"[0] in "25" else ""))
        ax.set_ylabel("ms per token")
        ax.set_title(f"{model}, batch {batch}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7)
    gpus = sorted({r["gpu"] for r in rows})
    dates = sorted({r["date"] for r in rows})
    fig.suptitle(f"decode at {rows[0]['context']} tokens, {', '.join(gpus)}, {', '.join(dates)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("files", nargs="+", help="bench_decode.json files, each optionally as label=path")
    args = p.parse_args(argv)
    plot(load(args.files, args.context), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
