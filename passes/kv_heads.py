"""How many KV heads the decode attention of a graph reads: what one rank holds under tensor
parallelism, read off the graph before any role map is applied.

For each decode-shaped site (one query position, 4-D q, k, v; the checks ``rewrite._plan``
makes first), the count is K's head dimension once a GQA expansion (or a ``repeat``
tiling) is folded back (``gqa.fold_kv_expansion``): ``(B, Hkv_local, N, D)``. A site whose K
arrives with as many heads as q and no fold could be multi-head attention (that count is the
truth) or K expanded by an op the pass cannot fold (it is not): its count is marked
*indefinite*, and ``lychee_fx.tensor_parallel`` never raises on an indefinite count alone.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from lychee_fx.passes.find_attention import find_attention_sites
from lychee_fx.passes.gqa import fold_kv_expansion
from lychee_fx.passes.graph_utils import fake, known_equal, known_int

__all__ = ["KVHeadCount", "decode_kv_heads"]


@dataclasses.dataclass(frozen=True)
class KVHeadCount:
    """The KV heads one decode site reads."""

    node: str  # the attention output's FX node name
    kv_heads: int  # Hkv_local: K's head dim after folding (B, Hkv_local, N, D)
    query_heads: int  # Hq_local
    definite: bool  # False when K may be expanded to the query heads by an unfoldable op


def decode_kv_heads(graph: fx.Graph) -> list[KVHeadCount]:
    """One entry per decode-shaped attention site with constant head counts, in graph order.

    Sites the pass declines before it looks at heads (prefill, a problem in the pattern,
    unknown shapes, symbolic head counts) are left out: no role-map column is read for them.
    """
    out = []
    for site in find_attention_sites(graph):
        if site.problem or site.v is None:
            continue
        qf, kf = fake(site.q), fake(site.k)
        if qf is None or kf is None or qf.dim() != 4 or kf.dim() != 4 or not known_equal(qf.shape[2], 1):
            continue
        hq = known_int(qf.shape[1])
        folded = fold_kv_expansion(site.k, tiling=True)
        base = fake(folded.base) if folded is not None else kf
        hk = known_int(base.shape[1]) if base is not None else None
        if hq is None or hk is None or hk < 1:
            continue
        definite = folded is not None or hk != hq or site.enable_gqa or hq == 1
        out.append(KVHeadCount(site.out.name, hk, hq, definite))
    return out
