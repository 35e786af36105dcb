"""Launchers: allocate outputs, pick splits and configs, launch the Triton kernels.

Each launcher implements one op contract of ``lychee_fx.ops`` on CUDA (or on the CPU under
``TRITON_INTERPRET=1``, which is how CI runs them). With ``traced=True`` the kernels are
launched through ``torch.library.wrap_triton`` so that Inductor puts their source in the
generated code; otherwise they launch directly.

Configs: ``BLOCK_N`` x warps x stages, pruned by the named rule ``_fits`` (a tile must hold
whole selection blocks, and K + V stages must fit in shared memory). Each split kernel
launches with its ``DEFAULT_SPLIT_CONFIG`` ([Note: split defaults]); where that does not fit
(large head dims) it is autotuned, once per (head dim, group, block size, mask kind) in eager
launches and once per kernel inside a compiled graph, at the graph's first run.
``SPLIT_CONFIG`` pins other configs. Splits are not tuned: ``split_plan`` sizes them so that
(B * R) x splits programs cover the GPU about twice.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton

from lychee_fx.codegen.attention_kernels import (
    LOG2E,
    MASK_ADDITIVE,
    MASK_BOOL,
    MASK_NONE,
    hybrid_split_kernel,
    merge_kernel,
    retrieval_split_kernel,
    sparse_split_kernel,
)
from lychee_fx.codegen.select_kernel import hybrid_reduce_kernel, retrieval_reduce_kernel

__all__ = ["supports", "retrieval_attention", "sparse_attention", "hybrid_attention", "retrieval_plan", "sparse_plan",
           "hybrid_plan", "hybrid_config", "pooled_config", "split_plan", "Plan",
           "SelectConfig", "SELECT_CONFIG", "SplitConfig", "SplitConfigs", "SPLIT_CONFIG", "DEFAULT_SPLIT_CONFIG",
           "split_configs", "reduce_constants"]

SPLIT_ALIGN = 128  # the largest BLOCK_N: every split boundary is a tile and block boundary
# [Note: retrieval split size] The fewest slots a retrieval split takes. 1024 until 2026-12-01 left
# one-head batch-1 layers with few programs: at 32K, 33 splits of 1024 slots took 33.6 us for the
# split and 39.6 for the op (floor 3.9); 129 splits of 256, 10.0 and 21.5 (the reduce then merges
# more splits: 11.2 against 5.9 us). At 128K split_plan's own target (about 2 programs per SM)
# gives 257 splits of 512: op 43.8 us against 49.0 (H200, bench_split --masks bool). Batch 4 and
# 8-head layers ask for longer splits themselves and are unchanged.
RETRIEVAL_LEAST = 256
SELECT_CHUNK = 4096  # blocks per selection tile (one tile up to 256K slots at block 64)
SPLIT_CHUNK = 32  # splits a merge program loads at once (x G x D_SLICE floats)
D_SLICE = 32  # head-dim columns one merge program owns (attention_kernels [Note: merge slices])


class SelectConfig(NamedTuple):
    """How the retrieval reduce launch selects (select_kernel [Note: digits], [Note: alone and end to end]):
    radix digit width, warps per program (the merge programs of the same launch use them
    too), int64 (``wide_keys``) or uint32 keys, the selection tile in blocks (None: the
    row's length rounded up to a power of 2 when it is a known int, else 4096), and whether the
    radix select stops once the selected set is fixed (select_kernel [Note: early exit])."""

    digit_bits: int = 2
    num_warps: int = 8
    wide_keys: bool = False
    chunk: int | None = None
    early_exit: bool = True


# How the default was chosen: select_kernel [Note: alone and end to end].
SELECT_CONFIG = SelectConfig()
_SMEM_BYTES = 160 * 1024
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The kernels' extension paths ([Note: logit extensions]: a soft-cap, a per-query-head bias, a
# value head dim of its own) pass their tests under the Triton interpreter and, on the H200
# (2026-12-01), `test_kernels_with_extensions_equal_reference` against the float64 oracle and
# `test_extension_forms_through_inductor` (gemma2, mpt, bloom, falcon, doge, MLA and neo forms
# through Inductor, float32 and bfloat16, 28 cases, with this switch on and off). False makes
# CUDA inputs with an extension run the ops' torch implementation (exact, slower): the switch
# those tests flip to compare both.
GPU_EXTENSIONS = True


def supports(q: torch.Tensor, k: torch.Tensor, block_size: int, v: torch.Tensor | None = None,
             softcap: float = 0.0, head_bias: torch.Tensor | None = None) -> str | None:
    """None when the kernels handle these inputs (``v``: the value cache, when its head dim
    may differ; ``softcap``, ``head_bias``: the logit extensions); else why not (the op then
    runs its vectorised torch implementation, which is exact for every input)."""
    if not (q.is_cuda or interpreting()):
        return f"device {q.device.type}"
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype}"
    if block_size > SPLIT_ALIGN or block_size & (block_size - 1):
        return f"block_size {block_size} (the kernels take powers of 2 up to {SPLIT_ALIGN})"
    d, g = q.shape[-1], q.shape[1] // k.shape[1]
    if not isinstance(d, int) or d > 256:
        return f"head dim {d}"
    if not isinstance(g, int) or g > 64:
        return f"group size {g}"
    dv = d if v is None else v.shape[-1]
    if not isinstance(dv, int) or dv > 256:
        return f"value head dim {dv}"
    if not GPU_EXTENSIONS and not interpreting() and (softcap or head_bias is not None or dv != d):
        return "a soft-cap, head bias or value head dim of its own (the kernels' extension paths await the GPU suite)"
    if k.stride(-1) != 1 or q.stride(-1) != 1 or (v is not None and v.stride(-1) != 1):
        return "a head dim that is not contiguous"
    if not split_configs(block_size, _pow2(d, 16), q.element_size(), _pow2(dv, 16)):
        return (f"head dim {d}{'' if dv == d else f' (values {dv})'} of {q.dtype} at block_size {block_size}: no split "
                f"tile of whole blocks fits {_SMEM_BYTES} bytes of shared memory")
    return None


def _pow2(x: int, least: int = 1) -> int:
    return max(least, 1 << (int(x) - 1).bit_length())


def _fits(block_n: int, stages: int, block_size: int, d_pad: int, elem: int, dv_pad: int | None = None) -> bool:
    """The pruning rule: a tile holds whole selection blocks, and the K and V tiles of every
    pipeline stage fit in shared memory (``dv_pad``: the value tile's width, default d_pad)."""
    dv_pad = d_pad if dv_pad is None else dv_pad
    return block_n >= block_size and stages * block_n * (d_pad + dv_pad) * elem <= _SMEM_BYTES


class SplitConfig(NamedTuple):
    """One launch config of a split kernel: cache slots per tile, warps, pipeline stages."""

    block_n: int
    num_warps: int
    num_stages: int


class SplitConfigs(NamedTuple):
    """The config each split kernel launches with when a call does not pass one (None: the
    next choice of ``_split_kernel``)."""

    retrieval: SplitConfig | None = None
    sparse: SplitConfig | None = None


# None: each kernel launches with its ``DEFAULT_SPLIT_CONFIG`` (autotuned where that does not
# fit). Benchmarks pin others per process (``bench_decode.py --split-config``); a pinned config
# that does not fit is an error.
SPLIT_CONFIG = SplitConfigs()

# [Note: split defaults] Fixed rather than autotuned: Inductor tunes a user kernel once, at the
# graph's first run, and Triton's autotuner keys without the cache length or the batch, so the
# first size a process meets picks the config for every later one. On the H200 (2026-11-30,
# examples/bench_split.py, Llama-3-8B attention at 128K) the config tuned on a one-head batch-1
# call then ran the batch-4 dense split at 699 us against 505 for 64 x 4 warps x 3 stages (floor
# 499); across the one-head, dense and sparse cases at 8K and 128K, 64/4/3 was within 5% of the
# best retrieval config and 128/4/2 within 1% of the best sparse one.
DEFAULT_SPLIT_CONFIG = SplitConfigs(retrieval=SplitConfig(64, 4, 3), sparse=SplitConfig(128, 4, 2))


def split_configs(block_size: int, d_pad: int, elem: int, dv_pad: int | None = None) -> list[SplitConfig]:
    """The configs the split kernels are tuned over, pruned by ``_fits``."""
    return [SplitConfig(block_n, warps, stages) for block_n in (64, 128) for warps in (4, 8) for stages in (2, 3, 4)
            if _fits(block_n, stages, block_size, d_pad, elem, dv_pad)]


def _configs(block_size: int, d_pad: int, elem: int, dv_pad: int | None = None) -> list[triton.Config]:
    return [triton.Config({"BLOCK_N": c.block_n}, num_warps=c.num_warps, num_stages=c.num_stages)
            for c in split_configs(block_size, d_pad, elem, dv_pad)]


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str, block_size: int, d_pad: int, elem: int, dv_pad: int | None = None):
    """The kernel autotuned over its pruned configs (one autotuner per specialisation)."""
    base = {"retrieval": retrieval_split_kernel, "sparse": sparse_split_kernel}[kernel_name]
    return triton.autotune(configs=_configs(block_size, d_pad, elem, dv_pad),
                           key=["G_PAD", "D_PAD", "DV_PAD", "BS", "MASK_KIND"])(base)


def _split_kernel(name: str, block_size: int, d_pad: int, elem: int, config: SplitConfig | None = None,
                  dv_pad: int | None = None):
    """(kernel, extra kwargs): the given ``config`` (benchmarks sweep them), else ``SPLIT_CONFIG``'s
    (both must fit), else ``DEFAULT_SPLIT_CONFIG``'s where it fits, else the autotuned kernel;
    interpreted runs take one small fixed tile unless a config is given or pinned. ``dv_pad``:
    the value tile's width when it differs from ``d_pad``."""
    base = {"retrieval": retrieval_split_kernel, "sparse": sparse_split_kernel}[name]
    dv_pad = None if dv_pad == d_pad else dv_pad
    config = config or getattr(SPLIT_CONFIG, name)
    if config is not None:
        if not _fits(config.block_n, config.num_stages, block_size, d_pad, elem, dv_pad):
            raise ValueError(f"split_config {config} does not fit block_size={block_size}, head dim {d_pad} padded, "
                             f"{elem}-byte elements: expected one of {split_configs(block_size, d_pad, elem, dv_pad)}")
    elif interpreting():
        return base, {"BLOCK_N": _configs(block_size, d_pad, elem, dv_pad)[0].kwargs["BLOCK_N"]}
    else:
        config = getattr(DEFAULT_SPLIT_CONFIG, name)
        if not _fits(config.block_n, config.num_stages, block_size, d_pad, elem, dv_pad):
            return _tuned(name, block_size, d_pad, elem, dv_pad), {}
    return base, {"BLOCK_N": config.block_n, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _select_chunk(nb) -> int:
    """Selection tile: the row itself when its length is a known int (static shapes: static
    caches, eager calls), else the largest tile (dynamic shapes)."""
    if interpreting():
        return 64
    if isinstance(nb, int):
        return min(SELECT_CHUNK, _pow2(nb, 16))
    return SELECT_CHUNK


def _slices(d_pad: int) -> tuple[int, int]:
    """(D_SLICE, number of slices): how a row's merge is spread over programs."""
    d_slice = min(D_SLICE, d_pad)
    return d_slice, d_pad // d_slice


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_plan(n, rows: int, sm_count: int, *, align: int = SPLIT_ALIGN, least: int = 256):
    """(split_size, num_splits) for ``n`` slots and ``rows`` = B * R programs per split:
    about 2 * sm_count programs, each at least ``least`` slots, boundaries on ``align``.
    ``n`` may be symbolic (a SymInt): the plan is then symbolic too, with no guards."""
    want = max(1, -(-2 * sm_count // rows))
    per = -(-n // want)
    per = ((per + align - 1) // align) * align
    split = torch.sym_max(per, max(least, align))
    return split, (n + split - 1) // split


@functools.lru_cache(maxsize=256)
def _heads_tensor(heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # Cached so that eager launches (and CUDA-graph capture) never copy host data.
    return torch.tensor(heads, dtype=torch.int32, device=device)


def _heads(heads: Sequence[int], device: torch.device, traced: bool) -> torch.Tensor:
    if traced:
        return torch.tensor(list(heads), dtype=torch.int32, device=device)
    return _heads_tensor(tuple(heads), device)


def _head_bias_args(head_bias: torch.Tensor | None, q: torch.Tensor):
    """(pointer tensor, stride_b, stride_h, stride_n, HAS_HB): a (1, Hq, N) bias broadcasts."""
    if head_bias is None:
        return q, 0, 0, 0, False
    sb = 0 if head_bias.shape[0] == 1 else head_bias.stride(0)
    return head_bias, sb, head_bias.stride(1), head_bias.stride(2), True


def _mask_args(mask: torch.Tensor | None, q: torch.Tensor):
    """(pointer tensor, stride_b, stride_n, kind, min): a (1, N) mask broadcasts (stride 0)."""
    if mask is None:
        return q, 0, 0, MASK_NONE, 0.0
    sb = 0 if mask.shape[0] == 1 else mask.stride(0)
    if mask.dtype == torch.bool:
        return mask, sb, mask.stride(1), MASK_BOOL, 0.0
    return mask, sb, mask.stride(1), MASK_ADDITIVE, float(torch.finfo(mask.dtype).min)


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and workspace buffer comes from here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _cache_strides(q, k, v) -> tuple:
    """The stride arguments both split kernels take, in their order: q (b, h, d), k and v
    (b, h, n, d)."""
    return (q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride())


def _partials(rows, g: int, d: int, dev: torch.device):
    """Per-(b, r, split) partial outputs (rows, G, D) and running max and sum (rows, G), float32."""
    return (_alloc((rows, g, d), torch.float32, dev), _alloc((rows, g), torch.float32, dev),
            _alloc((rows, g), torch.float32, dev))


def _launch(kernel, grid, traced: bool, *args, **kwargs) -> None:
    if traced:
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def _common(q, k, heads):
    b, hq, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    return b, hkv, n, d, g, len(heads), _pow2(g, 16), _pow2(d, 16)


def _value_dims(v) -> tuple[int, int]:
    """(DV, DV_PAD): the value head dim and its tile."""
    return v.shape[-1], _pow2(v.shape[-1], 16)


def _score_buffers(select, b, r: int, nb, dev: torch.device):
    """The selection inputs the retrieval split writes: block scores (B * R, NB) float32 and
    valid-slot counts (B, NB) int32; one-element stand-ins without ``select``."""
    if select:
        return _alloc((b * r, nb), torch.float32, dev), _alloc((b, nb), torch.int32, dev)
    return _alloc((1,), torch.float32, dev), _alloc((1,), torch.int32, dev)


class Plan:
    """Buffers and launches of one op call, as stages that can run (and be timed) one by one.

    ``outputs`` are what the op returns once every stage has run."""

    def __init__(self, stages: list[tuple[str, object]], outputs):
        self.stages, self.outputs = stages, outputs

    def run(self):
        for _, stage in self.stages:
            stage()
        return self.outputs


def reduce_constants(g: int, d: int, num_blocks: int, select: bool, nb, select_config: SelectConfig | None = None,
                     *, merge: bool = True) -> dict:
    """The compile-time arguments (and ``num_warps``) of ``retrieval_reduce_kernel`` for a group
    of ``g`` query heads of dim ``d``, ``num_blocks`` selected blocks per row and rows of ``nb``
    blocks (an int, or symbolic under dynamic shapes). ``merge=False`` keeps only the selection
    programs (``N_SLICES`` = 0). ``examples/kernel_resources.py`` compiles the kernel from them."""
    if not merge and not select:
        raise ValueError("merge=False leaves only the selection programs: it needs select=True")
    select_config = select_config or SELECT_CONFIG  # read per call: a process may pin another
    d_slice, n_slices = _slices(_pow2(d, 16))
    return dict(
        G=g, G_P2=_pow2(g), D=d, D_SLICE=d_slice, N_SLICES=n_slices if merge else 0, SPLIT_CHUNK=SPLIT_CHUNK,
        S=num_blocks, S_PAD=_pow2(num_blocks), SELECT=select, CHUNK=select_config.chunk or _select_chunk(nb),
        DIGIT_BITS=select_config.digit_bits, WIDE_KEYS=select_config.wide_keys, EARLY_EXIT=select_config.early_exit,
        num_warps=select_config.num_warps,
    )


def retrieval_plan(q, k, v, mask, sel, heads, scale, block_size, num_blocks, sink, recent, select, softcap=0.0,
                   head_bias=None, *, traced: bool = False, split_size: int | None = None, merge: bool = True,
                   select_config: SelectConfig | None = None, split_config: SplitConfig | None = None) -> Plan:
    """Stages "split" (attention over slices of the cache, block scores) and "reduce" (merge,
    selection) of ``lychee::retrieval_attention``. ``merge=False`` launches the reduce stage's
    selection programs alone (benchmarks time selection with it; the attention output is then
    not written). ``split_config`` fixes the split kernel's config (None: ``_split_kernel``'s
    choice)."""
    b, hkv, n, d, g, r, g_pad, d_pad = _common(q, k, heads)
    dv, dv_pad = _value_dims(v)
    dev = q.device
    if split_size is None:
        split_size, num_splits = split_plan(n, b * r, _sm_count(dev), least=RETRIEVAL_LEAST)
    else:
        if split_size % block_size:
            raise ValueError(f"split_size must be a multiple of block_size={block_size}, got {split_size}")
        num_splits = (n + split_size - 1) // split_size
    part_o, part_m, part_l = _partials(b * r * num_splits, g, dv, dev)
    nb = (n + block_size - 1) // block_size
    blk_score, blk_cnt = _score_buffers(select, b, r, nb, dev)
    out = _alloc((b, r * g, 1, dv), q.dtype, dev)
    sel_out = sel.clone() if sel is not None else torch.full((b, hkv, num_blocks), -1, dtype=torch.int32, device=dev)
    heads_t = _heads(heads, dev, traced)
    m_ptr, smb, smn, kind, mmin = _mask_args(mask, q)
    hb_ptr, shb, shh, shn, has_hb = _head_bias_args(head_bias, q)
    kernel, extra = _split_kernel("retrieval", block_size, d_pad, q.element_size(), split_config, dv_pad)

    def split():
        _launch(
            kernel, (b * r, num_splits), traced,
            q, k, v, m_ptr, heads_t, part_o, part_m, part_l, blk_score, blk_cnt, hb_ptr,
            *_cache_strides(q, k, v), smb, smn, shb, shh, shn,
            n, nb, r, split_size, num_splits, scale * LOG2E, mmin, scale, softcap,
            G=g, G_PAD=g_pad, D=d, D_PAD=d_pad, BS=block_size, MASK_KIND=kind, SELECT=bool(select),
            DOT_F32=q.dtype == torch.float32 or interpreting(), DV=dv, DV_PAD=dv_pad, SOFTCAP=bool(softcap),
            HAS_HB=has_hb, **extra,
        )

    constants = reduce_constants(g, dv, num_blocks, bool(select), nb, select_config, merge=merge)

    def reduce():
        _launch(
            retrieval_reduce_kernel, (b * r, constants["N_SLICES"] + bool(select)), traced,
            part_o, part_m, part_l, out, blk_score, blk_cnt, heads_t, sel_out,
            num_splits, r, hkv, nb, sink, recent, **constants,
        )

    return Plan([("split", split), ("reduce", reduce)], (out, sel_out))


def retrieval_attention(*args, **kwargs):
    """The CUDA implementation of ``lychee::retrieval_attention`` (same contract and shapes)."""
    return retrieval_plan(*args, **kwargs).run()


def sparse_plan(q, k, v, mask, sel, heads, scale, block_size, softcap=0.0, head_bias=None, *, traced: bool = False,
                split_size: int | None = None, split_config: SplitConfig | None = None) -> Plan:
    """Stages "split" (attention over slices of the selected slots) and "merge" of
    ``lychee::sparse_attention``. ``split_config`` fixes the split kernel's config (None:
    ``_split_kernel``'s choice)."""
    b, hkv, n, d, g, r, g_pad, d_pad = _common(q, k, heads)
    dv, dv_pad = _value_dims(v)
    dev = q.device
    sel = sel.contiguous()  # the kernel walks a row with unit stride
    s = sel.shape[-1]
    slots = s * block_size
    if split_size is None:
        split_size, num_splits = split_plan(slots, b * r, _sm_count(dev), least=SPLIT_ALIGN)
    else:
        num_splits = math.ceil(slots / split_size)
    part_o, part_m, part_l = _partials(b * r * num_splits, g, dv, dev)
    out = _alloc((b, r * g, 1, dv), q.dtype, dev)
    heads_t = _heads(heads, dev, traced)
    m_ptr, smb, smn, kind, mmin = _mask_args(mask, q)
    hb_ptr, shb, shh, shn, has_hb = _head_bias_args(head_bias, q)
    kernel, extra = _split_kernel("sparse", block_size, d_pad, q.element_size(), split_config, dv_pad)

    def split():
        _launch(
            kernel, (b * r, num_splits), traced,
            q, k, v, m_ptr, heads_t, sel, part_o, part_m, part_l, hb_ptr,
            *_cache_strides(q, k, v), smb, smn,
            sel.stride(0), sel.stride(1), shb, shh, shn,
            n, r, split_size, num_splits, scale * LOG2E, mmin, scale, softcap,
            G=g, G_PAD=g_pad, D=d, D_PAD=d_pad, BS=block_size, S=s, MASK_KIND=kind,
            DOT_F32=q.dtype == torch.float32 or interpreting(), DV=dv, DV_PAD=dv_pad, SOFTCAP=bool(softcap),
            HAS_HB=has_hb, **extra,
        )

    d_slice, n_slices = _slices(dv_pad)

    def merge():
        _launch(merge_kernel, (b * r, n_slices), traced, part_o, part_m, part_l, out, num_splits,
                G=g, G_P2=_pow2(g), D=dv, D_SLICE=d_slice, SPLIT_CHUNK=SPLIT_CHUNK)

    return Plan([("split", split), ("merge", merge)], out)


def sparse_attention(*args, **kwargs):
    """The CUDA implementation of ``lychee::sparse_attention`` (same contract and shapes)."""
    return sparse_plan(*args, **kwargs).run()


def hybrid_config(block_size: int, d_pad: int, elem: int, dv_pad: int | None = None) -> dict | None:
    """The launch kwargs of ``hybrid_split_kernel`` (one warps and stages count for both parts:
    the retrieval split's; the sparse part's tile where it fits those stages, else the
    retrieval tile), or None where the split kernels' own configs would be autotuned (large
    head dims): ``passes/pool.py`` leaves such a layer's two ops as they are."""
    dv_pad = None if dv_pad == d_pad else dv_pad
    if interpreting() and SPLIT_CONFIG.retrieval is None:
        block_n = _configs(block_size, d_pad, elem, dv_pad)[0].kwargs["BLOCK_N"]
        return {"BLOCK_N": block_n, "BLOCK_N_S": block_n}
    ret = SPLIT_CONFIG.retrieval or DEFAULT_SPLIT_CONFIG.retrieval
    spa = SPLIT_CONFIG.sparse or DEFAULT_SPLIT_CONFIG.sparse
    if not _fits(ret.block_n, ret.num_stages, block_size, d_pad, elem, dv_pad):
        return None
    block_s = spa.block_n if _fits(spa.block_n, ret.num_stages, block_size, d_pad, elem, dv_pad) else ret.block_n
    return {"BLOCK_N": ret.block_n, "BLOCK_N_S": block_s, "num_warps": ret.num_warps, "num_stages": ret.num_stages}


def pooled_config(q: torch.Tensor, v: torch.Tensor, block_size: int) -> dict | None:
    """``hybrid_config`` for a layer's q (B, Hq, 1, D) and v (B, Hkv, N, Dv) (fake tensors do)."""
    return hybrid_config(block_size, _pow2(q.shape[-1], 16), q.element_size(), _value_dims(v)[1])


def hybrid_plan(q, k, v, mask, sel, ret_heads, spa_heads, scale, block_size, num_blocks, sink, recent, select,
                softcap=0.0, head_bias=None, *, traced: bool = False) -> Plan:
    """Stages "split" (the retrieval heads' splits and the sparse heads' in one launch) and
    "reduce" (both merges and the selection) of ``lychee::hybrid_attention`` ([Note: pooled
    layers] in ``attention_kernels``). Splits are planned per part as the separate ops plan
    them; ``pooled_config`` must give a config."""
    b, hkv, n, d, g, r_r, g_pad, d_pad = _common(q, k, ret_heads)
    r_s = len(spa_heads)
    dv, dv_pad = _value_dims(v)
    extra = pooled_config(q, v, block_size)
    if extra is None:
        raise ValueError(f"no pooled split config for head dim {d} (values {dv}) of {q.dtype} at block_size "
                         f"{block_size}: expected inputs that hybrid_config takes (passes/pool.py checks it)")
    dev = q.device
    sel = sel.contiguous()  # the sparse part walks a row with unit stride
    sm = _sm_count(dev)
    split_r, splits_r = split_plan(n, b * r_r, sm, least=RETRIEVAL_LEAST)
    slots = num_blocks * block_size
    split_s, splits_s = split_plan(slots, b * r_s, sm, least=SPLIT_ALIGN)
    pr_o, pr_m, pr_l = _partials(b * r_r * splits_r, g, dv, dev)
    ps_o, ps_m, ps_l = _partials(b * r_s * splits_s, g, dv, dev)
    nb = (n + block_size - 1) // block_size
    blk_score, blk_cnt = _score_buffers(select, b, r_r, nb, dev)
    out = _alloc((b, (r_r + r_s) * g, 1, dv), q.dtype, dev)
    sel_out = sel.clone()
    heads_r, heads_s = _heads(ret_heads, dev, traced), _heads(spa_heads, dev, traced)
    m_ptr, smb, smn, kind, mmin = _mask_args(mask, q)
    hb_ptr, shb, shh, shn, has_hb = _head_bias_args(head_bias, q)
    progs_r = b * r_r * splits_r

    def split():
        _launch(
            hybrid_split_kernel, (progs_r + b * r_s * splits_s,), traced,
            q, k, v, m_ptr, heads_r, heads_s, sel, pr_o, pr_m, pr_l, ps_o, ps_m, ps_l, blk_score, blk_cnt, hb_ptr,
            *_cache_strides(q, k, v), smb, smn, sel.stride(0), sel.stride(1), shb, shh, shn,
            n, nb, r_r, r_s, progs_r, split_r, splits_r, split_s, splits_s, scale * LOG2E, mmin, scale, softcap,
            G=g, G_PAD=g_pad, D=d, D_PAD=d_pad, BS=block_size, S=num_blocks, MASK_KIND=kind, SELECT=bool(select),
            DOT_F32=q.dtype == torch.float32 or interpreting(), DV=dv, DV_PAD=dv_pad, SOFTCAP=bool(softcap),
            HAS_HB=has_hb, **extra,
        )

    constants = reduce_constants(g, dv, num_blocks, bool(select), nb)

    def reduce():
        _launch(
            hybrid_reduce_kernel, (b * (r_r + r_s), constants["N_SLICES"] + bool(select)), traced,
            pr_o, pr_m, pr_l, ps_o, ps_m, ps_l, out, blk_score, blk_cnt, heads_r, sel_out,
            splits_r, splits_s, b * r_r, r_r, r_s, hkv, nb, sink, recent, **constants,
        )

    return Plan([("split", split), ("reduce", reduce)], (out, sel_out))


def hybrid_attention(*args, **kwargs):
    """The CUDA implementation of ``lychee::hybrid_attention`` (same contract and shapes)."""
    return hybrid_plan(*args, **kwargs).run()
