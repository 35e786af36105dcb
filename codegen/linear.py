"""Decode linears: y_i = x @ W_i^T (+ b_i) for a few weights that share one small input x.

Notation:

    M        rows of x (decode: batch x 1 token), at most ``MAX_ROWS``
    K        input features                  N_i   output features of weight i
    W_i      (N_i, K), unit stride along K   y_i   (M, N_i), x's dtype
    BLOCK_N  output features per program     BLOCK_K  input features per loop step

Why a kernel of our own: a decode step's projections are matrix-vector products that read
every weight once and do almost no arithmetic, so their floor is bytes / bandwidth. cuBLAS
reached 38% of the H200's copy bandwidth on Llama-3-8B's k and v projections (8 MB each)
and 71% on q and o (2026-11-30d profile), each a launch of its own. One launch here serves
the q, k and v projections (or gate and up) of a layer: the weights stay separate tensors
(no concatenated copy, no extra memory), and programs are spread over all their rows.

Work is parallelised over output features only: program p owns BLOCK_N consecutive rows of
one weight (the weights' tiles are numbered one after another) and streams them along K
once, with all M rows of x, accumulating in float32; no split-K, so no partial sums and no
second launch. File order: the tile loop, the kernel, configs and their pruning rule, the
grid, the launcher.

[Note: two inner products] ``DOT``: the tile is multiplied on tensor cores, x padded to 16
rows (``tl.dot``'s least M); else by FMAs and a row sum, one x row at a time. Which is faster
is measured per shape (``examples/bench_linear.py``). float32 inputs (and every input under
Triton's interpreter, whose bfloat16 ``tl.dot`` is wrong) take IEEE float32 products.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lychee_fx import ops

__all__ = ["MAX_ROWS", "MAX_WEIGHTS", "LinearConfig", "supports", "default_config", "decode_linear", "tiles"]

MAX_ROWS = ops.LINEAR_MAX_ROWS  # rows of x the kernel takes (a decode batch)
MAX_WEIGHTS = ops.LINEAR_MAX_WEIGHTS  # weights one launch serves


@triton.jit
def _tile(X, W, BIAS, Y, tile, N, K, stride_xm, stride_wn, stride_ym,
          M: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          EVEN_K: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr):
    """Rows [tile * BLOCK_N, +BLOCK_N) of y = x @ W^T (+ bias) for all M rows of x."""
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    w_ptr = W + offs_n[:, None] * stride_wn + offs_k[None, :]  # (BLOCK_N, BLOCK_K)
    if DOT:
        offs_m = tl.arange(0, 16)
        x_ptr = X + offs_m[:, None] * stride_xm + offs_k[None, :]  # (16, BLOCK_K)
        acc = tl.zeros([16, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptr, mask=n_ok[:, None], other=0.0)
                x = tl.load(x_ptr, mask=offs_m[:, None] < M, other=0.0)
            else:
                k_ok = (k0 + offs_k) < K
                w = tl.load(w_ptr, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                x = tl.load(x_ptr, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
            w_ptr += BLOCK_K
            x_ptr += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y_ptr = Y + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=(offs_m[:, None] < M) & n_ok[None, :])
    else:
        for m in tl.static_range(M):
            acc = tl.zeros([BLOCK_N], tl.float32)
            wp = w_ptr
            for k0 in range(0, K, BLOCK_K):
                if EVEN_K:
                    w = tl.load(wp, mask=n_ok[:, None], other=0.0)
                    x = tl.load(X + m * stride_xm + k0 + offs_k)
                else:
                    k_ok = (k0 + offs_k) < K
                    w = tl.load(wp, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                    x = tl.load(X + m * stride_xm + k0 + offs_k, mask=k_ok, other=0.0)
                acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
                wp += BLOCK_K
            if HAS_BIAS:
                acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(Y + m * stride_ym + offs_n, acc.to(Y.dtype.element_ty), mask=n_ok)


@triton.jit
def decode_linear_kernel(
    X, W0, W1, W2, W3, B0, B1, B2, B3, Y0, Y1, Y2, Y3,
    N0, N1, N2, N3, T0, T1, T2, K,
    stride_xm, stride_w0, stride_w1, stride_w2, stride_w3, stride_y0, stride_y1, stride_y2, stride_y3,
    M: tl.constexpr, NUM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr,
):
    """Program p: tile p of weight 0, else tile p - T0 of weight 1, and so on (T_i = tiles of
    weight i, cumulative: T1 counts weights 0 and 1). Unused weight slots (i >= NUM) repeat
    weight 0's pointers and are never reached."""
    pid = tl.program_id(0)
    if pid < T0:
        _tile(X, W0, B0, Y0, pid, N0, K, stride_xm, stride_w0, stride_y0, M, HAS_BIAS, BLOCK_N, BLOCK_K, EVEN_K, DOT, IEEE)
    elif NUM > 1 and pid < T1:
        _tile(X, W1, B1, Y1, pid - T0, N1, K, stride_xm, stride_w1, stride_y1, M, HAS_BIAS, BLOCK_N, BLOCK_K, EVEN_K,
              DOT, IEEE)
    elif NUM > 2 and pid < T2:
        _tile(X, W2, B2, Y2, pid - T1, N2, K, stride_xm, stride_w2, stride_y2, M, HAS_BIAS, BLOCK_N, BLOCK_K, EVEN_K,
              DOT, IEEE)
    elif NUM > 3:
        _tile(X, W3, B3, Y3, pid - T2, N3, K, stride_xm, stride_w3, stride_y3, M, HAS_BIAS, BLOCK_N, BLOCK_K, EVEN_K,
              DOT, IEEE)


