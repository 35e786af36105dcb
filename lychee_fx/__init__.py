"""lychee_fx: LycheeDecode hybrid-head sparse decoding as a ``torch.compile`` backend.

    import lychee_fx
    compiled = torch.compile(model, backend=lychee_fx.backend(roles))
    out = model.generate(ids, past_key_values=cache, compile_config=lychee_fx.compile_config(roles))

Importing this package registers the ``torch.ops.lychee`` ops and changes no global config.
"""

from lychee_fx import ops, reference
from lychee_fx.backend import LycheeBackend, backend
from lychee_fx.generate_config import compile_config
from lychee_fx.learn import LearnConfig, learn_roles
from lychee_fx.options import DecodeOptions
from lychee_fx.passes.rewrite import RoleMapMismatch
from lychee_fx.report import CompileReport, SiteReport
from lychee_fx.roles import HeadRoles
from lychee_fx.tensor_parallel import HeadShard, TensorParallelMismatch

__all__ = [
    "backend",
    "compile_config",
    "LycheeBackend",
    "HeadRoles",
    "DecodeOptions",
    "learn_roles",
    "LearnConfig",
    "CompileReport",
    "SiteReport",
    "RoleMapMismatch",
    "TensorParallelMismatch",
    "HeadShard",
    "ops",
    "reference",
]
__version__ = "0.1.0"
