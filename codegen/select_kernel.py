"""Block selection of SPEC 1.1 in one Triton program per (batch, retrieval head) row, launched
together with the LSE merge of that head's attention splits (other programs of the grid).

Notation as in ``attention_kernels``; per row the inputs are NB block scores (the max over
each block's valid slots of sum_g q_g . k, -inf without one) and the per-block valid-slot
counts, both written by ``retrieval_split_kernel`` from the K tiles it already read.

Algorithm (no sort, no torch.topk over positions):

1. forced blocks: from the running count of valid slots, a block holding one of the first
   ``sink`` or last ``recent`` valid slots; candidates: other blocks with a valid slot;
2. K = S - (forced count) picks among candidates: if there are at most K, all of them; else
   the K-th largest score (with the early exit, a threshold exactly K candidates reach) is
   found by a radix select over order-preserving integer keys of the float scores (32
   significant bits in int64 or uint32), DIGIT_BITS bits per step from the top: each of up to
   32 / DIGIT_BITS steps counts, in one reduction, the candidates at or above the
   2^DIGIT_BITS thresholds that the next digit can give, and keeps the largest with at
   least K ([Note: digits]);
3. one last pass takes forced blocks, candidates above the threshold, and as many of those
   equal to it as are still needed in ascending block id (ties to the lower id), writing each
   taken id at its prefix-count position: the row comes out ascending; the rest is -1.

A row of NB <= CHUNK blocks (4096: 256K slots at block 64) is loaded once and every pass
runs on registers; longer rows walk the row in CHUNK-wide tiles in every pass (token-level
selection over long contexts: correct, and as slow as SPEC 3 says such selection is).

[Note: alone and end to end] The launcher's default is uint32 keys with 2-bit digits, one
CHUNK-wide tile, early exit ([Note: early exit]). On 2026-11-30 (H200, Triton 3.6) the
Llama-3-8B decode graph at 128K (dynamic shapes: 2049 blocks per row, a 4096-block tile) spent
156 us per call in this kernel with an older default (int64 keys, 4-bit digits), 37% of the
GPU's time per step; timed alone on the same 2049-block rows (examples/bench_select.py
--context 131098 --merge) that variant took 96 us per one-row launch and uint32 2-bit 20 us
(int64 2-bit 28, uint32 4-bit 87). In the same graph uint32 2-bit then took 43 us per call (39
at batch 4): twice its time alone. examples/bench_split.py reproduces that: replayed alone the
reduce launch took 19.7 us, but right after the split kernel (as the graph runs them) 42 us.
With the early exit it took 14.3 us alone and 14.7 right after the split (the op, split plus
reduce: 64.9 -> 37.6 us at batch 1, 104.6 -> 80.5 at batch 4). The likely cause, not verified:
the unrolled 16-step search is long straight-line code that the split kernel evicts from the
instruction caches, where the early exit's loop is short. In the decode graph (2026-11-30d,
Llama-3-8B at 128K, batch 4) the early exit took 14.8 us per call against 42.6 for the full
search in the same device call: a step 0.77 ms shorter. ptxas (examples/kernel_resources.py;
Triton 3.9, sm_90) reports no spills for uint32 2-bit, 56 bytes with the early exit. An earlier
note held the int64 4-bit kernel at 22 us per layer in the graph (2026-11-29); that does not
reproduce. Time a new default after the split kernel (bench_split's op), not only alone.

[Note: digits] A step is a (CHUNK, 2^DIGIT_BITS) comparison summed over the row: with 4 bits,
8 dependent cross-warp reductions instead of the 32 of a bit-at-a-time search (DIGIT_BITS=1).
Dependent reductions, not bytes (16 KB per row), bound a row of 2048 blocks; the launcher
passes DIGIT_BITS (``launch.SelectConfig``; [Note: alone and end to end] says how its default
was chosen).

[Note: early exit] (``EARLY_EXIT``) After a step, thr is the k-th largest key with its low bits
cleared. When exactly k candidates are at or above it (the picked digit's count is k), the
taken set is fixed: later digits cannot change it, and step 3 takes exactly those k (every one
above thr, and every one equal to it, as their count is k minus those above). Untied scores
separate once the search is past their shared sign and exponent bits, so the loop usually
stops well before 32 / DIGIT_BITS steps; ties at the k-th score run every step.

[Note: selection precision] (bfloat16 / float16 decoding on the H200 decoded differently from
an eager SPEC 1.1 oracle far beyond rounding, float32 did not.) The scores are not where it
came from. The split kernel's position scores are the group's sum of q . k taken from the
tl.dot accumulator: products of bfloat16 or float16 values are exact in float32 and the sum
of the G * D products is float32, so a score is within gamma(G * D) * sum |q_gd k_d|
(u = 2^-23 per addition) of its float64 value, and the block max and the integer keys below
are exact; a selection therefore equals the float64 selection of the same q and k except at
blocks that tie within that bound (tests: test_kernels' interpreter runs, whose float32 dots
of exact products are this arithmetic, and test_gpu on tensor cores at head dims 64/128/256,
group sizes 1-12). The inputs are: a compiled graph's q and k are rounded to bfloat16 at other
points than the eager model's (fusion), about one bfloat16 ulp apart, and a top-k is
discontinuous in them, so an oracle fed the eager model's q and k picks other blocks at
near-ties that bfloat16's 2^-8 moves across, and the decode diverges from there (q/k norms
give every score one size, so near-ties are common; a group mean of 7 heads narrows the gaps).
float32's 2^-24 rarely moves a tie. So low-precision decoding is checked launch by launch
against the oracle fed each launch's own inputs (tests/kernel_checks.py).

[Note: keys] For float bits u (as unsigned 32 bits), key = u | 2^31 when the sign is clear
and ~u = 2^32 - 1 - u when set (the same value in int64 or uint32): keys are monotone in the
float value, so comparing keys compares scores. Scores get + 0.0 first, so -0.0 and +0.0 share a key.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lychee_fx.codegen.attention_kernels import merge_splits


@triton.jit
def _keys(score, WIDE: tl.constexpr):
    """Order-preserving integer keys of float32 scores ([Note: keys]), uint32 or (WIDE) int64."""
    if WIDE:
        bits = score.to(tl.int32, bitcast=True).to(tl.int64)
        key = tl.where(bits < 0, (~bits) & 0xFFFFFFFF, bits + 0x80000000)
    else:
        bits = score.to(tl.uint32, bitcast=True)
        top = tl.full([], 1, tl.uint32) << 31
        key = tl.where((bits & top) != 0, ~bits, bits | top)
    return key


@triton.jit
def _no_key(WIDE: tl.constexpr):
    """The smallest key (0) in the key type: the threshold a radix select starts from."""
    if WIDE:
        z = tl.full([], 0, tl.int64)
    else:
        z = tl.full([], 0, tl.uint32)
    return z


@triton.jit
def _flags(cnt, before, total, sink, recent):
    """Forced and candidate blocks from per-block valid counts and the valid slots before each."""
    has = cnt > 0
    forced = has & ((before < sink) | (before + cnt > total - recent))
    return forced, has & (forced == 0)


@triton.jit
def _chunk(BLK_SCORE, BLK_CNT, pid, b, c0, NB, running, total, sink, recent, CHUNK: tl.constexpr, WIDE: tl.constexpr):
    """Blocks [c0, c0 + CHUNK) of a row: ids, forced and candidate flags, keys, and the chunk's
    valid-slot count (to advance ``running``, the valid slots before c0)."""
    offs = c0 + tl.arange(0, CHUNK)
    inb = offs < NB
    cnt = tl.load(BLK_CNT + b * NB + offs, mask=inb, other=0)
    score = tl.load(BLK_SCORE + pid * NB + offs, mask=inb, other=float("-inf"))
    forced, cand = _flags(cnt, running + tl.cumsum(cnt, axis=0) - cnt, total, sink, recent)
    return offs, forced, cand, _keys(score, WIDE), tl.sum(cnt, axis=0)


@triton.jit
def _count(flags, WIDE: tl.constexpr):
    """Flags as counts: int64 beside int64 keys, int32 beside uint32 keys."""
    if WIDE:
        c = flags.to(tl.int64)
    else:
        c = flags.to(tl.int32)
    return c


@triton.jit
def _digit_counts(key, cand, thr, shift, DIGIT_BITS: tl.constexpr, WIDE: tl.constexpr):
    """(2^DIGIT_BITS,): for each digit j, how many candidates have key >= thr | (j << shift)."""
    trial = thr | (tl.arange(0, 1 << DIGIT_BITS).to(thr.dtype) << shift)  # (2^DIGIT_BITS,)
    return tl.sum(_count(cand[:, None] & (key[:, None] >= trial[None, :]), WIDE), axis=0)


@triton.jit
def _next_digit(thr, counts, k, shift, WIDE: tl.constexpr):
    """Extend ``thr`` by the largest digit whose count is still >= k (counts[0] >= k holds:
    it counts the keys >= thr, and thr never passes the k-th largest key)."""
    if WIDE:
        nxt = thr | ((tl.sum((counts >= k).to(tl.int64), axis=0) - 1) << shift)
    else:
        nxt = thr | ((tl.sum((counts >= k).to(tl.int32), axis=0) - 1).to(thr.dtype) << shift)
    return nxt


@triton.jit
def _settled(counts, k):
    """True when the digit ``_next_digit`` picks from ``counts`` leaves exactly k candidates at or
    above the threshold ([Note: early exit]): the smallest count that is still >= k equals k."""
    return tl.min(tl.where(counts >= k, counts, k + 1), axis=0) == k


@triton.jit
def _step_counts(key, cand, thr, shift, BLK_SCORE, BLK_CNT, pid, b, NB, total, sink, recent, CHUNK: tl.constexpr,
                 DIGIT_BITS: tl.constexpr, WIDE: tl.constexpr, IN_REGISTERS: tl.constexpr):
    """One radix step's ``_digit_counts``: over the row held in registers (``key``, ``cand``),
    or over the row in memory, walked in CHUNK-wide tiles (``key`` and ``cand`` unused)."""
    if IN_REGISTERS:
        counts = _digit_counts(key, cand, thr, shift, DIGIT_BITS, WIDE)
    else:
        counts = _count(tl.zeros([1 << DIGIT_BITS], tl.int1), WIDE)
        running = tl.full([], 0, tl.int64)
        for c0 in range(0, NB, CHUNK):
            offs, forced, c_cand, c_key, c = _chunk(BLK_SCORE, BLK_CNT, pid, b, c0, NB, running, total, sink, recent,
                                                    CHUNK, WIDE)
            counts += _digit_counts(c_key, c_cand, thr, shift, DIGIT_BITS, WIDE)
            running += c
    return counts


@triton.jit
def _threshold(key, cand, k, BLK_SCORE, BLK_CNT, pid, b, NB, total, sink, recent, CHUNK: tl.constexpr,
               DIGIT_BITS: tl.constexpr, WIDE: tl.constexpr, EARLY_EXIT: tl.constexpr, IN_REGISTERS: tl.constexpr):
    """The key step 3 selects with (k >= 1, more than k candidates): the k-th largest candidate
    key, or with EARLY_EXIT possibly a smaller key that exactly k candidates reach ([Note:
    early exit]). A radix select, one digit per step from the top ([Note: digits]); each step
    counts as ``_step_counts`` says."""
    thr = _no_key(WIDE)
    if EARLY_EXIT:
        step = tl.full([], 0, tl.int32)
        done = tl.full([], 0, tl.int1)
        while (step < 32 // DIGIT_BITS) & (done == 0):
            shift = (32 - DIGIT_BITS * (step + 1)).to(thr.dtype)
            counts = _step_counts(key, cand, thr, shift, BLK_SCORE, BLK_CNT, pid, b, NB, total, sink, recent, CHUNK,
                                  DIGIT_BITS, WIDE, IN_REGISTERS)
            thr = _next_digit(thr, counts, k, shift, WIDE)
            done = _settled(counts, k)
            step += 1
    else:
        for step in tl.static_range(32 // DIGIT_BITS):
            shift = 32 - DIGIT_BITS * (step + 1)
            counts = _step_counts(key, cand, thr, shift, BLK_SCORE, BLK_CNT, pid, b, NB, total, sink, recent, CHUNK,
                                  DIGIT_BITS, WIDE, IN_REGISTERS)
            thr = _next_digit(thr, counts, k, shift, WIDE)
    return thr


@triton.jit
def _select_in_registers(BLK_SCORE, BLK_CNT, out_row, pid, b, NB, sink, recent, S: tl.constexpr, CHUNK: tl.constexpr,
                         DIGIT_BITS: tl.constexpr, WIDE: tl.constexpr, EARLY_EXIT: tl.constexpr):
    """The whole row (NB <= CHUNK) loaded once; returns how many ids were written."""
    offs = tl.arange(0, CHUNK)
    inb = offs < NB
    cnt = tl.load(BLK_CNT + b * NB + offs, mask=inb, other=0)
    key = _keys(tl.load(BLK_SCORE + pid * NB + offs, mask=inb, other=float("-inf")), WIDE)
    total = tl.sum(cnt, axis=0)
    forced, cand = _flags(cnt, tl.cumsum(cnt, axis=0) - cnt, total, sink, recent)
    k = S - tl.sum(forced.to(tl.int32), axis=0)
    thr = _no_key(WIDE)  # with at most k candidates: all of them (keys are >= 0)
    if tl.sum(cand.to(tl.int32), axis=0) > k:
        thr = _threshold(key, cand, k, BLK_SCORE, BLK_CNT, pid, b, NB, total, sink, recent, CHUNK, DIGIT_BITS, WIDE,
                         EARLY_EXIT, True)
    n_gt = tl.sum((cand & (key > thr)).to(tl.int32), axis=0)
    eq = cand & (key == thr)
    take = forced | (cand & (key > thr)) | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= k - n_gt))
    slot = tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(out_row + slot, offs.to(tl.int32), mask=take)
    return tl.sum(take.to(tl.int64), axis=0)


@triton.jit
def _select_in_chunks(BLK_SCORE, BLK_CNT, out_row, pid, b, NB, sink, recent, S: tl.constexpr, CHUNK: tl.constexpr,
                      DIGIT_BITS: tl.constexpr, WIDE: tl.constexpr, EARLY_EXIT: tl.constexpr):
    """Any NB: every pass walks the row in CHUNK-wide tiles (rows of token-level or very long
    selections). Same result as ``_select_in_registers``."""
    zero = tl.full([], 0, tl.int64)
    total = zero
    for c0 in range(0, NB, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        total += tl.sum(tl.load(BLK_CNT + b * NB + offs, mask=offs < NB, other=0).to(tl.int64), axis=0)
    n_forced = zero
    n_cand = zero
    running = zero
    for c0 in range(0, NB, CHUNK):
        offs, forced, cand, key, c = _chunk(BLK_SCORE, BLK_CNT, pid, b, c0, NB, running, total, sink, recent, CHUNK, WIDE)
        n_forced += tl.sum(forced.to(tl.int64), axis=0)
        n_cand += tl.sum(cand.to(tl.int64), axis=0)
        running += c
    k = S - n_forced
    thr = _no_key(WIDE)
    if n_cand > k:
        thr = _threshold(zero, zero, k, BLK_SCORE, BLK_CNT, pid, b, NB, total, sink, recent, CHUNK, DIGIT_BITS, WIDE,
                         EARLY_EXIT, False)
    n_gt = zero
    running = zero
    for c0 in range(0, NB, CHUNK):
        offs, forced, cand, key, c = _chunk(BLK_SCORE, BLK_CNT, pid, b, c0, NB, running, total, sink, recent, CHUNK, WIDE)
        n_gt += tl.sum((cand & (key > thr)).to(tl.int64), axis=0)
        running += c
    written = zero
    eq_seen = zero
    running = zero
    for c0 in range(0, NB, CHUNK):
        offs, forced, cand, key, c = _chunk(BLK_SCORE, BLK_CNT, pid, b, c0, NB, running, total, sink, recent, CHUNK, WIDE)
        running += c
        eq = cand & (key == thr)
        eq_rank = eq_seen + tl.cumsum(eq.to(tl.int64), axis=0)
        take = forced | (cand & (key > thr)) | (eq & (eq_rank <= k - n_gt))
        slot = written + tl.cumsum(take.to(tl.int64), axis=0) - 1
        tl.store(out_row + slot, offs.to(tl.int32), mask=take)
        written += tl.sum(take.to(tl.int64), axis=0)
        eq_seen += tl.sum(eq.to(tl.int64), axis=0)
    return written


@triton.jit
def _select_row(BLK_SCORE, BLK_CNT, HEADS, SEL_OUT, pid, R, HKV, NB, sink, recent, S: tl.constexpr,
                S_PAD: tl.constexpr, CHUNK: tl.constexpr, DIGIT_BITS: tl.constexpr, WIDE_KEYS: tl.constexpr,
                EARLY_EXIT: tl.constexpr):
    """The selection row SEL_OUT[b, HEADS[r], :] of row ``pid`` = b * R + r (ascending block
    ids, -1 padded)."""
    b = pid // R
    h = tl.load(HEADS + (pid % R))
    out_row = SEL_OUT + (b * HKV + h) * S
    if NB <= CHUNK:
        written = _select_in_registers(BLK_SCORE, BLK_CNT, out_row, pid, b, NB, sink, recent, S, CHUNK, DIGIT_BITS,
                                       WIDE_KEYS, EARLY_EXIT)
    else:
        written = _select_in_chunks(BLK_SCORE, BLK_CNT, out_row, pid, b, NB, sink, recent, S, CHUNK, DIGIT_BITS,
                                    WIDE_KEYS, EARLY_EXIT)
    rest = tl.arange(0, S_PAD)
    tl.store(out_row + rest, tl.full([S_PAD], -1, tl.int32), mask=(rest >= written) & (rest < S))


@triton.jit
def retrieval_reduce_kernel(
    PART_O, PART_M, PART_L, OUT, BLK_SCORE, BLK_CNT, HEADS, SEL_OUT,
    num_splits, R, HKV, NB, sink, recent,
    G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr, D_SLICE: tl.constexpr, N_SLICES: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr, SELECT: tl.constexpr, CHUNK: tl.constexpr,
    DIGIT_BITS: tl.constexpr, WIDE_KEYS: tl.constexpr, EARLY_EXIT: tl.constexpr,
):
    """Program (b * R + r, j): for j < N_SLICES merge head-dim slice j of the head's splits
    into OUT ([Note: merge slices]); program j == N_SLICES (launched with SELECT only)
    writes the selection row SEL_OUT[b, HEADS[r], :] (ascending block ids, -1 padded), in
    parallel with the merge."""
    pid = tl.program_id(0)
    j = tl.program_id(1)
    if j < N_SLICES:
        merge_splits(PART_O, PART_M, PART_L, OUT, pid, pid, j * D_SLICE, num_splits, G, G_P2, D, D_SLICE, SPLIT_CHUNK)
    elif SELECT:
        _select_row(BLK_SCORE, BLK_CNT, HEADS, SEL_OUT, pid, R, HKV, NB, sink, recent, S, S_PAD, CHUNK, DIGIT_BITS,
                    WIDE_KEYS, EARLY_EXIT)


@triton.jit
def hybrid_reduce_kernel(
    PART_O_R, PART_M_R, PART_L_R, PART_O_S, PART_M_S, PART_L_S, OUT, BLK_SCORE, BLK_CNT, HEADS_R, SEL_OUT,
    splits_r, splits_s, rows_r, R_R, R_S, HKV, NB, sink, recent,
    G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr, D_SLICE: tl.constexpr, N_SLICES: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr, SELECT: tl.constexpr, CHUNK: tl.constexpr,
    DIGIT_BITS: tl.constexpr, WIDE_KEYS: tl.constexpr, EARLY_EXIT: tl.constexpr,
):
    """The reduce of a pooled layer ([Note: pooled layers]), program (p, j): rows p < rows_r
    (= B * R_R) are retrieval rows, merged into OUT rows b * (R_R + R_S) + r, with the
    selection program j == N_SLICES (SELECT); the others sparse rows, merged into OUT rows
    b * (R_R + R_S) + R_R + r (their j == N_SLICES program does nothing). OUT (B, (R_R + R_S)
    * G, 1, D): the retrieval heads' groups, then the sparse heads'."""
    p = tl.program_id(0)
    j = tl.program_id(1)
    if p < rows_r:
        if j < N_SLICES:
            out_row = (p // R_R) * (R_R + R_S) + p % R_R
            merge_splits(PART_O_R, PART_M_R, PART_L_R, OUT, p, out_row, j * D_SLICE, splits_r, G, G_P2, D, D_SLICE,
                         SPLIT_CHUNK)
        elif SELECT:
            _select_row(BLK_SCORE, BLK_CNT, HEADS_R, SEL_OUT, p, R_R, HKV, NB, sink, recent, S, S_PAD, CHUNK,
                        DIGIT_BITS, WIDE_KEYS, EARLY_EXIT)
    elif j < N_SLICES:
        q = p - rows_r
        out_row = (q // R_S) * (R_R + R_S) + R_R + q % R_S
        merge_splits(PART_O_S, PART_M_S, PART_L_S, OUT, q, out_row, j * D_SLICE, splits_s, G, G_P2, D, D_SLICE,
                     SPLIT_CHUNK)
