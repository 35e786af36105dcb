"""Hypothesis strategies and comparison helpers shared by the property tests.

Query and key values are multiples of 1/4 in [-1, 1]: every q.k, and every selection score,
is then exact in float32, bfloat16-input and float64 arithmetic alike, so the fast paths and
the float64 oracle see the same ties and must break them the same way (lower block id).

``extended_cases`` add ``lychee_fx.reference``'s extensions: a value head dim of its own, a
logit soft-cap, a per-query-head bias (ALiBi slopes or exact random values) and scales that
are powers of 2. Logits are exact there too, except through ``tanh``; selections are then
compared with ``assert_selection_agrees``, which allows other blocks only at ties within a
stated margin.
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
    softcap: float = 0.0
    head_bias: torch.Tensor | None = None  # (B or 1, Hq, N)
    scale: float | None = None  # None: 1 / sqrt(D)
    sink_logits: torch.Tensor | None = None  # (Hq,)

    @property
    def shape(self):
        b, hq, _, d = self.q.shape
        return b, hq, self.k.shape[1], self.k.shape[2], d


def exact_values(gen: torch.Generator, shape, dtype) -> torch.Tensor:
    return (torch.randint(-4, 5, shape, generator=gen).to(torch.float64) / 4).to(dtype)


def low_precision_problem(seed: int, b: int, hkv: int, g: int, n: int, d: int, dtype, normed: bool):
    """q (B, Hkv * G, 1, D) and k (B, Hkv, N, D) as a model in ``dtype`` hands them to
    attention: normal values rounded to ``dtype`` (not exact: scores differ from their float64
    values by float32 rounding), or with ``normed`` RMS-normalised per head like Gemma 3's q/k
    norms (every score of one size, so near-ties are common)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * g, 1, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64)
    if normed:
        q = q / q.pow(2).mean(-1, keepdim=True).sqrt()
        k = k / k.pow(2).mean(-1, keepdim=True).sqrt()
    return q.to(dtype), k.to(dtype)


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


def alibi_bias(b: int, hq: int, valid: torch.Tensor, dtype) -> torch.Tensor:
    """ALiBi (Bloom's): slope_i * (position among the valid slots), (B, Hq, N); exact for
    power-of-2 slopes."""
    slopes = torch.tensor([2.0 ** -(i % 4 + 1) for i in range(hq)], dtype=torch.float64)
    pos = (valid.long().cumsum(-1) - 1).clamp_min(0).to(torch.float64)  # (B, N)
    return (slopes[None, :, None] * pos[:, None, :]).to(dtype)


@st.composite
def extended_cases(draw, dtypes=(torch.float32,), max_n=300, mask_kinds=("none", "bool", "additive"), sinks=False):
    """``decode_cases`` with the reference's extensions drawn in (at least one of them);
    ``sinks``: sink logits too (the ops' torch implementation takes them, the kernels not yet)."""
    case = draw(decode_cases(dtypes=dtypes, max_n=max_n, mask_kinds=mask_kinds))
    b, hq, hkv, n, d = case.shape
    gen = torch.Generator().manual_seed(case.seed + 3)
    dv = draw(st.sampled_from([d, 8, 24, 2 * d]))
    if dv != d:
        case.v = torch.randn(b, hkv, n, dv, generator=gen).to(case.q.dtype)
    case.softcap = draw(st.sampled_from([0.0, 0.0, 0.5, 2.0, 30.0]))
    kind = draw(st.sampled_from(["none", "alibi", "random", "broadcast"]))
    if kind == "alibi":
        case.head_bias = alibi_bias(b, hq, case.valid, case.q.dtype)
    elif kind == "random":
        case.head_bias = exact_values(gen, (b, hq, n), case.q.dtype) * 2
    elif kind == "broadcast":
        case.head_bias = exact_values(gen, (1, hq, n), case.q.dtype)
    case.scale = draw(st.sampled_from([None, 0.25, 0.125, 1.0]))
    if sinks:
        sink = draw(st.sampled_from(["none", "random", "random", "-inf", "large"]))
        if sink == "random":  # logits of the size the scores have, some above them, some below
            case.sink_logits = exact_values(gen, (hq,), case.q.dtype) * 4
        elif sink == "-inf":  # no sink, spelled as one
            case.sink_logits = torch.full((hq,), float("-inf"), dtype=case.q.dtype)
        elif sink == "large":  # a sink that takes nearly all the mass
            case.sink_logits = torch.full((hq,), 30.0, dtype=case.q.dtype)
    if dv == d and not case.softcap and case.head_bias is None and case.sink_logits is None:
        case.softcap = 1.0  # at least one extension
    return case


def selection_error_bound(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A bound, per (batch, KV head) row, on how far float32 arithmetic can move SPEC 1.1's
    position scores (the mean over the group of q . k) from their float64 values, for q and k
    of any dtype whose products are exact in float32 (bfloat16, float16; float32 inputs are
    first rounded by the products too, which the bound covers the same way):

        |err_j| <= gamma(G * D) * mean_g sum_d |q_gd k_jd|,   gamma(n) = n u / (1 - n u)

    with u = 2^-23, the worst rounding of one float32 addition (round-to-nearest is 2^-24;
    tensor cores may truncate), the G * D products summed in any order (a sum of m terms is
    rounded at most m - 1 times; one more rounding covers float32 products). q (B, Hq, 1, D),
    k (B, Hkv, N, D) -> (B, Hkv) float64, the largest bound over the row's slots."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    u = 2.0**-23
    m = g * d + 1
    gamma = m * u / (1 - m * u)
    qa = q.double().abs().reshape(b, hkv, g, d)
    mags = torch.einsum("bhgd,bhnd->bhn", qa, k.double().abs()) / g  # (B, Hkv, N)
    return gamma * mags.amax(dim=-1)


def assert_selection_agrees(name: str, sel: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor,
                            valid: torch.Tensor, opts: DecodeOptions, margin) -> None:
    """``sel`` equals the float64 selection ``ref`` except where block scores tie within
    ``margin``: the forced blocks and the count are the same, no block ``sel`` took scores
    below the lowest block ``ref`` took by score less ``margin``, and no block ``sel`` left
    out scores above it plus ``margin``. scores (B, Hkv, N) float64, the reference's; sel/ref
    (B, Hkv, S); valid (B, N); margin a float or one per row (B, Hkv)."""
    bs = opts.block_size
    b, hkv, n = scores.shape
    margins = torch.as_tensor(margin, dtype=torch.float64).expand(b, hkv)
    for bi in range(b):
        positions = [j for j in range(n) if valid[bi, j]]
        forced = {j // bs for j in positions[: opts.sink]} | {j // bs for j in positions[max(0, len(positions) - opts.recent):]}
        for h in range(hkv):
            got = {x for x in sel[bi, h].tolist() if x >= 0}
            want = {x for x in ref[bi, h].tolist() if x >= 0}
            if got == want:
                continue
            block = {}
            for j in positions:
                block[j // bs] = max(block.get(j // bs, -math.inf), float(scores[bi, h, j]))
            where = f"{name}: row (b={bi}, h={h}): got {sorted(got)}, float64 selection {sorted(want)}"
            assert len(got) == len(want) and forced <= got and got <= set(block), where
            margin = float(margins[bi, h])
            kth = min([block[x] for x in want - forced], default=math.inf)
            assert all(block[x] >= kth - margin for x in got - forced), f"{where}: a block below the threshold {kth}"
            assert all(block[x] <= kth + margin for x in set(block) - got), f"{where}: a block above the threshold {kth}"


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
