"""Inductor lowerings and the Triton kernels they generate for the lychee ops on CUDA.

    attention_kernels.py  split-KV decode attention (retrieval and sparse) and the LSE merge
    select_kernel.py      SPEC 1.1 block selection fused with the retrieval merge
    launch.py             launchers: splits, configs and their pruning rule, allocation
    linear.py             decode_linear: a decode step's matrix-vector products, several
                          weights per launch, with its launcher and configs
    lowering.py           registers the launchers for the op contracts (eager CUDA kernels,
                          and trace-through for Inductor so the kernels land in its code)

``available()`` says whether Triton can be used here; ``register()`` installs the kernels.
The backend calls ``register()`` when it compiles a graph; nothing happens at import.
"""

from __future__ import annotations

import importlib.util

__all__ = ["available", "register"]


def available() -> bool:
    return importlib.util.find_spec("triton") is not None


def register() -> None:
    """Install the Triton kernels for the lychee ops (idempotent; needs triton)."""
    from lychee_fx.codegen.lowering import register as _register

    _register()
