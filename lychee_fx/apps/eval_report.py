"""Write the eval's results: ``results.json`` (everything), ``results.md`` (tables) and PNG
plots (passkey accuracy against context length; perplexity and agreement against budget).

Plots use matplotlib's object API (``Figure`` + Agg canvas): no pyplot, no global backend.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["write_report", "headline_rows", "markdown"]

_FAMILY_ORDER = ("full", "lychee", "random", "tidal", "sink+recent")
_COLORS = {"full": "black", "lychee": "tab:red", "random": "tab:blue", "tidal": "tab:green", "sink+recent": "tab:gray"}


def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pk(run: dict) -> float | None:
    return run["passkey"]["accuracy"] if run.get("passkey") else None


def headline_rows(data: dict) -> list[dict]:
    """The runs shown in the headline: full, every family at the headline options, the
    lower bound at the headline block size, and the cache-correction variants."""
    budget, bs = data["grid"]["headline"]
    rows = []
    for run in data["runs"]:
        fam = run["family"]
        at_headline = run["budget"] == budget and run["block_size"] == bs
        if fam == "full" or (fam == "sink+recent" and run["block_size"] == bs) or (at_headline and fam != "sink+recent"):
            rows.append(run)
    return sorted(rows, key=lambda r: (r["correct_every"] > 0, _FAMILY_ORDER.index(r["family"])))


def _name(run: dict) -> str:
    name = run["family"]
    if run["family"] == "sink+recent":
        name += f" (budget {run['budget']})"
    if run["correct_every"]:
        name += f" + correction every {run['correct_every']}"
    return name


def _losses(data: dict) -> list[str]:
    """Where lychee loses to full attention, in words, at the headline and across the grid."""
    full = next((r for r in data["runs"] if r["family"] == "full"), None)
    ly = [r for r in data["runs"] if r["family"] == "lychee" and not r["correct_every"]]
    if full is None or not ly:
        return ["(needs both the full and the lychee methods)"]
    budget, bs = data["grid"]["headline"]
    head = next((r for r in ly if r["budget"] == budget and r["block_size"] == bs), None)
    lines = []
    if head is not None:
        keys = full["passkey"]["keys"] if full.get("passkey") else 0
        if keys:
            d = _pk(head) - _pk(full)
            lines.append(f"passkey exact match at budget {budget}, block {bs}: lychee {_f(_pk(head))} vs full {_f(_pk(full))} "
                         f"({d * 100:+.1f} points; {keys} keys, so one key is {100 / keys:.1f} points)")
        if full.get("perplexity"):
            rel = head["perplexity"] / full["perplexity"] - 1
            lines.append(f"perplexity: lychee {_f(head['perplexity'])} vs full {_f(full['perplexity'])} ({rel * 100:+.2f} %)")
            lines.append(f"greedy agreement with full attention: {_f(head['agreement'])} "
                         f"(first divergence at tokens {head['first_divergence']})")
        for r in data["runs"]:
            if r["family"] == "lychee" and r["correct_every"] and r["budget"] == budget and r["block_size"] == bs:
                lines.append(f"with cache correction every {r['correct_every']}: passkey {_f(_pk(r))}, "
                             f"perplexity {_f(r['perplexity'])}, agreement {_f(r['agreement'])}")
    if full.get("perplexity"):
        worst = max(ly, key=lambda r: r["perplexity"])
        best = min(ly, key=lambda r: r["perplexity"])
        lines.append(f"across the grid, lychee's perplexity ranges from {_f(best['perplexity'])} (budget {best['budget']}, "
                     f"block {best['block_size']}) to {_f(worst['perplexity'])} (budget {worst['budget']}, block {worst['block_size']})")
    return lines


def markdown(data: dict) -> str:
    g, ref, m = data["grid"], data["reference"], data["model"]
    budget, bs = g["headline"]
    lengths = list(ref["passkey"]["by_length"]) if ref.get("passkey") else []
    pk_items = [it for it in ref["items"] if "passkeys" in it]
    mean_tokens = {L: round(sum(it["context"] for it in pk_items if str(it["length"]) == L) /
                            max(1, sum(1 for it in pk_items if str(it["length"]) == L))) for L in lengths}
    v = data["versions"]
    out = [
        f"# lychee_fx eval: {m['name']} ({data['date']})",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Model: {m['layers']} layers, {m['query_heads']} query heads, {m['kv_heads']} KV heads, {m['max_positions']} positions, "
        f"{m['dtype']} on {m['device']}. torch {v['torch']}, transformers {v['transformers']}, {v['threads']} threads, "
        f"{v['platform']}. Backend compiler: {data['compiler']}. Seed {data['seed']}. Wall time {data['seconds'] / 60:.1f} min.",
        "",
        f"Lychee map: {data['lychee_map']}. Learned map: {'present' if data['learned_map']['present'] else 'ABSENT'} "
        f"({data['learned_map']['where']}).",
        "",
        f"Tasks. Passkey: {g['prompts_per_length']} prompt(s) per context length {list(g['lengths'])} (mean prompt tokens "
        f"{list(mean_tokens.values())}), {g['num_keys']} keys each at seeded random depths, greedy answer, exact match per key. "
        f"Perplexity: the last {g['score_tokens']} tokens of {g['texts']} window(s) of {g['text_length']} tokens of prose, "
        f"one decode step each. Agreement: the first {g['agree_tokens']} greedy tokens from the same point, position by "
        f"position against the plain (uncompiled) model's. Options: sink {g['sink']}, recent {g['recent']}.",
        "",
        f"## Headline: budget {budget}, block size {bs}",
        "",
        "| method | retrieval KV heads | passkey EM | " + " | ".join(f"EM @{L}" for L in lengths) + " | perplexity | agreement |",
        "|---|---|---|" + "---|" * len(lengths) + "---|---|",
    ]
    total = m["layers"] * m["kv_heads"]
    pk_ref = ref.get("passkey") or {"by_length": {}}
    out.append(f"| reference: plain model, full attention | {total}/{total} | {_f(_pk(ref))} | "
               + " | ".join(_f(pk_ref["by_length"].get(L)) for L in lengths) + f" | {_f(ref.get('perplexity'))} | 1.000 |")
    for r in headline_rows(data):
        by = (r.get("passkey") or {}).get("by_length", {})
        out.append(f"| {_name(r)} | {r['retrieval_kv_heads']}/{total} | {_f(_pk(r))} | "
                   + " | ".join(_f(by.get(L)) for L in lengths) + f" | {_f(r.get('perplexity'))} | {_f(r.get('agreement'))} |")
    out += ["", "What the methods are:", ""]
    seen = set()
    for r in data["runs"]:
        if r["family"] not in seen:
            seen.add(r["family"])
            out.append(f"- **{r['family']}**: {r['label']}")
    out += ["", "## Where lychee loses to full attention", ""] + [f"- {x}" for x in _losses(data)]
    out += ["", "## The whole grid", "",
            "| method | block | budget | passkey EM | perplexity | agreement | mean first divergence | ms / decode step |",
            "|---|---|---|---|---|---|---|---|"]
    for r in sorted(data["runs"], key=lambda r: (_FAMILY_ORDER.index(r["family"]), r["correct_every"], r["block_size"], r["budget"])):
        fd = r.get("first_divergence") or []
        ms = sum(it["ms_per_step"] for it in r["items"]) / max(1, len(r["items"]))
        out.append(f"| {_name(r)} | {r['block_size']} | {r['budget']} | {_f(_pk(r))} | {_f(r.get('perplexity'))} | "
                   f"{_f(r.get('agreement'))} | {_f(sum(fd) / len(fd), 1) if fd else 'n/a'} | {ms:.0f} |")
    depth_rows = [r for r in headline_rows(data) if r.get("passkey")]
    if depth_rows:
        buckets = sorted({b for r in depth_rows for b in r["passkey"]["by_depth"]} | set(pk_ref.get("by_depth", {})))
        out += ["", f"## Passkey exact match by depth (budget {budget}, block {bs})", "",
                "| method | " + " | ".join(buckets) + " |", "|---|" + "---|" * len(buckets)]
        out.append("| reference | " + " | ".join(_f(pk_ref["by_depth"].get(b)) for b in buckets) + " |")
        for r in depth_rows:
            out.append(f"| {_name(r)} | " + " | ".join(_f(r["passkey"]["by_depth"].get(b)) for b in buckets) + " |")
    out += ["", "## Plots", "", "![passkey accuracy against context length](passkey_vs_length.png)", "",
            "![perplexity against budget](perplexity_vs_budget.png)", "", "![agreement against budget](agreement_vs_budget.png)",
            "", "## Notes", "",
            "- ms / decode step is the CPU cost of the backend's vectorised eager ops, averaged over all prompts; it is not a "
            "speed claim (the fast path is the CUDA kernels).",
            "- The reference row is the plain model; the `full` row is every head retrieval through the backend, which "
            "SPEC 1.1 says equals full attention: its agreement and perplexity check the harness itself.",
            "- Greedy agreement compares positions after a divergence too; a divergence early in a window lowers it "
            "even when the continuation is as good."]
    return "\n".join(out) + "\n"


def _plot(path: Path, title: str, xlabel: str, ylabel: str, series: list[tuple[str, str, str, list, list]], hline=None, logx=False, ylim=None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, color, style, xs, ys in series:
        ax.plot(xs, ys, style, color=color, label=label, marker="o", markersize=4)
    if hline is not None:
        ax.axhline(hline[1], color="black", linestyle=":", label=hline[0])
    if logx:
        ax.set_xscale("log", base=2)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def _plots(data: dict, out: Path) -> dict[str, Path]:
    g = data["grid"]
    budget, bs = g["headline"]
    paths = {}
    rows = [r for r in headline_rows(data) if r.get("passkey")]
    if rows and data["reference"].get("passkey"):
        series = []
        ref = data["reference"]["passkey"]["by_length"]
        series.append(("reference (plain model)", "black", ":", [int(k) for k in ref], list(ref.values())))
        for r in rows:
            by = r["passkey"]["by_length"]
            style = "--" if r["correct_every"] else "-"
            series.append((_name(r), _COLORS[r["family"]], style, [int(k) for k in by], list(by.values())))
        paths["passkey_plot"] = out / "passkey_vs_length.png"
        _plot(paths["passkey_plot"], f"passkey exact match (budget {budget}, block {bs})", "context length (tokens asked)", "accuracy", series, ylim=(-0.03, 1.03))
    for metric, fname, ylabel in (("perplexity", "perplexity_vs_budget.png", "perplexity"), ("agreement", "agreement_vs_budget.png", "agreement with full attention")):
        series = []
        for fam in ("lychee", "random", "tidal", "sink+recent"):
            for block in g["block_sizes"]:
                rs = sorted((r for r in data["runs"] if r["family"] == fam and r["block_size"] == block
                             and not r["correct_every"] and r.get(metric) is not None), key=lambda r: r["budget"])
                if rs:
                    series.append((f"{fam}, block {block}", _COLORS[fam], "-" if block == max(g["block_sizes"]) else "--",
                                   [r["budget"] for r in rs], [r[metric] for r in rs]))
        full = next((r for r in data["runs"] if r["family"] == "full" and r.get(metric) is not None), None)
        if series:
            paths[f"{metric}_plot"] = out / fname
            what = f"last {g['score_tokens']} tokens of each text" if metric == "perplexity" else f"first {g['agree_tokens']} generated tokens"
            _plot(paths[f"{metric}_plot"], f"{metric} against budget ({what})",
                  "budget (tokens per sparse head)", ylabel, series, hline=("full attention", full[metric]) if full else None, logx=True)
    return paths


def write_report(data: dict, out: str | Path) -> dict[str, Path]:
    """Write JSON, markdown and plots into ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    paths["json"].write_text(json.dumps(data, indent=1) + "\n")
    paths["markdown"].write_text(markdown(data))
    paths.update(_plots(data, out))
    return paths
