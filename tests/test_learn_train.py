"""learn_roles end to end on tiny models: the loss falls and the density meets its target,
planted heads stay retrieval, runs are reproducible and resumable, bad input is refused."""

from __future__ import annotations

import pytest
import torch

import lychee_fx
from lychee_fx import HeadRoles
from lychee_fx.learn import LearnConfig
from lychee_fx.learn.data import as_pairs
from lychee_fx.learn.readout import gate_report, read_out
from tests.planted_model import planted_data, planted_llama
from tests.learn_support import single_thread  # noqa: F401  (autouse fixture)
from tests.tiny_models import VOCAB, hf_model

TINY = dict(budget=16, block_size=4, sink=4, recent=4)




def _random_data(num=4, prompt_len=100, answer_len=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(3, VOCAB, (1, prompt_len), generator=gen), torch.randint(3, VOCAB, (1, answer_len), generator=gen))
        for _ in range(num)
    ]


def test_training_a_tiny_model_lowers_the_loss_and_meets_the_density_target():
    model, hkv = hf_model("llama", layers=6)
    cfg = LearnConfig(count=4, steps=240, lr=0.02, log_every=20, **TINY)
    history = []
    roles = lychee_fx.learn_roles(model, _random_data(), config=cfg, log=history.append, progress=False)
    assert len(history) == 12 and history[-1]["step"] == 240
    first, last = history[0], history[-1]
    assert last["loss"] < 0.5 * first["loss"], f"loss {first['loss']:.4f} -> {last['loss']:.4f}"
    target = 4 / 12
    assert last["density"] <= target + 0.5 / 12, f"density {last['density']:.4f}, target {target:.4f}"
    assert first["density"] > target + 0.2, "the run starts well above the target (a = b = 1)"
    assert roles.num_retrieval == 4 and all(roles.row(0)), repr(roles)
    meta = roles.meta
    assert meta["steps"] == 240 and meta["count"] == 4
    assert len(meta["gate_mean"]) == 6 and len(meta["gate_mean"][0]) == hkv
    assert meta["final"]["density"] == pytest.approx(last["density"])


def test_planted_heads_are_kept_retrieval():
    planted = ((2, 1), (4, 0))
    model = planted_llama(planted, layers=6)
    cfg = LearnConfig(count=4, steps=200, lr=0.02, log_every=50, budget=32, block_size=4, sink=4, recent=4)
    roles = lychee_fx.learn_roles(model, planted_data(4), config=cfg, progress=False)
    want = torch.zeros(6, 2, dtype=torch.bool)
    want[0] = True
    for layer, head in planted:
        want[layer, head] = True
    assert torch.equal(roles.table, want), f"learned {roles!r}\n{gate_report(torch.tensor(roles.meta['gate_mean']), roles.table)}"
    mean = torch.tensor(roles.meta["gate_mean"])
    assert all(mean[layer, head] > 0.5 for layer, head in planted), mean.tolist()
    assert roles.meta["above_half"] == 4


def test_planted_heads_matter_to_the_loss_as_the_test_assumes():
    """The planted model is what the previous test claims: dropping a planted head costs
    much more than keeping it (so a learner that ignores the loss would fail)."""
    from lychee_fx.learn.examples import prepare_example, roles_mse

    planted = ((2, 1), (4, 0))
    model = planted_llama(planted, layers=6)
    opts = lychee_fx.DecodeOptions(budget=32, block_size=4, sink=4, recent=4)
    examples = [prepare_example(model, p, a) for p, a in planted_data(2)]
    good = torch.zeros(6, 2, dtype=torch.bool)
    good[0] = True
    good[2, 1] = good[4, 0] = True
    for layer, head in planted:
        worse = good.clone()
        worse[layer, head] = False
        worse[3, head] = True  # same count, a harmless head instead
        assert roles_mse(model, examples, worse, opts) > 100 * roles_mse(model, examples, good, opts)


def _short_run(tmp_path, steps, checkpoint=None, **overrides):
    model, _ = hf_model("llama", layers=3)
    cfg = LearnConfig(count=3, steps=steps, lr=0.05, log_every=2, checkpoint_every=3, **TINY, **overrides)
    history = []
    roles = lychee_fx.learn_roles(model, _random_data(num=3, prompt_len=60), config=cfg,
                                  checkpoint=checkpoint, log=history.append, progress=False)
    return roles, history


def test_runs_are_reproducible_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    straight, hist_a = _short_run(tmp_path, 8)
    again, _ = _short_run(tmp_path, 8)
    assert straight.meta["gate_mean"] == again.meta["gate_mean"], "same seed, same result"
    ckpt = tmp_path / "run.ckpt"
    _short_run(tmp_path, 4, checkpoint=ckpt)  # stops after step 4 (checkpoints at 3 and 4)
    resumed, hist_b = _short_run(tmp_path, 8, checkpoint=ckpt)
    assert resumed.meta["gate_mean"] == straight.meta["gate_mean"]
    assert resumed.meta["p_open"] == straight.meta["p_open"]
    assert [r["loss"] for r in hist_b] == [r["loss"] for r in hist_a if r["step"] > 4]
    finished, hist_c = _short_run(tmp_path, 8, checkpoint=ckpt)  # nothing left to do
    assert hist_c == [] and finished.meta["gate_mean"] == straight.meta["gate_mean"]
    other_seed, _ = _short_run(tmp_path, 8, seed=1)
    assert other_seed.meta["gate_mean"] != straight.meta["gate_mean"]


