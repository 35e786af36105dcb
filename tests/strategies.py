"""Hypothesis strategies and comparison helpers shared by the property tests.

Query and key values are multiples of 1/4 in [-1, 1]: every q.k, and every selection score,
is then exact in float32, bfloat16-input and float64 arithmetic alike, so the fast paths and
the float64 oracle see the same ties and must break them the same way (lower block id).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from hypothesis import strategies as st

from lychee_fx.options import DecodeOptions


@dataclasses.dataclass
class DecodeCase:
    q: torch.Tensor  # (B, Hq, 1, D)
    k: torch.Tensor  # (B, Hkv, N, D)
    v: torch.Tensor  # (B, Hkv, N, D)
    valid: torch.Tensor  # (B, N) bool
    mask: torch.Tensor | None  # what the op / SDPA receives: None, bool or additive (B, N)
    mask_kind: str
    opts: DecodeOptions
    roles: tuple[bool, ...]  # one layer's roles, per KV head
    seed: int

    @property
    def shape(self):
        b, hq, _, d = self.q.shape
        return b, hq, self.k.shape[1], self.k.shape[2], d


def exact_values(gen: torch.Generator, shape, dtype) -> torch.Tensor:
    return (torch.randint(-4, 5, shape, generator=gen).to(torch.float64) / 4).to(dtype)


def make_valid(gen: torch.Generator, b: int, n: int, pattern: str) -> torch.Tensor:
    """(B, N) bool with the newest slot of every row valid."""
    valid = torch.ones(b, n, dtype=torch.bool)
    for i in range(b):
        if pattern == "static":  # a static cache: slots past the current length are empty
            length = int(torch.randint(1, n + 1, (), generator=gen))
            pad = int(torch.randint(0, length, (), generator=gen))  # and left padding
            valid[i] = False
            valid[i, pad:length] = True
        elif pattern == "holes":
            valid[i] = torch.rand(n, generator=gen) < 0.7
            valid[i, -1] = True
        elif pattern == "left":
            pad = int(torch.randint(0, n, (), generator=gen))
            valid[i, :pad] = False
    return valid


def mask_from_valid(gen: torch.Generator, valid: torch.Tensor, kind: str, dtype) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "bool":
        return valid.clone()
    # additive: HF's finfo.min on invalid slots, and a small finite bias on valid ones
    bias = exact_values(gen, valid.shape, torch.float64).to(dtype) * 0.5
    return torch.where(valid, bias, torch.finfo(dtype).min).to(dtype)


def decode_problem(seed: int, b: int, hkv: int, g: int, n: int, d: int, dtype, pattern: str, kind: str):
    """One decode step's inputs from ``seed``: q (B, Hkv * G, 1, D) and k (B, Hkv, N, D) with
    exact values (ties and sums exact in every dtype), v (B, Hkv, N, D) normal, valid (B, N)
    by ``pattern`` and the mask of ``kind`` (None, bool or additive) for it."""
    gen = torch.Generator().manual_seed(seed)
    q = exact_values(gen, (b, hkv * g, 1, d), dtype)
    k = exact_values(gen, (b, hkv, n, d), dtype)
    v = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    valid = make_valid(gen, b, n, pattern)
    return q, k, v, valid, mask_from_valid(gen, valid, kind, dtype)


def options(block_size: int, draw) -> DecodeOptions:
    bs = block_size
    sink = draw(st.integers(0, 2 * bs if bs > 1 else 8))
    recent = draw(st.integers(1, 3 * bs if bs > 1 else 12))
    floor = math.ceil(sink / bs) + math.ceil(recent / bs) + 2
    s = draw(st.integers(floor, floor + (12 if bs > 1 else 40)))
    return DecodeOptions(budget=s * bs, block_size=bs, sink=sink, recent=recent)


@st.composite
def decode_cases(draw, dtypes=(torch.float32,), max_n=600, mask_kinds=("none", "bool", "additive")):
    b = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 4))
    g = draw(st.integers(1, 4))
    d = draw(st.sampled_from([16, 32, 64, 128]))
    n = draw(st.one_of(st.integers(1, 70), st.integers(1, max_n)))
    bs = draw(st.sampled_from([1, 16, 64]))
    opts = options(bs, draw)
    dtype = draw(st.sampled_from(dtypes))
    kind = draw(st.sampled_from(mask_kinds))
    pattern = "full" if kind == "none" else draw(st.sampled_from(["full", "static", "holes", "left"]))
    roles = tuple(draw(st.lists(st.booleans(), min_size=hkv, max_size=hkv)))
    seed = draw(st.integers(0, 2**31 - 1))
    q, k, v, valid, mask = decode_problem(seed, b, hkv, g, n, d, dtype, pattern, kind)
    return DecodeCase(q, k, v, valid, mask, kind, opts, roles, seed)


def rel_err(actual: torch.Tensor, ref: torch.Tensor) -> float:
    a, r = actual.double(), ref.double()
    return float((a - r).norm() / r.norm().clamp_min(1e-30))


def assert_close_anchored(name: str, actual: torch.Tensor, ref64: torch.Tensor, lowp: torch.Tensor | None = None, *, floor: float = 1e-5) -> None:
    """``actual`` may be at most about as wrong, against the float64 ``ref64``, as an
    independent low-precision computation ``lowp`` of the same thing (and always within
    ``floor``). NaN never passes."""
    assert not torch.isnan(actual).any(), f"{name}: NaN in output"
    err = rel_err(actual, ref64)
    budget = floor if lowp is None else max(floor, 2.0 * rel_err(lowp, ref64))
    assert err <= budget, f"{name}: relative error {err:.3e} > {budget:.3e} (dtype {actual.dtype}, shape {tuple(actual.shape)})"


def sdpa_lowp(q, k, v, token_mask, bias, scale, dtype):
    """Masked attention by torch SDPA in ``dtype`` (the independent low-precision reference).

    q (B, Hq, 1, D), k/v (B, Hkv, N, D), token_mask (B, Hkv, N), bias (B, N) float64."""
    b, hq, _, d = q.shape
    g = hq // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1).to(dtype), v.repeat_interleave(g, 1).to(dtype)
    m = token_mask.repeat_interleave(g, 1)[:, :, None, :]  # (B, Hq, 1, N)
    add = torch.where(m, bias[:, None, None, :], float("-inf")).to(dtype)
    out = torch.nn.functional.scaled_dot_product_attention(q.to(dtype), kk, vv, attn_mask=add, scale=scale)
    return torch.where(m.any(-1, keepdim=True), out, 0.0)
