"""Per-query validity and block selection for a teacher-forced tail, and the soft choice of
which shallower layer's selection a sparse head reads while roles are still gates.

Notation: B batch, Hkv KV heads, T tail (query) positions, N cache slots (prompt + tail),
nb = ceil(N / block_size) cache blocks, S = budget // block_size.

Tail query ``t`` sits at cache slot ``N - T + t`` and is one decoding step of SPEC 1.1: its
valid slots are the slots up to and including its own (and inside the attention mask), its
"recent" positions end at itself, and its selection is computed from its own query. All T
steps are computed at once: no Python loop over tokens.
"""

from __future__ import annotations

import torch

from lychee_fx.eager_ops import select_from_scores
from lychee_fx.options import DecodeOptions

__all__ = ["tail_valid", "tail_block_masks", "SourceMixture"]


def tail_valid(
    mask: torch.Tensor | None, batch: int, q_len: int, n: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The slots each tail query may see, and the additive bias of a float mask.

    mask: None (causal, bottom-right aligned: query t sees slots <= N - T + t), a bool
    ``(B | 1, 1, T, N)`` mask (True = attend), or an additive float mask of that shape
    (values <= finfo.min are invalid) -> valid (B, T, N) bool, bias (B, T, N) or None.
    """
    if mask is None:
        pos = torch.arange(q_len, device=device) + (n - q_len)  # (T,) cache slot of each query
        valid = torch.arange(n, device=device)[None, :] <= pos[:, None]  # (T, N)
        return valid[None].expand(batch, q_len, n), None
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (q_len, n) or mask.shape[0] not in (1, batch):
        raise ValueError(
            f"expected an attention mask of shape ({batch} or 1, 1, {q_len}, {n}), got {tuple(mask.shape)}"
        )
    m = mask[:, 0].expand(batch, q_len, n)  # (B, T, N)
    if m.dtype == torch.bool:
        return m, None
    if not m.is_floating_point():
        raise TypeError(f"attention mask must be bool or floating, got dtype {m.dtype}")
    valid = m > torch.finfo(m.dtype).min
    return valid, torch.where(valid, m, torch.zeros((), dtype=m.dtype, device=m.device))


def tail_block_masks(score: torch.Tensor, valid: torch.Tensor, opts: DecodeOptions) -> torch.Tensor:
    """SPEC 1.1 selections of every tail query, as block masks.

    score (B, Hkv, T, N) position scores (mean over the group of q . k), valid (B, T, N)
    -> (B, Hkv, T, nb) bool, True on the blocks each (KV head, query) selected.
    """
    b, hkv, t, n = score.shape
    nb = -(-n // opts.block_size)
    ids = select_from_scores(
        score.permute(0, 2, 1, 3), valid, opts.block_size, opts.num_blocks, opts.sink, opts.recent
    )  # (B, T, Hkv, S), -1 padded
    ids = torch.where(ids < 0, nb, ids).long()  # padding goes to a spill column
    hit = torch.zeros(b, t, hkv, nb + 1, dtype=torch.bool, device=score.device)
    hit.scatter_(-1, ids, True)
    return hit[..., :nb].permute(0, 2, 1, 3)  # (B, Hkv, T, nb)


def _effective(gate: torch.Tensor, none: torch.Tensor) -> torch.Tensor:
    """(Hkv,): P(a head acts as retrieval) = its gate, or no source selected for it yet."""
    return gate + (1.0 - gate) * none


class SourceMixture:
    """For each KV-head index, which shallower layer's selection a sparse head reads.

    [Note] Soft roles. SPEC 1.1 says a sparse head reads the selection of the *nearest*
    shallower layer whose head at the same index is retrieval, and a head with no such layer
    acts as a retrieval head (attends fully *and* selects). During training the roles are
    gate samples ``z`` in [0, 1]. We read ``z`` as the probability that a head is retrieval,
    independently per head, and give every head the exact expectation of SPEC 1.1 over those
    roles (given this pass's hidden states). With ``none`` = the probability that no head at
    this index has selected yet, a head acts as retrieval with probability
    ``eff = z + (1 - z) * none``; the selection of layer ``l'`` is read with weight
    ``eff[l'] * prod_{l' < m < l} (1 - eff[m])`` (``l'`` selected, every layer in between
    sparse). ``none`` is 1 before layer 0 and 0 after it: layer 0 always selects.

    Why this choice: at the HardKuma point masses (every z exactly 0 or 1, which is where
    training converges) it *is* SPEC 1.1, so the student trains as it will infer; in between
    it is smooth in every z, so a gate also receives gradient for the selections it supplies
    to deeper heads, not only for its own output (a hard rule such as "nearest layer with
    z > 0" gives no gradient for that role). Sources whose weight is exactly 0 (z = 0, or a
    z = 1 layer in between) are dropped, so the cost falls as the gates harden.

    State (acc = float32, or float64 for float64 models), E = the sources still read:
        masks    list of E selections (B, Hkv, T, nb) bool, on the model's device
        weights  (E, Hkv) acc, on the model's device: the weight of each source per head
        none     (Hkv,) acc, on the model's device
    Weights are one tensor so that a layer's work on its sources is a few batched ops
    whatever E is (a loop over sources would launch kernels in proportion to E).

    [Note] Host decisions. Which layers must compute selections and which entries to keep
    depend on which weights are exactly 0: data-dependent control flow. Reading that from
    the device tensors would make every layer of a pass on an accelerator wait for the device
    (two host syncs per layer). So the mixture keeps a detached copy of the same arithmetic on
    the CPU, fed with a host copy of each layer's gates (:meth:`push`'s ``gate_host``), and
    every decision reads that copy. The same float operations in the same order give the
    same values on both sides, so the decisions are those the device values would give.
    """

    def __init__(self, num_kv_heads: int, dtype: torch.dtype, device: torch.device):
        self.masks: list[torch.Tensor] = []
        self.weights = torch.zeros(0, num_kv_heads, dtype=dtype, device=device)  # (E, Hkv)
        self.none = torch.ones(num_kv_heads, dtype=dtype, device=device)
        self._dtype = dtype
        self._host_weights = torch.zeros(0, num_kv_heads, dtype=dtype)  # (E, Hkv), CPU
        self._host_none = torch.ones(num_kv_heads, dtype=dtype)  # (Hkv,), CPU

    def host_gate(self, gate: torch.Tensor, gate_host: torch.Tensor | None = None) -> torch.Tensor:
        """The CPU copy (Hkv,) of a layer's gates that decisions read: ``gate_host`` when
        given (no device sync), else ``gate`` detached and copied (a sync on an accelerator)."""
        src = gate if gate_host is None else gate_host
        if tuple(src.shape) != tuple(self.none.shape):
            raise ValueError(f"gates must have shape {tuple(self.none.shape)} (KV heads), got {tuple(src.shape)}")
        return src.detach().to("cpu", self._dtype)

    def total(self) -> torch.Tensor:
        """(Hkv,): the weights of all entries plus ``none``; 1 up to rounding."""
        return self.weights.sum(dim=0) + self.none

    def effective(self, gate: torch.Tensor) -> torch.Tensor:
        """(Hkv,): the probability that each head of a layer with gates ``gate`` acts as
        retrieval (its own gate, or no selection to read yet)."""
        return _effective(gate, self.none)

    def selects(self, gate_host: torch.Tensor) -> bool:
        """Whether a head of a layer with host gates ``gate_host`` (Hkv,) (see
        :meth:`host_gate`) may act as retrieval, so that its selections are needed."""
        return bool((self._host_effective(gate_host) != 0).any())

    def _host_effective(self, gate_host: torch.Tensor) -> torch.Tensor:
        return _effective(gate_host, self._host_none)

    def push(self, masks: torch.Tensor | None, gate: torch.Tensor, gate_host: torch.Tensor | None = None) -> None:
        """After a layer with gates ``gate`` (Hkv,) whose selections are ``masks``
        (B, Hkv, T, nb) bool; ``masks`` may be None only when no head acts as retrieval.
        ``gate_host``: a CPU copy of ``gate`` for the decisions (see :meth:`host_gate`)."""
        gate_host = self.host_gate(gate, gate_host)
        eff, eff_host = self.effective(gate), self._host_effective(gate_host)
        keep, keep_host = 1.0 - eff, 1.0 - eff_host
        sources = list(self.masks)
        weights, host = self.weights * keep, self._host_weights * keep_host  # (E, Hkv)
        if bool((eff_host != 0).any()):
            if masks is None:
                raise ValueError("a layer whose heads may act as retrieval must supply its selections, got masks=None")
            sources.append(masks)
            weights, host = torch.cat([weights, eff[None]]), torch.cat([host, eff_host[None]])
        live = (host != 0).any(dim=1)  # (E,) CPU
        if not bool(live.all()):
            keep_ids = live.nonzero().flatten()  # CPU
            sources = [sources[i] for i in keep_ids.tolist()]
            weights, host = weights[keep_ids.to(weights.device, non_blocking=True)], host[keep_ids]
        self.masks, self.weights, self._host_weights = sources, weights, host
        self.none = self.none * keep
        self._host_none = self._host_none * keep_host
