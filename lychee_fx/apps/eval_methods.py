"""The methods the eval compares, all through the same backend: only the role map, the
options or the cache correction differ.

    full          every KV head retrieval (SPEC 1.1: equals full attention)
    lychee        the learned map (or the map given / the stated default)
    random        the same number of retrieval KV heads drawn at random (layer 0 kept)
    tidal         TidalDecode: whole layers retrieval, about the same count
    sink+recent   the lower bound: layer-0 selection only, at the smallest budget the
                  options allow, ``ceil(sink/bs) + ceil(recent/bs) + 2`` blocks; the backend
                  always fills the selection with top-k blocks, so this is sink + recent +
                  the one or two best blocks layer 0 picked, reused by every later layer
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from lychee_fx.backend import LycheeBackend
from lychee_fx.options import DecodeOptions
from lychee_fx.roles import HeadRoles
from lychee_fx.apps.shipped_roles import tidal_layers

__all__ = ["FAMILIES", "Method", "build_methods", "lower_bound_options"]

FAMILIES = ("full", "lychee", "random", "tidal", "sink+recent")


@dataclasses.dataclass(frozen=True)
class Method:
    """One configuration to evaluate."""

    family: str  # one of FAMILIES
    label: str  # what it is, in words
    roles: HeadRoles
    options: DecodeOptions
    correct_every: int = 0  # SPEC 1.3 cache correction period, 0 = none

    @property
    def key(self) -> str:
        o = self.options
        tail = f"/c{self.correct_every}" if self.correct_every else ""
        return f"{self.family}/b{o.budget}/bs{o.block_size}{tail}"

    def backend(self, compiler: str) -> LycheeBackend:
        return LycheeBackend(self.roles, self.options, compiler=compiler)

    def as_dict(self) -> dict:
        return {
            "key": self.key, "family": self.family, "label": self.label,
            "retrieval_kv_heads": self.roles.num_retrieval, "role_digest": self.roles.digest(),
            "retrieval": [[int(x) for x in row] for row in self.roles.table.tolist()],
            **self.options.as_dict(), "correct_every": self.correct_every,
        }


def lower_bound_options(block_size: int, sink: int, recent: int) -> DecodeOptions:
    """The smallest budget the options allow: the forced blocks plus the two SPEC 1.1 keeps
    free for misaligned sink and recent ranges."""
    probe = DecodeOptions(budget=block_size * 10**6, block_size=block_size, sink=sink, recent=recent)
    return DecodeOptions(budget=probe.min_num_blocks * block_size, block_size=block_size, sink=sink, recent=recent)


def build_methods(
    lychee: HeadRoles,
    lychee_label: str,
    *,
    budgets: Sequence[int],
    block_sizes: Sequence[int],
    sink: int,
    recent: int,
    headline: tuple[int, int],
    correct_every: int = 0,
    seed: int = 0,
    families: Sequence[str] = FAMILIES,
) -> list[Method]:
    """Every method at every (budget, block size), full attention once (at ``headline``),
    the lower bound once per block size, and, with ``correct_every``, lychee again at
    ``headline`` with cache correction."""
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown method families {unknown}; expected some of {list(FAMILIES)}")
    if headline[0] not in budgets or headline[1] not in block_sizes:
        raise ValueError(f"the headline (budget, block size) {headline} must be in the grid: budgets {list(budgets)}, block sizes {list(block_sizes)}")
    num_layers, hkv = lychee.num_layers, lychee.num_kv_heads
    count = lychee.num_retrieval
    tidal_count = min(num_layers, max(1, round(count / hkv)))
    layers = tidal_layers(num_layers, tidal_count)
    maps = {
        "lychee": (lychee, lychee_label),
        "random": (
            HeadRoles.random(num_layers, hkv, count=max(count, hkv), seed=seed, force_layer0=True),
            f"random map, {max(count, hkv)} retrieval KV heads (layer 0 all, the rest uniform, seed {seed})",
        ),
        "tidal": (
            HeadRoles.tidal_decode(num_layers, hkv, layers),
            f"TidalDecode schedule, retrieval layers {layers} ({len(layers) * hkv} KV heads)",
        ),
    }

    def opts(budget: int, bs: int) -> DecodeOptions:
        return DecodeOptions(budget=budget, block_size=bs, sink=sink, recent=recent)

    out: list[Method] = []
    if "full" in families:
        out.append(Method("full", "full attention (every KV head retrieval)", HeadRoles.all_retrieval(num_layers, hkv), opts(*headline)))
    for fam in ("lychee", "random", "tidal"):
        if fam in families:
            roles, label = maps[fam]
            out += [Method(fam, label, roles, opts(b, bs)) for bs in block_sizes for b in budgets]
    if "sink+recent" in families:
        for bs in block_sizes:
            o = lower_bound_options(bs, sink, recent)
            label = (f"lower bound: layer 0 retrieval only, budget {o.budget} = {o.num_blocks} blocks of {bs} "
                     f"(sink {sink} + recent {recent} + top-k fill to the minimum)")
            out.append(Method("sink+recent", label, HeadRoles.tidal_decode(num_layers, hkv, [0]), o))
    if correct_every and "lychee" in families:
        roles, label = maps["lychee"]
        out.append(Method("lychee", f"{label}; cache correction every {correct_every} tokens", roles, opts(*headline), correct_every))
    return out
