"""The knobs of role learning (SPEC 4), validated once, before any model work.

    count           retrieval KV heads wanted; None = 1 in 8 of all KV heads (rounded), and
                    at least the forced ones
    force_layer0    layer 0 is retrieval (SPEC 1.1 makes it so anyway) and counts in ``count``
    steps, lr       AdamW steps on (log a, log b), and its learning rate (SPEC 4: 3000, 0.01)
    weight_decay    AdamW's decoupled weight decay on (log a, log b) (pulls towards a = b = 1)
    lambda_init     the density penalty's initial multiplier
    lambda_growth   factor applied to lambda after every step whose density exceeds the target
    seed            gate noise and example order are pure functions of (seed, step)
    budget, block_size, sink, recent
                    the decoding options the student trains under (SPEC 1.1); pick a budget
                    well below the training contexts, or sparse heads see everything
    log_every       steps per log record (means over the window)
    checkpoint_every  steps between checkpoints (when a checkpoint path is given)
"""

from __future__ import annotations

import dataclasses

from lychee_fx.options import DecodeOptions

__all__ = ["LearnConfig"]


def _check(name: str, value: object, kind: type | tuple, *, minimum: float | None = None, above: float | None = None):
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise TypeError(f"{name} must be {names}, got {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if above is not None and not value > above:
        raise ValueError(f"{name} must be > {above}, got {value}")


@dataclasses.dataclass(frozen=True)
class LearnConfig:
    """Role-learning settings; see the module docstring. Defaults follow SPEC 4.

    >>> LearnConfig(count=11).options().num_blocks
    16
    """

    count: int | None = None
    force_layer0: bool = True
    steps: int = 3000
    lr: float = 0.01
    weight_decay: float = 0.01
    lambda_init: float = 1.0
    lambda_growth: float = 1.01
    seed: int = 0
    budget: int = 256
    block_size: int = 16
    sink: int = 16
    recent: int = 64
    log_every: int = 10
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        if self.count is not None:
            _check("count", self.count, int, minimum=1)
        _check("force_layer0", self.force_layer0, bool)
        _check("steps", self.steps, int, minimum=0)
        _check("lr", self.lr, (float, int), above=0.0)
        _check("weight_decay", self.weight_decay, (float, int), minimum=0.0)
        _check("lambda_init", self.lambda_init, (float, int), above=0.0)
        _check("lambda_growth", self.lambda_growth, (float, int), minimum=1.0)
        _check("seed", self.seed, int, minimum=0)
        _check("log_every", self.log_every, int, minimum=1)
        _check("checkpoint_every", self.checkpoint_every, int, minimum=1)
        self.options()  # validates budget, block_size, sink, recent

    def options(self) -> DecodeOptions:
        return DecodeOptions(budget=self.budget, block_size=self.block_size, sink=self.sink, recent=self.recent)

    def target_count(self, num_layers: int, num_kv_heads: int) -> int:
        """The number of retrieval KV heads the read-out returns, for a model's shape."""
        total = num_layers * num_kv_heads
        forced = num_kv_heads if self.force_layer0 else 0
        if self.count is None:
            return max(forced, 1, round(total / 8))
        if not forced <= self.count <= total:
            raise ValueError(
                f"count must be in [{forced}, {total}] for {num_layers} layers x {num_kv_heads} KV heads"
                f"{' with layer 0 forced retrieval' if forced else ''}, got {self.count}"
            )
        return self.count

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
