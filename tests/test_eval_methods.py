"""Which role maps the demo and the eval use, and the eval's method grid."""

from __future__ import annotations

import json

import pytest
import torch

from lychee_fx import HeadRoles
from lychee_fx.apps.eval_methods import FAMILIES, build_methods, lower_bound_options
from lychee_fx.apps.shipped_roles import check_fits, choose_roles, learned_map, rotating, tidal_layers

L, H = 30, 3


def test_rotating_map_refreshes_every_index_within_hkv_layers():
    roles = rotating(L, H)
    t = roles.table
    assert t[0].all()
    assert (t[1:].sum(dim=1) == 1).all()
    assert roles.num_retrieval == H + (L - 1)
    # every sparse head's twin ran at most H - 1 layers earlier
    for layer in range(1, L):
        for h in range(H):
            last = max(x for x in range(layer + 1) if t[x, h])
            assert layer - last <= H - 1


def test_tidal_layers():
    assert tidal_layers(32, 4) == [0, 1, 2, 13]  # TidalDecode's own choice for 32 layers
    assert tidal_layers(30, 4) == [0, 1, 2, 12]
    assert tidal_layers(30, 2) == [0, 1]
    for n in range(1, 31):
        layers = tidal_layers(30, n)
        assert len(layers) == len(set(layers)) == n and layers == sorted(layers) and 0 in layers
    assert tidal_layers(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"count must be in \[1, 30\].*got 31"):
        tidal_layers(30, 31)


def test_check_fits_names_both_shapes():
    check_fits(rotating(L, H), L, H, source="x")
    with pytest.raises(ValueError, match=r"from my.json does not fit the model: expected 30 layers x 3 KV heads, got 4 x 2"):
        check_fits(HeadRoles.first_k(4, 2, 1), L, H, source="my.json")


def test_choose_roles(tmp_path):
    roles, text = choose_roles("some/other-model", L, H)
    assert roles == rotating(L, H) and "default map" in text and "no learned map is shipped" in text
    path = tmp_path / "r.json"
    HeadRoles.random(L, H, count=10, seed=3).save(path)
    roles, text = choose_roles(None, L, H, path)
    assert roles == HeadRoles.load(path) and str(path) in text
    HeadRoles.first_k(L, 2, 1).save(path)
    with pytest.raises(ValueError, match="expected 30 layers x 3 KV heads, got 30 x 2"):
        choose_roles(None, L, H, path)


def test_embedded_model_map_is_the_shipped_file_when_present():
    """With the learned map installed, the embedded model gets it; without, the default."""
    learned, where = learned_map(None)
    roles, text = choose_roles(None, L, H)
    if learned is None:
        assert where.endswith("(absent)") and roles == rotating(L, H)
    else:
        assert roles == learned and "learned map" in text
        assert (learned.num_layers, learned.num_kv_heads) == (L, H)


def test_default_grid_methods():
    lychee = HeadRoles.random(L, H, count=12, seed=99)
    extra = [(HeadRoles.random(L, H, count=n, seed=n), f"m{n}") for n in (6, 24)]
    ms = build_methods(lychee, "learned", budgets=(256, 512, 1024, 2048), block_sizes=(16, 64), sink=64, recent=64,
                       headline=(1024, 64), family_budgets=(256,), correct_every=32, random_seeds=3, maps=extra,
                       map_budgets=(256, 1024))
    keys = [m.key for m in ms]
    # full, lychee 4 x 2, random 3 seeds x 2 budgets, tidal 2, duo 2, lower bound 2, maps 2 x 2, correction 1
    assert len(keys) == len(set(keys)) == 1 + 8 + 6 + 2 + 2 + 2 + 4 + 1
    by = {fam: [m for m in ms if m.family == fam] for fam in FAMILIES}
    assert len(by["full"]) == 1 and by["full"][0].roles.num_retrieval == L * H
    assert {(m.options.budget, m.options.block_size) for m in by["lychee"] if not m.correct_every} == {
        (b, bs) for b in (256, 512, 1024, 2048) for bs in (16, 64)}
    assert [m.correct_every for m in by["lychee"] if m.correct_every] == [32]
    for fam in ("random", "tidal", "duo"):
        assert {(m.options.budget, m.options.block_size) for m in by[fam]} == {(1024, 64), (256, 64)}, fam
        assert all(m.roles.num_retrieval == 12 and m.roles.table[0].all() for m in by[fam])  # same count: 12 = 4 layers of 3
    assert sorted({m.tag for m in by["random"]}) == ["0", "1", "2"]
    assert len({m.roles.digest() for m in by["random"]}) == 3 and all(m.roles != lychee for m in by["random"])
    assert by["tidal"][0].roles == HeadRoles.tidal_decode(L, H, [0, 1, 2, 12])
    assert all(m.roles == lychee and not m.uses_backend for m in by["duo"])
    assert sorted(m.stream for m in by["duo"]) == [(64, 192), (64, 960)]  # sink 64 + the rest of the budget
    assert sorted((m.tag, m.options.budget) for m in by["map"]) == [("24", 256), ("24", 1024), ("6", 256), ("6", 1024)]
    # the lower bound: sink 64 + recent 64 at the smallest budget the options allow
    assert sorted((m.options.block_size, m.options.budget) for m in by["sink+recent"]) == [(16, 160), (64, 256)]
    assert all(m.roles.num_retrieval == H for m in by["sink+recent"])
    json.dumps([m.as_dict() for m in ms])
    with pytest.raises(ValueError, match="does not run through the lychee backend"):
        by["duo"][0].backend("eager")


def test_lower_bound_is_the_smallest_valid_budget():
    from lychee_fx.options import DecodeOptions

    for bs, sink, recent in ((64, 64, 64), (16, 64, 64), (16, 16, 16), (8, 0, 1)):
        o = lower_bound_options(bs, sink, recent)
        with pytest.raises(ValueError, match="forced blocks must fit"):
            DecodeOptions(budget=o.budget - bs, block_size=bs, sink=sink, recent=recent)


def test_build_methods_errors():
    roles = rotating(L, H)
    kw = dict(budgets=(256,), block_sizes=(64,), sink=64, recent=64)
    with pytest.raises(ValueError, match=r"headline \(budget, block size\) \(1024, 64\) must be in the grid"):
        build_methods(roles, "x", headline=(1024, 64), **kw)
    with pytest.raises(ValueError, match=r"unknown method families \['quest'\]"):
        build_methods(roles, "x", headline=(256, 64), families=("full", "quest"), **kw)
    with pytest.raises(ValueError, match=r"map m is 4 x 2; expected 30 layers x 3 KV heads"):
        build_methods(roles, "x", headline=(256, 64), maps=[(HeadRoles.first_k(4, 2, 1), "m")], **kw)
    with pytest.raises(ValueError, match="random_seeds must be >= 1, got 0"):
        build_methods(roles, "x", headline=(256, 64), random_seeds=0, **kw)
    with pytest.raises(ValueError, match="duo baseline at budget 64 needs budget > sink = 64"):
        build_methods(roles, "x", headline=(256, 64), family_budgets=(64,), families=("duo",), **kw)
    only = build_methods(roles, "x", headline=(256, 64), families=("full", "lychee"), **kw)
    assert [m.family for m in only] == ["full", "lychee"]
    assert torch.equal(only[1].roles.table, roles.table)
