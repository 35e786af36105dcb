"""The census: every causal-LM type of the installed transformers, decoded with lychee and with
SPEC 1.1, one line per type.

    python examples/census.py                          # every type, dynamic cache, compiler="eager"
    python examples/census.py --types llama bloom --caches dynamic static --compiler inductor
    python examples/census.py --out census.json --markdown census.md

Per type (``census_zoo`` builds a tiny random model, float64 so that no near-tie in a block
score can flip), for each cache kind, with a fixed prompt (batch 2, the first row left-padded)
and teacher-forced decode steps:

1. the model's own dense decode (the ground truth for full attention);
2. the oracle (``census_oracle``: ``lychee_fx.reference`` run inside the eager model), with
   every head retrieval, which must equal 1. (else the oracle cannot model this type), and
   with a sparse role map (one retrieval KV head per layer, its index rotating, so that every
   layer and head reads its own row);
3. lychee, ``torch.compile(model, backend=lychee_fx.backend(...))`` per decode step, with
   every head retrieval (must equal 1.) and with the sparse map (must equal 2. with the
   layers lychee declined left dense, which is what a decline means).

Outcomes: ``rewritten`` (every decode attention rewritten, both checks exact), ``partly
rewritten`` (some declined, with reasons; the rewritten ones exact), ``declined`` (no decode
attention rewritten, output dense), ``unverified`` (rewritten and exact with every head
retrieval, but the oracle cannot model the type, so the sparse map is not checked), ``n/a``
(no attention over a KV cache, or the model cannot be built or run), ``WRONG`` (a check
failed: the worst bug), ``ERROR`` (lychee raised).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import logging
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import census_oracle as O  # noqa: E402
import census_zoo as Z  # noqa: E402

import lychee_fx  # noqa: E402
from lychee_fx import HeadRoles  # noqa: E402

OPTS = dict(budget=16, block_size=4, sink=4, recent=4)  # 4 blocks of 4 slots: 2 chosen by score
PROMPT = 40
STEPS = 4
BATCH = 2
PAD = 4  # left padding of the first row
RTOL = {torch.float64: 1e-5, torch.float32: 2e-4}  # models may take softmax in float32

OUTCOMES = ("rewritten", "partly rewritten", "declined", "unverified", "n/a", "WRONG", "ERROR")


@dataclasses.dataclass
class Row:
    model_type: str
    cache: str
    outcome: str
    detail: str = ""
    layers: int = 0  # decode attention calls per step (the oracle's count)
    kv_heads: int = 0
    rewritten: int = 0  # decode sites of the sparse-map run (every compiled graph's)
    declined: int = 0
    sparse_heads: int = 0  # KV heads that ran sparse in one decode step (the most of any compiled step)
    reasons: list[str] = dataclasses.field(default_factory=list)
    errors: dict[str, float] = dataclasses.field(default_factory=dict)  # check -> relative error
    dtype: str = "float64"
    seconds: float = 0.0

    def line(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        counts = (f" [{self.layers} layers; decode sites: {self.rewritten} rewritten, {self.declined} declined; "
                  f"{self.sparse_heads} sparse KV heads per graph]" if self.layers else "")
        return f"{self.model_type:28s} {self.cache:8s} {self.outcome}{extra}{counts}"


def _inputs(pad: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, Z.VOCAB, (BATCH, PROMPT), generator=gen)
    am = torch.ones(BATCH, PROMPT, dtype=torch.long)
    am[0, :pad] = 0
    tokens = torch.randint(3, Z.VOCAB, (BATCH, STEPS), generator=gen)
    return prompt, am, tokens


def _cache(model, kind: str):
    if kind == "dynamic":
        return None
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=PROMPT + STEPS + 4)


def decode(model, kind: str, *, step=None, oracle: O.Oracle | None = None, context=contextlib.nullcontext,
           pad: int = PAD):
    """Prefill with the eager model, then STEPS teacher-forced decode steps through ``step``
    (default: the model), the first row left-padded by ``pad``. Returns the decode logits
    (STEPS, B, V) float64."""
    prompt, am, tokens = _inputs(pad)
    cache = _cache(model, kind)
    step = model if step is None else step
    out_logits = []
    with torch.no_grad(), context():
        kw = {} if cache is None else {"past_key_values": cache}
        out = model(input_ids=prompt, attention_mask=am, use_cache=True, **kw)
        cache = out.past_key_values
        for t in range(STEPS):
            am = torch.cat([am, torch.ones(BATCH, 1, dtype=am.dtype)], dim=1)
            if oracle is not None:
                oracle.start_step()
            out = step(input_ids=tokens[:, t : t + 1], attention_mask=am, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            out_logits.append(out.logits[:, -1].double())
    return torch.stack(out_logits)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def sparse_roles(layers: int, kv_heads: int) -> HeadRoles:
    """One retrieval KV head per layer, its index rotating; all-sparse rows in between for a
    single KV head (so a sparse head always has a twin to read from)."""
    if kv_heads == 1:
        return HeadRoles([[layer % 2 == 0] for layer in range(layers)])
    return HeadRoles([[h == layer % kv_heads for h in range(kv_heads)] for layer in range(layers)])


def _oracle_context(model, oracle: O.Oracle, kv_heads: int, way: str):
    """(context manager factory, restore): the oracle plugged into the model's attention,
    through transformers' attention interface or by intercepting torch functions."""
    if way == "interface":
        # the language model's own implementation (a composite model's top config may name its
        # vision tower's); every run gets a model of its own, so nothing is restored
        base = model.config.get_text_config()._attn_implementation
        name = O.InterfaceAttention(oracle, base).register()
        model.set_attn_implementation(name)
        return contextlib.nullcontext, lambda: model.set_attn_implementation(base)
    return (lambda: O.InterceptMode(oracle, kv_heads)), (lambda: None)


