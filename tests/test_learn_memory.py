"""profile_steps (learn_roles' own step, timed) and examples/learn_roles_memory.py, which
reports it per context; on the CPU, tiny sizes. Checks shapes and sense, never a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lychee_fx.learn import LearnConfig
from lychee_fx.learn.student import StudentAttention
from lychee_fx.learn.train import profile_steps
from lychee_fx.options import DecodeOptions
from tests.learn_support import single_thread  # noqa: F401  (autouse fixture)
from tests.tiny_models import VOCAB, hf_model

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(budget=16, block_size=4, sink=4, recent=4)


def _pair(prompt_len=60, answer_len=6):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, VOCAB, (1, prompt_len), generator=gen), torch.randint(3, VOCAB, (1, answer_len), generator=gen)


def test_profile_steps_times_the_training_step_and_leaves_the_model_as_it_was():
    model, _ = hf_model("llama", layers=3)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prof = profile_steps(model, *_pair(), config=LearnConfig(count=3, **TINY), steps=3, warmup=1)
    assert len(prof["step_s"]) == 3 and prof["median_step_s"] == sorted(prof["step_s"])[1]
    assert prof["prefill_s"] > 0 and all(t > 0 for t in prof["step_s"])
    assert (prof["device"], prof["dtype"], prof["prompt_tokens"], prof["answer_tokens"]) == ("cpu", "float32", 60, 6)
    assert prof["peak_step_bytes"] is None, "no CUDA memory to report on the CPU"
    records = prof["records"]
    assert len(records) == 4 and all(isinstance(r["loss"], float) for r in records), "warm-up included, settled"
    assert model.training and model.config._attn_implementation == "sdpa"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(steps=0), ValueError, "steps must be >= 1, got 0"),
        (dict(warmup=-1), ValueError, "warmup must be >= 0, got -1"),
        (dict(steps=1.5), TypeError, r"steps must be an int, got float \(1\.5\)"),
        (dict(config={"steps": 1}), TypeError, "config must be a LearnConfig, got dict"),
    ],
)
def test_profile_steps_checks_its_input(kwargs, error, match):
    model, _ = hf_model("llama", layers=2)
    with pytest.raises(error, match=match):
        profile_steps(model, *_pair(), **kwargs)


def test_the_student_refuses_gates_on_another_device_than_the_model():
    attention = StudentAttention(DecodeOptions(**TINY), 2, 2)
    with pytest.raises(ValueError, match=r"host_gates must be a CPU tensor of shape \(2, 2\), got cpu \(3, 2\)"):
        attention.begin(torch.ones(2, 2), torch.ones(3, 2))
    attention.begin(torch.ones(2, 2, device="meta"), torch.ones(2, 2))
    q = torch.zeros(1, 4, 1, 8)
    kv = torch.zeros(1, 2, 5, 8)
    with pytest.raises(ValueError, match="gates must be on the model's device: query is on cpu, gates on meta"):
        attention(None, q, kv, kv, None)


def test_the_memory_script_runs_tiny_on_the_cpu(tmp_path):
    out = tmp_path / "memory.json"
    proc = subprocess.run(
        [sys.executable, "examples/learn_roles_memory.py", "--tiny", "--device", "cpu", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["context"] for r in result["rows"]] == [256, 512]
    assert all(len(r["step_s"]) == 3 and r["prompt_tokens"] == r["context"] and r["answer_tokens"] == 32 for r in result["rows"])
    assert result["entry_point"] == "lychee_fx.learn.train.profile_steps" and result["dtype"] == "bfloat16"
    assert result["shape"]["num_hidden_layers"] == 4 and result["count"] == 2, "1 in 8 of 4 x 2, but at least layer 0's 2"
    assert "prefill s" in proc.stdout and "step s" in proc.stdout


def test_the_memory_script_refuses_a_bad_dtype(tmp_path):
    proc = subprocess.run(
        [sys.executable, "examples/learn_roles_memory.py", "--tiny", "--device", "cpu", "--dtype", "float16",
         "--out", str(tmp_path / "m.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0 and "--dtype must be one of float32, bfloat16, got 'float16'" in proc.stderr
