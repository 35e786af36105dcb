"""Which role map the demo and the eval use for a model, and whether a map fits it.

The shipped learned map for the embedded model lives in the package data
(``lychee_fx/apps/data/smollm2-135m.roles.json``, read through ``importlib.resources``). Without
it (or for another model), the stated default is :func:`rotating`: layer 0 all retrieval
(SPEC 1.1 makes it so anyway), then one retrieval KV head per layer with the index rotating,
``l mod Hkv``, so that every sparse head's selection is refreshed by its twin at most
``Hkv - 1`` layers earlier. (The same count with a fixed index, ``HeadRoles.first_k(L, Hkv,
1)``, leaves the other indices to reuse layer 0's selection through the whole model.)
"""

from __future__ import annotations

import importlib.resources
import json
import os

import torch

from lychee_fx.apps.embedded import EMBEDDED
from lychee_fx.roles import HeadRoles

__all__ = ["LEARNED_MAPS", "learned_map", "rotating", "tidal_layers", "check_fits", "choose_roles"]

# model name -> file in lychee_fx/apps/data
LEARNED_MAPS = {EMBEDDED: "smollm2-135m.roles.json"}


def learned_map(model: str | os.PathLike | None) -> tuple[HeadRoles | None, str]:
    """(the shipped learned map for ``model``, where it was looked for). ``None`` when the
    model has no shipped map or its file is not installed."""
    name = EMBEDDED if model is None else str(model)
    if name not in LEARNED_MAPS:
        return None, f"no learned map is shipped for {name!r} (only for {sorted(LEARNED_MAPS)})"
    res = importlib.resources.files("lychee_fx.apps") / "data" / LEARNED_MAPS[name]
    where = f"lychee_fx/apps/data/{LEARNED_MAPS[name]}"
    if not res.is_file():
        return None, f"{where} (absent)"
    return HeadRoles.from_json_obj(json.loads(res.read_text()), source=where), where


def rotating(num_layers: int, num_kv_heads: int) -> HeadRoles:
    """Layer 0 all retrieval; layer ``l >= 1``: KV head ``l mod num_kv_heads`` retrieval.

    >>> rotating(4, 3)
    HeadRoles(4 layers x 3 KV heads, 6 retrieval: RRR .R. ..R R..)
    """
    table = torch.zeros(num_layers, num_kv_heads, dtype=torch.bool)
    table[0] = True
    for layer in range(1, num_layers):
        table[layer, layer % num_kv_heads] = True
    return HeadRoles(table, meta={"schedule": "rotating", "per_layer": 1})


def tidal_layers(num_layers: int, count: int) -> list[int]:
    """``count`` whole retrieval layers in TidalDecode's pattern: layers 0, 1, 2 (full
    attention, then the first selection), then re-selection layers from about 13/32 of the
    depth (their layer 13 of 32) spread evenly to the last layer.

    >>> tidal_layers(32, 4), tidal_layers(30, 4), tidal_layers(30, 6)
    ([0, 1, 2, 13], [0, 1, 2, 12], [0, 1, 2, 12, 20, 29])
    """
    if not 1 <= count <= num_layers:
        raise ValueError(f"count must be in [1, {num_layers}] retrieval layers, got {count}")
    head = list(range(min(count, 3)))
    extra = count - len(head)
    if extra == 0:
        return head
    start = max(3, round(num_layers * 13 / 32))
    span = num_layers - 1 - start
    picks = [start + round(i * span / max(1, extra - 1)) for i in range(extra)] if extra > 1 else [start]
    layers = sorted(set(head + picks))
    # Rounding can collide on shallow models: fill with the first unused layers.
    free = (x for x in range(num_layers) if x not in layers)
    while len(layers) < count:
        layers.append(next(free))
    return sorted(layers)


def check_fits(roles: HeadRoles, num_layers: int, num_kv_heads: int, *, source: str) -> None:
    """Raise ``ValueError`` naming both shapes (and the fix) unless ``roles`` is
    ``(num_layers, num_kv_heads)``. Run it before compiling: the pass can only notice a map
    with too few rows or the wrong head count, and only while tracing."""
    if (roles.num_layers, roles.num_kv_heads) != (num_layers, num_kv_heads):
        raise ValueError(
            f"the role map from {source} does not fit the model: expected "
            f"{num_layers} layers x {num_kv_heads} KV heads, got {roles.num_layers} x "
            f"{roles.num_kv_heads}. Pass --roles with a map made for this model (e.g. "
            "lychee_fx.HeadRoles.random(num_layers, num_kv_heads, count).save(path)), or "
            "leave --roles out to use the default."
        )


def choose_roles(
    model: str | os.PathLike | None, num_layers: int, num_kv_heads: int, roles_path: str | os.PathLike | None = None
) -> tuple[HeadRoles, str]:
    """The role map to use and a sentence saying which it is and why.

    ``roles_path`` when given; else the shipped learned map for ``model`` when it exists and
    fits; else :func:`rotating`. Raises ``ValueError`` when a given map does not fit.
    """
    if roles_path is not None:
        roles = HeadRoles.load(roles_path)
        check_fits(roles, num_layers, num_kv_heads, source=str(roles_path))
        return roles, f"role map from {roles_path}"
    learned, where = learned_map(model)
    if learned is not None:
        check_fits(learned, num_layers, num_kv_heads, source=where)
        return learned, f"learned map {where}"
    roles = rotating(num_layers, num_kv_heads)
    return roles, (
        f"default map (learned map not available: {where}): layer 0 all retrieval, then one "
        f"retrieval KV head per layer, index rotating (layer l: head l mod {num_kv_heads})"
    )
