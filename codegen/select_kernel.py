"""Block selection of SPEC 1.1 in one Triton program per (batch, retrieval head) row, fused with
the LSE merge of that head's attention splits.

Notation as in ``attention_kernels``; per row the inputs are NB block scores (the max over
each block's valid slots of sum_g q_g . k, -inf without one) and the per-block valid-slot
counts, both written by ``retrieval_split_kernel`` from the K tiles it already read.

Algorithm (no sort, no torch.topk over positions):

1. forced blocks: from the running count of valid slots, a block holding one of the first
   ``sink`` or last ``recent`` valid slots; candidates: other blocks with a valid slot;
2. K = S - (forced count) picks among candidates: if there are at most K, all of them; else
   the K-th largest score is found by a 32-step binary search over order-preserving integer
   keys of the float scores (a radix select: each step counts keys >= a threshold);
3. one last pass takes forced blocks, candidates above the threshold, and as many of those
   equal to it as are still needed in ascending block id (ties to the lower id), writing each
   taken id at its prefix-count position: the row comes out ascending; the rest is -1.

Each pass walks the row in CHUNK-wide tiles, so any NB works; NB <= CHUNK (e.g. 2048 blocks of
64 at 128K) is one tile per pass.

[Note: keys] For float bits u (as unsigned), key = u | 2^31 when the sign is clear and
2^32 - 1 - u when set: keys are monotone in the float value, so comparing keys compares
scores. Scores get + 0.0 first, so -0.0 and +0.0 share a key.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lychee_fx.codegen.attention_kernels import merge_splits


@triton.jit
def _keys(score):
    bits = score.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(bits < 0, (~bits) & 0xFFFFFFFF, bits + 0x80000000)


@triton.jit
def _chunk(BLK_SCORE, BLK_CNT, pid, b, c0, NB, running, total, sink, recent, CHUNK: tl.constexpr):
    """Blocks [c0, c0 + CHUNK) of a row: ids, forced and candidate flags, keys, and the chunk's
    valid-slot count (to advance ``running``, the valid slots before c0)."""
    offs = c0 + tl.arange(0, CHUNK)
    inb = offs < NB
    cnt = tl.load(BLK_CNT + b * NB + offs, mask=inb, other=0)
    score = tl.load(BLK_SCORE + pid * NB + offs, mask=inb, other=float("-inf"))
    before = running + tl.cumsum(cnt, axis=0) - cnt  # valid slots before each block
    has = cnt > 0
    forced = has & ((before < sink) | (before + cnt > total - recent))
    cand = has & (forced == 0)
    return offs, forced, cand, _keys(score), tl.sum(cnt, axis=0)


@triton.jit
def retrieval_reduce_kernel(
    PART_O, PART_M, PART_L, OUT, BLK_SCORE, BLK_CNT, HEADS, SEL_OUT,
    num_splits, R, HKV, NB, sink, recent,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    S: tl.constexpr, S_PAD: tl.constexpr, SELECT: tl.constexpr, CHUNK: tl.constexpr,
):
    """Program (b * R + r): merge the head's splits into OUT; with SELECT, write its selection
    row SEL_OUT[b, HEADS[r], :] (ascending block ids, -1 padded)."""
    pid = tl.program_id(0)
    merge_splits(PART_O, PART_M, PART_L, OUT, pid, num_splits, G, G_PAD, D, D_PAD)
    if SELECT:
        b = pid // R
        h = tl.load(HEADS + (pid % R))
        zero = tl.full([], 0, tl.int64)
        total = zero
        for c0 in range(0, NB, CHUNK):
            offs = c0 + tl.arange(0, CHUNK)
            total += tl.sum(tl.load(BLK_CNT + b * NB + offs, mask=offs < NB, other=0).to(tl.int64), axis=0)
        n_forced = zero
        n_cand = zero
        running = zero
        for c0 in range(0, NB, CHUNK):
            offs, forced, cand, key, c = _chunk(BLK_SCORE, BLK_CNT, pid, b, c0, NB, running, total, sink, recent, CHUNK)
            n_forced += tl.sum(forced.to(tl.int64), axis=0)
            n_cand += tl.sum(cand.to(tl.int64), axis=0)
            running += c
        k = S - n_forced  # picks among candidates
        thr = zero  # with at most k candidates: all of them (every finite score's key is > 0)
        if n_cand > k:
            for bit in tl.static_range(31, -1, -1):
                trial = thr | (1 << bit)
                above = zero
                running = zero
                for c0 in range(0, NB, CHUNK):
                    offs, forced, cand, key, c = _chunk(BLK_SCORE, BLK_CNT, pid, b, c0, NB, running, total, sink, recent, CHUNK)
                    above += tl.sum((cand & (key >= trial)).to(tl.int64), axis=0)
                    running += c
                thr = tl.where(above >= k, trial, thr)
        n_gt = zero
        running = zero
        for c0 in range(0, NB, CHUNK):
            offs, forced, cand, key, c = _chunk(BLK_SCORE, BLK_CNT, pid, b, c0, NB, running, total, sink, recent, CHUNK)
            n_gt += tl.sum((cand & (key > thr)).to(tl.int64), axis=0)
            running += c
        out_row = SEL_OUT + (b * HKV + h) * S
        written = zero
        eq_seen = zero
        running = zero
        for c0 in range(0, NB, CHUNK):
            offs, forced, cand, key, c = _chunk(BLK_SCORE, BLK_CNT, pid, b, c0, NB, running, total, sink, recent, CHUNK)
            running += c
            take = forced | (cand & (key > thr))
            eq = cand & (key == thr)
            eq_rank = eq_seen + tl.cumsum(eq.to(tl.int64), axis=0)
            take = take | (eq & (eq_rank <= k - n_gt))
            slot = written + tl.cumsum(take.to(tl.int64), axis=0) - 1
            tl.store(out_row + slot, offs.to(tl.int32), mask=take)
            written += tl.sum(take.to(tl.int64), axis=0)
            eq_seen += tl.sum(eq.to(tl.int64), axis=0)
        rest = tl.arange(0, S_PAD)
        tl.store(out_row + rest, tl.full([S_PAD], -1, tl.int32), mask=(rest >= written) & (rest < S))
