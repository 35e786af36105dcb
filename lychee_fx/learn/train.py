"""``learn_roles``: HardKuma gates on a frozen model, distilled against full attention.

One step (SPEC 4): pick a prefilled example, sample gates ``z`` (L, Hkv), run the student
(:mod:`lychee_fx.learn.student`) over the teacher-forced answer, and minimise

    loss = MSE(student final hidden states, full-attention final hidden states) / scale
           + lambda * relu(density - target)

with AdamW on the gates' (log a, log b) only. ``scale`` is the teacher's mean square on the same answer
tokens, a constant per example: it leaves each example's minimiser unchanged and makes
``lambda`` mean the same for every model (a unit of relative error against the density).
``density`` is the expected share of open
gates, ``target = count / (L * Hkv)``, and ``lambda`` is multiplied by ``lambda_growth``
after every step whose density exceeds the target by more than half a head (``0.5 / (L *
Hkv)``): without that margin, gates that can only approach 0 keep the density a hair above
the target forever and lambda grows without bound. Gate noise and example order are pure
functions of (seed, step), so a run resumed from a checkpoint continues exactly as an
uninterrupted one would.

Devices: the model (and its prefilled examples) may live on any device; the gates, their
noise and AdamW stay on the CPU (2 x L x Hkv numbers). Each step draws ``z`` (L, Hkv) there
and moves it to the model's device with a differentiable copy, so the noise for a seed is the
same on every device, a checkpoint loads anywhere, and the density, lambda and the student's
per-layer decisions (which read the host copy of ``z``) never wait for the device. The one
wait per step is the backward's copy of ``z``'s gradient back to the host, which the next
step needs anyway; the step's loss values stay on the device until a log record or a
checkpoint needs them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lychee_fx.apps.decoding import synchronize
from lychee_fx.apps.embedded import kv_heads
from lychee_fx.learn.config import LearnConfig
from lychee_fx.learn.data import as_pairs, passkey_training_data
from lychee_fx.learn.examples import TailExample, prepare_example, student_hidden
from lychee_fx.learn.hardkuma import HardKumaGates
from lychee_fx.learn.readout import read_out
from lychee_fx.learn.student import StudentAttention, student_attention
from lychee_fx.roles import HeadRoles

__all__ = ["learn_roles", "model_shape", "profile_steps"]

_CKPT_FORMAT = "lychee_fx.learn_roles.checkpoint"
_CKPT_VERSION = 1
# Settings that may change between a run and its resumption.
_RESUMABLE_CHANGES = {"steps", "log_every", "checkpoint_every"}


def model_shape(model) -> tuple[int, int]:
    """(attention layers, KV heads) of an HF causal LM."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "base_model"):
        raise TypeError(f"model must be a Hugging Face PreTrainedModel, got {type(model).__name__}")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    if not layers:
        raise ValueError(f"cannot read the number of layers from {type(text).__name__}")
    return int(layers), kv_heads(text)


