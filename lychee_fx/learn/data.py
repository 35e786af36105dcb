"""Offline training data for role learning: synthetic multi-passkey prompts.

Several passkeys of a few words hidden at random depths in a haystack of prose (any UTF-8
text file, by default the documentation topics every Python install ships in
``pydoc_data.topics``), then a question asking for them; the answer is teacher forced.
No network is needed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from lychee_fx.apps.passkey import haystack_text, make_passkey_prompt

__all__ = ["passkey_training_data", "as_pairs"]


def passkey_training_data(
    tokenizer,
    *,
    num_prompts: int = 16,
    context_tokens: tuple[int, int] = (1024, 2048),
    num_keys: int = 3,
    seed: int = 0,
    haystack: str | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``num_prompts`` (prompt_ids (1, P), answer_ids (1, A)) pairs, seeded.

    Prompt ``i`` has a length drawn uniformly from ``context_tokens`` (inclusive), its own
    passkeys and depths, and a haystack rotated to a random sentence.
    """
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int):
        raise TypeError(f"num_prompts must be an int, got {type(num_prompts).__name__}")
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    if (
        not isinstance(context_tokens, (tuple, list))
        or len(context_tokens) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in context_tokens)
    ):
        raise TypeError(f"context_tokens must be a pair of ints (low, high), got {context_tokens!r}")
    low, high = context_tokens
    if not 64 <= low <= high:
        raise ValueError(f"context_tokens must satisfy 64 <= low <= high, got ({low}, {high})")
    text = haystack_text() if haystack is None else haystack
    rng = random.Random(seed)
    pairs = []
    for i in range(num_prompts):
        length = rng.randint(low, high)
        prompt = make_passkey_prompt(
            tokenizer, length, num_keys=num_keys, seed=rng.randrange(1 << 30), haystack=text
        )
        pairs.append((prompt.input_ids, prompt.answer_ids))
    return pairs


def as_pairs(data: Sequence) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Training data as (prompt_ids, answer_ids) pairs: accepts pairs or objects with
    ``input_ids`` and ``answer_ids`` (``lychee_fx.apps.passkey.PasskeyPrompt``)."""
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence):
        raise TypeError(f"data must be a sequence of (prompt_ids, answer_ids) pairs, got {type(data).__name__}")
    if not data:
        raise ValueError("data must hold at least one example, got 0")
    pairs = []
    for i, item in enumerate(data):
        if hasattr(item, "input_ids") and hasattr(item, "answer_ids"):
            pairs.append((item.input_ids, item.answer_ids))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            pairs.append((item[0], item[1]))
        else:
            raise TypeError(
                f"data[{i}] must be a (prompt_ids, answer_ids) pair or a PasskeyPrompt, got {type(item).__name__}"
            )
    return pairs
