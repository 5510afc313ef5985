"""Influence op benchmark: every path side by side in one process, interleaved rounds, medians.

Workload (defaults = issue 16's shape): N = 50,000 fp16 train features, k = 1024,
M = 2,000 fp32 targets in T = 10 tasks; per-task max (and top-m, m = 8).
Rows (``icons_fast.bench.ops.influence_providers``, the same as ``icons-fast bench``):

- ``fp32 GEMM alone`` / ``bf16 GEMM alone``: ``train @ targets.T`` with inputs
  already converted (what the machine's BLAS does, the floor of any path);
- ``ours auto max -> <backend>`` / ``ours auto topm -> <backend>``:
  ``segment_reduce(..., backend="auto")``, naming the backend the measured
  dispatch picked on this machine;
- each available backend on max (``blas``, ``cpp``, ``blas-bf16``, and the
  blocked torch reference ``torch blocked max``);
- ``torch materialise max``: upcast + one GEMM forming ``[N, M]`` + amax.

Columns: median seconds, GFLOP/s (2 N M k), ``x GEMM`` = time over the plain
GEMM at the same precision (1.0 = as fast as the BLAS alone), ``x ref`` = time
over the blocked torch reference of the same reduction (< 1 = faster). Rounds
are interleaved so a change of load on a shared machine hits every row alike;
the header names the CPU, its ISA and the load average.

    python benchmarks/bench_influence.py                 # issue shape, ~10 min on 2 busy cores
    python benchmarks/bench_influence.py --quick         # N = 8,192
    python benchmarks/bench_influence.py --block-rows-scan   # also blas at 256 .. 4096 rows per block
"""
from __future__ import annotations

import argparse
import datetime
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: two runtimes share the cores

import torch  # noqa: E402

from icons_fast.bench import timing  # noqa: E402
from icons_fast.bench.ops import influence_providers  # noqa: E402
from icons_fast.bench.suite import run_influence_suite  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--m", type=int, default=2_000)
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch / OpenMP threads (0 = library default)")
    ap.add_argument("--quick", action="store_true", help="N = 8,192")
    ap.add_argument("--block-rows-scan", action="store_true", help="also time blas at 256, 1024, 4096 rows per block")
    ap.add_argument("--csv", default=None, help="also write the rows as CSV")
    args = ap.parse_args()
    if args.quick:
        args.n = 8_192
    if args.threads:
        torch.set_num_threads(args.threads)
    env = timing.env_info("cpu")
    load = os.getloadavg()
    print(f"# bench_influence  {datetime.date.today()}  {env['device']}  torch {env['torch']}  "
          f"threads {env['threads']}  load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"# N={args.n:,} k={args.k} M={args.m} T={args.tasks}  fp16 train, fp32 targets, "
          f"medians of {args.repeats} interleaved rounds")
    scan = (256, 1024, 4096) if args.block_rows_scan else ()
    provs = influence_providers(args.n, args.k, args.m, args.tasks, "cpu", blas_block_rows=scan)
    rows = run_influence_suite(provs, "", args.repeats, env, timing.synchronizer("cpu"))
    print(f"{'path':<30}{'time s':>9}{'GFLOP/s':>9}{'x GEMM':>8}{'x ref':>7}  note")
    for r in rows:
        vs_ref = f"{r['vs_ref']:>7.2f}" if r["vs_ref"] != "" else f"{'':>7}"
        print(f"{r['provider']:<30}{r['median_s']:>9.3f}{r['tflops'] * 1e3:>9.0f}{r['vs_gemm']:>8.2f}{vs_ref}  {r['note']}")
    if args.csv:
        timing.write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