_WAY: dict[str, str] = {}  # model type -> how the oracle reaches its attention


def run_oracle(model, kind: str, roles: HeadRoles | None, kv_heads: int, dense_layers=(), pad: int = PAD, restarts=(),
               key: str = ""):
    """Decode with the oracle in the model's attention (it changes the model's attention
    implementation: pass a model of its own). The first call per ``key`` (a probe,
    ``roles=None``) finds the way in: the attention interface when the model's decode
    attention calls it, else interception."""
    ways = [_WAY[key]] if key in _WAY else ["interface", "intercept"]
    for way in ways:
        oracle = O.Oracle(roles, lychee_fx.DecodeOptions(**OPTS), dense_layers, restarts)
        context, restore = _oracle_context(model, oracle, kv_heads, way)
        try:
            logits = decode(model, kind, oracle=oracle, context=context, pad=pad)
        finally:
            restore()
        if oracle.calls or way == ways[-1]:
            _WAY[key] = way
            return logits, oracle
    raise AssertionError("unreachable")


def run_lychee(model, kind: str, roles: HeadRoles, compiler: str, pad: int = PAD):
    torch._dynamo.reset()
    be = lychee_fx.backend(roles, compiler=compiler, **OPTS)
    step = torch.compile(model, backend=be)
    logits = decode(model, kind, step=step, pad=pad)
    torch._dynamo.reset()
    decode_sites = [s for s in be.report.sites if s.query_len == "1"]
    return logits, be, decode_sites


