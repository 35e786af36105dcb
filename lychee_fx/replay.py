"""CUDA graphs for compiled decode steps with less host work per call than Inductor's trees.

Under ``mode="reduce-overhead"`` (HF's ``CompileConfig`` passes it) Inductor replays a graph
through its CUDA-graph trees, AOTAutograd's runtime wrapper and its own output code: on the
H200's host a Llama-3-8B decode step spent about a third of the compiled call's host time
there (py-spy, 2026-12-01: trees 19%, AOT wrapper 6%, output code 6%; the replay itself 17%,
Dynamo's guards 44%), every token, while the GPU waited (HF's ``generate`` syncs each token).
``GraphReplay`` captures the whole compiled callable once and then, per call:

1. checks that the static inputs (parameters, buffers and tensors marked static, such as HF's
   static cache) still live at the captured addresses (a mismatch captures again);
2. copies the other tensor inputs into the graph's own input buffers (one foreach copy);
3. replays, and returns copies of the outputs the graph allocated, so that no later replay
   overwrites what a caller holds; outputs that are views of static inputs are returned as
   captured.

``replay_plan`` decides at compile time, from the Dynamo graph, whether that is exact; when it
is not, the backend keeps Inductor's trees. Every condition is about what a replay cannot
reproduce:

- every input is a tensor on one CUDA device (no SymInts or Python numbers, which a replay
  would freeze at their captured values; no CPU tensors);
- the graph writes no input that is not static (a copied input would be written instead of
  the caller's tensor), and no output shares storage with a non-static input;
- no random ops (a replay repeats the captured random offsets);
- no tensor-subclass inputs (DTensor parameters under tensor parallelism: on the H200 a
  capture with them failed reading a DTensor's address, and the graph then ran without CUDA
  graphs at twice the time per token; Inductor's trees see the inner tensors instead).

Calls before the capture run the compiled callable as is (``warmup`` of them: Triton's
compiles and autotuning, lazy initialisation and the allocator's first blocks stay out of the
capture). Gradients: a call with grad mode on and an input that requires grad runs as is.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

__all__ = ["replay_plan", "GraphReplay", "ReplayPlan"]

log = logging.getLogger("lychee_fx")

_RANDOM = ("rand", "dropout", "bernoulli", "multinomial", "normal", "uniform", "exponential", "cauchy",
           "geometric", "log_normal", "poisson")


@dataclasses.dataclass(frozen=True)
class ReplayPlan:
    """Which graph inputs are static (their address may not change) and the reason a graph
    cannot be replayed (empty when it can)."""

    static: tuple[bool, ...]
    reason: str = ""


def _storage(t: Any):
    from torch.multiprocessing.reductions import StorageWeakRef

    if not isinstance(t, torch.Tensor):
        return None
    try:
        return StorageWeakRef(t.untyped_storage())
    except Exception:  # noqa: BLE001 - a tensor without storage (a nested or sparse one): unknown
        return None


def _fake(node: Any):
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    return val if isinstance(val, torch.Tensor) else None


def _writes(node: fx.Node) -> list[Any]:
    """The tensors (FX args) ``node`` writes in place: an in-place method's self, setitem's
    target, an ``inplace=True`` functional's input, an ``out=`` argument."""
    written = []
    if node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") \
            and not node.target.endswith("__"):
        written.append(node.args[0])
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if node.target is operator.setitem or (name.endswith("_") and not name.endswith("__")):
            written.append(node.args[0] if node.args else None)
        if node.kwargs.get("inplace") is True and node.args:
            written.append(node.args[0])
    out = node.kwargs.get("out")
    written.extend(out if isinstance(out, (list, tuple)) else [out] if out is not None else [])
    return [w for w in written if isinstance(w, fx.Node)]


