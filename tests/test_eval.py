"""``python -m lychee_fx eval --quick`` end to end on a tiny local model: files, sane numbers
with intervals, the targets section, one graph per method, batching that changes no result,
determinism, and the errors a user meets first."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lychee_fx import HeadRoles
from lychee_fx.apps.eval_methods import lower_bound_options
from lychee_fx.apps.evaluate import QUICK, main
from tests.tiny_lm_dir import KV_HEADS, LAYERS, make_tiny_lm_dir

pytestmark = pytest.mark.slow


def _main(argv: list[str]) -> int:
    """``main(argv)``, with torch's thread count restored after (the runs pass --threads)."""
    threads = torch.get_num_threads()
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_lm_dir(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="module")
def quick_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    # one thread: the tiny model gains nothing from more, and a busy CI core cannot stall it
    return _main(["--quick", "--model", str(tiny_dir), "--out", str(out), "--no-progress", "--threads", "1"]), out


def test_quick_eval_writes_json_markdown_and_plots(quick_run):
    rc, out = quick_run
    assert rc == 0
    for name in ("results.json", "results.md", "passkey_vs_length.png", "perplexity_vs_budget.png", "agreement_vs_budget.png",
                 "cost_quality.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    for section in ("## Headline: budget 128, block size 16", "## Headline: budget 64, block size 16", "## Targets",
                    "### budget 128, block 16", "## Passkey exact match by context length", "## Passkey exact match by depth",
                    "## Cost-quality: retrieval KV heads x budget (block 16)", "## The whole grid"):
        assert section in md, section
    for fam in ("| full |", "| lychee |", "| random (seed 0) |", "| random (seed 1) |", "| tidal |", "| duo (sink 16 + recent 112) |",
                "| sink+recent (budget 64) |", "| lychee + correction every 4 |"):
        assert fam in md, fam
    assert "**PASS**" in md or "**FAIL**" in md


def _point(d):
    assert d["lo"] <= d["point"] <= d["hi"], d
    return d["point"]


def test_quick_eval_numbers_are_sane(quick_run):
    _, out = quick_run
    data = json.loads((out / "results.json").read_text())
    ref, runs = data["reference"], data["runs"]
    assert data["learned_map"]["present"] is False  # no map is shipped for a local tiny model
    full = next(r for r in runs if r["family"] == "full")
    # every head retrieval through the backend is full attention (SPEC 1.1)
    assert _point(full["agreement"]) == 1.0
    assert _point(full["perplexity"]) == pytest.approx(_point(ref["perplexity"]), rel=1e-4)
    assert [it["text"] for it in full["items"] if "text" in it] == [it["text"] for it in ref["items"] if "text" in it]
    grid = QUICK
    expected_keys = len(grid.lengths) * grid.prompts_per_length * grid.num_keys
    # passkey prompts have exactly the asked length, so a length group needs no padding
    assert sorted({it["context"] for it in ref["items"] if it["task"] == "passkey"}) == list(grid.lengths)
    for r in runs:
        if r["family"] != "duo":
            assert r["sites"]["found"] > 0 and r["sites"]["rewritten"] == r["sites"]["found"], r["key"]
            assert r["graphs"] == 1, f"{r['key']}: {r['graphs']} graphs; expected one for every length (dynamic=True)"
        assert math.isfinite(_point(r["perplexity"])) and r["perplexity"]["point"] > 1.0
        assert 0.0 <= _point(r["agreement"]) <= 1.0
        assert 0.0 <= _point(r["passkey"]["accuracy"]) <= 1.0 and r["passkey"]["keys"] == expected_keys
        assert r["passkey"]["accuracy"]["hi"] > r["passkey"]["accuracy"]["lo"]  # never a width-0 interval
        assert r["decode_steps"] == full["decode_steps"]
        if r["correct_every"]:
            assert r["corrections"] > 0
    lower = [r for r in runs if r["family"] == "sink+recent"]
    assert [r["budget"] for r in lower] == [lower_bound_options(16, 16, 16).budget]
    assert sorted(r["tag"] for r in runs if r["family"] == "random" and r["budget"] == 128) == ["0", "1"]
    assert sorted(r["stream"][1] for r in runs if r["family"] == "duo") == [48, 112]
    sparse = [r for r in runs if r["family"] in ("lychee", "random", "tidal", "duo") and r["budget"] == 64]
    assert sparse and any(r["agreement"]["point"] < 1.0 for r in sparse), "budget 64 of ~300 tokens should change something"
    assert set(data["targets"]) == {"128/16", "64/16"}
    names = [t["target"] for t in data["targets"]["128/16"]]
    assert len(names) == 1 + 3 + 1 + 1 and all(t["pass"] in (True, False) for t in data["targets"]["128/16"])


