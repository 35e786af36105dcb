"""The eval's PNG plots, every point with its 95% interval as an error bar: passkey exact
match against context length, perplexity and agreement against budget, and the cost-quality
curve (quality against retrieval KV heads, one line per budget).

matplotlib's object API (``Figure`` + Agg canvas): no pyplot, no global backend.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_plots"]

_COLORS = {"full": "black", "lychee": "tab:red", "map": "tab:purple", "random": "tab:blue", "tidal": "tab:green",
           "duo": "tab:orange", "sink+recent": "tab:gray"}

# (label, color, line style, xs, intervals (dicts with point/lo/hi))
Series = tuple[str, str, str, list, list]


def _axes(fig, pos: int = 111):
    return fig.add_subplot(pos)


def _draw(ax, title: str, xlabel: str, ylabel: str, series: list[Series], hline=None, logx=False, ylim=None) -> None:
    for label, color, style, xs, ivs in series:
        ys = [d["point"] for d in ivs]
        err = [[d["point"] - d["lo"] for d in ivs], [d["hi"] - d["point"] for d in ivs]]
        ax.errorbar(xs, ys, yerr=err, fmt=style, color=color, label=label, marker="o", markersize=3, capsize=2, linewidth=1)
    if hline is not None:
        ax.axhspan(hline[1]["lo"], hline[1]["hi"], color="black", alpha=0.08)
        ax.axhline(hline[1]["point"], color="black", linestyle=":", label=hline[0])
    if logx:
        ax.set_xscale("log", base=2)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


def _save(path: Path, draw, size=(7, 4.5)) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(fig)
    draw(fig)
    fig.tight_layout()
    fig.savefig(path)


def _label(r: dict) -> str:
    tag = f" {r['tag']}" if r.get("tag") else ""
    corr = f" + corr {r['correct_every']}" if r["correct_every"] else ""
    return f"{r['family']}{tag}{corr}"


def _passkey_plot(data: dict, out: Path) -> Path | None:
    from lychee_fx.apps.eval_report import table_rows

    budget, bs = data["grid"]["headline"]
    rows = [r for r in table_rows(data, budget, bs) if r.get("passkey")]
    ref = data["reference"].get("passkey")
    if not rows or not ref:
        return None
    series = [("reference (plain model)", "black", ":", [int(k) for k in ref["by_length"]], list(ref["by_length"].values()))]
    for r in rows:
        by = r["passkey"]["by_length"]
        series.append((_label(r), _COLORS[r["family"]], "--" if r["correct_every"] else "-", [int(k) for k in by], list(by.values())))
    path = out / "passkey_vs_length.png"
    _save(path, lambda fig: _draw(_axes(fig), f"passkey exact match, 95% intervals (budget {budget}, block {bs})",
                                  "context length (tokens)", "exact match", series, logx=True, ylim=(-0.03, 1.03)))
    return path


def _budget_plot(data: dict, out: Path, metric: str) -> Path | None:
    g = data["grid"]
    series = []
    for fam in ("lychee", "map", "random", "tidal", "duo", "sink+recent"):
        tags = sorted({r.get("tag", "") for r in data["runs"] if r["family"] == fam})
        for tag in tags:
            for block in g["block_sizes"]:
                rs = sorted((r for r in data["runs"] if r["family"] == fam and r.get("tag", "") == tag and r["block_size"] == block
                             and not r["correct_every"] and r.get(metric) is not None), key=lambda r: r["budget"])
                if rs:
                    series.append((f"{_label(rs[0])}, block {block}", _COLORS[fam], "-" if block == g["headline"][1] else "--",
                                   [r["budget"] for r in rs], [r[metric] for r in rs]))
    if not series:
        return None
    full = next((r for r in data["runs"] if r["family"] == "full" and r.get(metric) is not None), None)
    path = out / f"{metric}_vs_budget.png"
    what = f"last {g['score_tokens']} tokens of each window" if metric == "perplexity" else f"first {g['agree_tokens']} generated tokens"
    ylabel = "perplexity" if metric == "perplexity" else "agreement with full attention"
    _save(path, lambda fig: _draw(_axes(fig), f"{metric} against budget, 95% intervals ({what})", "budget (tokens per sparse head)",
                                  ylabel, series, hline=("full attention", full[metric]) if full else None, logx=True))
    return path


def _cost_quality_plot(data: dict, out: Path) -> Path | None:
    bs = data["grid"]["headline"][1]
    rs = [r for r in data["runs"] if r["family"] in ("lychee", "map") and r["block_size"] == bs and not r["correct_every"]]
    if not rs:
        return None
    budgets = sorted({r["budget"] for r in rs})
    full = next((r for r in data["runs"] if r["family"] == "full"), None)
    metrics = [m for m in ("passkey", "perplexity", "agreement") if any(_value(r, m) for r in rs)]

    def draw(fig):
        for i, metric in enumerate(metrics):
            series = []
            for j, b in enumerate(budgets):
                pts = sorted((r for r in rs if r["budget"] == b and _value(r, metric)), key=lambda r: r["retrieval_kv_heads"])
                if pts:
                    series.append((f"budget {b}", f"C{j}", "-", [r["retrieval_kv_heads"] for r in pts], [_value(r, metric) for r in pts]))
            hl = ("full attention", _value(full, metric)) if full and _value(full, metric) else None
            _draw(fig.add_subplot(1, len(metrics), i + 1), f"{metric} (block {bs})", "retrieval KV heads", metric, series, hline=hl)

    path = out / "cost_quality.png"
    _save(path, draw, size=(4 * max(1, len(metrics)), 4))
    return path


def _value(r: dict, metric: str) -> dict | None:
    if metric == "passkey":
        return r["passkey"]["accuracy"] if r.get("passkey") else None
    return r.get(metric)


def write_plots(data: dict, out: Path) -> dict[str, Path]:
    """Every plot the data allows, into ``out``; their paths by name."""
    paths = {"passkey_plot": _passkey_plot(data, out), "perplexity_plot": _budget_plot(data, out, "perplexity"),
             "agreement_plot": _budget_plot(data, out, "agreement"), "cost_quality_plot": _cost_quality_plot(data, out)}
    return {k: v for k, v in paths.items() if v is not None}