def test_a_checkpoint_from_other_settings_is_refused(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    _short_run(tmp_path, 3, checkpoint=ckpt)
    with pytest.raises(ValueError, match=r"was made with other settings: lr expected 0\.1, got 0\.05"):
        model, _ = hf_model("llama", layers=3)
        cfg = LearnConfig(count=3, steps=4, lr=0.1, log_every=2, checkpoint_every=3, **TINY)
        lychee_fx.learn_roles(model, _random_data(num=3, prompt_len=60), config=cfg, checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match="does not match this run: data expected"):
        model, _ = hf_model("llama", layers=3)
        cfg = LearnConfig(count=3, steps=4, lr=0.05, log_every=2, checkpoint_every=3, **TINY)
        lychee_fx.learn_roles(model, _random_data(num=3, prompt_len=60, seed=9), config=cfg, checkpoint=ckpt, progress=False)


def test_training_leaves_the_model_as_it_was():
    model, _ = hf_model("llama", layers=2)
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lychee_fx.learn_roles(model, _random_data(num=2, prompt_len=40), config=LearnConfig(count=2, steps=2, **TINY), progress=False)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert model.config._attn_implementation == "sdpa"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "weights are frozen"


# ---- read-out --------------------------------------------------------------------------------


def test_read_out_uses_the_half_threshold_when_it_gives_the_count():
    mean = torch.tensor([[0.2, 0.1], [0.7, 0.4], [0.45, 0.6]])
    forced = torch.tensor([[True, True], [False, False], [False, False]])
    assert read_out(mean, forced, 4).tolist() == [[True, True], [True, False], [False, True]]


def test_read_out_ranks_when_the_threshold_misses_the_count():
    mean = torch.tensor([[0.2, 0.1], [0.3, 0.4], [0.45, 0.45]])
    forced = torch.tensor([[True, True], [False, False], [False, False]])
    assert read_out(mean, forced, 3).tolist() == [[True, True], [False, False], [True, False]], "ties to the lower index"
    many = torch.full((3, 2), 0.9)
    assert int(read_out(many, forced, 3).sum()) == 3


def test_read_out_rejects_impossible_counts():
    forced = torch.zeros(2, 2, dtype=torch.bool)
    forced[0] = True
    with pytest.raises(ValueError, match=r"count must be in \[2, 4\] \(forced units .. all units\), got 1"):
        read_out(torch.zeros(2, 2), forced, 1)


# ---- input validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(steps=-1), ValueError, "steps must be >= 0, got -1"),
        (dict(steps=2.5), TypeError, r"steps must be int, got float \(2.5\)"),
        (dict(lr=0), ValueError, "lr must be > 0.0, got 0"),
        (dict(lambda_growth=0.5), ValueError, "lambda_growth must be >= 1.0, got 0.5"),
        (dict(force_layer0=1), TypeError, r"force_layer0 must be bool, got int \(1\)"),
        (dict(count=True), TypeError, r"count must be int, got bool \(True\)"),
        (dict(budget=20, block_size=16), ValueError, "budget must be a positive multiple of block_size=16, got budget=20"),
    ],
)
def test_config_errors_name_expected_and_actual(kwargs, error, match):
    with pytest.raises(error, match=match):
        LearnConfig(**kwargs)


def test_target_count_defaults_to_one_in_eight_and_checks_the_forced_floor():
    assert LearnConfig().target_count(30, 3) == 11
    assert LearnConfig().target_count(32, 8) == 32
    assert LearnConfig().target_count(2, 4) == 4, "at least layer 0"
    with pytest.raises(ValueError, match=r"count must be in \[3, 90\] for 30 layers x 3 KV heads with layer 0 forced retrieval, got 2"):
        LearnConfig(count=2).target_count(30, 3)


def test_learn_roles_refuses_bad_input():
    model, _ = hf_model("llama", layers=2)
    with pytest.raises(ValueError, match="learn_roles needs data, or a tokenizer to build passkey prompts; got neither"):
        lychee_fx.learn_roles(model, progress=False)
    with pytest.raises(TypeError, match="model must be a Hugging Face PreTrainedModel, got Linear"):
        lychee_fx.learn_roles(torch.nn.Linear(2, 2), [], progress=False)
    with pytest.raises(TypeError, match="config must be a LearnConfig, got dict"):
        lychee_fx.learn_roles(model, _random_data(1), config={"steps": 1}, progress=False)
    with pytest.raises(TypeError, match=r"data\[0\] must be a \(prompt_ids, answer_ids\) pair or a PasskeyPrompt, got int"):
        as_pairs([3])
    with pytest.raises(ValueError, match="data must hold at least one example, got 0"):
        as_pairs([])


def test_the_learned_map_drives_the_backend():
    model, hkv = hf_model("llama", layers=3)
    roles = lychee_fx.learn_roles(model, _random_data(2, prompt_len=60), config=LearnConfig(count=3, steps=4, **TINY), progress=False)
    assert isinstance(roles, HeadRoles) and roles.num_layers == 3 and roles.num_kv_heads == hkv
    ids = torch.randint(3, VOCAB, (1, 60), generator=torch.Generator().manual_seed(0))
    be = lychee_fx.backend(roles, compiler="eager", **TINY)
    model.compile(backend=be)
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 64) and be.report.counters["rewritten"] >= 3