def _data_digest(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for prompt, answer in pairs:
        for ids in (prompt, answer):
            h.update(str(tuple(ids.shape)).encode())
            h.update(ids.to(torch.int64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 4 + stream)


def _example_index(seed: int, step: int, n: int) -> int:
    """Epoch-wise shuffled order: each example once per ``n`` steps."""
    perm = torch.randperm(n, generator=_step_generator(seed, step // n, 1))
    return int(perm[step % n])


@contextlib.contextmanager
def _frozen(model):
    """Eval mode, no parameter gradients; both restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


class _Trainer:
    """The state of one run: gates, optimizer, lambda, history; checkpoints."""

    def __init__(self, shape, forced, config: LearnConfig, target: float, digest: str, dtype: str = "float32"):
        self.config, self.target, self.digest, self.dtype = config, target, digest, dtype
        self.margin = 0.5 / (shape[0] * shape[1])  # half a head
        self.gates = HardKumaGates(*shape, forced=forced)
        self.opt = torch.optim.AdamW(
            [self.gates.log_a, self.gates.log_b], lr=config.lr, weight_decay=config.weight_decay
        )
        self.lam = float(config.lambda_init)
        self.step = 0
        self.history: list[dict] = []
        self.window: list[dict] = []  # per-step records since the last log record
        self.elapsed = 0.0

    def settle(self) -> None:
        """Turn the window's device scalars into floats: one device sync for the window."""
        slots = [(r, k) for r in self.window for k, v in r.items() if isinstance(v, torch.Tensor)]
        if slots:
            values = torch.stack([r[k].detach().float() for r, k in slots]).tolist()
            for (r, k), value in zip(slots, values):
                r[k] = value

    def state(self) -> dict:
        self.settle()
        cfg = {k: v for k, v in self.config.as_dict().items() if k not in _RESUMABLE_CHANGES}
        return {
            "format": _CKPT_FORMAT, "version": _CKPT_VERSION, "config": cfg, "data": self.digest,
            "shape": list(self.gates.shape), "dtype": self.dtype, "step": self.step, "gates": self.gates.state_dict(),
            "optimizer": self.opt.state_dict(), "lambda": self.lam, "history": self.history,
            "window": self.window, "elapsed": self.elapsed,
        }

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, path)

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or state.get("format") != _CKPT_FORMAT:
            raise ValueError(f"{str(path)!r} is not a learn_roles checkpoint (format {_CKPT_FORMAT!r})")
        mine = self.state()
        state.setdefault("dtype", "float32")  # checkpoints from before --dtype were float32 runs
        for key in ("version", "shape", "dtype", "data"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"checkpoint {str(path)!r} does not match this run: {key} expected {mine[key]!r}, got {state.get(key)!r}"
                )
        diff = {k: (v, state["config"].get(k)) for k, v in mine["config"].items() if state["config"].get(k) != v}
        if diff:
            shown = ", ".join(f"{k} expected {a!r}, got {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"checkpoint {str(path)!r} was made with other settings: {shown}")
        self.gates.load_state_dict(state["gates"])
        self.opt.load_state_dict(state["optimizer"])
        self.lam, self.step = float(state["lambda"]), int(state["step"])
        self.history, self.window = list(state["history"]), list(state["window"])
        self.elapsed = float(state["elapsed"])

    def train_step(self, mse: torch.Tensor, scale: torch.Tensor, z: torch.Tensor) -> dict:
        """One AdamW step on the gates.

        mse, scale: 0-dim float32 on the model's device; z (L, Hkv) the CPU sample that
        produced ``mse``. Returns the step's record; its ``loss``, ``mse`` and ``rel_mse``
        are 0-dim device tensors until :meth:`settle`.
        """
        density = self.gates.density()  # 0-dim, CPU
        rel_mse = mse / scale  # 0-dim, model device
        penalty = self.lam * torch.relu(density - self.target)  # 0-dim, CPU
        self.opt.zero_grad(set_to_none=True)
        torch.autograd.backward([rel_mse, penalty])  # two roots: no device round trip for the penalty
        self.opt.step()
        record = {
            "loss": rel_mse.detach() + penalty.detach(), "mse": mse.detach(), "rel_mse": rel_mse.detach(),
            "density": float(density.detach()), "lambda": self.lam, "z_open": float((z > 0).float().mean()),
        }
        if record["density"] > self.target + self.margin:
            self.lam *= self.config.lambda_growth
        self.step += 1
        return record


def _window_record(step: int, window: list[dict], gates: HardKumaGates, elapsed: float) -> dict:
    keys = ("loss", "mse", "rel_mse", "density", "z_open")
    rec = {"step": step, **{k: sum(r[k] for r in window) / len(window) for k in keys}}
    rec["lambda"] = window[-1]["lambda"]
    rec["above_half"] = int((gates.mean() > 0.5).sum())
    rec["elapsed_s"] = round(elapsed, 1)
    return rec


def learn_roles(
    model,
    data: Sequence | None = None,
    *,
    tokenizer=None,
    config: LearnConfig | None = None,
    checkpoint: str | os.PathLike | None = None,
    log: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> HeadRoles:
    """Learn a role map for ``model`` (an HF causal LM) with HardKuma gates (SPEC 4).

    Args:
        model: frozen during training (eval mode, no parameter gradients; both restored).
        data: (prompt_ids (1, P), answer_ids (1, A)) pairs or ``PasskeyPrompt`` objects; by
            default 16 multi-passkey prompts of 1024-2048 tokens built with ``tokenizer``.
        config: a :class:`LearnConfig` (defaults: SPEC 4).
        checkpoint: a file path; resumed from when it exists (settings and data must match),
            written every ``config.checkpoint_every`` steps and at the end.
        log: called with one record (dict) per ``config.log_every`` steps.
        progress: show tqdm progress bars.

    Returns the read-out :class:`HeadRoles` with exactly ``config.target_count(L, Hkv)``
    retrieval heads; its ``meta`` holds the gate values and a training summary.
    """
    config = LearnConfig() if config is None else config
    if not isinstance(config, LearnConfig):
        raise TypeError(f"config must be a LearnConfig, got {type(config).__name__}")
    config.target_count(*model_shape(model))  # the count checked against the model before any data is built
    if data is None:
        if tokenizer is None:
            raise ValueError("learn_roles needs data, or a tokenizer to build passkey prompts; got neither")
        data = passkey_training_data(tokenizer, seed=config.seed)
    pairs = as_pairs(data)
    trainer, forced, count = _new_trainer(model, config, _data_digest(pairs))
    ckpt = None if checkpoint is None else Path(checkpoint)
    if ckpt is not None and ckpt.exists():
        trainer.load(ckpt)

    if trainer.step < config.steps:
        with _frozen(model):
            _train(model, trainer, pairs, ckpt, log, progress)

    with torch.no_grad():
        mean = trainer.gates.mean().detach()  # (L, Hkv)
        p_open = trainer.gates.expected_open().detach()
    table = read_out(mean, forced, count)
    return HeadRoles(table, meta=_summary(model, trainer, pairs, count, mean, p_open))


def _new_trainer(model, config: LearnConfig, digest: str) -> tuple[_Trainer, torch.Tensor, int]:
    """A fresh run for ``model``: (trainer, forced (L, Hkv) bool, retrieval count)."""
    num_layers, hkv = model_shape(model)
    count = config.target_count(num_layers, hkv)
    forced = torch.zeros(num_layers, hkv, dtype=torch.bool)
    if config.force_layer0:
        forced[0] = True
    trainer = _Trainer((num_layers, hkv), forced, config, count / (num_layers * hkv), digest, _dtype_name(model))
    return trainer, forced, count


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _dtype_name(model) -> str:
    """The model's parameter dtype without the ``torch.`` prefix: 'float32', 'bfloat16'."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _step(model, attention: StudentAttention, trainer: _Trainer, examples: Sequence[TailExample]) -> dict:
    """Training step ``trainer.step``: its example and gate noise are functions of (seed,
    step); returns its record (see :meth:`_Trainer.train_step`)."""
    config = trainer.config
    step = trainer.step
    ex = examples[_example_index(config.seed, step, len(examples))]
    z = trainer.gates.sample(_step_generator(config.seed, step, 0))  # (L, Hkv), CPU
    gates = z.to(ex.target.device, non_blocking=True)  # differentiable copy; z itself on the CPU
    hidden = student_hidden(model, attention, ex, gates, z.detach())  # (1, A, H)
    target = ex.target.float()  # (1, A, H): the loss is float32 whatever the model's dtype
    mse = (hidden.float() - target).pow(2).mean()
    return trainer.train_step(mse, target.pow(2).mean(), z)


def _train(model, trainer: _Trainer, pairs, ckpt: Path | None, log, progress: bool) -> None:
    """Prefill the examples, then run the remaining steps (model already frozen)."""
    from tqdm.auto import tqdm

    config = trainer.config
    num_layers, hkv = trainer.gates.shape
    examples: list[TailExample] = [
        prepare_example(model, p, a) for p, a in tqdm(pairs, desc="prefill", disable=not progress)
    ]
    attention = StudentAttention(config.options(), num_layers, hkv)
    started = time.perf_counter() - trainer.elapsed
    bar = tqdm(total=config.steps, initial=trainer.step, desc="learn-roles", disable=not progress)
    with student_attention(model, attention):
        while trainer.step < config.steps:
            trainer.window.append(_step(model, attention, trainer, examples))
            trainer.elapsed = time.perf_counter() - started
            done = trainer.step == config.steps
            if trainer.step % config.log_every == 0 or done:
                trainer.settle()
                rec = _window_record(trainer.step, trainer.window, trainer.gates, trainer.elapsed)
                trainer.history.append(rec)
                trainer.window = []
                bar.set_postfix(loss=f"{rec['loss']:.4f}", density=f"{rec['density']:.3f}", lam=f"{rec['lambda']:.3g}")
                if log is not None:
                    log(rec)
            if ckpt is not None and (trainer.step % config.checkpoint_every == 0 or done):
                trainer.save(ckpt)
            bar.update(1)
    bar.close()


def profile_steps(model, prompt_ids: torch.Tensor, answer_ids: torch.Tensor, *, config: LearnConfig | None = None,
                  steps: int = 3, warmup: int = 1) -> dict:
    """Time learn_roles' own path on one example: its prefill, then ``warmup + steps``
    training steps (the step :func:`learn_roles` runs, from fresh gates), synchronising the
    device around each. The model is frozen meanwhile and left as it was.

    prompt_ids (1, P), answer_ids (1, A) -> a dict:
        prefill_s           seconds of :func:`~lychee_fx.learn.examples.prepare_example`
        step_s              seconds of each of the ``steps`` timed steps (after the warm-up)
        median_step_s       their median
        weights_bytes       CUDA memory allocated before the prefill (None off CUDA)
        peak_prefill_bytes  CUDA peak while prefilling (None off CUDA)
        peak_step_bytes     CUDA peak over the training steps, the resident model and
                            prefilled example included (None off CUDA)
        device, dtype, prompt_tokens, answer_tokens, records (the steps' log records)
    """
    config = LearnConfig() if config is None else config
    if not isinstance(config, LearnConfig):
        raise TypeError(f"config must be a LearnConfig, got {type(config).__name__}")
    for name, value, minimum in (("steps", steps, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    (prompt_ids, answer_ids), = as_pairs([(prompt_ids, answer_ids)])
    trainer, _, _ = _new_trainer(model, config, "profile")
    num_layers, hkv = trainer.gates.shape
    device = _device(model)
    cuda = device.type == "cuda"
    with _frozen(model):
        synchronize(device)
        weights = torch.cuda.memory_allocated(device) if cuda else None
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        example = prepare_example(model, prompt_ids, answer_ids)
        synchronize(device)
        prefill_s = time.perf_counter() - t0
        peak_prefill = torch.cuda.max_memory_allocated(device) if cuda else None
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        attention = StudentAttention(config.options(), num_layers, hkv)
        times = []
        with student_attention(model, attention):
            for i in range(warmup + steps):
                t0 = time.perf_counter()
                trainer.window.append(_step(model, attention, trainer, [example]))
                synchronize(device)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
        trainer.settle()
        peak_step = torch.cuda.max_memory_allocated(device) if cuda else None
    return {
        "prefill_s": prefill_s, "step_s": times, "median_step_s": statistics.median(times),
        "weights_bytes": weights, "peak_prefill_bytes": peak_prefill, "peak_step_bytes": peak_step,
        "device": str(device), "dtype": trainer.dtype,
        "prompt_tokens": int(prompt_ids.shape[1]), "answer_tokens": int(answer_ids.shape[1]),
        "records": trainer.window,
    }


def _summary(model, trainer: _Trainer, pairs, count: int, mean: torch.Tensor, p_open: torch.Tensor) -> dict:
    """The role map's provenance: method, gate values, settings, data, training summary."""
    config = trainer.config
    last = trainer.history[-1] if trainer.history else {}
    readout = "Kumaraswamy mean > 0.5, else the top `count` means"
    return {
        "method": "HardKuma gates (SPEC 4); student = SPEC 1.1 per teacher-forced answer token",
        "model": getattr(model.config, "name_or_path", "") or type(model).__name__,
        "count": count,
        "readout": readout + (" (layer 0 forced)" if config.force_layer0 else ""),
        "above_half": int((mean > 0.5).sum()),
        "gate_mean": [[round(float(x), 4) for x in row] for row in mean.tolist()],
        "p_open": [[round(float(x), 4) for x in row] for row in p_open.tolist()],
        "config": config.as_dict(),
        "data": {"examples": len(pairs), "digest": trainer.digest,
                 "prompt_tokens": [int(p.shape[1]) for p, _ in pairs],
                 "answer_tokens": [int(a.shape[1]) for _, a in pairs]},
        "steps": trainer.step,
        "wall_time_s": round(trainer.elapsed, 1),
        "final": {k: last[k] for k in ("loss", "mse", "rel_mse", "density", "lambda") if k in last},
        "device": _device_name(_device(model)),
        "dtype": trainer.dtype,
        "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
    }


def _device_name(device: torch.device) -> str:
    """'cpu', or 'cuda:0 (NVIDIA H200)'."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
