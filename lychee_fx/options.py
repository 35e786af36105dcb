"""Decoding options of SPEC 1.1, validated once, outside traced code.

    budget      tokens a sparse head may attend to (a multiple of block_size)
    block_size  cache slots per selection block; 1 = token-level selection
    sink        the first `sink` valid positions are always selected
    recent      the last `recent` valid positions are always selected (the newest token is one)

Derived: ``num_blocks = budget // block_size`` (S), the length of every selection row.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["DecodeOptions"]


def _check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """The knobs of LycheeDecode (SPEC 1.1). Defaults are the paper's.

    >>> DecodeOptions(budget=256, block_size=16, sink=16, recent=32).num_blocks
    16
    """

    budget: int = 4096
    block_size: int = 64
    sink: int = 128
    recent: int = 256

    def __post_init__(self) -> None:
        _check_int("block_size", self.block_size, minimum=1)
        _check_int("budget", self.budget, minimum=1)
        _check_int("sink", self.sink, minimum=0)
        _check_int("recent", self.recent, minimum=1)
        if self.budget % self.block_size:
            raise ValueError(
                f"budget must be a positive multiple of block_size={self.block_size}, "
                f"got budget={self.budget}"
            )
        if self.min_num_blocks > self.num_blocks:
            raise ValueError(
                "the forced blocks must fit in the budget: expected "
                "ceil(sink / block_size) + ceil(recent / block_size) + 2 <= budget // block_size, "
                f"got {math.ceil(self.sink / self.block_size)} + "
                f"{math.ceil(self.recent / self.block_size)} + 2 = {self.min_num_blocks} > "
                f"{self.num_blocks} (budget={self.budget}, block_size={self.block_size}, "
                f"sink={self.sink}, recent={self.recent})"
            )

    @property
    def num_blocks(self) -> int:
        """S: the number of block ids in one selection row."""
        return self.budget // self.block_size

    @property
    def min_num_blocks(self) -> int:
        """The most blocks the forced sink and recent positions can span (SPEC 1.1)."""
        return math.ceil(self.sink / self.block_size) + math.ceil(self.recent / self.block_size) + 2

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)
