"""Training examples for role learning: a prompt prefilled once, a teacher-forced answer.

The prompt (haystack and question) is prefilled once, without gradients, with the model's
own attention: at inference it is prefill too, which SPEC 1.1 never changes. What the
student trains on is only the answer, teacher forced: each answer token is one decoding
step, and the loss compares the student's final hidden states there with the frozen
full-attention model's.

Shapes: P prompt tokens, A answer tokens, L layers, Hkv KV heads, D head dim, H hidden size.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from lychee_fx.learn.student import StudentAttention

__all__ = ["TailExample", "prepare_example", "student_hidden", "roles_mse", "cache_kwarg"]


@dataclasses.dataclass
class TailExample:
    """One prompt, prefilled, and its answer.

    answer_ids  (1, A) long: the teacher-forced answer tokens
    prompt_kv   L pairs (k, v), each (1, Hkv, P, D): the prompt's cache, full attention
    target      (1, A, H): the full-attention model's final hidden states at the answer
    """

    answer_ids: torch.Tensor
    prompt_kv: list[tuple[torch.Tensor, torch.Tensor]]
    target: torch.Tensor

    @property
    def prompt_len(self) -> int:
        return int(self.prompt_kv[0][0].shape[2])


def _check_ids(name: str, ids: object) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of token ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ValueError(f"{name} must have shape (1, length >= 1), got {tuple(ids.shape)}")
    return ids.long()


def cache_kwarg(model) -> str:
    """The keyword under which this transformers version's base model takes a cache."""
    params = inspect.signature(model.base_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(model, kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
    from transformers import DynamicCache

    # Filling a cache concatenates onto empty layers: the stored tensors are copied, never
    # aliased, so a training step cannot change them.
    return DynamicCache(ddp_cache_data=kv, config=model.config) if kv else DynamicCache(config=model.config)


@torch.no_grad()
def prepare_example(model, prompt_ids: torch.Tensor, answer_ids: torch.Tensor) -> TailExample:
    """Run the frozen model once over prompt + answer with its own (full) attention.

    prompt_ids (1, P), answer_ids (1, A) -> a :class:`TailExample` holding the prompt's cache
    and the teacher's final hidden states at the A answer positions.
    """
    prompt_ids = _check_ids("prompt_ids", prompt_ids)
    answer_ids = _check_ids("answer_ids", answer_ids)
    device = next(model.parameters()).device
    ids = torch.cat([prompt_ids, answer_ids], dim=1).to(device)  # (1, P + A)
    p = prompt_ids.shape[1]
    cache = _new_cache(model)
    out = model.base_model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
    target = out.last_hidden_state[:, p:].detach().clone()  # (1, A, H)
    kv = [(layer.keys[:, :, :p].clone(), layer.values[:, :, :p].clone()) for layer in cache.layers]
    return TailExample(answer_ids.to(device), kv, target)


def student_hidden(
    model, attention: StudentAttention, example: TailExample, gates: torch.Tensor, host_gates: torch.Tensor | None = None
) -> torch.Tensor:
    """The student's final hidden states (1, A, H) on the answer, with gates (L, Hkv) on
    the model's device (``host_gates``: the same on the CPU, see :meth:`StudentAttention.begin`).

    Must run inside :func:`~lychee_fx.learn.student.student_attention` for ``attention``;
    gradients flow to ``gates``.
    """
    cache = _new_cache(model, example.prompt_kv)
    attention.begin(gates, host_gates)
    try:
        out = model.base_model(input_ids=example.answer_ids, use_cache=True, **{cache_kwarg(model): cache})
    except BaseException:
        attention.end(check=False)
        raise
    attention.end()
    return out.last_hidden_state


@torch.no_grad()
def roles_mse(model, examples: list[TailExample], table: torch.Tensor, opts) -> float:
    """Mean over ``examples`` of the MSE of the final hidden states on the answer, decoding
    with the hard role map ``table`` (L, Hkv) bool under SPEC 1.1 and options ``opts``, against
    the full-attention model: the quantity training minimises, for a fixed map."""
    from lychee_fx.learn.student import student_attention

    num_layers, hkv = table.shape
    attention = StudentAttention(opts, num_layers, hkv)
    host = table.to("cpu", torch.float32)  # (L, Hkv)
    total = []
    with student_attention(model, attention):
        for ex in examples:
            h = student_hidden(model, attention, ex, host.to(ex.target.device), host)  # (1, A, H)
            total.append((h.float() - ex.target.float()).pow(2).mean())
    return float(torch.stack(total).double().mean()) if total else 0.0
