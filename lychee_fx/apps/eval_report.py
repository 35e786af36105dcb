"""Write the eval's results: ``results.json`` (everything, per-item records included),
``results.md`` (tables, every number with its 95% interval, the targets) and PNG plots
(``eval_plots``).

Metric values in ``data`` are interval dicts (``point``, ``lo``, ``hi``) from
:mod:`lychee_fx.apps.eval_summary`.
"""

from __future__ import annotations

import json
from pathlib import Path

from lychee_fx.apps.eval_plots import write_plots

__all__ = ["write_report", "table_rows", "markdown", "FAMILY_ORDER"]

FAMILY_ORDER = ("full", "lychee", "map", "random", "tidal", "duo", "sink+recent")


def _iv(d: dict | None, digits: int = 3) -> str:
    if not d:
        return "n/a"
    return f"{d['point']:.{digits}f} [{d['lo']:.{digits}f}, {d['hi']:.{digits}f}]"


def _metric(run: dict, name: str) -> dict | None:
    if name == "passkey":
        return run["passkey"]["accuracy"] if run.get("passkey") else None
    return run.get(name)


def _order(r: dict) -> tuple:
    return (r["correct_every"] > 0, FAMILY_ORDER.index(r["family"]), r.get("tag", ""), r["block_size"], r["budget"])


def table_rows(data: dict, budget: int, block_size: int) -> list[dict]:
    """The runs of a headline-style table at (budget, block size): full attention, every
    family there, the lower bound at that block size, and the cache-correction variants."""
    rows = []
    for run in data["runs"]:
        fam = run["family"]
        at = run["budget"] == budget and run["block_size"] == block_size
        if fam == "full" or (fam == "sink+recent" and run["block_size"] == block_size) or (at and fam != "sink+recent"):
            rows.append(run)
    return sorted(rows, key=_order)


def _name(run: dict) -> str:
    name = run["family"]
    if run.get("tag"):
        name += f" ({'seed ' if run['family'] == 'random' else ''}{run['tag']}{' heads' if run['family'] == 'map' else ''})"
    if run["family"] == "sink+recent":
        name += f" (budget {run['budget']})"
    if run["family"] == "duo" and run.get("stream"):
        name += f" (sink {run['stream'][0]} + recent {run['stream'][1]})"
    if run["correct_every"]:
        name += f" + correction every {run['correct_every']}"
    return name


def _table(data: dict, budget: int, bs: int) -> list[str]:
    m = data["model"]
    total = m["layers"] * m["kv_heads"]
    ref = data["reference"]
    out = [f"## Headline: budget {budget}, block size {bs}", "",
           "| method | retrieval KV heads | passkey EM | perplexity | agreement | ms / step |", "|---|---|---|---|---|---|",
           f"| reference: plain model, full attention | {total}/{total} | {_iv(_metric(ref, 'passkey'))} | "
           f"{_iv(ref.get('perplexity'), 2)} | 1.000 | {ref['ms_per_step']:.1f} |"]
    for r in table_rows(data, budget, bs):
        out.append(f"| {_name(r)} | {r['retrieval_kv_heads']}/{total} | {_iv(_metric(r, 'passkey'))} | "
                   f"{_iv(r.get('perplexity'), 2)} | {_iv(r.get('agreement'))} | {r['ms_per_step']:.1f} |")
    return out + [""]


def _by(data: dict, budget: int, bs: int, key: str, title: str) -> list[str]:
    ref = data["reference"].get("passkey")
    if not ref:
        return []
    cols = sorted(ref[key], key=lambda x: (float(x.split("-")[0]) if "-" in x else float(x)))
    out = [f"## {title} (budget {budget}, block {bs})", "", "| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols),
           "| reference | " + " | ".join(_iv(ref[key].get(c), 2) for c in cols) + " |"]
    for r in table_rows(data, budget, bs):
        if r.get("passkey"):
            out.append(f"| {_name(r)} | " + " | ".join(_iv(r["passkey"][key].get(c), 2) for c in cols) + " |")
    return out + [""]


def _targets(data: dict) -> list[str]:
    out = ["## Targets", "",
           "Learned map (lychee) against the other methods over the same prompts (paired bootstrap, 95%). The headline "
           "point is the issue's target; the others are reported whatever they show.", ""]
    for point, rows in data.get("targets", {}).items():
        out += [f"### budget {point.split('/')[0]}, block {point.split('/')[1]}", "", "| target | result | value | rule |", "|---|---|---|---|"]
        for t in rows:
            verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
            out.append(f"| {t['target']} | **{verdict}** | {t['value']} | {t['rule']} |")
        out.append("")
    return out