class LinearConfig(NamedTuple):
    """One launch config: output rows per program, input features per step, warps, stages,
    and the inner product ([Note: two inner products])."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    dot: bool


def _fits(cfg: LinearConfig, m: int, elem: int) -> bool:
    """The pruning rule: the W tiles of every stage (and x's, padded to 16 rows for the dot)
    fit in shared memory, and the FMA path keeps its (BLOCK_N, BLOCK_K) product tile small
    enough for the registers of its warps."""
    rows = cfg.block_n + (16 if cfg.dot else 0)
    if cfg.num_stages * rows * cfg.block_k * elem > 160 * 1024:
        return False
    return cfg.dot or cfg.block_n * cfg.block_k <= 64 * 32 * cfg.num_warps


def configs(m: int, elem: int) -> list[LinearConfig]:
    """The grid ``examples/bench_linear.py`` sweeps, pruned by ``_fits``."""
    grid = [LinearConfig(bn, bk, w, s, dot) for dot in (True, False) for bn in (16, 32, 64) for bk in (128, 256, 512)
            for w in (4, 8) for s in (3, 4)]
    return [c for c in grid if _fits(c, m, elem)]


# [Note: linear defaults] Measured on the H200 (2026-12-01, bench_linear.py --grid small, bf16,
# Llama-3-8B shapes, weights rotated past the L2; us per launch, cuBLAS = one launch per weight):
#
#   M=1            floor  cuBLAS  32/256/4w/4s dot  32/128/4w/3s dot
#   q, k, v         11.8    29.2    15.7              18.3
#   o                7.8    13.5    11.7              16.3
#   gate, up        54.9    61.4    60.8              55.5
#   down            27.5    31.5    31.4              50.3
#   LM head        245.7   239.3   232.8             245.8
#
# (M=4 alike for q/k/v, o and gate/up.) 32 rows x 256 features x 4 stages on tensor cores is the
# best single config (a layer's linears 114 us against cuBLAS's 136); launches of 16K to 64K
# rows (gate and up) take 128-feature steps in 3 stages. The FMA path is never much better at
# M=1 and 3-4x slower at M=4.
DEFAULT_CONFIG = LinearConfig(block_n=32, block_k=256, num_warps=4, num_stages=4, dot=True)
WIDE_CONFIG = LinearConfig(block_n=32, block_k=128, num_warps=4, num_stages=3, dot=True)  # 16K-64K rows
CONFIG: LinearConfig | None = None  # a benchmark may pin another config per process


def default_config(m: int, k: int, elem: int, rows: int = 0) -> LinearConfig:
    """The config a launch of ``rows`` output rows in all uses: ``CONFIG`` when pinned, else
    ``WIDE_CONFIG`` for 16K to 64K rows and ``DEFAULT_CONFIG`` otherwise ([Note: linear
    defaults]), the K step shrunk to a power of 2 no larger than K (a small tile under the
    interpreter)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and CONFIG is None:
        return LinearConfig(16, min(64, triton.next_power_of_2(k)), 4, 1, True)
    cfg = CONFIG or (WIDE_CONFIG if 16384 <= rows <= 65536 else DEFAULT_CONFIG)
    return cfg._replace(block_k=min(cfg.block_k, max(16, triton.next_power_of_2(k))))


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> str | None:
    """None when the kernel takes these inputs, else why not (the op then runs ``F.linear``)."""
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not (x.is_cuda or interp):
        return f"device {x.device.type}"
    if not 1 <= len(weights) <= MAX_WEIGHTS or len(biases) != len(weights):
        return f"{len(weights)} weights and {len(biases)} biases (expected 1 to {MAX_WEIGHTS} of each)"
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        return f"x {tuple(x.shape)} (expected (M <= {MAX_ROWS}, K))"
    if x.dtype not in _DTYPES or x.stride(1) != 1:
        return f"x of {x.dtype} with strides {x.stride()}"
    k = x.shape[1]
    for w in weights:
        if w.dim() != 2 or w.shape[1] != k or w.dtype != x.dtype or w.stride(1) != 1 or w.device != x.device:
            return f"weight {tuple(w.shape)} {w.dtype} strides {w.stride()} on {w.device} for x {tuple(x.shape)} {x.dtype}"
    if len({b is None for b in biases}) > 1:
        return "some weights have a bias and others not"
    for w, b in zip(weights, biases):
        if b is not None and (tuple(b.shape) != (w.shape[0],) or b.dtype != x.dtype or b.stride(0) != 1):
            return f"bias {tuple(b.shape)} {b.dtype} for weight {tuple(w.shape)}"
    return None


def tiles(ns: Sequence[int], block_n: int) -> list[int]:
    """Cumulative tile counts of the weights: the grid is ``tiles(...)[-1]`` programs."""
    out, total = [], 0
    for n in ns:
        total += triton.cdiv(n, block_n)
        out.append(total)
    return out


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pad(seq: Sequence, fill) -> list:
    """``seq`` padded with ``fill`` to ``MAX_WEIGHTS`` entries (the kernel's fixed slots)."""
    return list(seq) + [fill] * (MAX_WEIGHTS - len(seq))


def decode_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                  *, traced: bool = False, config: LinearConfig | None = None) -> list[torch.Tensor]:
    """The CUDA implementation of ``lychee::decode_linear`` (same contract): one launch for
    every weight. x (M, K); weights[i] (N_i, K); biases[i] (N_i,) or None; returns [y_i (M, N_i)]."""
    m, k = x.shape
    num = len(weights)
    ns = [w.shape[0] for w in weights]
    cfg = config or default_config(m, k, x.element_size(), sum(ns))
    ys = [torch.empty((m, n), dtype=x.dtype, device=x.device) for n in ns]
    t = tiles(ns, cfg.block_n)
    ws, ysp = _pad(weights, weights[0]), _pad(ys, ys[0])
    has_bias = biases[0] is not None
    bs = _pad(biases, biases[0]) if has_bias else [x] * MAX_WEIGHTS  # never read without a bias
    nsp, tp = _pad(ns, ns[0]), _pad(t, t[-1])
    kernel = torch.library.wrap_triton(decode_linear_kernel) if traced else decode_linear_kernel
    kernel[(t[-1],)](
        x, *ws, *bs, *ysp, *nsp, *tp[:3], k,
        x.stride(0), *(w.stride(0) for w in ws), *(y.stride(0) for y in ysp),
        M=m, NUM=num, HAS_BIAS=has_bias, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0,
        DOT=cfg.dot, IEEE=x.dtype == torch.float32 or _interpreting(), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return ys
