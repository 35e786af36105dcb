"""From trained gates to a role map (SPEC 4's read-out), and a readable gate report.

Retrieval where the Kumaraswamy mean exceeds 0.5; if that is not exactly the target count,
the ``count`` units with the highest means instead (forced units first, ties to the lower
(layer, head) index). Shapes: (L, Hkv).
"""

from __future__ import annotations

import torch

__all__ = ["read_out", "gate_report"]


def read_out(mean: torch.Tensor, forced: torch.Tensor, count: int) -> torch.Tensor:
    """mean (L, Hkv) float, forced (L, Hkv) bool, count -> (L, Hkv) bool with ``count`` True."""
    if mean.shape != forced.shape:
        raise ValueError(f"mean and forced must have the same shape, got {tuple(mean.shape)} and {tuple(forced.shape)}")
    total, n_forced = mean.numel(), int(forced.sum())
    if not n_forced <= count <= total:
        raise ValueError(f"count must be in [{n_forced}, {total}] (forced units .. all units), got {count}")
    table = forced | (mean > 0.5)
    if int(table.sum()) == count:
        return table
    score = torch.where(forced, float("inf"), mean.double()).reshape(-1)
    order = torch.sort(score, descending=True, stable=True).indices
    flat = torch.zeros(total, dtype=torch.bool)
    flat[order[:count]] = True
    return flat.reshape(mean.shape)


def gate_report(mean: torch.Tensor, table: torch.Tensor) -> str:
    """One line per layer: each head's Kumaraswamy mean, ``*`` marking retrieval heads."""
    lines = []
    for layer, (row, roles) in enumerate(zip(mean.tolist(), table.tolist())):
        cells = " ".join(f"{x:5.3f}{'*' if r else ' '}" for x, r in zip(row, roles))
        lines.append(f"layer {layer:3d}: {cells}")
    return "\n".join(lines)
