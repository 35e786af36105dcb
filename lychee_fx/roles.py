"""Head-role maps (SPEC 1.2): which KV heads of which layer keep full attention.

A role map is a boolean table ``(num_layers, num_kv_heads)``; ``True`` = retrieval head
(exact attention over the whole cache, and the source of the block selection), ``False`` =
sparse head (attends only to the blocks its retrieval twin in a shallower layer picked).
Layers are numbered in the order attention runs in the forward pass.

Every constructor validates its input and raises ``TypeError`` for a wrong kind and
``ValueError`` for a wrong value, naming the expected and the actual value.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

import torch

__all__ = ["HeadRoles", "RolesLike"]

_FORMAT = "lychee_fx.head_roles"
_VERSION = 1

RolesLike = Union["HeadRoles", torch.Tensor, Sequence[Sequence[bool]], str, os.PathLike]


def _as_bool_table(table: Any, what: str) -> torch.Tensor:
    """Nested lists of bools or a bool tensor -> a 2-D CPU bool tensor (validated)."""
    if isinstance(table, torch.Tensor):
        if table.dtype != torch.bool:
            raise TypeError(f"{what} must be a bool tensor, got dtype {table.dtype}")
        if table.dim() != 2:
            raise ValueError(
                f"{what} must be 2-D (num_layers, num_heads), got shape {tuple(table.shape)}"
            )
        out = table.detach().to("cpu", copy=True)
    elif isinstance(table, (list, tuple)):
        rows = list(table)
        if not rows:
            raise ValueError(f"{what} must have at least one layer, got 0 rows")
        width = None
        for i, row in enumerate(rows):
            if not isinstance(row, (list, tuple)):
                raise TypeError(
                    f"{what} row {i} must be a list of bools, got {type(row).__name__}"
                )
            if width is None:
                width = len(row)
            elif len(row) != width:
                raise ValueError(
                    f"{what} rows must have equal length: expected {width} (row 0), "
                    f"got {len(row)} in row {i}"
                )
            for j, x in enumerate(row):
                if not isinstance(x, bool):
                    raise TypeError(
                        f"{what}[{i}][{j}] must be a bool, got {type(x).__name__} ({x!r})"
                    )
        out = torch.tensor(rows, dtype=torch.bool).reshape(len(rows), width or 0)
    else:
        raise TypeError(
            f"{what} must be a bool tensor or nested lists of bools, got {type(table).__name__}"
        )
    if out.shape[0] == 0 or out.shape[1] == 0:
        raise ValueError(
            f"{what} must have at least one layer and one head, got shape {tuple(out.shape)}"
        )
    return out


def _reduce_query_heads(
    table: torch.Tensor, group_size: int, what: str, how: str = "any"
) -> torch.Tensor:
    """(L, Hq) -> (L, Hkv): ``any`` (bools) or ``max`` (gates) over each query-head group."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    num_layers, hq = table.shape
    if hq % group_size:
        raise ValueError(
            f"{what} has {hq} query heads per layer, expected a multiple of "
            f"group_size={group_size}"
        )
    grouped = table.reshape(num_layers, hq // group_size, group_size)
    return grouped.any(dim=-1) if how == "any" else grouped.amax(dim=-1)


def _check_count(name: str, value: Any, *, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value}")
    return value


class HeadRoles:
    """A validated role map ``(num_layers, num_kv_heads)``, ``True`` = retrieval.

    Immutable; equal maps compare equal and share a :meth:`digest`, which keys compile caches.

    >>> roles = HeadRoles.first_k(num_layers=2, num_kv_heads=4, k=1)
    >>> roles.row(1)
    (True, False, False, False)
    """

    __slots__ = ("_table", "_meta")

    def __init__(self, table: torch.Tensor | Sequence[Sequence[bool]], *, meta: dict | None = None):
        self._table = _as_bool_table(table, "role map")
        self._meta = dict(meta or {})

    # ---- constructors -------------------------------------------------------------------

    @classmethod
    def from_query_heads(
        cls, table: torch.Tensor | Sequence[Sequence[bool]], *, group_size: int
    ) -> HeadRoles:
        """A per-query-head map ``(L, Hq)``, reduced per KV group with ``any`` (SPEC 1.2):
        a group with one retrieval query head must read its whole KV anyway."""
        t = _as_bool_table(table, "per-query-head role map")
        return cls(_reduce_query_heads(t, group_size, "per-query-head role map"))

    @classmethod
    def all_retrieval(cls, num_layers: int, num_kv_heads: int) -> HeadRoles:
        """Every head retrieval: decoding equals full attention."""
        _check_count("num_layers", num_layers, minimum=1, maximum=1 << 20)
        _check_count("num_kv_heads", num_kv_heads, minimum=1, maximum=1 << 20)
        return cls(torch.ones(num_layers, num_kv_heads, dtype=torch.bool))

    @classmethod
    def first_k(cls, num_layers: int, num_kv_heads: int, k: int) -> HeadRoles:
        """KV heads ``0 .. k-1`` of every layer are retrieval."""
        _check_count("num_layers", num_layers, minimum=1, maximum=1 << 20)
        _check_count("num_kv_heads", num_kv_heads, minimum=1, maximum=1 << 20)
        _check_count("k", k, minimum=0, maximum=num_kv_heads)
        table = torch.zeros(num_layers, num_kv_heads, dtype=torch.bool)
        table[:, :k] = True
        return cls(table)

    @classmethod
    def tidal_decode(
        cls, num_layers: int, num_kv_heads: int, retrieval_layers: Iterable[int]
    ) -> HeadRoles:
        """A TidalDecode schedule: whole layers retrieval (e.g. 0, 1, 2 and 13 of 32), the
        rest sparse, reusing the selection of the last retrieval layer before them."""
        _check_count("num_layers", num_layers, minimum=1, maximum=1 << 20)
        _check_count("num_kv_heads", num_kv_heads, minimum=1, maximum=1 << 20)
        layers = list(retrieval_layers)
        table = torch.zeros(num_layers, num_kv_heads, dtype=torch.bool)
        for x in layers:
            _check_count("retrieval layer", x, minimum=0, maximum=num_layers - 1)
            table[x] = True
        return cls(table, meta={"schedule": "tidal_decode", "retrieval_layers": sorted(set(layers))})

    @classmethod
    def random(
        cls,
        num_layers: int,
        num_kv_heads: int,
        count: int,
        *,
        seed: int = 0,
        force_layer0: bool = True,
    ) -> HeadRoles:
        """``count`` retrieval KV heads drawn uniformly (seeded); with ``force_layer0`` the
        heads of layer 0 are retrieval and count towards ``count``. A baseline for evals."""
        _check_count("num_layers", num_layers, minimum=1, maximum=1 << 20)
        _check_count("num_kv_heads", num_kv_heads, minimum=1, maximum=1 << 20)
        total = num_layers * num_kv_heads
        floor = num_kv_heads if force_layer0 else 0
        _check_count("count", count, minimum=floor, maximum=total)
        table = torch.zeros(total, dtype=torch.bool)
        table[:floor] = True
        gen = torch.Generator().manual_seed(seed)
        rest = torch.randperm(total - floor, generator=gen)[: count - floor] + floor
        table[rest] = True
        return cls(table.reshape(num_layers, num_kv_heads), meta={"schedule": "random", "seed": seed})

    @classmethod
    def from_gates(
        cls,
        gates: torch.Tensor | Sequence[Sequence[float]] | str | os.PathLike,
        *,
        threshold: float | None = None,
        ratio: float | None = None,
        count: int | None = None,
        group_size: int | None = None,
        force_layer0: bool = False,
    ) -> HeadRoles:
        """Roles from a table of gate values (DuoAttention-style), higher = more retrieval.

        ``gates``: ``(L, Hkv)`` values, or ``(L, Hq)`` with ``group_size`` (a group takes the
        max of its query heads), as a tensor, nested lists, or a path to a whitespace- or
        comma-separated text table (DuoAttention's ``full_attention_heads.tsv``).
        Exactly one of ``threshold`` (retrieval where gate > threshold), ``ratio`` (the top
        ``round(ratio * L * Hkv)`` gates) or ``count`` (the top ``count`` gates) must be
        given. Ties in the ranking go to the lower (layer, head) index. ``force_layer0``
        makes layer 0 retrieval on top of the selection.
        """
        values = _gate_table(gates)
        if group_size is not None:
            values = _reduce_query_heads(values, group_size, "gate table", how="max")
        given = [name for name, v in (("threshold", threshold), ("ratio", ratio), ("count", count)) if v is not None]
        if len(given) != 1:
            raise ValueError(
                f"from_gates needs exactly one of threshold, ratio, count; got {given or 'none'}"
            )
        total = values.numel()
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
                raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
            table = values > threshold
        else:
            if ratio is not None:
                if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
                    raise TypeError(f"ratio must be a number, got {type(ratio).__name__}")
                if not 0.0 <= ratio <= 1.0:
                    raise ValueError(f"ratio must be in [0, 1], got {ratio}")
                count = round(ratio * total)
            _check_count("count", count, minimum=0, maximum=total)
            order = _rank_descending(values.reshape(-1))
            flat = torch.zeros(total, dtype=torch.bool)
            flat[order[:count]] = True
            table = flat.reshape(values.shape)
        if force_layer0:
            table[0] = True
        return cls(table, meta={"from_gates": given[0]})

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeadRoles:
        """Read a role map saved by :meth:`save` (or a bare JSON list of lists of bools)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"role map file not found: {str(path)!r}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"role map file {str(path)!r} is not valid JSON: {e}") from None
        return cls.from_json_obj(data, source=str(path))

    @classmethod
    def from_json_obj(cls, data: Any, *, source: str = "JSON") -> HeadRoles:
        if isinstance(data, list):
            return cls(data)
        if not isinstance(data, dict):
            raise TypeError(
                f"{source}: expected an object with 'retrieval' or a list of lists, "
                f"got {type(data).__name__}"
            )
        if data.get("format", _FORMAT) != _FORMAT:
            raise ValueError(f"{source}: expected format {_FORMAT!r}, got {data.get('format')!r}")
        if "retrieval" not in data:
            raise ValueError(f"{source}: missing key 'retrieval'")
        roles = cls(data["retrieval"], meta=data.get("meta"))
        for key, actual in (("num_layers", roles.num_layers), ("num_kv_heads", roles.num_kv_heads)):
            if key in data and data[key] != actual:
                raise ValueError(f"{source}: {key} says {data[key]}, but the table has {actual}")
        return roles

    @classmethod
    def coerce(cls, obj: RolesLike) -> HeadRoles:
        """What :func:`lychee_fx.backend` accepts: a HeadRoles, a bool tensor, nested lists
        of bools, or a path to a JSON file."""
        if isinstance(obj, HeadRoles):
            return obj
        if isinstance(obj, (str, os.PathLike)):
            return cls.load(obj)
        if isinstance(obj, (torch.Tensor, list, tuple)):
            return cls(obj)
        raise TypeError(
            "role map must be a HeadRoles, a bool tensor, nested lists of bools or a path, "
            f"got {type(obj).__name__}"
        )

    # ---- accessors ----------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return int(self._table.shape[0])

    @property
    def num_kv_heads(self) -> int:
        return int(self._table.shape[1])

    @property
    def table(self) -> torch.Tensor:
        """A copy of the ``(num_layers, num_kv_heads)`` bool table."""
        return self._table.clone()

    @property
    def meta(self) -> dict:
        """Free-form provenance (how the map was made); saved with the map."""
        return dict(self._meta)

    @property
    def num_retrieval(self) -> int:
        return int(self._table.sum())

    @property
    def density(self) -> float:
        """Share of KV heads that are retrieval."""
        return self.num_retrieval / self._table.numel()

    def row(self, layer: int) -> tuple[bool, ...]:
        """Roles of one layer as a tuple (what the pass writes into the graph as literals)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(
                f"layer must be in [0, {self.num_layers - 1}] for a role map of "
                f"{self.num_layers} layers, got {layer}"
            )
        return tuple(bool(x) for x in self._table[layer].tolist())

    def digest(self) -> str:
        """A stable hash of the table (not of ``meta``): keys compile caches."""
        h = hashlib.sha256(f"{self.num_layers}x{self.num_kv_heads}:".encode())
        h.update(bytes(self._table.to(torch.uint8).reshape(-1).tolist()))
        return h.hexdigest()[:16]

    # ---- files ----------------------------------------------------------------------------

    def to_json_obj(self) -> dict:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "retrieval": [[bool(x) for x in row] for row in self._table.tolist()],
            "meta": self._meta,
        }

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_json_obj(), indent=1) + "\n")

    # ---- dunder ----------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HeadRoles):
            return NotImplemented
        return self._table.shape == other._table.shape and bool(torch.equal(self._table, other._table))

    def __hash__(self) -> int:
        return hash(self.digest())

    def __repr__(self) -> str:
        rows = ["".join("R" if x else "." for x in row) for row in self._table.tolist()]
        shown = " ".join(rows) if len(rows) <= 8 else " ".join(rows[:4] + ["..."] + rows[-2:])
        return (
            f"HeadRoles({self.num_layers} layers x {self.num_kv_heads} KV heads, "
            f"{self.num_retrieval} retrieval: {shown})"
        )


