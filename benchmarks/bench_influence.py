"""Influence op benchmark: fused blocked C++ kernel vs torch materialising the product.

Workload (defaults = the issue's goal): N = 200,000 fp16 train features, k = 1024,
M = 2,000 fp32 targets in T = 10 tasks, per-task max. Providers, each in its own
process so peak RSS is its own:

- ``ours``:  ``segment_reduce(train_fp16, targets, offsets, "max", backend="cpp")``
- ``torch``: ``p = train.float() @ targets.T`` ([N, M] fp32), then per-segment ``amax``
- ``ours-cuda`` / ``torch-cuda`` with ``--device cuda``.

Prints one row per provider: median ms over repeats, GFLOP/s (2 N M k), speed-up
over torch, peak RSS and peak RSS above the inputs (which must not grow with N:
``--scan-n`` runs ours at N/4, N/2, N to show it).

    python benchmarks/bench_influence.py            # full size, ~2 min on 2 cores
    python benchmarks/bench_influence.py --quick    # N = 20,000
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from icons_fast.bench.timing import cpu_name


def rss_mb() -> float:
    """Current resident set size (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_inputs(n: int, k: int, m: int, tasks: int, device: str):
    """fp16 unit-ish train rows made in chunks (no fp32 [N, k] temporary), fp32 targets, offsets."""
    g = torch.Generator().manual_seed(0)
    train = torch.empty(n, k, dtype=torch.float16)
    for i in range(0, n, 8192):
        rows = min(8192, n - i)
        train[i : i + rows] = (torch.randn(rows, k, generator=g) / k**0.5).half()
    targets = torch.randn(m, k, generator=g) / k**0.5
    sizes = [m // tasks + (1 if t < m % tasks else 0) for t in range(tasks)]
    offsets = torch.tensor([0] + sizes).cumsum(0)
    return train.to(device), targets.to(device), offsets


def run_provider(args) -> dict:
    """Time one provider in this process; returns its row."""
    from icons_fast.ops.segment_reduce import segment_reduce

    if args.threads:
        torch.set_num_threads(args.threads)
    train, targets, offsets = make_inputs(args.n, args.k, args.m, args.tasks, args.device)
    base_rss = rss_mb()
    offs = offsets.tolist()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def ours():
        return segment_reduce(train, targets, offsets, args.reduction, m=8, threshold=0.0,
                              backend="cuda" if args.device == "cuda" else "cpp",
                              block_rows=args.block_rows, num_threads=args.threads)

    def torch_ref():
        p = train.float() @ targets.T  # [N, M] fp32, materialised
        return torch.stack([p[:, lo:hi].amax(1) for lo, hi in zip(offs[:-1], offs[1:])], 1)

    fn = ours if args.provider.startswith("ours") else torch_ref
    fn()  # warm-up (page faults of the buffers, OpenMP pool, CUDA context)
    sync()
    times, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    check = float(out.float().sum())
    ms = statistics.median(times) * 1e3
    return {
        "provider": args.provider, "n": args.n, "k": args.k, "m": args.m, "tasks": args.tasks,
        "reduction": args.reduction if args.provider.startswith("ours") else "max",
        "ms": ms, "cpu_s": statistics.median(cpu), "gflops": 2 * args.n * args.m * args.k / (ms * 1e-3) / 1e9,
        "peak_rss_mb": peak_rss_mb(), "peak_above_inputs_mb": peak_rss_mb() - base_rss,
        "threads": torch.get_num_threads(), "checksum": check,
    }


def spawn(args, provider: str, n: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--provider", provider, "--n", str(n), "--k", str(args.k),
           "--m", str(args.m), "--tasks", str(args.tasks), "--reduction", args.reduction, "--repeats", str(args.repeats),
           "--block-rows", str(args.block_rows), "--threads", str(args.threads), "--device", args.device]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--m", type=int, default=2_000)
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--reduction", default="max", choices=["mean", "max", "topm", "count"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block-rows", type=int, default=144)
    ap.add_argument("--threads", type=int, default=0, help="0 = library default")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="N = 20,000")
    ap.add_argument("--scan-n", action="store_true", help="also run ours at N/4 and N/2 (memory vs N)")
    ap.add_argument("--provider", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.provider:  # child process
        print(json.dumps(run_provider(args)))
        return
    if args.quick:
        args.n = 20_000
    from icons_fast import _C

    dev = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    print(f"# bench_influence  {datetime.date.today()}  device: {dev} ({os.cpu_count()} CPUs)  "
          f"torch {torch.__version__}  N={args.n} k={args.k} M={args.m} tasks={args.tasks} fp16 train, fp32 targets")
    if args.device == "cpu":
        print(f"# C++ micro-kernel: {probe_kernel(_C)}")
    sfx = "-cuda" if args.device == "cuda" else ""
    rows = [spawn(args, "torch" + sfx, args.n), spawn(args, "ours" + sfx, args.n)]
    if args.scan_n:
        rows += [spawn(args, "ours" + sfx, args.n // 4), spawn(args, "ours" + sfx, args.n // 2)]
    ref_ms = rows[0]["ms"]
    ref_cpu = rows[0]["cpu_s"]
    # CPU seconds (all threads) are shown too: on a shared machine wall time also
    # measures the neighbours, CPU time mostly our own work.
    print(f"{'provider':<12}{'N':>9}{'reduction':>10}{'ms':>11}{'GFLOP/s':>9}{'speed-up':>9}"
          f"{'CPU s':>8}{'CPU ratio':>10}{'peak RSS MB':>13}{'above inputs':>14}")
    for r in rows:
        scale = r["n"] / args.n  # per-row rates relative to torch at the full N
        print(f"{r['provider']:<12}{r['n']:>9}{r['reduction']:>10}{r['ms']:>11.0f}{r['gflops']:>9.1f}"
              f"{ref_ms / r['ms'] * scale:>9.2f}{r['cpu_s']:>8.1f}{ref_cpu / r['cpu_s'] * scale:>10.2f}"
              f"{r['peak_rss_mb']:>13.0f}{r['peak_above_inputs_mb']:>14.0f}")


def probe_kernel(_C) -> str:
    """Name of the micro-kernel the CPU path picks here (one tiny call)."""
    codes = _C.influence_codes()
    x, t, o, out = torch.ones(1, 4), torch.ones(1, 4), torch.tensor([0, 1]), torch.zeros(1, 1)
    return _C.influence_segment_reduce_cpu(x.data_ptr(), codes["f32"], 1, 4, 0, t.data_ptr(), codes["f32"], 1,
                                           o.data_ptr(), 1, codes["max"], 0, 0.0, 1.0, out.data_ptr())


if __name__ == "__main__":
    main()
