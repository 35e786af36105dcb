"""The eval's numbers with their 95% intervals, and the targets of issue 17 checked on them.

:func:`summarise` turns one method's per-item records into metrics, each an
:class:`~lychee_fx.apps.eval_stats.Interval` dict (``point``, ``lo``, ``hi``): passkey exact
match (overall, by context length, by depth third), perplexity, greedy agreement.
:func:`paired` compares two methods over the same items; :func:`check_targets` reads the
paired intervals at a (budget, block size).

Item records (``results.json``'s ``items``): ``name``, ``task``, ``length``, ``depths`` and
``found`` (passkey), ``nll`` and ``agreement`` (text).
"""

from __future__ import annotations

from lychee_fx.apps.eval_stats import RESAMPLES, bootstrap, paired_bootstrap, proportion

__all__ = ["summarise", "paired", "check_targets", "depth_bucket", "METRICS"]

# metric -> (task, transform, higher is better)
METRICS = {"passkey": ("passkey", "identity", True), "perplexity": ("text", "exp", False), "agreement": ("text", "identity", True)}


def depth_bucket(depth: float) -> str:
    """Thirds of the prompt: "0.00-0.33", "0.33-0.67", "0.67-1.00"."""
    i = min(2, int(depth * 3))
    return f"{i / 3:.2f}-{(i + 1) / 3:.2f}"


def _units(records: list[dict], metric: str) -> tuple[list[str], list[float], list[float]]:
    """(item names, sums, counts) of one metric, one unit per prompt or window."""
    task = METRICS[metric][0]
    rows = [r for r in records if r["task"] == task]
    if metric == "passkey":
        return [r["name"] for r in rows], [float(sum(r["found"])) for r in rows], [float(len(r["found"])) for r in rows]
    if metric == "perplexity":
        return [r["name"] for r in rows], [float(sum(r["nll"])) for r in rows], [float(len(r["nll"])) for r in rows]
    return [r["name"] for r in rows], [float(r["agreement"]) for r in rows], [1.0] * len(rows)


