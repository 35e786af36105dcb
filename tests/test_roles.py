"""Role maps (SPEC 1.2): constructors, file formats, and every error path."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lychee_fx import HeadRoles


def tables(max_layers=6, max_heads=5):
    return st.integers(1, max_layers).flatmap(
        lambda n: st.integers(1, max_heads).flatmap(
            lambda h: st.lists(st.lists(st.booleans(), min_size=h, max_size=h), min_size=n, max_size=n)
        )
    )


@given(rows=tables())
def test_lists_tensor_and_json_round_trip(rows, tmp_path_factory):
    roles = HeadRoles(rows)
    assert roles.num_layers == len(rows) and roles.num_kv_heads == len(rows[0])
    assert [list(roles.row(i)) for i in range(roles.num_layers)] == rows
    assert HeadRoles(torch.tensor(rows)) == roles
    path = tmp_path_factory.mktemp("roles") / "roles.json"
    roles.save(path)
    back = HeadRoles.load(path)
    assert back == roles and back.digest() == roles.digest()
    assert roles.num_retrieval == sum(map(sum, rows))


@given(tables(max_heads=8), st.sampled_from([1, 2, 4]))
def test_query_head_maps_reduce_with_any(rows, group):
    width = len(rows[0]) * group
    per_query = [[x for x in row for _ in range(group)] for row in rows]
    assert len(per_query[0]) == width
    roles = HeadRoles.from_query_heads(per_query, group_size=group)
    assert roles == HeadRoles(rows)


def test_query_head_any_keeps_a_single_retrieval_query_head():
    roles = HeadRoles.from_query_heads([[False, True, False, False]], group_size=2)
    assert roles.row(0) == (True, False)


def test_bare_json_list_loads(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps([[True, False], [False, True]]))
    assert HeadRoles.load(p).row(1) == (False, True)


def test_constructors():
    assert HeadRoles.all_retrieval(2, 3).num_retrieval == 6
    assert HeadRoles.first_k(3, 4, 1).row(2) == (True, False, False, False)
    tidal = HeadRoles.tidal_decode(32, 8, [0, 1, 2, 13])
    assert tidal.num_retrieval == 32 and tidal.row(13) == (True,) * 8 and tidal.row(14) == (False,) * 8
    r = HeadRoles.random(10, 4, count=9, seed=3)
    assert r.num_retrieval == 9 and r.row(0) == (True,) * 4
    assert r == HeadRoles.random(10, 4, count=9, seed=3)


def test_from_gates_threshold_ratio_count_and_file(tmp_path):
    gates = [[0.9, 0.1, 0.5], [0.2, 0.7, 0.5]]
    assert HeadRoles.from_gates(gates, threshold=0.5).table.tolist() == [[True, False, False], [False, True, False]]
    assert HeadRoles.from_gates(gates, count=2).num_retrieval == 2
    # ties go to the lower (layer, head) index
    assert HeadRoles.from_gates(gates, count=3).table.tolist() == [[True, False, True], [False, True, False]]
    assert HeadRoles.from_gates(gates, ratio=0.5).num_retrieval == 3
    assert HeadRoles.from_gates(gates, count=0, force_layer0=True).row(0) == (True, True, True)
    per_q = [[0.9, 0.0, 0.1, 0.2], [0.0, 0.0, 0.3, 0.8]]
    assert HeadRoles.from_gates(per_q, threshold=0.5, group_size=2).table.tolist() == [[True, False], [False, True]]
    f = tmp_path / "full_attention_heads.tsv"
    f.write_text("0.9\t0.1\t0.5\n0.2\t0.7\t0.5\n")
    assert HeadRoles.from_gates(f, threshold=0.5) == HeadRoles.from_gates(gates, threshold=0.5)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: HeadRoles(torch.ones(2, 2)), TypeError, "bool tensor, got dtype torch.float32"),
        (lambda: HeadRoles(torch.ones(4, dtype=torch.bool)), ValueError, r"must be 2-D .* got shape \(4,\)"),
        (lambda: HeadRoles([[True, False], [True]]), ValueError, "expected 2 .* got 1 in row 1"),
        (lambda: HeadRoles([[True, 1]]), TypeError, r"\[0\]\[1\] must be a bool, got int"),
        (lambda: HeadRoles([]), ValueError, "at least one layer, got 0 rows"),
        (lambda: HeadRoles("roles.json"), TypeError, "nested lists of bools, got str"),
        (lambda: HeadRoles(3), TypeError, "bool tensor or nested lists of bools, got int"),
        (lambda: HeadRoles.first_k(2, 4, -1), ValueError, r"k must be in \[0, 4\], got -1"),
        (lambda: HeadRoles.first_k(2, 4, 5), ValueError, r"k must be in \[0, 4\], got 5"),
        (lambda: HeadRoles.first_k(2, 4, 1.0), TypeError, "k must be an int, got float"),
        (lambda: HeadRoles.all_retrieval(0, 4), ValueError, "num_layers must be in"),
        (lambda: HeadRoles.tidal_decode(4, 2, [4]), ValueError, r"retrieval layer must be in \[0, 3\], got 4"),
        (lambda: HeadRoles.random(4, 2, count=1), ValueError, r"count must be in \[2, 8\], got 1"),
        (lambda: HeadRoles.from_query_heads([[True, False, True]], group_size=2), ValueError, "multiple of group_size=2"),
        (lambda: HeadRoles.from_query_heads([[True, False]], group_size=0), ValueError, "group_size must be >= 1, got 0"),
        (lambda: HeadRoles.from_gates([[0.1, 0.2]], threshold=0.5, ratio=0.5), ValueError, "exactly one of"),
        (lambda: HeadRoles.from_gates([[0.1, 0.2]]), ValueError, "exactly one of .* got none"),
        (lambda: HeadRoles.from_gates([[0.1, 0.2]], ratio=1.5), ValueError, r"ratio must be in \[0, 1\], got 1.5"),
        (lambda: HeadRoles.from_gates([[0.1, float("nan")]], ratio=0.5), ValueError, "finite"),
        (lambda: HeadRoles.from_gates([[0.1], [0.2, 0.3]], count=1), ValueError, "equal length"),
        (lambda: HeadRoles.from_gates(torch.ones(2, 2, dtype=torch.bool), count=1), TypeError, "real numbers"),
        (lambda: HeadRoles.coerce(3.0), TypeError, "got float"),
    ],
)
def test_errors_name_expected_and_actual(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_bad_files(tmp_path):
    p = tmp_path / "r.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        HeadRoles.load(p)
    p.write_text(json.dumps({"format": "other", "retrieval": [[True]]}))
    with pytest.raises(ValueError, match="expected format 'lychee_fx.head_roles', got 'other'"):
        HeadRoles.load(p)
    p.write_text(json.dumps({"retrieval": [[True, False]], "num_kv_heads": 3}))
    with pytest.raises(ValueError, match="num_kv_heads says 3, but the table has 2"):
        HeadRoles.load(p)
    with pytest.raises(FileNotFoundError, match="role map file not found"):
        HeadRoles.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"layer must be in \[0, 0\]"):
        HeadRoles([[True]]).row(1)