def _gate_table(gates: Any) -> torch.Tensor:
    """Gate values as a 2-D float64 tensor."""
    if isinstance(gates, (str, os.PathLike)):
        path = Path(gates)
        if not path.is_file():
            raise FileNotFoundError(f"gate table file not found: {str(path)!r}")
        rows = []
        for n, line in enumerate(path.read_text().splitlines()):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                rows.append([float(x) for x in line.replace(",", " ").split()])
            except ValueError:
                raise ValueError(f"{str(path)!r} line {n + 1}: expected numbers, got {line!r}") from None
        gates = rows
    if isinstance(gates, torch.Tensor):
        if gates.dtype == torch.bool or gates.is_complex():
            raise TypeError(f"gate values must be real numbers, got dtype {gates.dtype}")
        values = gates.detach().to("cpu", torch.float64)
    elif isinstance(gates, (list, tuple)):
        widths = {len(r) if isinstance(r, (list, tuple)) else -1 for r in gates}
        if -1 in widths:
            raise TypeError("gate table must be a list of rows of numbers")
        if len(widths) > 1:
            raise ValueError(f"gate table rows must have equal length, got lengths {sorted(widths)}")
        try:
            values = torch.tensor(gates, dtype=torch.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"gate table must hold numbers: {e}") from None
    else:
        raise TypeError(f"gate values must be a tensor, nested lists or a path, got {type(gates).__name__}")
    if values.dim() != 2 or values.numel() == 0:
        raise ValueError(f"gate table must be 2-D and non-empty, got shape {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise ValueError("gate table must hold finite values, got NaN or inf")
    return values


def _rank_descending(values: torch.Tensor) -> torch.Tensor:
    """Indices by descending value, ties to the lower index."""
    return torch.sort(values, descending=True, stable=True).indices