def summarise(records: list[dict], *, seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """Metrics of one method from its item records, each with its interval."""
    kw = {"seed": seed, "resamples": resamples}
    out: dict = {"passkey": None, "perplexity": None, "agreement": None, "first_divergence": None}
    pk = [r for r in records if r["task"] == "passkey"]
    if pk:
        by_len: dict[int, list[list[bool]]] = {}
        by_depth: dict[str, list[list[bool]]] = {}
        for r in pk:
            by_len.setdefault(r["length"], []).append(r["found"])
            per: dict[str, list[bool]] = {}
            for d, f in zip(r["depths"], r["found"]):
                per.setdefault(depth_bucket(d), []).append(f)
            for b, fs in per.items():
                by_depth.setdefault(b, []).append(fs)
        out["passkey"] = {
            "accuracy": proportion([r["found"] for r in pk], **kw).as_dict(),
            "keys": sum(len(r["found"]) for r in pk), "prompts": len(pk),
            "by_length": {str(k): proportion(v, **kw).as_dict() for k, v in sorted(by_len.items())},
            "by_depth": {k: proportion(v, **kw).as_dict() for k, v in sorted(by_depth.items())},
        }
    tx = [r for r in records if r["task"] == "text"]
    if tx:
        _, s, c = _units(records, "perplexity")
        out["perplexity"] = bootstrap(s, c, transform="exp", **kw).as_dict()
        out["perplexity"]["tokens"] = int(sum(c))
        if all("agreement" in r for r in tx):
            _, s, c = _units(records, "agreement")
            out["agreement"] = bootstrap(s, c, **kw).as_dict()
            out["first_divergence"] = sum(r["first_divergence"] for r in tx) / len(tx)
    return out


def paired(a: list[dict], b: list[dict], metric: str, *, seed: int = 0, resamples: int = RESAMPLES) -> dict | None:
    """Method a against method b over the same items: the difference of ``metric`` (a - b;
    for perplexity the relative change a / b - 1) with its paired bootstrap interval. None
    when neither has the metric's task."""
    na, sa, ca = _units(a, metric)
    nb, sb, cb = _units(b, metric)
    if not na and not nb:
        return None
    if na != nb:
        raise ValueError(f"paired comparison of {metric} needs the same items in both methods: got {len(na)} and {len(nb)} "
                         f"items{'' if len(na) != len(nb) else ', in a different order'}")
    transform, compare = ("exp", "rel") if metric == "perplexity" else ("identity", "diff")
    return paired_bootstrap((sa, ca), (sb, cb), transform=transform, compare=compare, seed=seed, resamples=resamples).as_dict()


def _row(name: str, verdict: bool | None, shown: str, rule: str) -> dict:
    return {"target": name, "pass": verdict, "value": shown, "rule": rule}


def _iv(d: dict, scale: float = 100.0, unit: str = " points") -> str:
    return f"{d['point'] * scale:+.2f}{unit} [{d['lo'] * scale:+.2f}, {d['hi'] * scale:+.2f}]"


def check_targets(runs: list[dict], budget: int, block_size: int, *, seed: int = 0, resamples: int = RESAMPLES) -> list[dict]:
    """Issue 17's targets at (budget, block size), each a dict (``target``, ``pass``: True,
    False or None when a method is missing, ``value``, ``rule``).

    Learned map (family ``lychee``, no correction) against, over the same prompts:
    full attention: passkey difference's interval reaches 0 (hi >= 0); every random map and
    the TidalDecode schedule: the passkey difference's interval above 0 (lo > 0); full
    attention: perplexity at most 1.5% above (point); TidalDecode: agreement at least as high
    (point)."""
    at = [r for r in runs if r["budget"] == budget and r["block_size"] == block_size and not r["correct_every"]]
    full = next((r for r in runs if r["family"] == "full"), None)
    learned = next((r for r in at if r["family"] == "lychee"), None)
    others = [r for r in at if r["family"] in ("random", "tidal")]
    kw = {"seed": seed, "resamples": resamples}
    if learned is None or full is None:
        return [_row(f"budget {budget}, block {block_size}: needs the full and lychee methods", None, "n/a", "")]
    out = []
    d = paired(learned["items"], full["items"], "passkey", **kw)
    if d is not None:
        out.append(_row(f"passkey EM within full attention's interval (budget {budget}, block {block_size})", d["hi"] >= 0,
                        f"lychee - full = {_iv(d)}", "paired 95% interval of the difference reaches 0 (hi >= 0)"))
        for o in others:
            d = paired(learned["items"], o["items"], "passkey", **kw)
            out.append(_row(f"passkey EM above {o['key']}", d["lo"] > 0, f"lychee - {o['family']} = {_iv(d)}",
                            "paired 95% interval of the difference above 0 (lo > 0)"))
        if not others:
            out.append(_row("passkey EM above random maps and TidalDecode", None, "n/a", "methods not run"))
    d = paired(learned["items"], full["items"], "perplexity", **kw)
    if d is not None:
        out.append(_row(f"perplexity at most 1.5% above full attention's (budget {budget}, block {block_size})",
                        d["point"] <= 0.015, f"lychee / full - 1 = {_iv(d, unit=' %')}", "point estimate <= +1.5 %"))
    tidal = next((r for r in others if r["family"] == "tidal"), None)
    if learned.get("agreement") is not None:
        if tidal is None:
            out.append(_row("greedy agreement at least TidalDecode's", None, "n/a", "tidal not run"))
        else:
            d = paired(learned["items"], tidal["items"], "agreement", **kw)
            out.append(_row(f"greedy agreement at least TidalDecode's (budget {budget}, block {block_size})", d["point"] >= 0,
                            f"lychee - tidal = {_iv(d)}", "point estimate of the difference >= 0"))
    return out
