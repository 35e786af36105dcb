"""The eval's tasks: prompts grouped into batches of one length, prefilled once, and the
scoring of one method batch by batch.

Every batch holds a dense prefill of all but the last prompt token of each of its rows
(prefill is never changed by the backend, SPEC 1.1), so every method decodes from the same
cache and every scored token goes through the decode path. Rows of a batch have the same
token length, so no padding or attention mask is needed.

- ``passkey``: several passkeys at seeded token depths in a haystack, each prompt exactly
  the asked length (:func:`lychee_fx.apps.passkey.exact_passkey_prompt`); greedy generation
  of the answer length plus a few tokens; exact match per key (verbatim in the output).
- ``text``: a window of prose. Perplexity: its last M tokens scored one decode step at a
  time, teacher forced. Agreement: T tokens generated greedily from the same point; the
  share of positions equal to the dense reference's tokens.
"""

from __future__ import annotations

import dataclasses
import random

import torch

from lychee_fx.apps.decoding import agreement, clone_cache, decode, prefill
from lychee_fx.apps.passkey import exact_passkey_prompt, score_answer

__all__ = ["Item", "Batch", "build_passkey_items", "build_text_items", "make_batches", "prefill_batches", "run_batch"]

# After the answer, a few more tokens: a key may follow a short detour.
_PASSKEY_SLACK = 4


@dataclasses.dataclass
class Item:
    """One prompt of one task."""

    task: str  # "passkey" | "text"
    name: str
    ids: torch.Tensor  # (1, P + 1) the prompt; the cache will hold [0, P)
    steps: int  # decode steps to generate (passkey) or to score (text)
    meta: dict
    targets: torch.Tensor | None = None  # (1, steps) text: the tokens to score
    agree_steps: int = 0  # text: greedy steps compared with the reference

    @property
    def context(self) -> int:
        return int(self.ids.shape[1])


@dataclasses.dataclass
class Batch:
    """Items of one task and one token length, stacked; ``cache`` set by :func:`prefill_batches`."""

    items: list[Item]
    ids: torch.Tensor  # (B, P + 1)
    targets: torch.Tensor | None  # (B, steps) text only
    cache: object = None  # DynamicCache of ids[:, :-1], batch B

    @property
    def task(self) -> str:
        return self.items[0].task

    @property
    def size(self) -> int:
        return len(self.items)

    @property
    def steps(self) -> int:
        """Decode steps of the batch: the most any row needs (rows score their own)."""
        return max(it.steps for it in self.items)

    @property
    def agree_steps(self) -> int:
        return max(it.agree_steps for it in self.items)

    @property
    def decode_steps(self) -> int:
        """Batched decode steps one method runs on this batch."""
        return self.steps + self.agree_steps


def _tokenise(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]  # (N,)


def build_passkey_items(tokenizer, lengths, prompts_per_length: int, num_keys: int, seed: int, haystack: str) -> list[Item]:
    """``prompts_per_length`` prompts of exactly each length in ``lengths``, each with
    ``num_keys`` keys at seeded random depths. Prompt i (counting over all lengths) uses seed
    ``seed * 100_000 + i``, so keys, depths and haystack offsets differ from prompt to prompt."""
    hay = _tokenise(tokenizer, haystack)
    items = []
    for li, length in enumerate(lengths):
        for j in range(prompts_per_length):
            i = li * prompts_per_length + j
            p = exact_passkey_prompt(tokenizer, hay, length, num_keys=num_keys, seed=seed * 100_000 + i)
            items.append(Item(
                "passkey", f"passkey/{length}/{j}", p.input_ids, p.answer_ids.shape[1] + _PASSKEY_SLACK,
                meta={"length": length, "seed": seed * 100_000 + i, "passkeys": p.passkeys, "depths": p.depths},
            ))
    return items


def build_text_items(tokenizer, length: int, count: int, score_tokens: int, agree_tokens: int, seed: int, haystack: str) -> list[Item]:
    """``count`` windows of ``length`` tokens of prose at seeded offsets.

    The cache holds the first ``length - score_tokens - 1`` tokens; decoding feeds the next
    and scores the last ``score_tokens`` of the window."""
    if length < score_tokens + 2:
        raise ValueError(f"text length must be >= score_tokens + 2 = {score_tokens + 2}, got {length}")
    rng = random.Random(seed)
    ids_all = _tokenise(tokenizer, haystack)
    if ids_all.numel() < length:
        raise ValueError(f"the haystack has {ids_all.numel()} tokens, expected at least the text length {length}")
    items = []
    for j in range(count):
        start = rng.randrange(0, ids_all.numel() - length + 1)
        window = ids_all[start : start + length][None]  # (1, length)
        cut = length - score_tokens  # the cache holds [0, cut - 1); position cut - 1 is fed first
        items.append(Item(
            "text", f"text/{length}/{j}", window[:, :cut], score_tokens,
            meta={"length": length, "start": start},
            targets=window[:, cut:], agree_steps=agree_tokens,
        ))
    return items


