"""The census (examples/census.py) on a sample of types, one per path the pass has: every
outcome is rewritten (or partly, where sliding-window layers keep their attention) and
exact against the independent oracle; no type is WRONG. The full census is a script:
``python examples/census.py`` (README, "Which models")."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

# type -> cache kind, and why it is in the sample
SAMPLE = {
    "llama": ("dynamic", "SDPA with enable_gqa, the common case"),
    "gemma2": ("dynamic", "eager soft-capped logits; sliding-window layers declined"),
    "bloom": ("dynamic", "ALiBi through baddbmm on (B * H, 1, N) scores"),
    "deepseek_v3": ("dynamic", "multi-head latent attention: V's head dim differs from K's"),
    "falcon+new_decoder_architecture": ("dynamic", "a cache that holds expanded K/V heads"),
    "gpt_neo": ("dynamic", "no scaling, a where-mask and an additive mask"),
    "opt": ("static", "graph breaks that drop the module path's layer number"),
    "jamba": ("dynamic", "a hybrid model: attention at decoder layers 1 and 3"),
    "jetmoe": ("dynamic", "K/V tiled by repeat(1, G, 1, 1): query head t * Hkv + h reads KV head h"),
    "longcat_flash": ("static", "one attention per graph, K/V computed from the cache it writes"),
    "gemma3n_text": ("dynamic", "KV sharing: the last layers attend over earlier layers' caches"),
    "gpt_oss": ("static", "attention sinks and a max-shift in eager attention; sliding-window layers declined"),
}


def _example(name: str):
    """The module ``examples/<name>.py`` (the census and its oracle are scripts, not package code)."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "examples"))


def _census():
    return _example("census")


@pytest.mark.parametrize("model_type", list(SAMPLE))
def test_sampled_types_are_rewritten_and_exact(model_type):
    census = _census()
    kind, why = SAMPLE[model_type]
    row = census.census_type(model_type, kind)
    assert row.outcome in ("rewritten", "partly rewritten"), f"{model_type} ({why}): {row.line()}"
    assert row.errors and all(err <= census.RTOL[getattr(census.torch, row.dtype)] for err in row.errors.values()), row.errors
    assert "lychee sparse vs oracle" in row.errors, "the sparse map was checked against the oracle"


def test_the_inductor_path_on_one_type():
    """The default compiler (Inductor; on the CPU the ops stay opaque torch calls)."""
    census = _census()
    row = census.census_type("llama", "dynamic", compiler="inductor")
    assert row.outcome == "rewritten", row.line()


def test_summary_counts_every_row():
    census = _census()
    rows = [census.Row("a", "dynamic", "rewritten"), census.Row("b", "dynamic", "declined", reasons=["x 12"]),
            census.Row("c", "static", "WRONG", detail="lychee sparse vs oracle: 1e-1")]
    table = census.summary(rows)
    assert "| rewritten | 1 | 0 |" in table and "| declined | 1 | 0 |" in table and "| WRONG | 0 | 1 |" in table
    assert "x N" in table  # reasons grouped without their numbers


def _oracle():
    return _example("census_oracle")


def test_the_oracle_untiles_kv_tiled_by_repeat():
    """K/V tiled by ``repeat(1, r, 1, 1)`` (JetMoE) are read as the cache's C heads, query
    head t * C + h in KV head h's group; side-by-side copies (a cache of expanded heads) and
    one column are not a tiling."""
    import torch

    import lychee_fx

    O = _oracle()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 1, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 32, 8, generator=g, dtype=torch.float64) for _ in range(2))
    tk, tv = k.repeat(1, 3, 1, 1), v.repeat(1, 3, 1, 1)
    assert O.tiling(tk, tv, 2) == 3
    assert O.tiling(k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), 2) == 1
    assert O.tiling(tk, tv, 1) == 1 and O.tiling(torch.randn(2, 6, 32, 8), torch.randn(2, 6, 32, 8), 2) == 1
    opts = lychee_fx.DecodeOptions(budget=16, block_size=4, sink=4, recent=4)
    roles = lychee_fx.HeadRoles([[True, False], [False, True]])
    oracle = O.Oracle(roles, opts)
    dec = lychee_fx.reference.ReferenceDecoder(opts)
    rows = [0, 2, 4, 1, 3, 5]  # KV head 0's group: query heads 0, 2, 4; KV head 1's: 1, 3, 5
    back = [rows.index(i) for i in range(6)]
    for layer in range(2):  # layer 1's sparse head 0 reads layer 0's selection
        expected = dec(q[:, rows], k, v, None, roles.row(layer))[:, back]
        torch.testing.assert_close(oracle.attend(q, tk, tv, None, None), expected)