def census_type(model_type: str, kind: str, compiler: str = "eager") -> Row:
    """One type, one cache kind: the outcome and how it was found."""
    t0 = time.time()
    row = Row(model_type, kind, "n/a")
    for dtype in (torch.float64, torch.float32):  # float32 where a kernel has no float64 (grouped MoE mm)
        try:
            model = Z.build(model_type, dtype=dtype)
        except Z.NotBuildable as e:
            row.detail = f"could not be built: {e}"
            return _finish(row, t0)
        row.dtype = str(dtype).replace("torch.", "")
        _WAY.pop(model_type, None)
        pad, row.detail = PAD, ""
        try:
            dense = decode(model, kind, pad=pad)
            if not torch.isfinite(dense).all():  # padded prompt rows of NaN reach the cache of some models
                pad, row.detail = 0, "no padding: a padded prompt gives NaN"
                dense = decode(model, kind, pad=pad)
                if not torch.isfinite(dense).all():  # nothing to compare with (prophetnet's random model)
                    row.detail = "could not run: the model's own decode is not finite, with or without padding"
                    return _finish(row, t0)
            _, probe = run_oracle(Z.build(model_type, dtype=dtype), kind, None, 0, pad=pad, key=model_type)
            break
        except Exception as e:  # noqa: BLE001 - the model itself does not run this way
            row.detail = f"could not run: {type(e).__name__}: {str(e).splitlines()[0][:140] if str(e) else ''}"
    else:
        return _finish(row, t0)
    rtol = RTOL[dtype]

    def fresh():  # the same random model again (seeded), for a run that may change it
        return Z.build(model_type, dtype=dtype)

    row.layers = len(probe.calls)
    heads = {c[2] for c in probe.calls}
    declared = Z.kv_heads_of(model.config)
    kv = min(heads) if heads else (declared or 1)
    if declared and all(h % declared == 0 for h in heads):
        kv = declared
    row.kv_heads = kv
    rows = row.layers or max(1, getattr(model.config.get_text_config(), "num_hidden_layers", 1) or 1)
    roles_all = HeadRoles.all_retrieval(rows, kv)
    roles_sparse = sparse_roles(rows, kv)
    oracle_problem = "" if probe.calls else "no decode attention call seen"
    if probe.calls:
        try:
            oracle_all, _ = run_oracle(fresh(), kind, roles_all, kv, pad=pad, key=model_type)
            row.errors["oracle all-retrieval vs dense"] = rel_err(oracle_all, dense)
            if row.errors["oracle all-retrieval vs dense"] > rtol:
                oracle_problem = "the oracle (all retrieval) differs from the dense model"
        except Exception as e:  # noqa: BLE001 - a form the oracle does not model
            oracle_problem = f"the oracle cannot model it: {e}"
        row.errors.pop("oracle all-retrieval vs dense", None) if oracle_problem else None
    decoder_rows: list[int] | None = None  # the decoder layer of each attention layer, once lychee asks for it

    def lychee(roles: HeadRoles):
        """lychee with ``roles`` (one row per attention layer), given to the backend as one row
        per decoder layer where ``decoder_rows`` is set; site layers back in forward order."""
        if decoder_rows is None:
            return run_lychee(fresh(), kind, roles, compiler, pad)
        table = [[True] * roles.num_kv_heads for _ in range(max(decoder_rows) + 1)]
        for i, d in enumerate(decoder_rows):
            table[d] = list(roles.row(i))
        logits, be, sites = run_lychee(fresh(), kind, HeadRoles(table), compiler, pad)
        order = {d: i for i, d in enumerate(decoder_rows)}
        return logits, be, [dataclasses.replace(s, layer=order.get(s.layer)) for s in sites]

    try:
        for _ in range(3):  # at most one retry of each kind below
            try:
                lychee_all, _, _ = lychee(roles_all)
                break
            except Exception as e:  # noqa: BLE001
                inner = getattr(e, "inner_exception", None) or e
                if not isinstance(inner, lychee_fx.RoleMapMismatch):
                    raise
                indices = [c[4] for c in probe.calls]
                if (decoder_rows is None and "per decoder layer" in str(inner) and indices and None not in indices
                        and indices == sorted(set(indices))):
                    # a hybrid model split by graph breaks: a map with one row per decoder layer
                    decoder_rows = indices
                    note = f"a map with one row per decoder layer (attention at decoder layers {decoder_rows})"
                elif "KV heads" in str(inner) and kv != min(heads, default=kv):
                    # a map of the config's KV heads where layers read others
                    kv = row.kv_heads = min(heads)
                    roles_all, roles_sparse = HeadRoles.all_retrieval(rows, kv), sparse_roles(rows, kv)
                    note = f"a map of the {kv} KV heads attention reads (not the config's {declared})"
                else:
                    raise
                row.detail = "; ".join(x for x in (row.detail, note) if x)
        lychee_sparse, be, sites = lychee(roles_sparse)
    except Exception as e:  # noqa: BLE001
        row.outcome = "ERROR"
        e = getattr(e, "inner_exception", None) or e  # Dynamo wraps what the backend raised
        row.detail = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        logging.getLogger("census").debug("%s", traceback.format_exc())
        return _finish(row, t0)
    row.rewritten = sum(s.status == "rewritten" for s in sites)
    row.declined = sum(s.status == "declined" for s in sites)
    row.reasons = sorted({s.reason for s in sites if s.status == "declined"})
    row.errors["lychee all-retrieval vs dense"] = rel_err(lychee_all, dense)
    declined_layers = {s.layer for s in sites if s.status == "declined" and s.layer is not None}
    unknown = any(s.status == "declined" and s.layer is None for s in sites)
    # where a graph break restarts the selection: the first layer of every decode graph but the first
    firsts = {}
    for s in sites:
        if s.layer is not None:
            firsts[s.graph] = min(firsts.get(s.graph, s.layer), s.layer)
    restarts = {x for x in firsts.values() if x > 0}
    row.sparse_heads = max((sum(len(s.sparse_heads) for s in sites if s.graph == g) for g in {s.graph for s in sites}),
                           default=0) if sites else 0
    notes = [row.detail] if row.detail else []
    if row.rewritten == 0:
        row.errors["lychee sparse vs dense"] = rel_err(lychee_sparse, dense)
    elif not oracle_problem:
        expected, _ = run_oracle(fresh(), kind, roles_sparse, kv, dense_layers=declined_layers, pad=pad,
                                 restarts=restarts, key=model_type)
        if restarts:
            notes.append(f"graph breaks restart the selection at layers {sorted(restarts)}")
        row.errors["lychee sparse vs oracle"] = rel_err(lychee_sparse, expected)
        if unknown:
            notes.append("declined sites of unknown layer: the oracle ran them sparse")
    wrong = [name for name, err in row.errors.items() if err > rtol]
    if wrong:
        row.outcome = "WRONG"
        notes.insert(0, "; ".join(f"{name}: {row.errors[name]:.2e}" for name in wrong))
    elif not sites:
        row.outcome = "declined" if probe.calls else "n/a"
        notes.insert(0, "no attention site found by the pass" if probe.calls else "no decode attention over a KV cache")
    elif row.rewritten == 0:
        row.outcome = "declined"
    elif oracle_problem:
        row.outcome = "unverified"
        notes.insert(0, f"rewritten, all retrieval exact; sparse map not checked: {oracle_problem}")
    elif row.declined:
        row.outcome = "partly rewritten"
    else:
        row.outcome = "rewritten"
    if row.outcome in ("declined", "partly rewritten") and row.reasons:
        notes = [*row.reasons, *notes]
    row.detail = "; ".join(notes)
    return _finish(row, t0)