def replay_plan(gm: fx.GraphModule, example_inputs: Sequence[Any], *, device_type: str = "cuda") -> ReplayPlan:
    """Whether ``GraphReplay`` computes exactly what ``gm`` does for every call that passes
    Dynamo's guards, read from the Dynamo graph's fake tensors (``example_value``).
    ``device_type``: where the inputs must be (CUDA; tests of the analysis pass ``"cpu"``)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    static = tuple(
        bool(n.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")) or isinstance(x, torch.nn.Parameter)
        for n, x in zip(placeholders, example_inputs)
    )

    def no(reason: str) -> ReplayPlan:
        return ReplayPlan(static, reason)

    if len(placeholders) != len(example_inputs):
        return no(f"{len(placeholders)} placeholders for {len(example_inputs)} inputs")
    devices = {x.device for x in example_inputs if isinstance(x, torch.Tensor)}
    wrapped = sorted({type(x).__name__ for x in example_inputs if is_traceable_wrapper_subclass(x)})
    if wrapped:
        return no(f"tensor-subclass inputs ({', '.join(wrapped)}, e.g. tensor-parallel parameters): their data "
                  f"lives in inner tensors whose addresses a replay cannot check")
    if any(not isinstance(x, torch.Tensor) for x in example_inputs):
        kinds = sorted({type(x).__name__ for x in example_inputs if not isinstance(x, torch.Tensor)})
        return no(f"inputs that are not tensors ({', '.join(kinds)}): a replay would freeze their values")
    if len(devices) != 1 or next(iter(devices)).type != device_type:
        return no(f"inputs on {sorted(str(d) for d in devices)}, not on one {device_type} device")
    owner = {}
    for n, is_static in zip(placeholders, static):
        s = _storage(_fake(n))
        if s is None:
            return no(f"the storage of input {n.name} is unknown")
        owner[s] = (n.name, is_static)
    for node in gm.graph.nodes:
        name = str(getattr(node.target, "__name__", node.target)).lower()
        if node.op in ("call_function", "call_method") and any(r in name for r in _RANDOM):
            return no(f"a random op ({node.target}): a replay would repeat its numbers")
        for target in _writes(node):
            hit = owner.get(_storage(_fake(target)))
            if hit is not None and not hit[1]:
                return no(f"the graph writes input {hit[0]}, which is not static")
        if node.op == "output":
            for out in _flat(node.args):
                hit = owner.get(_storage(_fake(out)))
                if hit is not None and not hit[1]:
                    return no(f"an output shares storage with input {hit[0]}, which is not static")
    return ReplayPlan(static)


def _flat(args) -> list:
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.extend(_flat(a))
        elif isinstance(a, fx.Node):
            out.append(a)
    return out


def _unexpanded(t: torch.Tensor) -> torch.Tensor:
    """``t`` narrowed to one element along every broadcast (stride 0) dim: the memory a copy
    into an expanded buffer must write, once."""
    for dim, (size, stride) in enumerate(zip(t.shape, t.stride())):
        if stride == 0 and size > 1:
            t = t.narrow(dim, 0, 1)
    return t


def _ptrs_equal(args: list, ptrs: list[int | None], idx: list[int]) -> bool:
    """Whether ``args[i]`` lives at ``ptrs[i]`` for every ``i`` in ``idx`` (``ptrs`` has one
    entry per input, as torch's check reads it: a list of only the static inputs' addresses
    failed every call on the H200 and captured again each time)."""
    check = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)
    if check is not None:
        return check(args, ptrs, idx)
    return all(args[i].data_ptr() == ptrs[i] for i in idx)


class GraphReplay:
    """A callable that replays ``compiled`` as one CUDA graph; see the module docstring.
    ``captures`` counts graphs captured (a static input that moved captures again, at most
    ``max_captures`` times; then calls run ``compiled`` as is). A capture that fails runs
    ``compiled`` as is from then on and tells ``on_fail`` why (the backend's report).

    Dynamo calls a backend's result with the graph's inputs as arguments, and Inductor's
    ``compile_fx`` result takes them so too (torch 2.11 and 2.13: a ``_boxed_call`` flag on
    this class made neither pass a list)."""

    def __init__(self, compiled: Callable, plan: ReplayPlan, *, warmup: int = 1, max_captures: int = 8,
                 on_fail: Callable[[str], None] | None = None):
        if plan.reason:
            raise ValueError(f"this graph cannot be replayed: {plan.reason}")
        self.compiled = compiled
        self.static_idx = [i for i, s in enumerate(plan.static) if s]
        self.copy_idx = [i for i, s in enumerate(plan.static) if not s]
        self.warmup, self.max_captures = warmup, max_captures
        self.calls = 0
        self.captures = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.stream: torch.cuda.Stream | None = None
        self.on_fail = on_fail  # told why, when a capture fails and the graph runs without CUDA graphs

    def _run(self, args: Sequence[torch.Tensor]):
        return self.compiled(*args)

    def __call__(self, *call_args: torch.Tensor):
        args = list(call_args)
        self.calls += 1
        if self.graph is not None and _ptrs_equal(args, self.static_ptrs, self.static_idx):
            return self._replay(args)
        grad = torch.is_grad_enabled() and any(a.requires_grad for a in args)
        if grad or self.calls <= self.warmup or self.captures >= self.max_captures:
            return self._run(args)
        try:
            self._capture(args)
        except Exception as e:  # noqa: BLE001 - e.g. a CPU sync inside the graph: run it as is from now on
            log.warning("lychee_fx: CUDA-graph capture failed (%s: %s); the graph runs without CUDA graphs",
                        type(e).__name__, e)
            self.graph, self.max_captures = None, 0
            if self.on_fail is not None:
                self.on_fail(f"{type(e).__name__}: {e}")
            torch.cuda.synchronize()
            return self._run(args)
        return self._replay(args)

    def _capture(self, args: list) -> None:
        self.graph = None
        torch.cuda.synchronize()
        static = set(self.static_idx)
        self.placeholders = [a if i in static else torch.empty_strided(a.size(), a.stride(), dtype=a.dtype,
                                                                                       device=a.device)
                             for i, a in enumerate(args)]
        self.dst = [_unexpanded(self.placeholders[i]) for i in self.copy_idx]
        self.static_ptrs = [a.data_ptr() if i in static else None for i, a in enumerate(args)]
        static_storages = {args[i].untyped_storage().data_ptr() for i in self.static_idx}
        self.stream = self.stream or torch.cuda.Stream()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            outs = self.compiled(*self.placeholders)
        self.kind = None if not isinstance(outs, (list, tuple)) else type(outs)
        self.outs = [outs] if self.kind is None else list(outs)
        # outputs viewing a static input are returned as captured; the rest are copied per call
        self.fresh = [isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in static_storages
                      for o in self.outs]
        self.graph = graph
        self.captures += 1
        log.info("lychee_fx: captured a CUDA graph (%d inputs copied per call, %d static)", len(self.copy_idx),
                 len(self.static_idx))

    def _replay(self, args: list):
        if self.copy_idx:
            torch._foreach_copy_(self.dst, [_unexpanded(args[i]) for i in self.copy_idx])
        self.graph.replay()
        outs = [o.clone() if f else o for o, f in zip(self.outs, self.fresh)]
        return outs[0] if self.kind is None else self.kind(outs)
