"""Token-by-token decoding of an HF causal LM from a shared prefilled cache: the loop that
``demo`` and ``eval`` run, so that every method decodes the same tokens the same way.

    cache = prefill(model, ids[:, :-1])                      # dense, once per prompt
    step = torch.compile(model, backend=lychee_fx.backend(roles, compiler="eager"))
    res = decode(step, model, clone_cache(cache), ids[:, -1:], steps=32)

Prefill (query length > 1) is never changed by the backend (SPEC 1.1), so one dense prefill
serves every method; the last prompt token is fed as the first decode step, so every
generated (or scored) token goes through the decode path that the backend rewrites.

Cache correction (SPEC 1.3): with ``correct_every=C``, every C-th decode step is instead
one prefill-shaped call of the dense model over the last C fed tokens, after cropping the
cache back by the C - 1 of them it already holds: their K/V, written under sparse
attention, are overwritten with dense values, and that step's logits are dense.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import time
from collections.abc import Callable

import torch

__all__ = ["pick_device", "synchronize", "forward_takes", "cache_kwarg", "prefill", "clone_cache", "DecodeResult", "decode", "agreement"]

# model(input_ids=..., past_key_values=..., use_cache=True) -> output with .logits (B, T, V)
StepFn = Callable[..., object]


def pick_device(name: str | None = None) -> torch.device:
    """``name`` if given, else CUDA when available, else the CPU."""
    if name:
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for, but CUDA is not available here; expected 'cpu'")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _forward_params(model) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def forward_takes(model, name: str) -> bool:
    """Whether ``model.forward`` names the argument ``name`` (the HF signature changes across
    transformers versions: 5.24 dropped ``cache_position`` and renamed the cache argument)."""
    return name in _forward_params(model)


def cache_kwarg(model) -> str:
    """The name under which ``model.forward`` takes the KV cache: ``cache`` (transformers
    5.24 renamed it) or ``past_key_values``."""
    return "cache" if forward_takes(model, "cache") else "past_key_values"


@torch.no_grad()
def prefill(model, ids: torch.Tensor, *, chunk: int = 512, progress: Callable[[int], None] | None = None):
    """A ``DynamicCache`` holding positions ``[0, T)`` of ``ids`` (B, T), filled densely in
    chunks of ``chunk`` tokens (causal attention makes this equal to one call up to float
    rounding). Every row has the same length: no padding, no attention mask. ``progress(n)``
    is called after each chunk with the tokens just added (per row)."""
    from transformers import DynamicCache

    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"expected ids of shape (B, T) with B, T >= 1, got {tuple(ids.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    cache = DynamicCache(config=model.config)
    extra = {"logits_to_keep": 1} if forward_takes(model, "logits_to_keep") else {}
    kw = cache_kwarg(model)
    for start in range(0, ids.shape[1], chunk):
        part = ids[:, start : start + chunk]
        model(input_ids=part, use_cache=True, **{kw: cache}, **extra)
        if progress is not None:
            progress(part.shape[1])
    return cache


@torch.no_grad()
def prefill_static(model, ids: torch.Tensor, slots: int, *, chunk: int = 512):
    """A ``StaticCache`` of ``slots`` slots holding positions ``[0, T)`` of ``ids`` (1, T), filled
    in chunks of ``chunk`` tokens: the cache ``generate(past_key_values=...)`` continues from,
    with the compiled decode step (``compile_config``) and CUDA graphs."""
    from transformers import StaticCache

    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"expected ids of shape (1, T), got {tuple(ids.shape)}")
    if slots < ids.shape[1]:
        raise ValueError(f"expected at least {ids.shape[1]} slots for {ids.shape[1]} tokens, got {slots}")
    cache = StaticCache(config=model.config, max_cache_len=slots)
    extra = {"logits_to_keep": 1} if forward_takes(model, "logits_to_keep") else {}
    kw = cache_kwarg(model)
    for start in range(0, ids.shape[1], chunk):
        model(input_ids=ids[:, start : start + chunk], use_cache=True, **{kw: cache}, **extra)
    return cache


def clone_cache(cache):
    """An independent copy of a cache (decoding writes into it). A static cache's tensors are
    marked static again, as the cache marks its own when it allocates them: compiled decoding
    keeps them at fixed addresses (CUDA graphs)."""
    new = copy.deepcopy(cache)
    for layer in getattr(new, "layers", None) or []:
        if getattr(layer, "is_compileable", False) and getattr(layer, "is_initialized", False):
            for name in ("keys", "values", "cumulative_length"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    torch._dynamo.mark_static_address(t)
    return new


@dataclasses.dataclass
class DecodeResult:
    """What ``decode`` saw, for a batch of B rows over ``steps`` decode steps (on the CPU)."""

    tokens: torch.Tensor  # (B, steps) int64: the argmax at every step (greedy picks, or predictions when forced)
    nll: torch.Tensor | None  # (B, steps) float32: -log p(target) per step; None unless targets were given
    seconds: float  # wall time of the whole loop, the device synchronised at its end
    corrected: list[int]  # the steps that ran as a dense cache correction


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing to wait for elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode(
    step: StepFn,
    dense: StepFn,
    cache,
    first: torch.Tensor,
    steps: int,
    *,
    targets: torch.Tensor | None = None,
    correct_every: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> DecodeResult:
    """``steps`` decode steps of a batch of B rows from ``cache`` (positions ``[0, P)`` of
    every row), feeding ``first`` (B, 1) at position P.

    Greedy when ``targets`` is None: each step feeds the previous step's argmax. Teacher
    forced with ``targets`` (B, steps): step i feeds ``targets[:, i-1]`` (``first`` at i = 0)
    and scores ``targets[:, i]``. ``step`` runs ordinary steps (the compiled model),
    ``dense`` the cache corrections (the plain model, whose signature also names the cache
    argument). ``on_step(i)`` after step i is launched.

    Tokens and scores stay on the device during the loop (no host sync per step) and come
    back to the CPU once at the end. Every fed token is a fresh tensor (storage offset 0), so
    a compiled step sees the same input layout at every step and does not recompile.
    """
    if first.dim() != 2 or first.shape[1] != 1:
        raise ValueError(f"expected first of shape (B, 1), got {tuple(first.shape)}")
    b = first.shape[0]
    if targets is not None and tuple(targets.shape) != (b, steps):
        raise ValueError(f"expected targets of shape ({b}, {steps}), got {tuple(targets.shape)}")
    if correct_every < 0:
        raise ValueError(f"correct_every must be >= 0 (0 = never), got {correct_every}")
    kw = cache_kwarg(dense)
    fed = [first.clone(memory_format=torch.contiguous_format)]  # each (B, 1), strides (1, 1)
    picks, nlls, corrected = [], [], []
    t0 = time.perf_counter()
    for i in range(steps):
        if correct_every and (i + 1) % correct_every == 0:
            back = correct_every - 1
            if back:
                cache.crop(-back)  # a negative count removes that many tokens (transformers >= 5.17)
            ids = torch.cat(fed[-correct_every:], dim=1)  # (B, C)
            logits = dense(input_ids=ids, use_cache=True, **{kw: cache}).logits[:, -1]
            corrected.append(i)
        else:
            logits = step(input_ids=fed[-1], use_cache=True, **{kw: cache}).logits[:, -1]
        logits = logits.float()  # (B, V)
        pick = logits.argmax(-1, keepdim=True)  # (B, 1)
        picks.append(pick)
        if targets is not None:
            nxt = targets[:, i : i + 1].clone(memory_format=torch.contiguous_format)  # (B, 1)
            nlls.append(-torch.log_softmax(logits, -1).gather(1, nxt))  # (B, 1)
        else:
            nxt = pick
        fed.append(nxt)
        if on_step is not None:
            on_step(i)
    synchronize(first.device)
    seconds = time.perf_counter() - t0
    empty = torch.zeros(b, 0)
    tokens = torch.cat(picks, dim=1).cpu() if picks else empty.long()
    nll = (torch.cat(nlls, dim=1).cpu() if nlls else empty) if targets is not None else None
    return DecodeResult(tokens, nll, seconds, corrected)


def agreement(tokens: list[int], reference: list[int]) -> tuple[float, int]:
    """(share of positions where two generations agree, counted over the longer one, so a
    generation that stopped early disagrees where it stopped; the first differing index)."""
    n = max(len(tokens), len(reference))
    same = [a == b for a, b in zip(tokens, reference)]
    first = next((i for i, s in enumerate(same) if not s), min(len(tokens), len(reference)))
    return (sum(same) / n if n else 1.0), first
