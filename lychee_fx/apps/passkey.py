"""Synthetic multi-passkey retrieval prompts, built offline from any text.

A haystack of prose (by default the documentation topics in the standard library's
``pydoc_data.topics``, which every Python install has) with several passkeys of a few words
hidden at chosen depths, then a question asking for them. Used to learn head roles
(``learn_roles``) and to measure retrieval accuracy (``eval``).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["haystack_text", "PasskeyPrompt", "make_passkey_prompt", "exact_passkey_prompt", "score_answer"]

_WORDS = (
    "amber anchor apple arrow autumn basil beacon birch bison bramble breeze cactus canyon cedar "
    "cherry cobalt comet copper coral cricket crystal cypress dahlia delta dune ember falcon fern "
    "fjord garnet glacier granite harbor hazel heron indigo iris ivory jasper juniper kestrel lagoon "
    "lantern lilac linen lotus maple marble meadow mesa meteor mint nectar nutmeg oasis olive onyx "
    "orchid otter pebble pepper pine plum prairie quartz quill raven reef river saffron sage "
    "sapphire sequoia silver sparrow spruce summit thistle thunder topaz tulip tundra valley velvet "
    "violet walnut willow winter yarrow zephyr"
).split()


def haystack_text(path: str | Path | None = None) -> str:
    """Prose to hide passkeys in: a UTF-8 text file, or Python's own documentation topics."""
    if path is not None:
        return Path(path).read_text(encoding="utf-8")
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


@dataclasses.dataclass
class PasskeyPrompt:
    input_ids: torch.Tensor  # (1, T) prompt, ready for generate()
    answer_ids: torch.Tensor  # (1, A) the expected answer tokens (for teacher forcing)
    passkeys: list[str]
    depths: list[float]  # where each passkey sits, as a fraction of the haystack
    text: str


def _passkey(rng: random.Random, words: int) -> str:
    return "-".join(rng.choice(_WORDS) for _ in range(words)) + f"-{rng.randrange(100, 1000)}"


def make_passkey_prompt(
    tokenizer,
    context_tokens: int,
    *,
    num_keys: int = 3,
    words: int = 2,
    depths: Sequence[float] | None = None,
    seed: int = 0,
    haystack: str | None = None,
) -> PasskeyPrompt:
    """A prompt of about ``context_tokens`` tokens with ``num_keys`` passkeys hidden in it.

    ``depths`` (fractions in [0, 1]) place the keys; by default they are drawn at random.
    The prompt is a plain completion that ends with the start of the answer
    (``Answer: The magic code number 1 is``): small instruction-tuned models answer it far
    more reliably than a chat turn. ``answer_ids`` continue it:
    `` <key 1>. The magic code number 2 is <key 2>. ...``.
    """
    if num_keys < 1:
        raise ValueError(f"num_keys must be >= 1, got {num_keys}")
    rng = random.Random(seed)
    keys = [_passkey(rng, words) for _ in range(num_keys)]
    if depths is None:
        depths = sorted(rng.uniform(0.05, 0.95) for _ in range(num_keys))
    elif len(depths) != num_keys or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be {num_keys} fractions in [0, 1], got {list(depths)}")
    needles, tail, answer = _needles_and_tail(keys)

    text = haystack if haystack is not None else haystack_text()
    sentences = re.split(r"(?<=[.!?])\s+", text)
    start = rng.randrange(len(sentences))
    sentences = sentences[start:] + sentences[:start]
    overhead = len(tokenizer(tail + "".join(needles))["input_ids"]) + 8
    budget = max(0, context_tokens - overhead)
    body, used = [], 0
    for s in sentences:
        n = len(tokenizer(s, add_special_tokens=False)["input_ids"]) + 1
        if used + n > budget:
            break
        body.append(s)
        used += n
    cuts = [round(d * len(body)) for d in depths]
    for i in reversed(range(num_keys)):
        body.insert(cuts[i], needles[i])
    content = " ".join(body) + tail
    ids = tokenizer(content, return_tensors="pt")["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return PasskeyPrompt(ids, answer_ids, keys, list(depths), content)


def _needles_and_tail(keys: Sequence[str]) -> tuple[list[str], str, str]:
    needles = [
        f" The magic code number {i + 1} is {k}. Remember it: magic code {i + 1} is {k}. "
        for i, k in enumerate(keys)
    ]
    tail = "\n\nQuestion: what are the magic codes in the text above?\nAnswer: The magic code number 1 is"
    answer = " " + " ".join(
        f"{k}." if i == 0 else f"The magic code number {i + 1} is {k}." for i, k in enumerate(keys)
    )
    return needles, tail, answer


def exact_passkey_prompt(
    tokenizer, haystack_ids: torch.Tensor, context_tokens: int, *, num_keys: int = 2, words: int = 2, seed: int = 0
) -> PasskeyPrompt:
    """A prompt of exactly ``context_tokens`` tokens (the eval batches prompts of one length
    without padding), built in token space: a window of the tokenised haystack
    ``haystack_ids`` (N,) from a seeded offset, the needles' tokens spliced in at seeded
    depths, the question's tokens at the end. ``depths`` are the needles' token positions
    as fractions of the prompt. The same needles, question and answer as
    :func:`make_passkey_prompt`; the pieces are tokenised separately, so the prompt is a
    valid token sequence though not always the one the joined text tokenises to.
    """
    if num_keys < 1:
        raise ValueError(f"num_keys must be >= 1, got {num_keys}")
    if haystack_ids.dim() != 1:
        raise ValueError(f"expected haystack_ids of shape (N,), got {tuple(haystack_ids.shape)}")
    rng = random.Random(seed)
    keys = [_passkey(rng, words) for _ in range(num_keys)]
    needles, tail, answer = _needles_and_tail(keys)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    needle_ids, tail_ids = [ids(x) for x in needles], ids(tail)
    body = context_tokens - len(tail_ids) - sum(map(len, needle_ids))
    if body < num_keys:
        raise ValueError(f"context of {context_tokens} tokens is too short for {num_keys} keys and the question: "
                         f"expected at least {context_tokens - body + num_keys}")
    if haystack_ids.numel() < body:
        raise ValueError(f"the haystack has {haystack_ids.numel()} tokens, expected at least {body}")
    start = rng.randrange(0, haystack_ids.numel() - body + 1)
    hay = haystack_ids[start : start + body].tolist()
    cuts = sorted(rng.randrange(round(0.05 * body), round(0.95 * body) + 1) for _ in range(num_keys))
    out, at, depths = [], 0, []
    for cut, nid in zip(cuts, needle_ids):
        out += hay[at:cut]
        depths.append(len(out) / context_tokens)
        out += nid
        at = cut
    out += hay[at:] + tail_ids
    input_ids = torch.tensor([out], dtype=torch.long)  # (1, context_tokens)
    answer_ids = torch.tensor([ids(answer)], dtype=torch.long)  # (1, A)
    return PasskeyPrompt(input_ids, answer_ids, keys, depths, tokenizer.decode(out))


def score_answer(generated: str, passkeys: Sequence[str]) -> float:
    """Share of passkeys that appear verbatim in the generated text."""
    return sum(k in generated for k in passkeys) / len(passkeys)
