"""Triton kernels for decode attention over a KV cache: split-KV passes and their merge.

Notation (every kernel here):

    B        batch                           Hkv   KV heads of the cache
    R        KV heads one launch serves (the op's ``heads``; HEADS[r] is the cache head)
    G        query heads per KV head, G_PAD >= 16 rows for tl.dot (rows >= G are zero)
    N        cache slots                     D     query/key head dim, D_PAD its power-of-2 tile
    DV       value head dim (= D but for multi-head latent attention), DV_PAD its tile
    BS       selection block size (slots per block), NB = ceil(N / BS) cache blocks
    S        selected blocks per row (the op's ``num_blocks``)
    BLOCK_N  slots per inner tile            SPLIT work per program along N (or the selection)

Work is parallelised over (B * R) x SPLITS programs: each streams its slice of K/V once, with
all G query heads of the group in one tile, so every K/V byte is read once. A split writes an
un-normalised partial output with its running max and sum (log2 domain); ``merge_splits``
combines the splits (LSE merge). File order: helpers, split kernels (each a jit body and its
kernel; the pooled kernel of both), merge.

[Note: pooled layers] A layer with retrieval and sparse heads (``lychee::hybrid_attention``,
``passes/pool.py``) runs both kinds of splits in one launch, ``hybrid_split_kernel``: its
first B * R_ret * splits programs are the retrieval splits, the rest the sparse splits (each
part split as its own op would be, so the long retrieval programs start first and the short
sparse ones fill the SMs behind them), one warps/stages config for both (the retrieval
split's). ``select_kernel.hybrid_reduce_kernel`` then merges both parts' rows into one output
(the retrieval heads' groups, then the sparse heads') beside the selection program. The
sparse heads read the selection the layer was given: their rows are not the ones this layer
selects. Against two ops, a layer saves a split launch, a merge launch and the cat of the
outputs, and the sparse split no longer runs alone on a mostly idle GPU: on the H200 at 128K,
batch 1 (2026-12-02), the pooled split took 27.9 us where a one-head retrieval split and the
sparse split took about 24.7 and 9.0, and a token 0.25 ms less through generate().

[Note: exp2] Logits are kept in log2 units (scale * log2(e) folded into one multiplier) so the
softmax uses exp2, one instruction on NVIDIA GPUs.

[Note: empty tiles] A tile whose slots are all invalid has max -inf; ``_safe`` replaces it by 0
in the exponent so that exp2(-inf - -inf) never makes a NaN, and the tile contributes 0.

[Note: DOT_F32] float32 inputs take IEEE float32 dots (not tf32). The launcher also sets it
under Triton's interpreter, whose bfloat16 tl.dot is wrong (Triton 3.9); on a GPU bfloat16 and
float16 dots run natively on tensor cores with float32 accumulation.

[Note: logit extensions] (``lychee_fx.reference``'s extensions of SPEC 1.1) With SOFTCAP or
HAS_HB, a tile's logits are ``cap(scale * q.k + head_bias)`` in natural units, taken to log2
units (and the mask's bias added) only for the softmax; the selection score is the group's sum
of those logits before the mask. ``tanh`` is ``1 - 2 / (exp(2|x|) + 1)`` with the sign put
back: exp2 only, the same code on every Triton version and in the interpreter; its absolute
error is a few float32 ulps of 1. Without either flag the code is the plain path, unchanged.

[Note: invalid slots are never read] K and V loads are masked by validity, so garbage (even
NaN) in empty static-cache slots or masked padding cannot reach the output: same as the
vectorised torch implementation and the oracle.

[Note: the mask's cost] HF's decode graph passes a (B, N) bool mask. On the H200 it makes a
one-head retrieval split at 128K 1.56x slower at batch 1 (22.7 to 35.4 us, floor 15.7) and
1.28x at batch 4 (64.4 to 82.5 us, floor 62.7), the sparse split 1.1x (18.0 to 19.9 us at batch
4), an 8-head split (longer splits) under 1% (bench_split --masks, 2026-11-30d). Three variants
did not win it back: loading the next tile's validity one iteration ahead (38.8 / 85.0 us),
predicating the K load on bounds alone (41.6 / 92.9), and predicating K and V on bounds with
invalid V zeroed by a where (40.7 / 93.5, and 1.3-1.9x slower on 8 heads: V no longer goes
straight from shared memory to the dot). Skipping wholly invalid tiles would still have to
write their block scores. So the loads stay masked by validity; end to end the mask costs about
24 x 13-18 us per paper-ratio step at 128K.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# MASK_KIND values
MASK_NONE = 0
MASK_BOOL = 1
MASK_ADDITIVE = 2


@triton.jit
def _safe(m):
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _tanh(x):
    """tanh by exp2 ([Note: logit extensions])."""
    t = 1.0 - 2.0 / (tl.exp2(tl.abs(x) * (2.0 * 1.4426950408889634)) + 1.0)
    return tl.where(x < 0, -t, t)


@triton.jit
def _load_q(Q, b, h, stride_qb, stride_qh, stride_qd, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
    """The G query heads of KV head h: (G_PAD, D_PAD), zero-padded."""
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    ptr = Q + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :] * stride_qd
    return tl.load(ptr, mask=(offs_g[:, None] < G) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _prologue(Q, HEADS, b, r, stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_vb, stride_vh,
              G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr):
    """Batch row b, head slot r: its cache head h, queries (G_PAD, D_PAD), K/V base offsets,
    and empty online-softmax state (max, sum, accumulator (G_PAD, DV_PAD)).

    [Note: store pointers] The caller computes b and r itself. Inductor's mutation analysis
    (``identify_mutated_tensors``) counts every tensor argument of a call as the source of the
    call's results; a store address built from a result of this function (which reads Q and
    HEADS) would mark Q and HEADS as written, and the functionalised graph would then clone
    and copy back the caller's query: wrong answers. Store addresses here derive from
    program ids only; a GPU test pins the analysis."""
    h = tl.load(HEADS + r)
    q = _load_q(Q, b, h, stride_qb, stride_qh, stride_qd, G, G_PAD, D, D_PAD)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, DV_PAD], tl.float32)
    return h, q, b * stride_kb + h * stride_kh, b * stride_vb + h * stride_vh, m_i, l_i, acc


@triton.jit
def _slot_validity(MASK, b, pos, ok, stride_mb, stride_mn, mask_min, MASK_KIND: tl.constexpr):
    """Validity (BLOCK_N,) and additive bias (BLOCK_N,) float32 (log2 units) of slots ``pos``."""
    bias = tl.zeros(pos.shape, dtype=tl.float32)
    valid = ok
    if MASK_KIND == 1:
        m = tl.load(MASK + b * stride_mb + pos * stride_mn, mask=ok, other=0)
        valid = ok & (m != 0)
    if MASK_KIND == 2:
        m = tl.load(MASK + b * stride_mb + pos * stride_mn, mask=ok, other=float("-inf")).to(tl.float32)
        valid = ok & (m > mask_min)
        bias = tl.where(valid, m * 1.4426950408889634, 0.0)
    return valid, bias


@triton.jit
def _head_bias_tile(HB, b, h, pos, valid, stride_hbb, stride_hbh, stride_hbn, G: tl.constexpr, G_PAD: tl.constexpr):
    """The head bias of the group's query heads at slots ``pos``: (G_PAD, BLOCK_N) float32,
    0 on padded rows and invalid slots."""
    offs_g = tl.arange(0, G_PAD)
    ptr = HB + b * stride_hbb + (h * G + offs_g)[:, None] * stride_hbh + pos[None, :] * stride_hbn
    return tl.load(ptr, mask=(offs_g[:, None] < G) & valid[None, :], other=0.0).to(tl.float32)


@triton.jit
def _attend_tile(q, K, V, base_k, base_v, pos, valid, bias, hb, stride_kn, stride_kd, stride_vn, stride_vd,
                 m_i, l_i, acc, scale_log2, scale, softcap, D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr,
                 DV_PAD: tl.constexpr, SOFTCAP: tl.constexpr, HAS_HB: tl.constexpr, DOT_F32: tl.constexpr):
    """One online-softmax step over a tile of slots. Returns the tile's selection scores per
    query row too: the raw q.k^T, or with SOFTCAP / HAS_HB the logits before the mask
    ([Note: logit extensions]).

    q (G_PAD, D_PAD); pos/valid/bias (BLOCK_N,); hb (G_PAD, BLOCK_N) (HAS_HB); m_i, l_i
    (G_PAD,); acc (G_PAD, DV_PAD)."""
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d[None, :] < D
    k = tl.load(K + base_k + pos[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=valid[:, None] & dmask, other=0.0)
    if DOT_F32:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")  # (G_PAD, BLOCK_N)
    else:
        s = tl.dot(q, tl.trans(k))
    if SOFTCAP or HAS_HB:
        x = s * scale
        if HAS_HB:
            x = x + hb
        if SOFTCAP:
            x = softcap * _tanh(x / softcap)
        logits = tl.where(valid[None, :], x * 1.4426950408889634 + bias[None, :], float("-inf"))
        s = x
    else:
        logits = tl.where(valid[None, :], s * scale_log2 + bias[None, :], float("-inf"))
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    m_safe = _safe(m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(logits - m_safe[:, None])
    offs_dv = tl.arange(0, DV_PAD)
    v = tl.load(V + base_v + pos[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=valid[:, None] & (offs_dv[None, :] < DV), other=0.0)
    if DOT_F32:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return m_new, l_i, acc, s


@triton.jit
def _store_partial(PART_O, PART_M, PART_L, row, m_i, l_i, acc, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
    """Partials of one (b, r, split) ``row``: o (G, D), m (G,), l (G,) float32 (D: the value
    head dim)."""
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    gmask = offs_g < G
    tl.store(PART_O + row * G * D + offs_g[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None] & (offs_d[None, :] < D))
    tl.store(PART_M + row * G + offs_g, m_i, mask=gmask)
    tl.store(PART_L + row * G + offs_g, l_i, mask=gmask)


@triton.jit
def _retrieval_split(
    pid, split, Q, K, V, MASK, HEADS, PART_O, PART_M, PART_L, BLK_SCORE, BLK_CNT, HB,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_hbb, stride_hbh, stride_hbn,
    N, NB, R, split_size, num_splits, scale_log2, mask_min, scale, softcap,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr,
    MASK_KIND: tl.constexpr, SELECT: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr,
    DV: tl.constexpr, DV_PAD: tl.constexpr, SOFTCAP: tl.constexpr, HAS_HB: tl.constexpr,
):
    """``retrieval_split_kernel``'s work for row ``pid`` (= b * R + r) and ``split``."""
    b = pid // R  # [Note: store pointers]
    r = pid % R
    h, q, base_k, base_v, m_i, l_i, acc = _prologue(Q, HEADS, b, r, stride_qb, stride_qh, stride_qd, stride_kb, stride_kh,
                                                 stride_vb, stride_vh, G, G_PAD, D, D_PAD, DV_PAD)
    scale_log2 = tl.cast(scale_log2, tl.float32)  # Inductor passes Python floats as float64
    mask_min = tl.cast(mask_min, tl.float32)
    scale = tl.cast(scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    start = split * split_size
    end = tl.minimum(start + split_size, N)
    cnt_limit = tl.where(r == 0, NB, 0)  # the counts depend on b only: head 0 writes them
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        ok = pos < end
        valid, bias = _slot_validity(MASK, b, pos, ok, stride_mb, stride_mn, mask_min, MASK_KIND)
        hb = 0.0
        if HAS_HB:
            hb = _head_bias_tile(HB, b, h, pos, valid, stride_hbb, stride_hbh, stride_hbn, G, G_PAD)
        m_i, l_i, acc, s = _attend_tile(q, K, V, base_k, base_v, pos, valid, bias, hb, stride_kn, stride_kd,
                                        stride_vn, stride_vd, m_i, l_i, acc, scale_log2, scale, softcap, D, D_PAD,
                                        DV, DV_PAD, SOFTCAP, HAS_HB, DOT_F32)
        if SELECT:
            score = tl.where(valid, tl.sum(s, axis=0) + 0.0, float("-inf"))  # + 0.0: no -0.0
            best = tl.max(tl.reshape(score, (BLOCK_N // BS, BS)), axis=1)
            count = tl.sum(tl.reshape(valid.to(tl.int32), (BLOCK_N // BS, BS)), axis=1)
            blk = n0 // BS + tl.arange(0, BLOCK_N // BS)
            mine = blk * BS < end  # a tile may reach past this split: those blocks are another's
            tl.store(BLK_SCORE + pid * NB + blk, best, mask=mine & (blk < NB))
            tl.store(BLK_CNT + b * NB + blk, count, mask=mine & (blk < cnt_limit))
    _store_partial(PART_O, PART_M, PART_L, pid * num_splits + split, m_i, l_i, acc, G, G_PAD, DV, DV_PAD)


@triton.jit
def retrieval_split_kernel(
    Q, K, V, MASK, HEADS, PART_O, PART_M, PART_L, BLK_SCORE, BLK_CNT, HB,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_hbb, stride_hbh, stride_hbn,
    N, NB, R, split_size, num_splits, scale_log2, mask_min, scale, softcap,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr,
    MASK_KIND: tl.constexpr, SELECT: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr,
    DV: tl.constexpr, DV_PAD: tl.constexpr, SOFTCAP: tl.constexpr, HAS_HB: tl.constexpr,
):
    """Exact attention of one (b, r) over slots [split * split_size, +split_size).

    With SELECT, also the selection inputs of SPEC 1.1 from the same K tiles (no second read):
    BLK_SCORE (B, R, NB) = per cache block, the max over its valid slots of sum_g q_g . k
    (of the logits before the mask with SOFTCAP / HAS_HB: [Note: logit extensions]; -inf
    without a valid slot), and BLK_CNT (B, NB) int32 = valid slots per block. HB (B or 1, Hq,
    N): the head bias (HAS_HB).
    split_size and BLOCK_N are multiples of BS, so no block straddles two splits or tiles; a
    tile reaching past the split's end writes no block beyond it.
    """
    _retrieval_split(tl.program_id(0), tl.program_id(1), Q, K, V, MASK, HEADS, PART_O, PART_M, PART_L, BLK_SCORE,
                     BLK_CNT, HB, stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mn, stride_hbb, stride_hbh,
                     stride_hbn, N, NB, R, split_size, num_splits, scale_log2, mask_min, scale, softcap, G, G_PAD, D,
                     D_PAD, BS, MASK_KIND, SELECT, DOT_F32, BLOCK_N, DV, DV_PAD, SOFTCAP, HAS_HB)


@triton.jit
def _sparse_split(
    pid, split, Q, K, V, MASK, HEADS, SEL, PART_O, PART_M, PART_L, HB,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_sb, stride_sh,
    stride_hbb, stride_hbh, stride_hbn,
    N, R, split_size, num_splits, scale_log2, mask_min, scale, softcap,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr,
    S: tl.constexpr, MASK_KIND: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr,
    DV: tl.constexpr, DV_PAD: tl.constexpr, SOFTCAP: tl.constexpr, HAS_HB: tl.constexpr,
):
    """``sparse_split_kernel``'s work for row ``pid`` (= b * R + r) and ``split``."""
    b = pid // R  # [Note: store pointers]
    r = pid % R
    h, q, base_k, base_v, m_i, l_i, acc = _prologue(Q, HEADS, b, r, stride_qb, stride_qh, stride_qd, stride_kb, stride_kh,
                                                 stride_vb, stride_vh, G, G_PAD, D, D_PAD, DV_PAD)
    scale_log2 = tl.cast(scale_log2, tl.float32)  # Inductor passes Python floats as float64
    mask_min = tl.cast(mask_min, tl.float32)
    scale = tl.cast(scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    start = split * split_size
    end = tl.minimum(start + split_size, S * BS)
    for t0 in range(start, end, BLOCK_N):
        slot = t0 + tl.arange(0, BLOCK_N)
        in_range = slot < end
        blk = tl.load(SEL + b * stride_sb + h * stride_sh + slot // BS, mask=in_range, other=-1)
        pos = blk * BS + slot % BS
        ok = in_range & (blk >= 0) & (pos < N)
        pos = tl.where(ok, pos, 0)
        valid, bias = _slot_validity(MASK, b, pos, ok, stride_mb, stride_mn, mask_min, MASK_KIND)
        hb = 0.0
        if HAS_HB:
            hb = _head_bias_tile(HB, b, h, pos, valid, stride_hbb, stride_hbh, stride_hbn, G, G_PAD)
        m_i, l_i, acc, s = _attend_tile(q, K, V, base_k, base_v, pos, valid, bias, hb, stride_kn, stride_kd,
                                        stride_vn, stride_vd, m_i, l_i, acc, scale_log2, scale, softcap, D, D_PAD,
                                        DV, DV_PAD, SOFTCAP, HAS_HB, DOT_F32)
    _store_partial(PART_O, PART_M, PART_L, pid * num_splits + split, m_i, l_i, acc, G, G_PAD, DV, DV_PAD)


@triton.jit
def sparse_split_kernel(
    Q, K, V, MASK, HEADS, SEL, PART_O, PART_M, PART_L, HB,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_sb, stride_sh,
    stride_hbb, stride_hbh, stride_hbn,
    N, R, split_size, num_splits, scale_log2, mask_min, scale, softcap,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr,
    S: tl.constexpr, MASK_KIND: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr,
    DV: tl.constexpr, DV_PAD: tl.constexpr, SOFTCAP: tl.constexpr, HAS_HB: tl.constexpr,
):
    """Attention of one (b, r) over selection slots [split * split_size, +split_size) of the
    S * BS slots its selected blocks hold, read straight from the cache (no gathered copy).

    Slot t of the selection is cache slot SEL[b, h, t // BS] * BS + t % BS; -1 blocks, slots
    past N and invalid slots are skipped."""
    _sparse_split(tl.program_id(0), tl.program_id(1), Q, K, V, MASK, HEADS, SEL, PART_O, PART_M, PART_L, HB,
                  stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mn, stride_sb, stride_sh,
                  stride_hbb, stride_hbh, stride_hbn, N, R, split_size, num_splits, scale_log2, mask_min, scale,
                  softcap, G, G_PAD, D, D_PAD, BS, S, MASK_KIND, DOT_F32, BLOCK_N, DV, DV_PAD, SOFTCAP, HAS_HB)


@triton.jit
def hybrid_split_kernel(
    Q, K, V, MASK, HEADS_R, HEADS_S, SEL, PART_O_R, PART_M_R, PART_L_R, PART_O_S, PART_M_S, PART_L_S,
    BLK_SCORE, BLK_CNT, HB,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_sb, stride_sh,
    stride_hbb, stride_hbh, stride_hbn,
    N, NB, R_R, R_S, progs_r, split_r, splits_r, split_s, splits_s, scale_log2, mask_min, scale, softcap,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr,
    S: tl.constexpr, MASK_KIND: tl.constexpr, SELECT: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_N_S: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_HB: tl.constexpr,
):
    """A layer's retrieval and sparse heads in one launch ([Note: pooled layers]). Programs
    [0, progs_r = B * R_R * splits_r) do ``retrieval_split_kernel``'s work (row p // splits_r,
    split p % splits_r; partials *_R, selection inputs), the others ``sparse_split_kernel``'s
    over SEL, the selection the layer was given (partials *_S)."""
    p = tl.program_id(0)
    if p < progs_r:
        _retrieval_split(p // splits_r, p % splits_r, Q, K, V, MASK, HEADS_R, PART_O_R, PART_M_R, PART_L_R, BLK_SCORE,
                         BLK_CNT, HB, stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                         stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mn, stride_hbb, stride_hbh,
                         stride_hbn, N, NB, R_R, split_r, splits_r, scale_log2, mask_min, scale, softcap, G, G_PAD, D,
                         D_PAD, BS, MASK_KIND, SELECT, DOT_F32, BLOCK_N, DV, DV_PAD, SOFTCAP, HAS_HB)
    else:
        q = p - progs_r
        _sparse_split(q // splits_s, q % splits_s, Q, K, V, MASK, HEADS_S, SEL, PART_O_S, PART_M_S, PART_L_S, HB,
                      stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                      stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mn, stride_sb, stride_sh,
                      stride_hbb, stride_hbh, stride_hbn, N, R_S, split_s, splits_s, scale_log2, mask_min, scale,
                      softcap, G, G_PAD, D, D_PAD, BS, S, MASK_KIND, DOT_F32, BLOCK_N_S, DV, DV_PAD, SOFTCAP, HAS_HB)


@triton.jit
def merge_splits(PART_O, PART_M, PART_L, OUT, pid, out_row, d0, num_splits,
                 G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr, D_SLICE: tl.constexpr, SPLIT_CHUNK: tl.constexpr):
    """LSE-merge the splits of row ``pid`` (= b * R + r), head-dim slice [d0, d0 + D_SLICE),
    into OUT rows [out_row * G, +G) of a contiguous (B, rows * G, 1, D) output (``out_row`` =
    ``pid`` for an op's own output; a pooled layer's rows sit elsewhere); a row that saw no
    valid slot gets zeros. Each step loads SPLIT_CHUNK splits of all G heads at once,
    (SPLIT_CHUNK, G_P2, D_SLICE): a handful of independent loads rather than a chain of
    dependent ones. [Note: merge slices] one program per (row, slice): a row's merge is
    spread over D / D_SLICE programs, so one retrieval head with many splits does not
    leave its whole merge to a single SM."""
    offs_s = tl.arange(0, SPLIT_CHUNK)[:, None]  # (SC, 1)
    offs_g = tl.arange(0, G_P2)[None, :]  # (1, G)
    offs_d = d0 + tl.arange(0, D_SLICE)[None, None, :]  # (1, 1, DS)
    m = tl.full([G_P2], float("-inf"), tl.float32)
    l = tl.zeros([G_P2], tl.float32)
    acc = tl.zeros([G_P2, D_SLICE], tl.float32)
    for s0 in range(0, num_splits, SPLIT_CHUNK):
        ok = (s0 + offs_s < num_splits) & (offs_g < G)  # (SC, G)
        row = (pid * num_splits + s0 + offs_s) * G + offs_g  # (SC, G)
        ms = tl.load(PART_M + row, mask=ok, other=float("-inf"))
        ls = tl.load(PART_L + row, mask=ok, other=0.0)
        os = tl.load(PART_O + row[:, :, None] * D + offs_d, mask=ok[:, :, None] & (offs_d < D), other=0.0)
        m_new = tl.maximum(m, tl.max(ms, axis=0))  # (G,)
        m_safe = _safe(m_new)
        w = tl.exp2(ms - m_safe[None, :])  # (SC, G)
        a = tl.exp2(m - m_safe)
        l = l * a + tl.sum(ls * w, axis=0)
        acc = acc * a[:, None] + tl.sum(os * w[:, :, None], axis=0)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    og = tl.arange(0, G_P2)[:, None]
    od = d0 + tl.arange(0, D_SLICE)[None, :]
    tl.store(OUT + (out_row * G + og) * D + od, out.to(OUT.dtype.element_ty), mask=(og < G) & (od < D))


@triton.jit
def merge_kernel(PART_O, PART_M, PART_L, OUT, num_splits,
                 G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr, D_SLICE: tl.constexpr, SPLIT_CHUNK: tl.constexpr):
    """Program (b * R + r, slice): the merge alone (sparse heads)."""
    pid = tl.program_id(0)
    merge_splits(PART_O, PART_M, PART_L, OUT, pid, pid, tl.program_id(1) * D_SLICE, num_splits, G, G_P2, D, D_SLICE,
                 SPLIT_CHUNK)