def _finish(row: Row, t0: float) -> Row:
    row.seconds = round(time.time() - t0, 1)
    return row


def summary(rows: list[Row]) -> str:
    """A markdown table: outcome counts per cache kind, then the declines grouped by reason."""
    kinds = sorted({r.cache for r in rows})
    lines = ["| outcome | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for outcome in OUTCOMES:
        counts = [sum(r.outcome == outcome and r.cache == k for r in rows) for k in kinds]
        if any(counts):
            lines.append(f"| {outcome} | " + " | ".join(map(str, counts)) + " |")
    by_reason = collections.defaultdict(set)
    for r in rows:
        if r.outcome != "rewritten":
            for reason in (r.reasons if r.outcome in ("declined", "partly rewritten") and r.reasons else [r.detail]):
                by_reason[(r.outcome, _generalise(reason))].add(r.model_type)
    lines += ["", "| outcome | reason | types |", "|---|---|---|"]
    for (outcome, reason), types in sorted(by_reason.items(), key=lambda kv: (OUTCOMES.index(kv[0][0]), -len(kv[1]))):
        lines.append(f"| {outcome} | {reason} | {len(types)}: {', '.join(sorted(types))} |")
    return "\n".join(lines)


def _generalise(reason: str) -> str:
    """A reason without the numbers that differ between types (shapes, lengths)."""
    import re

    return re.sub(r"\d+", "N", reason)[:160]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", nargs="*", help="model types (default: every causal-LM type, then the variants "
                                              "of census_zoo.VARIANTS)")
    p.add_argument("--caches", nargs="*", default=["dynamic"], choices=["dynamic", "static"])
    p.add_argument("--compiler", default="eager", choices=["eager", "inductor"])
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--markdown", help="write the summary table here")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    for name in ("transformers", "torch._dynamo", "torch._inductor", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    types = args.types or [*Z.causal_lm_types(), *Z.VARIANTS]
    rows = []
    for t in types:
        for kind in args.caches:
            try:
                row = census_type(t, kind, args.compiler)
            except Exception as e:  # noqa: BLE001 - the census goes on; a failure of its own is not lychee's
                row = Row(t, kind, "n/a", f"the census could not run it: {type(e).__name__}: {str(e)[:200]}")
            rows.append(row)
            print(row.line(), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    table = summary(rows)
    print("\n" + table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return int(any(r.outcome == "WRONG" for r in rows))


if __name__ == "__main__":
    sys.exit(main())
