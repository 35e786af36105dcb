"""Role maps compared on the passkey task with the embedded model (SmolLM2-135M-Instruct):
a learned map against a random map and a TidalDecode schedule with the same number of
retrieval KV heads, and full attention.

    python examples/compare_roles.py --contexts 1024 2048 3072 --prompts 10 --budget 256

Each prompt is prefilled once with full attention (SPEC 1.1 never changes prefill) and its
first answer token taken from the prefill; then, per map, ``model.compile(backend=
lychee_fx.backend(roles, compiler="eager", ...))`` and ``model.generate`` continue greedily
from a copy of that cache, so every generated token is a LycheeDecode decoding step. A
prompt counts as found when its passkey appears verbatim in the answer. With ``--mse N``,
also the training objective on the first N prompts of each context (unseen in training):
the MSE of the final hidden states on the teacher-forced answer against full attention,
relative to the teacher's mean square. Prints a markdown table and writes the results as
JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.resources
import json
import time

import torch

import lychee_fx
from lychee_fx import HeadRoles


def role_maps(learned: HeadRoles, random_seeds: list[int], tidal_layers: list[int]) -> dict[str, HeadRoles]:
    """The maps to compare, all with the learned map's number of retrieval heads."""
    layers, hkv, count = learned.num_layers, learned.num_kv_heads, learned.num_retrieval
    maps = {"learned": learned}
    for seed in random_seeds:
        maps[f"random (seed {seed})"] = HeadRoles.random(layers, hkv, count, seed=seed)
    tidal = HeadRoles.tidal_decode(layers, hkv, tidal_layers)
    if tidal.num_retrieval != count:
        raise ValueError(
            f"TidalDecode layers {tidal_layers} give {tidal.num_retrieval} retrieval heads, expected {count} "
            "(the learned map's count); pass --tidal-layers with count / KV heads layers"
        )
    maps[f"TidalDecode (layers {', '.join(map(str, tidal_layers))})"] = tidal
    return maps


@torch.no_grad()
def prefill(model, ids: torch.Tensor):
    """ids (1, P) -> (cache after the prompt, first answer token (1, 1))."""
    from transformers import DynamicCache

    from lychee_fx.learn.examples import cache_kwarg

    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache}).logits
    return cache, logits[:, -1:].argmax(-1)


@torch.no_grad()
def continue_answer(model, ids, cache, first, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding from a prefilled cache (copied); returns the answer tokens (1, <= 1 + new)."""
    from lychee_fx.learn.examples import cache_kwarg

    seq = torch.cat([ids, first], dim=1)
    out = model.generate(
        seq, max_new_tokens=max_new_tokens, do_sample=False, attention_mask=torch.ones_like(seq),
        **{cache_kwarg(model): copy.deepcopy(cache)},
    )
    return out[:, ids.shape[1]:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--roles", default=None, help="learned map (default: the shipped map of the embedded model)")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 3072])
    p.add_argument("--prompts", type=int, default=10, help="prompts per context")
    p.add_argument("--keys", type=int, default=1, help="passkeys per prompt")
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--sink", type=int, default=16)
    p.add_argument("--recent", type=int, default=64)
    p.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tidal-layers", type=int, nargs="+", default=[0, 1, 2, 12])
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=1000, help="prompt seeds start here (training used others)")
    p.add_argument("--mse", type=int, default=0, help="also the held-out relative MSE on N prompts per context")
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args(argv)

    from lychee_fx.apps.embedded import load_model
    from lychee_fx.apps.passkey import haystack_text, make_passkey_prompt, score_answer

    shipped = importlib.resources.files("lychee_fx.apps") / "data" / "smollm2-135m.roles.json"
    learned = HeadRoles.load(args.roles or str(shipped))
    maps = role_maps(learned, args.random_seeds, args.tidal_layers)
    model, tok = load_model(None)
    text = haystack_text()
    prompts = [
        (ctx, make_passkey_prompt(tok, ctx, num_keys=args.keys, seed=args.seed + 100 * ctx + i, haystack=text))
        for ctx in args.contexts for i in range(args.prompts)
    ]
    t0 = time.perf_counter()
    prefilled = [prefill(model, pr.input_ids) for _, pr in prompts]
    print(f"prefilled {len(prompts)} prompts in {time.perf_counter() - t0:.0f} s")

    from lychee_fx.learn.examples import prepare_example, roles_mse

    held_out = [prepare_example(model, pr.input_ids, pr.answer_ids)
                for i, (_, pr) in enumerate(prompts) if i % args.prompts < args.mse]
    scale = sum(float(ex.target.pow(2).mean()) for ex in held_out) / max(1, len(held_out))
    found: dict[str, dict[int, list[float]]] = {}
    rel_mse: dict[str, float] = {}

    def run(name: str) -> None:
        t = time.perf_counter()
        found[name] = {ctx: [] for ctx in args.contexts}
        for (ctx, pr), (cache, first) in zip(prompts, prefilled):
            answer = tok.decode(continue_answer(model, pr.input_ids, cache, first, args.new_tokens)[0])
            found[name][ctx].append(score_answer(answer, pr.passkeys))
        print(f"{name}: {sum(map(sum, found[name].values()))} / {len(prompts)} ({time.perf_counter() - t:.0f} s)")

    run("full attention")
    opts = dict(budget=args.budget, block_size=args.block_size, sink=args.sink, recent=args.recent)
    for name, roles in maps.items():
        if held_out:
            rel_mse[name] = roles_mse(model, held_out, roles.table, lychee_fx.DecodeOptions(**opts)) / scale
        torch._dynamo.reset()
        be = lychee_fx.backend(roles, compiler="eager", **opts)
        model.compile(backend=be)
        run(name)
        print(f"  compiled {be.report.graphs} graph(s), {be.report.counters['rewritten']} attention sites rewritten")
        if be.report.counters["rewritten"] == 0:
            raise RuntimeError(f"{name}: the backend rewrote no attention site:\n{be.report.summary()}")

    mse_head = f" held-out rel. MSE ({len(held_out)} prompts) |" if held_out else ""
    head = "| map | " + " | ".join(f"{c} tokens" for c in args.contexts) + " | all |" + mse_head
    lines = [head, "|" + "---|" * (len(args.contexts) + 2 + bool(held_out))]
    for name, per_ctx in found.items():
        cells = [f"{sum(v):g}/{len(v)}" for v in per_ctx.values()]
        total = sum(sum(v) for v in per_ctx.values())
        mse_cell = (f" {rel_mse[name]:.4f} |" if name in rel_mse else " 0 |") if held_out else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {total:g}/{len(prompts)} |" + mse_cell)
    print(f"\n{learned.num_retrieval} of {learned.num_layers * learned.num_kv_heads} KV heads retrieval; "
          f"budget {args.budget}, block_size {args.block_size}, sink {args.sink}, recent {args.recent}; "
          f"{args.keys} passkey(s) per prompt\n")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "found": found, "rel_mse": rel_mse,
                       "learned_meta_command": learned.meta.get("command")}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
