"""``lychee_fx.backend``: input validation, per-compile config, cache keys, no global state."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import lychee_fx
from lychee_fx import HeadRoles
from tests.attn_modules import Stack


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(budget=100, block_size=64), ValueError, "budget must be a positive multiple of block_size=64, got budget=100"),
        (dict(budget=0), ValueError, "budget must be >= 1, got 0"),
        (dict(block_size=0), ValueError, "block_size must be >= 1, got 0"),
        (dict(block_size=16.0), TypeError, "block_size must be an int, got float"),
        (dict(sink=-1), ValueError, "sink must be >= 0, got -1"),
        (dict(recent=0), ValueError, "recent must be >= 1, got 0"),
        (dict(budget=256, block_size=64, sink=128, recent=256), ValueError, r"forced blocks must fit .* 2 \+ 4 \+ 2 = 8 > 4"),
        (dict(compiler="tvm"), ValueError, "compiler must be one of .* got 'tvm'"),
    ],
)
def test_backend_validates_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        lychee_fx.backend(HeadRoles.all_retrieval(2, 2), **kwargs)


def test_backend_is_keyword_only():
    with pytest.raises(TypeError):
        lychee_fx.backend(HeadRoles.all_retrieval(2, 2), 4096)  # type: ignore[misc]


def test_backend_accepts_every_role_map_form(tmp_path):
    roles = HeadRoles([[True, False], [False, True]])
    path = tmp_path / "roles.json"
    roles.save(path)
    for form in (roles, roles.table, [[True, False], [False, True]], path, str(path)):
        assert lychee_fx.backend(form).roles == roles
    with pytest.raises(TypeError, match="got dict"):
        lychee_fx.backend({"a": 1})


def test_cache_key_tracks_roles_and_options():
    a = lychee_fx.backend(HeadRoles.first_k(2, 2, 1))
    assert a.cache_key == lychee_fx.backend(HeadRoles.first_k(2, 2, 1)).cache_key
    assert a.cache_key != lychee_fx.backend(HeadRoles.first_k(2, 2, 2)).cache_key
    assert a.cache_key != lychee_fx.backend(HeadRoles.first_k(2, 2, 1), budget=2048).cache_key
    patches = a.config_patches(None, None)
    uuid = patches["post_grad_custom_post_pass"].uuid()
    assert uuid.startswith(f"lychee_fx:{a.cache_key}:") and uuid.endswith(":None")


def test_cache_key_tracks_pinned_kernel_configs(monkeypatch):
    """Kernel configs pinned at run time (``bench_decode --split-config``, ``--select-config``)
    key the cache: a graph compiled with the default configs is not served to a pinned run,
    nor back."""
    from lychee_fx.codegen import launch

    census = lychee_fx.backend(HeadRoles.first_k(2, 2, 1)).config_patches(None, None)["post_grad_custom_post_pass"]
    tuned = census.uuid()
    monkeypatch.setattr(launch, "SPLIT_CONFIG", launch.SplitConfigs(retrieval=launch.SplitConfig(64, 4, 3)))
    pinned = census.uuid()
    assert pinned != tuned
    monkeypatch.setattr(launch, "SELECT_CONFIG", launch.SelectConfig(digit_bits=4))
    assert census.uuid() not in (tuned, pinned)


def test_mode_and_options_become_per_compile_patches():
    be = lychee_fx.backend(HeadRoles.all_retrieval(2, 2))
    p = be.config_patches("reduce-overhead", {"max_autotune": True})
    assert p["triton.cudagraphs"] is True and p["max_autotune"] is True
    assert be.config_patches("default", None).keys() == {"post_grad_custom_post_pass"}

    class UserPass:
        def __init__(self):
            self.calls = 0

        def __call__(self, graph):
            self.calls += 1

        def uuid(self):
            return "user-pass-v1"

    user = UserPass()
    p = be.config_patches(None, {"post_grad_custom_post_pass": user})
    p["post_grad_custom_post_pass"](torch.fx.Graph())
    assert user.calls == 1 and p["post_grad_custom_post_pass"].uuid().endswith("user-pass-v1")


def test_torch_compile_mode_reaches_the_backend():
    seen = []

    class Spy(lychee_fx.LycheeBackend):
        def config_patches(self, mode, options):
            seen.append((mode, options))
            return super().config_patches(mode, options)

    be = Spy(HeadRoles.all_retrieval(1, 1), lychee_fx.DecodeOptions())
    q = torch.randn(1, 1, 1, 8)
    k = torch.randn(1, 1, 5, 8)
    torch.compile(Stack(1, "gqa"), backend=be, mode="max-autotune-no-cudagraphs")(q[None], k[None], k[None], None)
    assert seen and seen[0][0] == "max-autotune-no-cudagraphs"


def test_compiling_writes_no_global_config():
    before = (torch._inductor.config.get_config_copy(), torch._dynamo.config.get_config_copy())
    be = lychee_fx.backend(HeadRoles.all_retrieval(1, 1))
    q, k = torch.randn(1, 1, 1, 1, 8), torch.randn(1, 1, 1, 5, 8)
    torch.compile(Stack(1, "gqa"), backend=be)(q, k, k, None)
    after = (torch._inductor.config.get_config_copy(), torch._dynamo.config.get_config_copy())
    assert before == after
    assert be.report.counters["rewritten"] == 1


def test_import_changes_no_global_config():
    code = (
        "import torch, torch._inductor.config as ic, torch._dynamo.config as dc\n"
        "a = (ic.get_config_copy(), dc.get_config_copy())\n"
        "import lychee_fx\n"
        "assert (ic.get_config_copy(), dc.get_config_copy()) == a\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_deepcopy_keeps_the_report():
    """HF's CompileConfig deep-copies its backend: the copy must report where the user looks."""
    be = lychee_fx.backend(HeadRoles.all_retrieval(1, 1))
    assert copy.deepcopy(be) is be and copy.copy(be) is be


def test_report_summary_lists_every_site():
    be = lychee_fx.backend(HeadRoles.all_retrieval(2, 1), compiler="eager")
    q, k = torch.randn(2, 1, 1, 1, 8), torch.randn(2, 1, 1, 5, 8)
    torch.compile(Stack(2, "gqa"), backend=be)(q, k, k, None)
    text = be.report.summary()
    assert "2 attention site(s): 2 rewritten, 0 declined" in text
    assert "layer 0" in text and "layer 1" in text
