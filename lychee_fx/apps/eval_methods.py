"""The methods the eval compares. All but ``duo`` run through the same backend: only the role
map, the options or the cache correction differ.

    full          every KV head retrieval (SPEC 1.1: equals full attention)
    lychee        the learned map (or the map given / the stated default)
    map           extra role maps (``--maps``), labelled by their retrieval KV head count:
                  the cost-quality curve
    random        the same number of retrieval KV heads drawn at random (layer 0 kept), one
                  method per seed
    tidal         TidalDecode: whole layers retrieval, about the same count
    duo           DuoAttention-style: the lychee map's retrieval heads at full attention, the
                  other KV heads over the first ``sink`` and the last ``budget - sink`` slots
                  (``eval_duo``, through transformers' AttentionInterface, not the backend)
    sink+recent   the lower bound: layer-0 selection only, at the smallest budget the
                  options allow, ``ceil(sink/bs) + ceil(recent/bs) + 2`` blocks; the backend
                  always fills the selection with top-k blocks, so this is sink + recent +
                  the one or two best blocks layer 0 picked, reused by every later layer
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

from lychee_fx.backend import LycheeBackend
from lychee_fx.options import DecodeOptions
from lychee_fx.roles import HeadRoles
from lychee_fx.apps.shipped_roles import tidal_layers

__all__ = ["FAMILIES", "Method", "build_methods", "lower_bound_options"]

FAMILIES = ("full", "lychee", "map", "random", "tidal", "duo", "sink+recent")


@dataclasses.dataclass(frozen=True)
class Method:
    """One configuration to evaluate."""

    family: str  # one of FAMILIES
    label: str  # what it is, in words
    roles: HeadRoles
    options: DecodeOptions  # duo: budget and block size place it in the tables; its window is ``stream``
    correct_every: int = 0  # SPEC 1.3 cache correction period, 0 = none
    tag: str = ""  # tells apart methods of one family at the same options (random seed, map count)
    stream: tuple[int, int] | None = None  # duo: (sink, recent) slots of its streaming heads

    @property
    def key(self) -> str:
        o = self.options
        tail = f"/c{self.correct_every}" if self.correct_every else ""
        return f"{self.family}{self.tag}/b{o.budget}/bs{o.block_size}{tail}"

    @property
    def uses_backend(self) -> bool:
        return self.family != "duo"

    def backend(self, compiler: str) -> LycheeBackend:
        if not self.uses_backend:
            raise ValueError(f"method {self.key} does not run through the lychee backend")
        return LycheeBackend(self.roles, self.options, compiler=compiler)

    def attention(self, model):
        """A context in which the plain ``model`` runs this method (duo only)."""
        from lychee_fx.apps.eval_duo import DuoAttention, duo_attention

        if self.stream is None:
            return contextlib.nullcontext()
        return duo_attention(model, DuoAttention(self.roles, *self.stream))

    def as_dict(self) -> dict:
        return {
            "key": self.key, "family": self.family, "tag": self.tag, "label": self.label,
            "retrieval_kv_heads": self.roles.num_retrieval, "role_digest": self.roles.digest(),
            "retrieval": [[int(x) for x in row] for row in self.roles.table.tolist()],
            **self.options.as_dict(), "correct_every": self.correct_every,
            "stream": list(self.stream) if self.stream else None,
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
    family_budgets: Sequence[int] = (),
    correct_every: int = 0,
    seed: int = 0,
    random_seeds: int = 1,
    families: Sequence[str] = FAMILIES,
    maps: Sequence[tuple[HeadRoles, str]] = (),
    map_budgets: Sequence[int] | None = None,
) -> list[Method]:
    """The grid: full attention once (at ``headline``); lychee at every (budget, block size);
    random (``random_seeds`` seeds from ``seed``), tidal and duo at the headline and at every
    budget of ``family_budgets``, at the headline block size; the lower bound once per block
    size; each of ``maps`` at every budget of ``map_budgets`` (default ``budgets``) at the
    headline block size; with ``correct_every``, lychee again at ``headline`` with cache
    correction."""
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown method families {unknown}; expected some of {list(FAMILIES)}")
    if headline[0] not in budgets or headline[1] not in block_sizes:
        raise ValueError(f"the headline (budget, block size) {headline} must be in the grid: budgets {list(budgets)}, block sizes {list(block_sizes)}")
    if random_seeds < 1:
        raise ValueError(f"random_seeds must be >= 1, got {random_seeds}")
    num_layers, hkv = lychee.num_layers, lychee.num_kv_heads
    for roles, label in maps:
        if (roles.num_layers, roles.num_kv_heads) != (num_layers, hkv):
            raise ValueError(f"map {label} is {roles.num_layers} x {roles.num_kv_heads}; expected {num_layers} layers x {hkv} KV heads")
    count = lychee.num_retrieval
    tidal_count = min(num_layers, max(1, round(count / hkv)))
    layers = tidal_layers(num_layers, tidal_count)
    rcount = max(count, hkv)
    bs0 = headline[1]
    fam_budgets = sorted({headline[0], *family_budgets}, reverse=True)

    def opts(budget: int, bs: int) -> DecodeOptions:
        return DecodeOptions(budget=budget, block_size=bs, sink=sink, recent=recent)

    out: list[Method] = []
    if "full" in families:
        out.append(Method("full", "full attention (every KV head retrieval)", HeadRoles.all_retrieval(num_layers, hkv), opts(*headline)))
    if "lychee" in families:
        out += [Method("lychee", lychee_label, lychee, opts(b, bs)) for bs in block_sizes for b in budgets]
    if "random" in families:
        for s in range(seed, seed + random_seeds):
            roles = HeadRoles.random(num_layers, hkv, count=rcount, seed=s, force_layer0=True)
            label = f"random map, {rcount} retrieval KV heads (layer 0 all, the rest uniform, seed {s})"
            out += [Method("random", label, roles, opts(b, bs0), tag=f"{s}") for b in fam_budgets]
    if "tidal" in families:
        roles = HeadRoles.tidal_decode(num_layers, hkv, layers)
        label = f"TidalDecode schedule, retrieval layers {layers} ({len(layers) * hkv} KV heads)"
        out += [Method("tidal", label, roles, opts(b, bs0)) for b in fam_budgets]
    if "duo" in families:
        for b in fam_budgets:
            if b <= sink:
                raise ValueError(f"the duo baseline at budget {b} needs budget > sink = {sink}")
            label = (f"DuoAttention-style: the lychee map's {count} retrieval KV heads at full attention, the others over "
                     f"the first {sink} + last budget - {sink} slots")
            out.append(Method("duo", label, lychee, opts(b, bs0), stream=(sink, b - sink)))
    if "sink+recent" in families:
        for bs in block_sizes:
            o = lower_bound_options(bs, sink, recent)
            label = (f"lower bound: layer 0 retrieval only, budget {o.budget} = {o.num_blocks} blocks of {bs} "
                     f"(sink {sink} + recent {recent} + top-k fill to the minimum)")
            out.append(Method("sink+recent", label, HeadRoles.tidal_decode(num_layers, hkv, [0]), o))
    if "map" in families:
        seen: dict[int, int] = {}
        for roles, label in maps:
            n = roles.num_retrieval
            seen[n] = seen.get(n, 0) + 1
            tag = f"{n}" if seen[n] == 1 else f"{n}.{seen[n]}"
            out += [Method("map", f"{label} ({n} retrieval KV heads)", roles, opts(b, bs0), tag=tag)
                    for b in (budgets if map_budgets is None else map_budgets)]
    if correct_every and "lychee" in families:
        out.append(Method("lychee", f"{lychee_label}; cache correction every {correct_every} tokens", lychee, opts(*headline), correct_every))
    return out
