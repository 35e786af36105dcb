"""The student: hybrid-head attention over a teacher-forced tail, with gated roles.

Per attention layer and KV head ``h`` with gate ``z`` (SPEC 4):

    out_h = z * full_h + (1 - z) * sparse_h

``full_h`` is exact softmax attention over every valid slot; ``sparse_h`` is SPEC 1.1's sparse
head, attention over the blocks selected by a shallower retrieval head with index ``h``
(:class:`~lychee_fx.learn.selection.SourceMixture` says which, while roles are soft).

It enters a Hugging Face model through transformers' own extension point:
``AttentionInterface.register(name, fn)`` plus ``AttentionMaskInterface.register(name,
sdpa_mask)``, then ``model.set_attn_implementation(name)`` (see :func:`student_attention`);
no class or ``forward`` is patched.

Notation: B batch, Hq query heads, Hkv KV heads, G = Hq // Hkv, T tail positions, N cache
slots, D head dim, bs block size, nb = ceil(N / bs).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from lychee_fx.learn.selection import SourceMixture, tail_block_masks, tail_valid
from lychee_fx.options import DecodeOptions

__all__ = ["hybrid_attention", "StudentAttention", "student_attention", "routed_attention", "ATTN_NAME"]

ATTN_NAME = "lychee_fx_student"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _normaliser(eb: torch.Tensor, lb: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the blocks in ``seen``, from per-block partial sums.

    eb (B, Hkv, G, T, nb) = sum over a block of exp(logit - lb), lb (..., nb) the block maxima
    (0 where a block holds no valid slot), seen (..., nb) bool, or (E, ..., nb) for E block
    sets at once (eb and lb broadcast) -> (factor (seen's shape), denom (seen's shape, nb -> 1))
    with ``exp(logit_j) / sum_seen exp(logit) = exp(logit_j - lb) * factor / denom`` for every slot j of a seen block; factor <= 1 and denom >= 1 wherever something is seen,
    so nothing overflows or underflows to 0/0. Rows that see nothing get factor 0, denom 1.
    """
    with torch.no_grad():
        peak = torch.where(seen, lb, float("-inf")).amax(dim=-1, keepdim=True)  # (..., 1)
        peak = torch.where(torch.isfinite(peak), peak, 0.0)
        factor = torch.where(seen, torch.exp(lb - peak), 0.0)  # (..., nb)
    denom = (eb * factor).sum(dim=-1, keepdim=True)  # (..., 1), differentiable through eb
    return factor, torch.where(denom > 0, denom, 1.0)


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    gate: torch.Tensor,
    mixture: SourceMixture,
    opts: DecodeOptions,
    gate_host: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer of the student; pushes this layer's selections onto ``mixture``.

    q (B, Hq, T, D), k/v (B, Hkv, N, D), valid (B, T, N) bool, bias (B, T, N) or None,
    gate (Hkv,) in [0, 1] on q's device -> (B, Hq, T, D) in q's dtype, differentiable in q,
    k, v, gate and the weights held by ``mixture``. ``gate_host``: the same gates on the CPU
    (detached), which the layer's data-dependent decisions read (see
    :class:`~lychee_fx.learn.selection.SourceMixture`); None copies ``gate`` to the host,
    which on an accelerator waits for the device.

    [Note] One softmax numerator for every path. Full and sparse attention share the logits
    and differ only in which blocks they normalise over. With ``e = exp(logit - lb)`` (lb =
    the max of the slot's block) and block sums ``eb``, every path's weights are ``e``
    times a per-block coefficient, so the head's mixed attention weights are

        e * (alpha * f_full / d_full + sum_s beta_s * f_s / d_s)[block]

    (alpha = the probability of acting as retrieval, beta_s = (1 - z) * w_s; see :func:`_normaliser` for f, d),
    and one ``weights @ v`` gives the mixed output; each selection source costs only
    block-level work, and all sources are one batched op (no loop over sources). Per-block shifts keep every softmax exact even when one slot's logit
    is hundreds above the rest (a sparse path that misses it still normalises correctly).
    """
    b, hq, t, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g, bs = hq // hkv, opts.block_size
    acc = _acc_dtype(q.dtype)
    nb = -(-n // bs)

    qg = q.to(acc).reshape(b, hkv, g, t, d)  # (B, Hkv, G, T, D)
    dots = torch.einsum("bhgtd,bhnd->bhgtn", qg, k.to(acc))  # (B, Hkv, G, T, N), q . k
    logits = dots * scale
    if bias is not None:
        logits = logits + bias[:, None, None].to(acc)
    logits = logits.masked_fill(~valid[:, None, None], float("-inf"))
    logits = F.pad(logits, (0, nb * bs - n), value=float("-inf")).view(b, hkv, g, t, nb, bs)
    with torch.no_grad():
        lb = logits.amax(dim=-1)  # (B, Hkv, G, T, nb)
        nonempty = torch.isfinite(lb)
        lb = torch.where(nonempty, lb, 0.0)
    e = torch.exp(logits - lb[..., None])  # (B, Hkv, G, T, nb, bs), 0 at invalid slots
    eb = e.sum(dim=-1)  # (B, Hkv, G, T, nb)

    gate = gate.to(acc)
    gate_host = mixture.host_gate(gate, gate_host)  # (Hkv,) CPU
    eff = mixture.effective(gate)  # (Hkv,) probability of acting as retrieval
    z = gate.view(1, hkv, 1, 1, 1)  # broadcasts over (B, Hkv, G, T, nb)
    alpha = eff.view(1, hkv, 1, 1, 1)
    factor, denom = _normaliser(eb, lb, nonempty)
    coef = alpha * factor / denom  # (B, Hkv, G, T, nb)
    if mixture.masks:  # all E sources at once: (E, B, Hkv, G, T, nb)
        seen = nonempty & torch.stack(mixture.masks)[:, :, :, None]  # (E, B, Hkv, G, T, nb)
        factor, denom = _normaliser(eb, lb, seen)  # (E, B, Hkv, G, T, nb), (E, B, Hkv, G, T, 1)
        beta = (1.0 - z) * mixture.weights.view(-1, 1, hkv, 1, 1, 1)  # (E, 1, Hkv, 1, 1, 1)
        coef = coef + (beta * factor / denom).sum(dim=0)
    weights = (e * coef[..., None]).reshape(b, hkv, g, t, nb * bs)[..., :n]  # (B, Hkv, G, T, N)
    out = torch.einsum("bhgtn,bhnd->bhgtd", weights, v.to(acc))  # (B, Hkv, G, T, D)

    masks = None
    if mixture.selects(gate_host):  # a deeper sparse head may read this layer's selections
        with torch.no_grad():
            score = dots.detach().mean(dim=2)  # (B, Hkv, T, N), SPEC 1.1's position score
            masks = tail_block_masks(score, valid, opts)  # (B, Hkv, T, nb)
    mixture.push(masks, gate, gate_host)
    return out.reshape(b, hq, t, d).to(q.dtype)


class StudentAttention:
    """A transformers attention function that runs :func:`hybrid_attention` per layer.

    Between :meth:`begin` (with gates ``(L, Hkv)``) and :meth:`end`, each call is the next
    attention layer in forward order (SPEC 1.2's numbering). Outside a pass it refuses to run,
    so it can never silently change a model's ordinary forward.
    """

    def __init__(self, opts: DecodeOptions, num_layers: int, num_kv_heads: int):
        self.opts, self.num_layers, self.num_kv_heads = opts, num_layers, num_kv_heads
        self._gates: torch.Tensor | None = None
        self._host: torch.Tensor | None = None  # (L, Hkv) CPU copy of the gates
        self._layer = 0
        self._mixture: SourceMixture | None = None

    def begin(self, gates: torch.Tensor, host_gates: torch.Tensor | None = None) -> None:
        """Start a forward pass with gates (L, Hkv) in [0, 1] on the model's device.

        ``host_gates``: the same values (L, Hkv) on the CPU, detached, for the per-layer
        decisions; None copies ``gates`` to the host once here (a device sync on an
        accelerator, none on the CPU).
        """
        shape = (self.num_layers, self.num_kv_heads)
        if tuple(gates.shape) != shape:
            raise ValueError(f"gates must have shape {shape} (layers, KV heads), got {tuple(gates.shape)}")
        if host_gates is None:
            host_gates = gates.detach().to("cpu")
        elif tuple(host_gates.shape) != shape or host_gates.device.type != "cpu":
            raise ValueError(
                f"host_gates must be a CPU tensor of shape {shape}, got {host_gates.device.type} {tuple(host_gates.shape)}"
            )
        self._gates, self._host, self._layer, self._mixture = gates, host_gates.detach(), 0, None

    def end(self, check: bool = True) -> None:
        """Close the pass; with ``check``, raise unless every layer ran exactly once."""
        ran, self._gates, self._host, self._mixture = self._layer, None, None, None
        if check and ran != self.num_layers:
            raise RuntimeError(
                f"expected {self.num_layers} attention calls through the student in one forward pass, "
                f"got {ran}: the model does not route (all of) its attention through transformers' "
                "AttentionInterface, or its number of layers differs from the role map's"
            )

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        """query (B, Hq, T, D), key/value (B, Hkv, N, D) -> ((B, T, Hq, D), None)."""
        if self._gates is None:
            raise RuntimeError("the lychee_fx student attention runs only inside learn_roles' forward passes")
        for name in ("sliding_window", "softcap"):
            if kwargs.get(name) is not None:
                raise ValueError(f"role learning supports plain softmax attention; got {name}={kwargs[name]!r}")
        if dropout:
            raise ValueError(f"role learning needs attention dropout 0 (model.eval()), got {dropout}")
        if self._layer >= self.num_layers:
            raise RuntimeError(f"more attention calls in one pass than the {self.num_layers} layers of the role map")
        if key.shape[1] != self.num_kv_heads:
            raise ValueError(f"expected {self.num_kv_heads} KV heads per layer, got key {tuple(key.shape)}")
        b, _, t, d = query.shape
        n = key.shape[2]
        if self._mixture is None:
            self._mixture = SourceMixture(self.num_kv_heads, _acc_dtype(query.dtype), query.device)
        valid, bias = tail_valid(attention_mask, b, t, n, query.device)
        scale = d**-0.5 if scaling is None else scaling
        if self._gates.device != query.device:
            raise ValueError(
                f"gates must be on the model's device: query is on {query.device}, gates on {self._gates.device}"
            )
        gate, gate_host = self._gates[self._layer], self._host[self._layer]  # (Hkv,) each
        out = hybrid_attention(query, key, value, valid, bias, scale, gate, self._mixture, self.opts, gate_host)
        self._layer += 1
        return out.transpose(1, 2).contiguous(), None


def student_attention(model, attention: StudentAttention, name: str = ATTN_NAME):
    """Route ``model``'s attention through the student inside the block (:func:`routed_attention`)."""
    return routed_attention(model, attention, name)


@contextlib.contextmanager
def routed_attention(model, attention, name: str):
    """Route ``model``'s attention through ``attention`` (a transformers attention function)
    inside the block, registered as ``name`` in transformers' AttentionInterface with SDPA's
    mask; the previous implementation is restored on exit."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
