"""HardKuma gates (SPEC 4): a stretched and rectified Kumaraswamy distribution per unit.

A unit (one KV head of one layer) has parameters ``a, b > 0``. A sample is

    u ~ U(0, 1)
    s = (1 - (1 - u) ** (1 / b)) ** (1 / a)      Kumaraswamy(a, b), in (0, 1)
    t = -0.1 + 1.2 * s                            stretched to (-0.1, 1.1)
    z = clamp(t, 0, 1)                            rectified: point masses at 0 and 1

so ``z`` is exactly 0 (closed, sparse head) or exactly 1 (open, retrieval head) with positive
probability, and the sample is a differentiable function of ``(a, b)`` in between. With the
Kumaraswamy CDF ``F(x) = 1 - (1 - x ** a) ** b``:

    P(z = 0) = F(1/12)      = 1 - (1 - (1/12) ** a) ** b
    P(z = 1) = 1 - F(11/12) = (1 - (11/12) ** a) ** b
    E[L0]    = P(z > 0)     = (1 - (1/12) ** a) ** b        (the expected share of open gates)
    E[s]     = b * B(1 + 1/a, b)                              (the Kumaraswamy mean; read-out)

``a, b`` are kept as ``log a, log b`` so that AdamW on them can never leave ``a, b > 0``;
``log a = log b = 0`` is SPEC 4's initialisation ``a = b = 1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = [
    "STRETCH_LOW",
    "STRETCH_HIGH",
    "kumaraswamy_sample",
    "hardkuma_sample",
    "prob_closed",
    "prob_open_fully",
    "expected_l0",
    "kumaraswamy_mean",
    "HardKumaGates",
]

STRETCH_LOW, STRETCH_HIGH = -0.1, 1.1
_U_EPS = 1e-6  # keeps u inside (0, 1) so that logs stay finite


def kumaraswamy_sample(a: torch.Tensor, b: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The reparameterised Kumaraswamy sample ``(1 - (1 - u) ** (1/b)) ** (1/a)``.

    a, b > 0 and u in [0, 1], broadcastable -> s in [0, 1], differentiable in a and b.
    Computed in log space: ``1 - (1 - u) ** (1/b) = -expm1(log1p(-u) / b)``.
    """
    u = u.clamp(_U_EPS, 1.0 - _U_EPS)
    inner = -torch.expm1(torch.log1p(-u) / b)  # 1 - (1 - u) ** (1/b), in (0, 1)
    return torch.exp(torch.log(inner) / a)


def hardkuma_sample(a: torch.Tensor, b: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """z = clamp(-0.1 + 1.2 * s, 0, 1) with s = :func:`kumaraswamy_sample` (a, b, u)."""
    s = kumaraswamy_sample(a, b, u)
    return (STRETCH_LOW + (STRETCH_HIGH - STRETCH_LOW) * s).clamp(0.0, 1.0)


def _kuma_cdf(x: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """F(x) = 1 - (1 - x ** a) ** b for a constant x in (0, 1), stably."""
    x_pow_a = torch.exp(a * math.log(x))
    return -torch.expm1(b * torch.log1p(-x_pow_a))


_ZERO_AT = -STRETCH_LOW / (STRETCH_HIGH - STRETCH_LOW)  # s below 1/12 rectifies to z = 0
_ONE_AT = (1.0 - STRETCH_LOW) / (STRETCH_HIGH - STRETCH_LOW)  # s above 11/12 gives z = 1


def prob_closed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """P(z = 0) = 1 - (1 - (1/12) ** a) ** b."""
    return _kuma_cdf(_ZERO_AT, a, b)


def prob_open_fully(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """P(z = 1) = (1 - (11/12) ** a) ** b."""
    return 1.0 - _kuma_cdf(_ONE_AT, a, b)


def expected_l0(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """P(z > 0) = (1 - (1/12) ** a) ** b: a gate's expected contribution to the density."""
    return torch.exp(b * torch.log1p(-torch.exp(a * math.log(_ZERO_AT))))


def kumaraswamy_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """E[s] = b * B(1 + 1/a, b) = b * Gamma(1 + 1/a) * Gamma(b) / Gamma(1 + 1/a + b)."""
    c = 1.0 + 1.0 / a
    return torch.exp(torch.log(b) + torch.lgamma(c) + torch.lgamma(b) - torch.lgamma(c + b))


class HardKumaGates(nn.Module):
    """One HardKuma gate per (layer, KV head); ``forced`` units are fixed open (z = 1).

    Parameters ``log_a``, ``log_b``: (L, Hkv), initialised to 0 (a = b = 1). Forced units keep
    their parameters but never use them: their samples, expected L0 and read-out are 1.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, forced: torch.Tensor | None = None):
        super().__init__()
        shape = (num_layers, num_kv_heads)
        if forced is None:
            forced = torch.zeros(shape, dtype=torch.bool)
        if forced.dtype != torch.bool or tuple(forced.shape) != shape:
            raise ValueError(
                f"forced must be a bool tensor of shape {shape}, got {forced.dtype} {tuple(forced.shape)}"
            )
        self.log_a = nn.Parameter(torch.zeros(shape))
        self.log_b = nn.Parameter(torch.zeros(shape))
        self.register_buffer("forced", forced.clone())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.log_a.shape)

    def ab(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b), each (L, Hkv)."""
        return self.log_a.exp(), self.log_b.exp()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z (L, Hkv) in [0, 1], differentiable in (log a, log b); 1 at forced units."""
        a, b = self.ab()
        u = torch.rand(self.shape, generator=generator, dtype=a.dtype, device=a.device)
        return torch.where(self.forced, 1.0, hardkuma_sample(a, b, u))

    def expected_open(self) -> torch.Tensor:
        """P(z > 0) per unit (L, Hkv); 1 at forced units."""
        return torch.where(self.forced, 1.0, expected_l0(*self.ab()))

    def density(self) -> torch.Tensor:
        """Expected share of open gates over all units (forced ones count as open): a scalar."""
        return self.expected_open().mean()

    def mean(self) -> torch.Tensor:
        """The Kumaraswamy mean per unit (L, Hkv), the read-out score; 1 at forced units."""
        return torch.where(self.forced, 1.0, kumaraswamy_mean(*self.ab()))
