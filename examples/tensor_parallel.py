"""Tensor parallelism: lychee on a model sharded over several processes with torch.distributed.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py                      # CPU, gloo, tiny random Llama
    torchrun --nproc-per-node 2 examples/tensor_parallel.py --plan hand --cache dynamic --check
    torchrun --nproc-per-node 2 examples/tensor_parallel.py --model-dir PATH     # a local HF model folder
    torchrun --nproc-per-node 2 examples/tensor_parallel.py --device cuda --model llama3-8b --layers 8 \\
        --prompt 32768 --new 64 --time --check                                  # NCCL, one GPU per rank

Each rank loads the model sharded by HF's own plan (``--plan hf``: ``from_pretrained(...,
tp_plan="auto")``) or by a hand-written ``parallelize_module`` plan (``--plan hand``: q, k, v,
gate and up projections colwise, o and down rowwise), and decodes greedily with HF
``generate()`` through ``lychee_fx.backend(roles)``, the role map given whole: the backend
finds which KV heads the rank holds (from the DTensor parameters' device mesh) and applies
those columns. Without ``--model-dir`` the model is random, built from a config and saved by
rank 0 to a temporary folder that every rank loads (``tp_plan`` applies at loading time).

Each rank prints what it holds, its backend report and its tokens. ``--check`` decodes the
same model unsharded in the same process with the whole map and compares tokens and logits;
``--time`` prints milliseconds per generated token, ``(t(n) - t(1)) / (n - 1)`` of
``generate`` (SPEC 3.1), of the sharded path and, with ``--check``, of the unsharded one,
timed in turns (``--repeats``): on one GPU (``--nproc-per-node 1``) the two must agree.
The static cache goes through ``CompileConfig(backend=...)`` (CUDA graphs on CUDA), the
dynamic cache through ``model.compile(backend=...)``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import lychee_fx

MODELS = {
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=4, vocab_size=96),
    "tiny-qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=16, vocab_size=96),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "llama3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}


def init_distributed(device: str) -> torch.device:
    """Join torchrun's group: NCCL and the GPU of LOCAL_RANK on CUDA, gloo on the CPU."""
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")


def random_model_dir(name: str, layers: int | None, max_len: int, dtype: torch.dtype, device: torch.device) -> Path:
    """Rank 0 builds a random model of shape ``name`` (seeded) and saves it; every rank gets
    the folder's path. One host: the folder is in its temporary directory."""
    path = [None]
    if dist.get_rank() == 0:
        from transformers import AutoConfig, AutoModelForCausalLM

        spec = dict(MODELS[name])
        if layers is not None:
            spec["num_hidden_layers"] = layers
        cfg = AutoConfig.for_model(spec.pop("model_type"), max_position_embeddings=max_len, bos_token_id=1,
                                   eos_token_id=2, pad_token_id=0, **spec)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        path[0] = tempfile.mkdtemp(prefix="lychee_tp_")
        model.save_pretrained(path[0])
        del model
    dist.broadcast_object_list(path, src=0)
    return Path(path[0])