def test_eval_batching_changes_no_result_and_is_deterministic(tiny_dir, tmp_path, quick_run):
    """The lychee methods again with batches of 2 (the quick run decodes one row at a time):
    the same tokens, perplexity to 1e-5, one graph."""
    _, first = quick_run
    again = tmp_path / "again"
    assert _main(["--quick", "--model", str(tiny_dir), "--out", str(again), "--no-progress", "--methods", "lychee",
                     "--budgets", "64,128", "--correct-every", "0", "--batch", "2", "--threads", "1"]) == 0
    a = {r["key"]: r for r in json.loads((first / "results.json").read_text())["runs"]}
    data = json.loads((again / "results.json").read_text())
    assert data["estimate"]["batch"] == 2 and data["estimate"]["batches"] < json.loads((first / "results.json").read_text())["estimate"]["batches"]
    for r in data["runs"]:
        ref = a[r["key"]]
        assert [it["tokens"] for it in r["items"]] == [it["tokens"] for it in ref["items"]], r["key"]
        assert r["perplexity"]["point"] == pytest.approx(ref["perplexity"]["point"], rel=1e-5)
        assert r["graphs"] == 1


def test_eval_errors(tiny_dir, tmp_path, capsys):
    assert main(["--quick", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "cannot load model" in capsys.readouterr().err
    path = tmp_path / "wrong.json"
    HeadRoles.first_k(LAYERS + 1, KV_HEADS, 1).save(path)
    assert main(["--quick", "--model", str(tiny_dir), "--roles", str(path), "--out", str(tmp_path)]) == 2
    assert f"expected {LAYERS} layers x {KV_HEADS} KV heads, got {LAYERS + 1} x {KV_HEADS}" in capsys.readouterr().err
    assert main(["--quick", "--model", str(tiny_dir), "--headline", "100", "--out", str(tmp_path)]) == 2
    assert "--headline takes budget,block_size" in capsys.readouterr().err


def test_a_run_cut_short_keeps_the_methods_it_finished(tiny_dir, tmp_path, monkeypatch):
    """Results are written after each method: a run interrupted in its third method leaves
    results.json and results.md with the first two, marked partial; the finished run is not."""
    import lychee_fx.apps.evaluate as ev

    calls = []
    real = ev._run_method

    def cut_in_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ev, "_run_method", cut_in_third)
    out = tmp_path / "cut"
    args = ["--quick", "--model", str(tiny_dir), "--out", str(out), "--no-progress", "--methods", "full,lychee",
            "--budgets", "64,128", "--correct-every", "0", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        with pytest.raises(KeyboardInterrupt):
            main(args)
    finally:
        torch.set_num_threads(threads)
    data = json.loads((out / "results.json").read_text())
    assert data["partial"]["methods_done"] == 2 < data["partial"]["methods"]
    assert [r["family"] for r in data["runs"]] == ["full", "lychee"]
    assert data["runs"][1]["passkey"] is not None
    assert "**Partial results: 2 of" in (out / "results.md").read_text()
    monkeypatch.setattr(ev, "_run_method", real)
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads((out / "results.json").read_text())
    assert data["partial"]["methods_done"] == data["partial"]["methods"] == len(data["runs"])
    assert "Partial results" not in (out / "results.md").read_text()


def test_out_of_memory_says_what_the_eval_holds(tiny_dir, tmp_path, monkeypatch, capsys):
    """An out-of-memory error while decoding names the caches the eval holds and what to lower
    (exit 2), and the methods finished before it stay written; ``cache_bytes`` counts every K
    and V slot of every prefilled cache."""
    import lychee_fx.apps.evaluate as ev
    from lychee_fx.apps.eval_tasks import cache_bytes

    seen = {}
    real = ev._run_method

    def oom_in_second(model, m, batches, *a, **k):
        seen.setdefault("batches", batches)
        if len(seen.setdefault("calls", [])) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 282.00 MiB")
        seen["calls"].append(1)
        return real(model, m, batches, *a, **k)

    monkeypatch.setattr(ev, "_run_method", oom_in_second)
    out = tmp_path / "oom"
    rc = _main(["--quick", "--model", str(tiny_dir), "--out", str(out), "--no-progress", "--methods", "full,lychee",
                   "--budgets", "64,128", "--correct-every", "0", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    batches = seen["batches"]
    assert f"the eval keeps the prefilled caches of the round's {len(batches)} batches" in err
    assert "Lower --cache-gib (more, smaller rounds)" in err and "Tried to allocate 282.00 MiB" in err
    assert "prefilled caches held on cpu: " in err
    data = json.loads((out / "results.json").read_text())
    assert [r["family"] for r in data["runs"]] == ["full"]
    # every K and V slot: layers x 2 x (rows x KV heads x slots x head dim) x 4 bytes, as the caches were built
    want = 0
    for b in batches:
        for layer in b.cache.layers:
            want += 2 * layer.keys.numel() * 4
            assert layer.keys.dtype == torch.float32 and layer.keys.shape[0] == b.size
    assert cache_bytes(batches) >= want > 0


def test_the_estimate_line_states_the_cache_memory(tiny_dir, tmp_path, capsys):
    """Before prefilling, the eval says how much its caches will hold (prompt tokens x K and V
    bytes per token), and after, what they hold: a grid that cannot fit is visible up front."""
    from transformers import AutoModelForCausalLM

    import lychee_fx.apps.evaluate as ev

    assert _main(["--quick", "--model", str(tiny_dir), "--out", str(tmp_path), "--no-progress", "--methods", "full",
                     "--threads", "1"]) == 0
    err = capsys.readouterr().err
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    cfg = model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert ev._kv_bytes_per_token(model) == per_token
    tokens = int(err.split(" prompt tokens to prefill")[0].rsplit(" ", 1)[1])
    assert f"about {tokens * per_token / 2**30:.1f} GiB, held for the whole run" in err
    assert "prefilled caches held on cpu: " in err


def test_rounds_change_no_result(tiny_dir, tmp_path, quick_run):
    """With ``--cache-gib`` below one batch's caches every batch runs in a round of its own
    (prefilled, decoded by the reference and each method, freed): the same records as the one
    round of the quick run, to the last token and nll."""
    from lychee_fx.apps.evaluate import plan_rounds

    _, first = quick_run
    out = tmp_path / "rounds"
    assert _main(["--quick", "--model", str(tiny_dir), "--out", str(out), "--no-progress", "--methods", "full,lychee",
                     "--budgets", "64,128", "--correct-every", "0", "--cache-gib", "1e-9", "--threads", "1"]) == 0
    data = json.loads((out / "results.json").read_text())
    whole = json.loads((first / "results.json").read_text())
    assert data["estimate"]["rounds"] == data["estimate"]["batches"] > 1 and whole["estimate"]["rounds"] == 1
    a = {r["key"]: r for r in whole["runs"]}
    for r in data["runs"]:
        assert r["items"] == a[r["key"]]["items"], r["key"]
        assert r["graphs"] == data["estimate"]["rounds"]  # one compile per round
    assert data["reference"]["items"] == whole["reference"]["items"]

    class B:  # batches of 10 prompt tokens (+ 1 fed) x size rows
        def __init__(self, size):
            self.size, self.ids = size, torch.zeros(1, 11)

    bs = [B(1), B(2), B(1), B(3)]
    assert plan_rounds(bs, 1, None) == [[0, 1, 2, 3]]
    assert plan_rounds(bs, 1, 30) == [[0, 1], [2], [3]]  # 10 + 20, then 10 (+ 30 > 30), then 30
    assert plan_rounds(bs, 1, 5) == [[0], [1], [2], [3]]  # a batch over the limit is a round of its own