def _cost_quality(data: dict) -> list[str]:
    bs = data["grid"]["headline"][1]
    rs = [r for r in data["runs"] if r["family"] in ("lychee", "map") and r["block_size"] == bs and not r["correct_every"]]
    if not rs:
        return []
    heads = sorted({r["retrieval_kv_heads"] for r in rs})
    budgets = sorted({r["budget"] for r in rs})
    total = data["model"]["layers"] * data["model"]["kv_heads"]
    out = [f"## Cost-quality: retrieval KV heads x budget (block {bs})", "",
           f"Learned maps (lychee and --maps) by retrieval KV head count (of {total}). Each cell: passkey EM / perplexity / agreement.", "",
           "| retrieval KV heads | " + " | ".join(f"budget {b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for h in heads:
        cells = []
        for b in budgets:
            r = next((r for r in rs if r["retrieval_kv_heads"] == h and r["budget"] == b), None)
            cells.append("—" if r is None else f"{_iv(_metric(r, 'passkey'))} / {_iv(r.get('perplexity'), 2)} / {_iv(r.get('agreement'))}")
        out.append(f"| {h} | " + " | ".join(cells) + " |")
    return out + [""]


def _grid_table(data: dict) -> list[str]:
    out = ["## The whole grid", "",
           "| method | block | budget | passkey EM | perplexity | agreement | first divergence | ms / step | graphs | traces | first-batch overhead (s) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(data["runs"], key=_order):
        fd = r.get("first_divergence")
        out.append(f"| {_name(r)} | {r['block_size']} | {r['budget']} | {_iv(_metric(r, 'passkey'))} | {_iv(r.get('perplexity'), 2)} | "
                   f"{_iv(r.get('agreement'))} | {'n/a' if fd is None else f'{fd:.1f}'} | {r['ms_per_step']:.1f} | {r['graphs']} | "
                   f"{r['traces']} | {r['first_batch_overhead_s']:.1f} |")
    return out + [""]


def _partial(data: dict) -> list[str]:
    """A warning line for results written before the run finished (none when it did)."""
    p = data.get("partial")
    if not p or p["methods_done"] >= p["methods"]:
        return []
    return [f"**Partial results: {p['methods_done']} of {p['methods']} methods** (written after each method; the run "
            "did not reach the end, or is still running).", ""]


def markdown(data: dict) -> str:
    """The whole ``results.md``."""
    g, m, v, est, tm = data["grid"], data["model"], data["versions"], data["estimate"], data["timing"]
    ref = data["reference"]
    keys = ref["passkey"]["keys"] if ref.get("passkey") else 0
    out = [
        f"# lychee_fx eval: {m['name']} ({data['date']})", "",
        f"Command: `{data['command']}`", "",
        *_partial(data),
        f"Model: {m['layers']} layers, {m['query_heads']} query heads, {m['kv_heads']} KV heads, {m['max_positions']} positions, "
        f"{m['dtype']} on {m['device']}. torch {v['torch']}, transformers {v['transformers']}, {v['threads']} threads, "
        f"{v['platform']}. Backend compiler: {data['compiler']}, `dynamic=True`. Seed {data['seed']}.", "",
        f"Wall time {data['seconds']:.0f} s: load {tm['load_s']:.0f} s, prefill {tm['prefill_s']:.0f} s, reference "
        f"{tm['reference_s']:.0f} s, methods {tm['methods_s']:.0f} s. {est['methods']} methods + the reference; {est['rows']} prompts "
        f"in {est['batches']} batches of up to {est['batch']}; {est['steps_per_method']} batched decode steps per method.", "",
        f"Lychee map: {data['lychee_map']}. Learned map: {'present' if data['learned_map']['present'] else 'ABSENT'} "
        f"({data['learned_map']['where']}).", "",
        f"Tasks. Passkey: {g['prompts_per_length']} prompts of exactly each of {list(g['lengths'])} tokens, {g['num_keys']} keys each "
        f"at seeded random depths ({keys} keys), greedy answer, exact match per key. Perplexity: the last {g['score_tokens']} "
        f"tokens of {g['texts']} windows of {g['text_length']} tokens of prose, one decode step each. Agreement: the first "
        f"{g['agree_tokens']} greedy tokens from the same point against the plain model's. Options: sink {g['sink']}, recent {g['recent']}.", "",
        f"Intervals: 95% percentile bootstrap ({g['resamples']} resamples, seeded) over whole prompts (passkey, widened to the "
        "Wilson interval over keys), windows (perplexity, exp of the mean nll per resample) and prompts (agreement); target "
        "checks use the paired bootstrap of the difference over the same prompts.", "",
    ]
    b, bs = g["headline"]
    points = [(int(p.split("/")[0]), int(p.split("/")[1])) for p in data.get("targets", {})] or [(b, bs)]
    for pb, pbs in points:
        out += _table(data, pb, pbs)
    out += ["What the methods are:", ""]
    seen = set()
    for r in sorted(data["runs"], key=_order):
        if (r["family"], r.get("tag", "")) not in seen and not r["correct_every"]:
            seen.add((r["family"], r.get("tag", "")))
            out.append(f"- **{_name(r) if r['family'] in ('random', 'map') else r['family']}**: {r['label']}")
    out.append("")
    out += _targets(data)
    for pb, pbs in points:
        out += _by(data, pb, pbs, "by_length", "Passkey exact match by context length")
        out += _by(data, pb, pbs, "by_depth", "Passkey exact match by depth")
    out += _cost_quality(data)
    out += _grid_table(data)
    out += ["## Plots", "", "![passkey accuracy against context length](passkey_vs_length.png)", "",
            "![perplexity against budget](perplexity_vs_budget.png)", "", "![agreement against budget](agreement_vs_budget.png)", "",
            "![cost-quality](cost_quality.png)", "", "## Notes", "",
            "- ms / step is the wall time of one batched decode step (the whole batch), median over batches after the first; "
            "'first-batch overhead' is the first batch's time beyond that rate: the compile (Dynamo trace + backend) for a "
            "compiled method. 'graphs' counts graphs the backend compiled, 'traces' the frames Dynamo traced.",
            "- The reference row is the plain model; the `full` row is every head retrieval through the backend, which "
            "SPEC 1.1 says equals full attention: its agreement and perplexity check the harness itself.",
            "- `duo` runs the plain model with a DuoAttention-style attention function (transformers' AttentionInterface), "
            "not the backend: it has no graphs.",
            "- Greedy agreement compares positions after a divergence too; a divergence early in a window lowers it "
            "even when the continuation is as good."]
    return "\n".join(out) + "\n"


def write_report(data: dict, out: str | Path) -> dict[str, Path]:
    """Write JSON, markdown and plots into ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    paths["json"].write_text(json.dumps(data, indent=1) + "\n")
    paths["markdown"].write_text(markdown(data))
    paths.update(write_plots(data, out))
    return paths