def hand_plan() -> dict:
    """A ``parallelize_module`` plan for HF Llama-style decoders (Llama, Qwen2/3, Mistral):
    Megatron's split, attention and MLP colwise in, rowwise out; all else replicated. Each
    rank then computes ``Hq / world`` query and ``Hkv / world`` KV heads per layer (HF's
    attention views its projections with ``-1`` heads)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    col, row = ColwiseParallel(), RowwiseParallel()
    return {
        **{f"model.layers.*.self_attn.{p}": col for p in ("q_proj", "k_proj", "v_proj")},
        "model.layers.*.self_attn.o_proj": row,
        **{f"model.layers.*.mlp.{p}": col for p in ("gate_proj", "up_proj")},
        "model.layers.*.mlp.down_proj": row,
    }


def load(path: Path, plan: str, dtype: torch.dtype, device: torch.device):
    """The model at ``path``: sharded by HF's plan (``hf``), by ``hand_plan`` (``hand``) or
    whole on this rank (``none``)."""
    from transformers import AutoModelForCausalLM

    if plan == "hf":
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=dtype).eval()
        # HF places the shards on LOCAL_RANK's device; in a world of one it applies no plan and
        # leaves the model where it loaded it.
        return model if model.device == device else model.to(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    if plan == "hand":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module

        mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("tp",))
        parallelize_module(model, mesh, hand_plan())
    return model


def prompt_ids(vocab: int, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """The prompt every rank (and the one-process check) decodes: seeded random ids (B, T)."""
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(1)).to(device)


def paper_roles(num_layers: int, hkv: int) -> lychee_fx.HeadRoles:
    """1 retrieval KV head in 8 (at least one per layer's worth), layer 0 all retrieval, then
    one head per layer at a rotating index: every rank gets retrieval heads of its own."""
    table = torch.zeros(num_layers, hkv, dtype=torch.bool)
    table[0] = True
    for layer in range(1, num_layers):
        if table.sum() >= max(num_layers * hkv // 8, hkv + 1):
            break
        table[layer, layer % hkv] = True
    return lychee_fx.HeadRoles(table)


class Decoder:
    """Greedy ``generate()`` of one model through one backend, on a fixed prompt."""

    def __init__(self, model, be, cache: str, ids: torch.Tensor):
        from transformers import CompileConfig

        self.model, self.ids, self.kw = model, ids, dict(do_sample=False, cache_implementation=cache, pad_token_id=0)
        if cache == "static":
            cfg = CompileConfig(backend=be)
            cfg._compile_all_devices = True  # HF compiles only on accelerators unless told
            self.kw["compile_config"] = cfg
        else:
            model.compile(backend=be)

    def run(self, new: int):
        """Tokens (B, new) and logits (new, B, V)."""
        with torch.no_grad():
            out = self.model.generate(self.ids, max_new_tokens=new, min_new_tokens=new, output_logits=True,
                                      return_dict_in_generate=True, **self.kw)
        return out.sequences[:, self.ids.shape[1]:], torch.stack(out.logits)

    def ms_per_token(self, new: int) -> float:
        """(t(new) - t(1)) / (new - 1), milliseconds: the decode steps, not the prefill."""
        t = []
        for n in (1, new):
            if self.ids.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            self.run(n)
            if self.ids.is_cuda:
                torch.cuda.synchronize()
            t.append(time.perf_counter() - t0)
        return 1e3 * (t[1] - t[0]) / (new - 1)


def check_line(tokens, logits, ref_tokens, ref_logits) -> str:
    """The ``--check`` verdict. Equal tokens: the largest logit difference over every step.
    Different tokens: the first step ``k`` where a row differs, the largest logit difference
    over steps 0..k (computed from the same prefix in both, so comparable) and the
    reference's smallest top-2 logit gap at step k over the rows that differ there: a gap
    below that difference is a near-tie that rounding (bfloat16, another GEMM kernel) may
    flip, not a wrong answer by itself. Tokens (B, n), logits (n, B, V)."""
    if torch.equal(tokens, ref_tokens):
        diff = (logits.float() - ref_logits.float()).abs().max().item()
        return f"check: tokens equal one process with the whole map; max |logit diff| {diff:.2e}"
    rows = tokens != ref_tokens
    k = int(rows.any(0).nonzero()[0])
    diff = (logits[: k + 1].float() - ref_logits[: k + 1].float()).abs().max().item()
    top2 = ref_logits[k].float().topk(2, dim=-1).values
    gap = (top2[:, 0] - top2[:, 1])[rows[:, k]].min().item()
    return (f"check: tokens DIFFER from one process with the whole map from step {k}; max |logit diff| up to it "
            f"{diff:.2e}, the reference's top-2 logit gap there {gap:.2e} "
            f"({'a near-tie: within the logit difference' if gap <= diff else 'NOT a near-tie'})")


def in_rank_order(text: str) -> None:
    """Print ``text`` from every rank, rank 0 first."""
    for r in range(dist.get_world_size()):
        if r == dist.get_rank():
            print(text, flush=True)
        dist.barrier()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", choices=["hf", "hand"], default="hf")
    p.add_argument("--model", choices=list(MODELS), default="tiny", help="shape of the random model")
    p.add_argument("--model-dir", type=Path, help="a local HF model folder instead of a random model")
    p.add_argument("--layers", type=int, help="override the random model's number of layers")
    p.add_argument("--roles", help="role map JSON (default: 1 in 8 retrieval, layer 0 all retrieval)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: float32 on the CPU, bfloat16 on CUDA")
    p.add_argument("--cache", choices=["static", "dynamic"], default="static")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens (random ids)")
    p.add_argument("--new", type=int, default=16, help="tokens to generate")
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--sink", type=int, default=16)
    p.add_argument("--recent", type=int, default=16)
    p.add_argument("--compiler", choices=["inductor", "eager"], default="inductor")
    p.add_argument("--check", action="store_true", help="compare with the unsharded model in this process")
    p.add_argument("--time", action="store_true", help="ms per generated token")
    p.add_argument("--repeats", type=int, default=3, help="timed turns of each path with --time")
    p.add_argument("--save", type=Path, help="write each rank's tokens, logits and report to SAVE/rank<R>.pt")
    a = p.parse_args(argv)
    if a.time and a.new < 2:
        p.error(f"--time needs --new >= 2, got {a.new}")

    device = init_distributed(a.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device == "cuda" else "float32"))
    try:
        path = a.model_dir or random_model_dir(a.model, a.layers, a.prompt + a.new + 64, dtype, device)
        model = load(path, a.plan, dtype, device)
        cfg = model.config
        roles = lychee_fx.HeadRoles.load(a.roles) if a.roles else paper_roles(cfg.num_hidden_layers, cfg.num_key_value_heads)
        opts = dict(budget=a.budget, block_size=a.block_size, sink=a.sink, recent=a.recent, compiler=a.compiler)
        ids = prompt_ids(cfg.vocab_size, a.batch, a.prompt, device)

        be = lychee_fx.backend(roles, **opts)
        sharded = Decoder(model, be, a.cache, ids)
        tokens, logits = sharded.run(a.new)
        decode = [s for s in be.report.sites if s.query_len == "1"]
        lines = [
            f"== rank {rank} of {world} ({dist.get_backend()}, {device}): {type(model).__name__}, plan {a.plan}"
            f"{' (HF applies none in a world of one)' if a.plan == 'hf' and world == 1 else ''}, "
            f"{cfg.num_hidden_layers} layers, role map {roles.num_layers} x {roles.num_kv_heads} ({roles.num_retrieval} retrieval)",
            be.report.summary() if decode else "no decode attention was compiled",
            f"tokens {tokens.tolist()}",
        ]
        if a.check:
            whole = lychee_fx.backend(roles, **opts)
            single = Decoder(load(path, "none", dtype, device), whole, a.cache, ids)
            ref_tokens, ref_logits = single.run(a.new)
            lines.append(check_line(tokens, logits, ref_tokens, ref_logits))
        if a.time:
            rows = {"sharded": sharded, **({"one process": single} if a.check else {})}
            ms = {name: [] for name in rows}
            for _ in range(a.repeats):
                for name, dec in rows.items():
                    ms[name].append(dec.ms_per_token(a.new))
            lines.append("time (ms per token, each turn): " + "; ".join(
                f"{name} {' '.join(f'{x:.2f}' for x in v)} (median {sorted(v)[len(v) // 2]:.2f})" for name, v in ms.items()))
        if a.save is not None:
            a.save.mkdir(parents=True, exist_ok=True)
            shard = be.report.shard
            torch.save(dict(tokens=tokens.cpu(), logits=logits.float().cpu(), report=be.report.summary(),
                            shard=None if shard is None else shard.kv_heads), a.save / f"rank{rank}.pt")
        in_rank_order("\n".join(lines))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
