"""``compile_config``: the ``CompileConfig`` that HF ``generate()`` decodes fastest with.

    out = model.generate(ids, past_key_values=StaticCache(...),
                         compile_config=lychee_fx.compile_config(roles))

is ``CompileConfig(backend=lychee_fx.backend(roles), ...)`` with two settings that HF's own
default does not choose:

- CUDA graphs as an Inductor option (``options={"triton.cudagraphs": True}``, which the
  backend replays as ``mode="reduce-overhead"``: ``replay.py``), because ``torch.compile``
  takes either a ``mode`` or ``options``, never both;
- ``guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe``: Dynamo keeps no
  guards on what it reads through the model object ([Note: guard cost]).

[Note: guard cost] HF's ``generate`` syncs with the GPU on its stopping check every token, so
the host's work between that sync and the next CUDA-graph launch adds to every token. Dynamo
checks its guards on each call of the compiled forward: on a Llama decoder about 200 per
layer (the hook dicts, classes and attributes of every submodule, every parameter's tensor
match, config values), 6,571 for a 32-layer model. On a CPU here one call of such a
compiled forward took 262 us of guard and frame work with all of them and 66 us with this
filter (886 kept). On the H200 (2026-12-02, Llama-3-8B shape, 128K, batch 1; results
``examples/results/h200-2026-12-02/``) a generated token took 8.86 ms with
``CompileConfig(backend=...)`` and 7.85 ms with this config, in the same call.

What the filter gives up: Dynamo no longer notices changes to the model object after the
first compile: hooks registered later, submodules replaced, ``model.train()``, config
attributes edited. Weights updated in place (``param.copy_(...)``, ``load_state_dict`` into
the same tensors) are read as usual; a parameter replaced by a tensor of another shape or
dtype fails Inductor's input size assertions rather than computing with it. Pass
``fast_guards=False`` for HF's default guards (and ``mode="reduce-overhead"``).
"""

from __future__ import annotations

from typing import Any

import torch

from lychee_fx.backend import LycheeBackend, backend

__all__ = ["compile_config", "fast_guard_options"]


def fast_guard_options(cuda_graphs: bool = True) -> dict[str, Any]:
    """``torch.compile`` options: no guards through the model object ([Note: guard cost]) and,
    with ``cuda_graphs``, CUDA graphs (an Inductor option: leave it out for a backend such as
    ``"eager"`` that takes no options). A new dict per call (the caller may add options)."""
    out: dict[str, Any] = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    if cuda_graphs:
        out["triton.cudagraphs"] = True
    return out


def compile_config(roles_or_backend: Any, *, fast_guards: bool = True, fullgraph: bool = False, **backend_kwargs: Any):
    """A ``transformers.CompileConfig`` that decodes with lychee in ``generate()``.

    Args:
        roles_or_backend: a role map (anything :func:`lychee_fx.backend` takes) or a
            :class:`LycheeBackend` already built (then ``backend_kwargs`` must be empty).
        fast_guards: CUDA graphs as an option and ``skip_guard_on_all_nn_modules_unsafe``
            ([Note: guard cost] says what that gives up); False: HF's defaults
            (``mode="reduce-overhead"``, every guard).
        fullgraph: passed to ``CompileConfig``.
        backend_kwargs: :func:`lychee_fx.backend`'s keyword arguments (budget, block_size, ...).

    On a CPU, HF compiles ``generate()``'s forward only with ``cc._compile_all_devices = True``
    (HF's rule, left to the caller); CUDA graphs are then skipped by Inductor.
    """
    from transformers import CompileConfig

    if isinstance(roles_or_backend, LycheeBackend):
        if backend_kwargs:
            raise TypeError(f"backend options {sorted(backend_kwargs)} given with a built LycheeBackend; "
                            "expected a role map with options, or the backend alone")
        be = roles_or_backend
    else:
        be = backend(roles_or_backend, **backend_kwargs)
    if not isinstance(fast_guards, bool):
        raise TypeError(f"fast_guards must be a bool, got {type(fast_guards).__name__} ({fast_guards!r})")
    if fast_guards:
        return CompileConfig(backend=be, fullgraph=fullgraph, mode=None, options=fast_guard_options())
    return CompileConfig(backend=be, fullgraph=fullgraph)
