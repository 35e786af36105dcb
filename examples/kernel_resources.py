"""Registers, spills and a PTX fingerprint of the retrieval reduce kernel, per selection config,
compiled for a GPU that need not be here (no device time: Triton compiles and ptxas assembles
on the CPU).

    python examples/kernel_resources.py                          # the default grid, sm_90 (H200)
    python examples/kernel_resources.py --digit-bits 4 --keys wide --chunks 4096

The kernel is compiled with the compile-time arguments the launcher gives it
(``launch.reduce_constants``) for the Llama-3-8B shape (G 4, D 128, budget 4096 at block 64),
rows of ``--blocks`` blocks. The PTX fingerprint (sha256 of the PTX without comments and debug
lines) tells whether two versions of the source compile to the same kernel (with the same
Triton: the PTX differs between versions; select_kernel [Note: alone and end to end]). ptxas
reports registers, spill stores and the stack frame; spills into local memory are the first
suspect when a variant is slow.

Prints a table and writes ``kernel_resources.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bench_attention import BLOCK, BUDGET, D, HKV, HQ
from bench_select import add_config_args, key_width, select_configs
from lychee_fx.codegen import launch
from lychee_fx.codegen.select_kernel import retrieval_reduce_kernel

G = HQ // HKV
POINTERS = dict(PART_O="*fp32", PART_M="*fp32", PART_L="*fp32", OUT="*bf16", BLK_SCORE="*fp32", BLK_CNT="*i32",
                HEADS="*i32", SEL_OUT="*i32")


def compile_reduce(constants: dict, arch: int):
    """The reduce kernel compiled for ``sm_<arch>`` with these compile-time arguments."""
    constants = dict(constants)
    num_warps = constants.pop("num_warps")
    params = inspect.signature(retrieval_reduce_kernel.fn).parameters
    signature = {n: POINTERS.get(n, "constexpr" if n in constants else "i32") for n in params}
    src = ASTSource(fn=retrieval_reduce_kernel, signature=signature, constexprs=constants)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))


def fingerprint(ptx: str) -> str:
    """sha256 of the PTX without comments, ``.loc``/``.file`` lines, debug sections and the
    ``$L__tmp`` labels that only the debug line table refers to (their numbering follows the
    source's inlining, not the code)."""
    text = re.sub(r"\.section\s+\.debug.*", "", ptx, flags=re.S)
    lines = [ln for ln in text.splitlines()
             if ln.strip() and not re.match(r"\s*(//|\.loc|\.file|\$L__tmp\d+:)", ln)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _ptxas() -> list[Path]:
    """The ptxas binaries Triton ships, newest first (its PTX version may need the newer one)."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return [p for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.exists()]


def resources(ptx: str, arch: int) -> dict:
    """Registers, spill stores (bytes) and stack frame (bytes) that ptxas reports."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        errors = []
        for ptxas in _ptxas():
            proc = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{arch}a", str(src), "-o", str(Path(tmp) / "k.cubin")],
                                  capture_output=True, text=True)
            out = proc.stdout + proc.stderr
            regs = re.search(r"Used (\d+) registers", out)
            if proc.returncode == 0 and regs:
                spills = re.search(r"(\d+) bytes spill stores", out)
                stack = re.search(r"(\d+) bytes stack frame", out)
                return dict(registers=int(regs.group(1)), spill_store_bytes=int(spills.group(1)) if spills else 0,
                            stack_bytes=int(stack.group(1)) if stack else 0, ptxas=ptxas.name)
            errors.append(f"{ptxas.name}: {out.strip().splitlines()[-1] if out.strip() else proc.returncode}")
    raise RuntimeError("no ptxas of Triton's assembled the kernel: " + "; ".join(errors))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--blocks", type=int, default=2049, help="blocks per row (2049: 128K + a few slots at block 64)")
    p.add_argument("--static", action="store_true",
                   help="rows of exactly --blocks blocks (default: of unknown length, as under dynamic shapes, "
                        "where the launcher takes the largest tile)")
    add_config_args(p, digit_bits=[2, 4], warps=[8], keys=["wide", "narrow"], early_exit=[1])
    p.add_argument("--no-merge", dest="merge", action="store_false", help="the selection programs only")
    args = p.parse_args(argv)
    if launch.interpreting():
        raise SystemExit("TRITON_INTERPRET=1 is set: the launcher would pick the interpreter's tiles; unset it")
    args.out.mkdir(parents=True, exist_ok=True)
    args.dynamic = not args.static
    nb = object() if args.dynamic else args.blocks  # a non-int row length stands for a symbolic one
    rows = []
    for cfg in select_configs(args):
        constants = launch.reduce_constants(G, D, BUDGET // BLOCK, True, nb, cfg, merge=args.merge)
        ptx = compile_reduce(constants, args.arch).asm["ptx"]
        row = dict(cfg._asdict(), tile=constants["CHUNK"], default=cfg == launch.SELECT_CONFIG,
                   ptx_sha=fingerprint(ptx), **resources(ptx, args.arch))
        rows.append(row)
        print(f"{cfg.digit_bits} bit / {cfg.num_warps} w / {key_width(cfg.wide_keys)} / tile {row['tile']}"
              f"{' / early exit' if cfg.early_exit else ''}: "
              f"{row['registers']} registers, {row['spill_store_bytes']} B spilled, ptx {row['ptx_sha']}", flush=True)
    report = dict(arch=args.arch, triton=triton.__version__, blocks=args.blocks, dynamic=args.dynamic, merge=args.merge,
                  rows=rows)
    (args.out / "kernel_resources.json").write_text(json.dumps(report, indent=1))
    print(table(report))


def table(report) -> str:
    out = [f"# retrieval_reduce_kernel for sm_{report['arch']}, triton {report['triton']}, "
           f"{'dynamic rows' if report['dynamic'] else str(report['blocks']) + ' blocks per row'}"
           f"{'' if report['merge'] else ', selection only'}",
           "| digit bits | warps | keys | tile | early exit | registers | spill stores (B) | stack (B) | PTX sha256 | |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        out.append(f"| {r['digit_bits']} | {r['num_warps']} | {key_width(r['wide_keys'])} | {r['tile']} "
                   f"| {'yes' if r.get('early_exit') else ''} "
                   f"| {r['registers']} | {r['spill_store_bytes']} | {r['stack_bytes']} | {r['ptx_sha']} "
                   f"| {'default' if r['default'] else ''} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
