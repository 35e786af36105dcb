"""Give the lychee op contracts their Triton kernels, eagerly and inside compiled graphs.

Two registrations per op, both through public ``torch.library`` APIs:

- a CUDA kernel (``register_kernel("cuda")``): eager calls, and any graph that keeps the op
  opaque, launch the kernels directly;
- a rule for ``FunctionalTensorMode`` (``CustomOpDef.register_torch_dispatch``): when
  AOTAutograd functionalises a graph for Inductor, CUDA calls of the op are traced *through*
  the launcher, whose ``wrap_triton`` launches become ``triton_kernel_wrapper_functional``
  nodes. Inductor then compiles those kernels itself: their source, specialised by the
  constexprs (head dim, group, block size, budget, dtype, mask kind), appears in the
  generated code, with the launch config ``launch._split_kernel`` picks
  (``DEFAULT_SPLIT_CONFIG``, else the autotuning configs of ``launch._configs``). This is the
  mechanism ``torch.library.triton_op`` uses; it is applied here to the existing contract ops
  so that CPU graphs keep the vectorised implementation.

``hybrid_attention`` (a layer's two ops as one launch pair) and ``decode_linear``
(``codegen/linear.py``) are registered the same way.

Inputs the kernels do not take (``launch.supports``: fp64, block sizes that are not powers of
2 up to 128, ...) run the vectorised torch implementation instead: never a wrong answer.
Inductor's FX-graph cache sees none of this, so the backend keys it on this package's sources.
"""

from __future__ import annotations

import torch
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from torch._subclasses.fake_tensor import FakeTensor

from lychee_fx import eager_ops, ops
from lychee_fx.codegen import launch, linear

__all__ = ["register"]

_REGISTERED = False


def _kernels_take(q, k, block_size, v, softcap, head_bias, sink_logits) -> bool:
    """Whether the kernels run these inputs: ``launch.supports``, and no sink logits (the
    kernels have no sink path yet; the torch implementation computes them exactly)."""
    return sink_logits is None and launch.supports(q, k, block_size, v, softcap, head_bias) is None


def _retrieval_cuda(q, k, v, mask, sel, heads, scale, block_size, num_blocks, sink, recent, select, softcap=0.0,
                    head_bias=None, sink_logits=None):
    ops.check_inputs(q, k, v, mask, sel, heads, block_size, num_blocks, softcap, head_bias, sink_logits)
    args = (q, k, v, mask, sel, heads, scale, block_size, num_blocks, sink, recent, select, softcap, head_bias)
    if _kernels_take(q, k, block_size, v, softcap, head_bias, sink_logits):
        return launch.retrieval_attention(*args)
    return eager_ops.retrieval_attention(*args, sink_logits)


def _sparse_cuda(q, k, v, mask, sel, heads, scale, block_size, softcap=0.0, head_bias=None, sink_logits=None):
    ops.check_inputs(q, k, v, mask, sel, heads, block_size, None, softcap, head_bias, sink_logits)
    if _kernels_take(q, k, block_size, v, softcap, head_bias, sink_logits):
        return launch.sparse_attention(q, k, v, mask, sel, heads, scale, block_size, softcap, head_bias)
    return eager_ops.sparse_attention(q, k, v, mask, sel, heads, scale, block_size, softcap, head_bias, sink_logits)


def _hybrid_cuda(q, k, v, mask, sel, ret_heads, spa_heads, scale, block_size, num_blocks, sink, recent, select,
                 softcap=0.0, head_bias=None, sink_logits=None):
    ops.check_hybrid_inputs(q, k, v, mask, sel, ret_heads, spa_heads, block_size, num_blocks, softcap, head_bias,
                            sink_logits)
    args = (q, k, v, mask, sel, ret_heads, spa_heads, scale, block_size, num_blocks, sink, recent, select, softcap,
            head_bias)
    if _hybrid_takes(q, k, block_size, v, softcap, head_bias, sink_logits):
        return launch.hybrid_attention(*args)
    return eager_ops.hybrid_attention(*args, sink_logits)


def _hybrid_takes(q, k, block_size, v, softcap, head_bias, sink_logits) -> bool:
    """``_kernels_take``, and a pooled split config for these shapes (``launch.pooled_config``)."""
    return (_kernels_take(q, k, block_size, v, softcap, head_bias, sink_logits)
            and launch.pooled_config(q, v, block_size) is not None)


def _linear_cuda(x, weights, biases):
    ops.check_linear_inputs(x, weights, biases)
    if linear.supports(x, weights, biases) is None:
        return linear.decode_linear(x, weights, biases)
    return eager_ops.decode_linear(x, weights, biases)


def _linear_rule(mode, op, types, args, kwargs):
    x, weights, biases = args
    if not _traceable(types) or not x.is_cuda or linear.supports(x, weights, biases) is not None:
        return mode.__torch_dispatch__(op, types, args, kwargs)
    with mode:
        return linear.decode_linear(x, weights, biases, traced=True)


def _traceable(types) -> bool:
    return all(issubclass(t, (FakeTensor, FunctionalTensor)) or t is torch.Tensor for t in types)


def _functional_rule(launcher, softcap_at: int, block_size_at: int = 7, takes=_kernels_take):
    """``softcap_at``: the position of the op's ``softcap`` argument (``head_bias`` and
    ``sink_logits`` follow); ``block_size_at`` that of ``block_size``; ``takes`` whether the
    kernels run the inputs."""

    def rule(mode, op, types, args, kwargs):
        q, k, v, block_size = args[0], args[1], args[2], args[block_size_at]
        ext = list(args[softcap_at:softcap_at + 3])
        softcap = ext[0] if ext else kwargs.get("softcap", 0.0)
        head_bias = ext[1] if len(ext) > 1 else kwargs.get("head_bias")
        sink_logits = ext[2] if len(ext) > 2 else kwargs.get("sink_logits")
        if not _traceable(types) or not q.is_cuda or not takes(q, k, block_size, v, softcap, head_bias, sink_logits):
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode:
            return launcher(*args, **kwargs, traced=True)

    return rule


def register() -> None:
    """Install the CUDA kernels and the trace-through rule (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    ops.retrieval_attention.register_kernel("cuda")(_retrieval_cuda)
    ops.sparse_attention.register_kernel("cuda")(_sparse_cuda)
    ops.retrieval_attention.register_torch_dispatch(FunctionalTensorMode, _functional_rule(launch.retrieval_attention, 12))
    ops.sparse_attention.register_torch_dispatch(FunctionalTensorMode, _functional_rule(launch.sparse_attention, 8))
    ops.hybrid_attention.register_kernel("cuda")(_hybrid_cuda)
    ops.hybrid_attention.register_torch_dispatch(
        FunctionalTensorMode, _functional_rule(launch.hybrid_attention, 13, block_size_at=8, takes=_hybrid_takes))
    ops.decode_linear.register_kernel("cuda")(_linear_cuda)
    ops.decode_linear.register_torch_dispatch(FunctionalTensorMode, _linear_rule)
    _REGISTERED = True
