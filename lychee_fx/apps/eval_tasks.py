"""The eval's tasks: prompts prefilled once, a dense reference, and the scoring of one method.

Every item holds a dense prefill of all but its last prompt token (prefill is never changed
by the backend, SPEC 1.1), so every method decodes from the same cache and every scored
token goes through the decode path.

- ``passkey``: several passkeys at seeded random depths in a haystack
  (:func:`lychee_fx.apps.passkey.make_passkey_prompt`); greedy generation of the answer length
  plus a few tokens; exact match per key (the key appears verbatim in the output).
- ``text``: a window of prose. Perplexity: its last M tokens scored one decode step at a
  time, teacher forced. Agreement: T tokens generated greedily from the same point; the
  share of positions equal to full attention's tokens (the dense reference).
"""

from __future__ import annotations

import dataclasses
import math
import random

import torch

from lychee_fx.apps.decoding import DecodeResult, agreement, clone_cache, decode, prefill
from lychee_fx.apps.passkey import make_passkey_prompt, score_answer

__all__ = ["Item", "build_passkey_items", "build_text_items", "run_item", "prefill_items", "summarise"]

# After the answer, a few more tokens: a key may follow a short detour.
_PASSKEY_SLACK = 4


@dataclasses.dataclass
class Item:
    """One prompt of one task, its dense prefill and its dense reference."""

    task: str  # "passkey" | "text"
    name: str
    ids: torch.Tensor  # (1, P + 1) the prompt; the cache will hold [0, P)
    steps: int  # decode steps to generate (passkey) or to score (text)
    meta: dict
    targets: torch.Tensor | None = None  # (1, steps) text: the tokens to score
    agree_steps: int = 0  # text: greedy steps compared with the reference
    cache: object = None  # DynamicCache of ids[:, :-1], set by prefill_items
    ref: dict | None = None  # the dense model's results (run_item with the plain model)

    @property
    def context(self) -> int:
        return int(self.ids.shape[1])


def build_passkey_items(tokenizer, lengths, prompts_per_length: int, num_keys: int, seed: int, haystack: str) -> list[Item]:
    """``prompts_per_length`` prompts per context length, each with ``num_keys`` keys at
    random depths. Prompt i (counting over all lengths) uses seed ``seed * 100_000 + i``, so
    keys, depths and haystack offsets differ from prompt to prompt."""
    items = []
    for li, length in enumerate(lengths):
        for j in range(prompts_per_length):
            i = li * prompts_per_length + j
            p = make_passkey_prompt(tokenizer, length, num_keys=num_keys, seed=seed * 100_000 + i, haystack=haystack)
            items.append(Item(
                "passkey", f"passkey/{length}/{j}", p.input_ids, p.answer_ids.shape[1] + _PASSKEY_SLACK,
                meta={"length": length, "seed": seed * 100_000 + i, "passkeys": p.passkeys, "depths": p.depths},
            ))
    return items


def build_text_items(tokenizer, length: int, count: int, score_tokens: int, agree_tokens: int, seed: int, haystack: str) -> list[Item]:
    """``count`` windows of ``length`` tokens of prose, starting at seeded sentence starts.

    The cache holds the first ``length - score_tokens - 1`` tokens; decoding feeds the next
    and scores the last ``score_tokens`` of the window."""
    if length < score_tokens + 2:
        raise ValueError(f"text length must be >= score_tokens + 2 = {score_tokens + 2}, got {length}")
    rng = random.Random(seed)
    ids_all = tokenizer(haystack, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
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


def prefill_items(model, items: list[Item], progress=None) -> None:
    """Dense prefill of every item (all but its last prompt token)."""
    for item in items:
        item.cache = prefill(model, item.ids[:, :-1], progress=progress)


def run_item(step, dense, item: Item, tokenizer, *, correct_every: int = 0, on_step=None) -> dict:
    """Decode ``item`` with ``step`` (and ``dense`` for cache corrections); the raw results.

    passkey: ``tokens``, ``text``, ``found`` (per key), ``score``. text: ``nll`` (per scored
    token), ``tokens`` (the greedy continuation). Plus ``seconds`` per decode step.
    """
    first = item.ids[:, -1:]
    if item.task == "passkey":
        res = decode(step, dense, clone_cache(item.cache), first, item.steps, correct_every=correct_every, on_step=on_step)
        text = tokenizer.decode(res.tokens, skip_special_tokens=True)
        keys = item.meta["passkeys"]
        return {"tokens": res.tokens, "text": text, "found": [k in text for k in keys],
                "score": score_answer(text, keys), "seconds": res.seconds, "corrected": len(res.corrected)}
    if item.task == "text":
        scored: DecodeResult = decode(step, dense, clone_cache(item.cache), first, item.steps, targets=item.targets,
                                      correct_every=correct_every, on_step=on_step)
        greedy = decode(step, dense, clone_cache(item.cache), first, item.agree_steps, correct_every=correct_every, on_step=on_step)
        return {"nll": scored.nll, "tokens": greedy.tokens, "seconds": scored.seconds + greedy.seconds,
                "corrected": len(scored.corrected) + len(greedy.corrected)}
    raise ValueError(f"unknown task {item.task!r}; expected 'passkey' or 'text'")


def summarise(items: list[Item], results: list[dict]) -> dict:
    """Task metrics of one method from its per-item results (in ``items`` order)."""
    out: dict = {"passkey": None, "perplexity": None, "agreement": None}
    pk = [(it, r) for it, r in zip(items, results) if it.task == "passkey"]
    if pk:
        found = [f for _, r in pk for f in r["found"]]
        by_len: dict[int, list[bool]] = {}
        by_depth: dict[str, list[bool]] = {}
        for it, r in pk:
            by_len.setdefault(it.meta["length"], []).extend(r["found"])
            for d, f in zip(it.meta["depths"], r["found"]):
                by_depth.setdefault(_depth_bucket(d), []).append(f)
        out["passkey"] = {
            "accuracy": sum(found) / len(found), "keys": len(found),
            "by_length": {str(k): sum(v) / len(v) for k, v in sorted(by_len.items())},
            "by_depth": {k: sum(v) / len(v) for k, v in sorted(by_depth.items())},
        }
    tx = [(it, r) for it, r in zip(items, results) if it.task == "text"]
    if tx:
        nll = [x for _, r in tx for x in r["nll"]]
        agree = [agreement(r["tokens"], it.ref["tokens"]) for it, r in tx]
        out["perplexity"] = math.exp(sum(nll) / len(nll))
        out["agreement"] = sum(a for a, _ in agree) / len(agree)
        out["first_divergence"] = [f for _, f in agree]
    steps = [s for r in results for s in r["seconds"]]
    out["decode_steps"] = len(steps)
    out["corrections"] = sum(r["corrected"] for r in results)
    return out


def _depth_bucket(depth: float) -> str:
    """Thirds of the haystack: "0.00-0.33", "0.33-0.67", "0.67-1.00"."""
    i = min(2, int(depth * 3))
    return f"{i / 3:.2f}-{(i + 1) / 3:.2f}"

