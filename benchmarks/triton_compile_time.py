"""Compile time and register spills of the projection kernel's autotune set, for sm_90, without a GPU.

Each configuration of ``kernels/project.py``'s autotune set is compiled the
way a first GPU launch compiles it (Triton -> PTX -> cubin with the ptxas
Triton ships, ``-v``), for a target named here rather than read from a
driver, so it runs on a CPU-only machine. Per configuration it records the
wall time of the whole compile, the registers per thread and the spill
stores/loads ptxas reports. Autotuning compiles every configuration that
survives pruning once per (BLOCK_B, ADAM, N_TERMS, input dtype), so the sum
of a combination's times is what the first call of that combination costs
before any benchmarking; ``--all`` also lists the pruned ones (the spill
figures that justify the pruning).

The signature is the one a launch with the suite's shapes gets: 16-aligned
pointers, 16-divisible ``rows_per_split`` and row stride, sizes unspecialized.
A configuration that is kept but spills (or uses 250+ registers), or pruned
but fits, is marked "!": ``NO_SPILL`` in ``kernels/project.py`` then needs
the new measurement.

Measured on a shared 2-core CPU machine (triton 3.9, sm_90, Adam, bf16x2,
fp32 gradients; a config takes 0.8-4 s, up to 15 s for the large spilling
ones): BLOCK_B = 16 keeps 15 of 18 configurations, 23-37 s to compile
(all 18: 53 s in the same run); BLOCK_B = 32 keeps 9 (10.5 s, all 18:
~70-100 s); BLOCK_B = 64 keeps 4 (4.1 s, all 18: ~105 s). Each further
(BLOCK_B, ADAM, N_TERMS, dtype) a run meets costs its set again.

    python benchmarks/triton_compile_time.py                       # BLOCK_B 16, Adam, bf16x2, fp32 grads
    python benchmarks/triton_compile_time.py --block-b 16 32 64 --all
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import tempfile
import time

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from icons_fast.kernels.project import CHUNK_ROWS, PRECISIONS, _project_kernel, autotune_configs, prune_configs

INT_ARGS = ("n_samples", "n_rows", "proj_dim")  # not specialized by the kernel
ALIGNED_ARGS = ("rows_per_split", "stride_gb")  # specialized: 16-divisible at the suite's shapes
FLOAT_ARGS = ("beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "eps", "inv_sqrt_k")
PTR_ARGS = ("g_ptr", "m_ptr", "v_ptr", "part_ptr")
REGISTER_MARGIN = 250  # kept configurations stay below this many of the 255 registers (see NO_SPILL)


def source(cfg: triton.Config, block_b: int, adam: bool, n_terms: int, g_dtype: str) -> ASTSource:
    """The ``ASTSource`` a launch with ``cfg`` compiles (16-divisible ints and aligned pointers)."""
    names = _project_kernel.arg_names
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in PTR_ARGS:
            signature[name] = "*" + (g_dtype if name == "g_ptr" else "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ALIGNED_ARGS:
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in INT_ARGS:
            signature[name] = "i32"
        elif name == "h1":
            signature[name] = "i32"
        elif name == "row_start":
            signature[name] = "i64"
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "constexpr"
    constexprs = dict(ADAM=adam, N_TERMS=n_terms, MMA_DTYPE=triton.language.bfloat16, BLOCK_B=block_b,
                      CHUNK_P=CHUNK_ROWS, **cfg.kwargs)
    return ASTSource(_project_kernel, signature, constexprs, attrs)


def compile_one(cfg: triton.Config, block_b: int, adam: bool, n_terms: int, g_dtype: str, arch: int) -> dict:
    """Compile one configuration; return seconds, registers and spill bytes (from ptxas -v)."""
    src = source(cfg, block_b, adam, n_terms, g_dtype)
    log = io.StringIO()
    start = time.perf_counter()
    with knobs.nvidia.scope(), knobs.cache.scope(), tempfile.TemporaryDirectory() as cache_dir:
        knobs.nvidia.dump_ptxas_log = True
        knobs.cache.dir = cache_dir  # an empty cache: a fresh compile, as on a new machine
        with contextlib.redirect_stdout(log):
            triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    seconds = time.perf_counter() - start
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return dict(seconds=seconds, registers=int(regs.group(1)) if regs else -1,
                spill_stores=int(spill.group(1)) if spill else -1, spill_loads=int(spill.group(2)) if spill else -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block-b", type=int, nargs="+", default=[16], help="samples per program (16, 32, 64)")
    ap.add_argument("--precision", nargs="+", default=["bf16x2"], choices=sorted(PRECISIONS))
    ap.add_argument("--no-adam", action="store_true", help="compile without Adam (default: with)")
    ap.add_argument("--g-dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="gradient dtype")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    ap.add_argument("--all", action="store_true", help="also compile the configurations pruning drops")
    args = ap.parse_args()

    adam = not args.no_adam
    print(f"triton {triton.__version__}, sm_{args.arch}, ADAM={adam}, grads {args.g_dtype}")
    print(f"{'B_B':>4} {'terms':>5} {'B_P':>4} {'B_K':>4} {'warps':>5} {'kept':>5} {'s':>6} {'regs':>5} "
          f"{'spill st':>8} {'spill ld':>8}")
    for block_b in args.block_b:
        for precision in args.precision:
            n_terms = PRECISIONS[precision]
            kept = prune_configs(autotune_configs(), None, BLOCK_B=block_b, N_TERMS=n_terms, ADAM=adam)
            total = 0.0
            for cfg in autotune_configs():
                is_kept = any(cfg.kwargs == k.kwargs and cfg.num_warps == k.num_warps for k in kept)
                if not (is_kept or args.all):
                    continue
                r = compile_one(cfg, block_b, adam, n_terms, args.g_dtype, args.arch)
                total += r["seconds"] if is_kept else 0.0
                fits = r["spill_stores"] == 0 and 0 <= r["registers"] < REGISTER_MARGIN
                flag = " !" if is_kept != fits else ""
                print(f"{block_b:>4} {n_terms:>5} {cfg.kwargs['BLOCK_P']:>4} {cfg.kwargs['BLOCK_K']:>4} "
                      f"{cfg.num_warps:>5} {'yes' if is_kept else 'no':>5} {r['seconds']:>6.2f} {r['registers']:>5} "
                      f"{r['spill_stores']:>8} {r['spill_loads']:>8}{flag}", flush=True)
            print(f"BLOCK_B={block_b} {precision}: {len(kept)} configurations kept, compile {total:.1f} s in all")


if __name__ == "__main__":
    main()
