"""``python -m tests.mutation_check``: what Inductor's mutation analysis says each lychee
kernel writes, as one JSON line ``{kernel: [argument names]}`` (``test_kernels`` reads it).

Runs without Triton's interpreter (the analysis reads a ``JITFunction``'s TTIR) against an
sm_90 target, so no GPU is needed: every launch of one hybrid (selecting and not), retrieval
and sparse op is handed to ``identify_accessed_tensors`` (torch 2.13) instead of launched.
Exit 3 (with a line saying why) where this torch has no such API.
"""

from __future__ import annotations

import json
import sys

import torch


def main() -> int:
    import torch._higher_order_ops.triton_kernel_wrap as tkw
    import triton
    from triton.backends.compiler import GPUTarget

    if not hasattr(tkw, "identify_accessed_tensors"):
        print("torch 2.13's identify_accessed_tensors is missing (2.11's API is checked by test_gpu)")
        return 3
    from lychee_fx.codegen import launch

    class Sm90:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    seen: dict[str, set[str]] = {}

    def analyse(kernel, grid, traced, *args, **kwargs):
        kw = dict(zip(kernel.arg_names, args))
        kw.update({k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")})
        res = tkw.identify_accessed_tensors(kernel, kw, {})
        seen.setdefault(kernel.__name__, set()).update(
            d.name for d in res.read_writes.writes if isinstance(kw.get(d.name), torch.Tensor))

    launch._launch = analyse
    launch._sm_count = lambda dev: 132
    triton.runtime.driver.set_active(Sm90())
    b, hkv, g, n, d = 2, 2, 4, 1024, 64
    q, k, v = torch.randn(b, hkv * g, 1, d).half(), torch.randn(b, hkv, n, d).half(), torch.randn(b, hkv, n, d).half()
    mask = torch.ones(b, n, dtype=torch.bool)
    sel = torch.zeros(b, hkv, 16, dtype=torch.int32)
    for select in (True, False):
        launch.hybrid_plan(q, k, v, mask, sel, [0], [1], 0.125, 16, 16, 16, 32, select).run()
    launch.retrieval_plan(q, k, v, mask, sel, [0], 0.125, 16, 16, 16, 32, True).run()
    launch.sparse_plan(q, k, v, mask, sel, [1], 0.125, 16).run()
    print(json.dumps({name: sorted(names) for name, names in seen.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
