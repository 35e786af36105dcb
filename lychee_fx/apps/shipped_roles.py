"""Which role map the demo and the eval use for a model, and whether a map fits it.

The shipped learned map for the embedded model lives in the package data
(``lychee_fx/apps/data/smollm2-135m.roles.json``, read through ``importlib.resources``), beside
maps learned for other retrieval counts, ``smollm2-135m.r{count}.roles.json`` (each with its
training log, ``.log.jsonl``), found by :func:`learned_maps`; they are made by

    python -m lychee_fx learn-roles --count COUNT --out lychee_fx/apps/data/smollm2-135m.rCOUNT.roles.json

Without
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
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lychee_fx.apps.embedded import EMBEDDED
from lychee_fx.roles import HeadRoles

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "LEARNED_MAPS", "learned_map", "learned_maps", "count_file_name", "rotating", "tidal_layers", "check_fits",
    "choose_roles",
]

# model name -> its default map's file in lychee_fx/apps/data; the maps for other retrieval
# counts are the files "<stem>.r<count>.roles.json", stem = this name less ".roles.json"
LEARNED_MAPS = {EMBEDDED: "smollm2-135m.roles.json"}
_SUFFIX = ".roles.json"

def _folder(folder: str | os.PathLike | Traversable | None) -> tuple[Traversable, str]:
    """(the data folder, how file names in it are shown): the package's by default; a path,
    or any ``importlib.resources`` Traversable."""
    if folder is None:
        return importlib.resources.files("lychee_fx.apps") / "data", "lychee_fx/apps/data"
    if isinstance(folder, (str, os.PathLike)):
        return Path(folder), str(folder)
    return folder, str(folder)


def _model_name(model: str | os.PathLike | None) -> str:
    return EMBEDDED if model is None else str(model)


def count_file_name(model: str | os.PathLike | None, count: int) -> str:
    """The file name of ``model``'s shipped map with ``count`` retrieval KV heads.

    >>> count_file_name(None, 12)
    'smollm2-135m.r12.roles.json'
    """
    name = _model_name(model)
    if name not in LEARNED_MAPS:
        raise ValueError(f"no learned maps are shipped for {name!r}: expected one of {sorted(LEARNED_MAPS)}")
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"count must be an int, got {type(count).__name__} ({count!r})")
    if count < 1:
        raise ValueError(f"count must be >= 1 retrieval KV heads, got {count}")
    return f"{LEARNED_MAPS[name].removesuffix(_SUFFIX)}.r{count}{_SUFFIX}"


def _read(res: Traversable, where: str) -> HeadRoles:
    return HeadRoles.from_json_obj(json.loads(res.read_text()), source=where)


def _discover(name: str, folder: str | os.PathLike | Traversable | None) -> dict[int, tuple[HeadRoles, str]]:
    """count -> (map, where it was read) for a model in LEARNED_MAPS; see learned_maps."""
    data, shown = _folder(folder)
    if not data.is_dir():
        return {}
    pattern = re.compile(re.escape(LEARNED_MAPS[name].removesuffix(_SUFFIX)) + r"\.r([1-9][0-9]*)" + re.escape(_SUFFIX))
    found: dict[int, tuple[HeadRoles, str]] = {}
    for res in data.iterdir():
        match = pattern.fullmatch(res.name)
        if match is None or not res.is_file():
            continue
        count, where = int(match.group(1)), f"{shown}/{res.name}"
        roles = _read(res, where)
        if roles.num_retrieval != count:
            raise ValueError(f"{where} must hold {count} retrieval KV heads, as its name says, got {roles.num_retrieval}")
        found[count] = (roles, where)
    default = data / LEARNED_MAPS[name]
    if default.is_file():
        where = f"{shown}/{LEARNED_MAPS[name]}"
        roles = _read(default, where)
        found.setdefault(roles.num_retrieval, (roles, where))
    return dict(sorted(found.items()))


def learned_maps(model: str | os.PathLike | None, *, folder: str | os.PathLike | Traversable | None = None) -> dict[int, HeadRoles]:
    """Every shipped learned map of ``model`` by retrieval count, ascending: the files
    ``<stem>.r<count>.roles.json`` present in ``folder`` (default: the package data), plus the
    default map (:data:`LEARNED_MAPS`) under its own count where no such file has that count.
    Empty for a model without shipped maps. Raises ``ValueError`` for a file whose map does
    not hold the count its name says."""
    name = _model_name(model)
    if name not in LEARNED_MAPS:
        return {}
    return {count: roles for count, (roles, _) in _discover(name, folder).items()}


def learned_map(
    model: str | os.PathLike | None, count: int | None = None, *, folder: str | os.PathLike | Traversable | None = None
) -> tuple[HeadRoles | None, str]:
    """(the shipped learned map for ``model``, where it was looked for). ``None`` when the
    model has no shipped map or its file is not installed.

    ``count`` None: the model's default map (:data:`LEARNED_MAPS`). An int: the map with that
    many retrieval KV heads, ``<stem>.r<count>.roles.json``, or the default map when it has
    that count and no such file exists (as in :func:`learned_maps`)."""
    name = _model_name(model)
    if name not in LEARNED_MAPS:
        return None, f"no learned map is shipped for {name!r} (only for {sorted(LEARNED_MAPS)})"
    data, shown = _folder(folder)
    if count is None:
        where = f"{shown}/{LEARNED_MAPS[name]}"
        res = data / LEARNED_MAPS[name]
        if not res.is_file():
            return None, f"{where} (absent)"
        return _read(res, where), where
    file = count_file_name(name, count)
    found = _discover(name, folder)
    if count in found:
        return found[count]
    return None, f"{shown}/{file} (absent; shipped counts: {sorted(found)})"


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