def make_batches(items: list[Item], batch: int) -> list[Batch]:
    """Group items by (task, token length), in first-seen order, and split each group into
    ``ceil(n / batch)`` batches of near-equal size (33 items at ``batch=32``: 17 and 16, so a
    size-1 batch, which a compiled step would specialise on, comes only from a size-1 group)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    groups: dict[tuple[str, int], list[Item]] = {}
    for it in items:
        groups.setdefault((it.task, it.context), []).append(it)
    out = []
    for group in groups.values():
        n = len(group)
        parts = -(-n // batch)
        bounds = [round(k * n / parts) for k in range(parts + 1)]
        for a, b in zip(bounds, bounds[1:]):
            rows = group[a:b]
            targets = torch.cat([it.targets for it in rows]) if rows[0].targets is not None else None
            out.append(Batch(rows, torch.cat([it.ids for it in rows]), targets))
    return out


def prefill_batches(model, batches: list[Batch], device, progress=None) -> None:
    """Move each batch to ``device`` and prefill it densely (all but its last prompt token)."""
    for b in batches:
        b.ids = b.ids.to(device)
        if b.targets is not None:
            b.targets = b.targets.to(device)
        b.cache = prefill(model, b.ids[:, :-1], progress=None if progress is None else (lambda n, s=b.size: progress(n * s)))


def cache_bytes(batches: list[Batch]) -> int:
    """Bytes of the prefilled caches ``batches`` hold (every tensor of every cache layer): the
    eval keeps all of them on the device for its whole run, so this is its floor of memory."""
    total = 0
    for b in batches:
        for layer in getattr(b.cache, "layers", None) or []:
            for t in vars(layer).values():
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def run_batch(step, dense, batch: Batch, tokenizer, *, correct_every: int = 0, reference: list[dict] | None = None,
              on_step=None) -> tuple[list[dict], dict]:
    """Decode ``batch`` with ``step`` (``dense`` for cache corrections): per-item results and
    what the batch cost.

    Per item, passkey: ``tokens``, ``text``, ``found`` (per key), ``score``; text: ``nll`` (per
    scored token), ``tokens`` (the greedy continuation) and, given the dense ``reference``
    results of the same items, ``agreement`` and ``first_divergence``. The cost: ``seconds``,
    ``decode_steps`` (batched), ``corrected`` (steps run as corrections).
    """
    first = batch.ids[:, -1:]  # (B, 1)
    if batch.task == "passkey":
        res = decode(step, dense, clone_cache(batch.cache), first, batch.steps, correct_every=correct_every, on_step=on_step)
        out = []
        for row, it in enumerate(batch.items):
            tokens = res.tokens[row, : it.steps].tolist()
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            keys = it.meta["passkeys"]
            out.append({"tokens": tokens, "text": text, "found": [k in text for k in keys], "score": score_answer(text, keys)})
        return out, {"seconds": res.seconds, "decode_steps": batch.steps, "corrected": len(res.corrected)}
    if batch.task == "text":
        scored = decode(step, dense, clone_cache(batch.cache), first, batch.steps, targets=batch.targets,
                        correct_every=correct_every, on_step=on_step)
        greedy = decode(step, dense, clone_cache(batch.cache), first, batch.agree_steps, correct_every=correct_every, on_step=on_step)
        out = []
        for row, it in enumerate(batch.items):
            r = {"nll": scored.nll[row, : it.steps].tolist(), "tokens": greedy.tokens[row, : it.agree_steps].tolist()}
            if reference is not None:
                r["agreement"], r["first_divergence"] = agreement(r["tokens"], reference[row]["tokens"])
            out.append(r)
        cost = {"seconds": scored.seconds + greedy.seconds, "decode_steps": batch.decode_steps,
                "corrected": len(scored.corrected) + len(greedy.corrected)}
        return out, cost
    raise ValueError(f"unknown task {batch.task!r}; expected 'passkey' or 'text'")
