"""Projection speed on the CPU: counter-hash Rademacher (never stored) vs a stored dense matrix.

Providers, all computing ``grads[B, P] @ R[P, k]`` in float32:

- ``dense``:  ``grads @ R`` with ``R`` a stored +-1 float32 matrix (``P * k * 4`` bytes;
  6.4 GB at the default size). The reference the speed goal is stated against.
- ``cpp-fused``: ``icons_fast._C.project_accumulate`` (four-Russians, ``R`` never stored).
- ``cpp-tile``: C++ sign tiles + ``torch.addmm`` per tile.
- ``torch``: the torch hash path (sign tiles + ``addmm``), timed on a slice and
  extrapolated (it is the reference, not a fast path).

Each row: median / p20 / p80 ms over ``--repeats``, ratio to ``dense``, GFLOP/s
from the analytic ``2 * B * P * k``. Goal (issue 3): ``cpp <= 2 x dense``.

    .venv/bin/python benchmarks/bench_projection.py              # [16, 312320] -> 5120
    .venv/bin/python benchmarks/bench_projection.py --quick      # small, seconds
"""
from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a shared or oversubscribed CPU a spinning
# pool steals the core its partner needs and every parallel region (BLAS ones included) slows
# several-fold. Set before torch loads its OpenMP runtime; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import datetime  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from icons_fast.bench.timing import cpu_name  # noqa: E402
from icons_fast.ops.backend import has_cpu_ext  # noqa: E402
from icons_fast.ops.project import project_param  # noqa: E402


def timed_interleaved(providers, repeats: int) -> list[list[float]]:
    """Seconds per call for each provider; one round of every provider per repeat, so a change
    in machine load (the CPU is shared) hits every provider alike and the ratios stay fair."""
    for _, fn, _, _ in providers:
        fn()  # warm-up (allocations, thread pools, page faults)
    times = [[] for _ in providers]
    for _ in tqdm(range(repeats), desc="rounds", leave=False):
        for i, (_, fn, _, scale) in enumerate(providers):
            t = time.perf_counter()
            fn()
            times[i].append((time.perf_counter() - t) * scale)
    return times


def build_dense(P: int, k: int, chunk_rows: int) -> torch.Tensor | None:
    """A stored +-1 float32 ``R[P, k]`` built in row chunks (no 4x temporaries); None if it does not fit."""
    try:
        R = torch.empty(P, k, dtype=torch.float32)
    except RuntimeError:
        return None
    gen = torch.Generator().manual_seed(0)
    for r0 in tqdm(range(0, P, chunk_rows), desc="dense R", leave=False):
        r1 = min(P, r0 + chunk_rows)
        R[r0:r1] = torch.randint(0, 2, (r1 - r0, k), generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
    return R


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--grad-dim", type=int, default=312320)
    ap.add_argument("--proj-dim", type=int, default=5120)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="B=16, P=20000, k=1024")
    ap.add_argument("--fused-rows", type=int, nargs="*", default=[8192, 32768, 131072])
    ap.add_argument("--tile-rows", type=int, nargs="*", default=[128, 1024])
    ap.add_argument("--torch-rows", type=int, default=4096, help="slice of P timed for the torch path")
    ap.add_argument("--dense-chunks", type=int, default=1,
                    help="store R as this many row chunks timed one after another (when 6.4 GB does not fit)")
    args = ap.parse_args()
    if args.quick:
        args.grad_dim, args.proj_dim, args.repeats = 20000, 1024, 3
    B, P, k = args.batch, args.grad_dim, args.proj_dim
    flops = 2.0 * B * P * k
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  {cpu_name()}  threads={torch.get_num_threads()}"
          f"  OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
          f"  torch {torch.__version__}  B={B} P={P} k={k}  ({flops / 1e9:.1f} GFLOP)")
    g = torch.randn(B, P, generator=torch.Generator().manual_seed(1))
    providers = []  # (name, fn, note, time scale)

    # Dense baseline: one stored matrix, or equal row chunks timed in turn and summed.
    chunk = -(-P // args.dense_chunks)
    R = build_dense(chunk if args.dense_chunks > 1 else P, k, 8192)
    if R is None:
        raise SystemExit(f"cannot allocate R[{chunk}, {k}] float32; rerun with a larger --dense-chunks")
    note = f"R stored as {args.dense_chunks} chunks of {chunk} rows, times summed" if args.dense_chunks > 1 else ""

    def dense():
        if args.dense_chunks == 1:
            return g @ R
        y = torch.zeros(B, k)
        for r0 in range(0, P, chunk):
            r1 = min(P, r0 + chunk)
            y.addmm_(g[:, r0:r1], R[: r1 - r0])
        return y

    providers.append(("dense (stored R)", dense, note, 1.0))
    out = torch.zeros(B, k)
    if has_cpu_ext():
        for r in args.fused_rows:
            providers.append((f"cpp-fused rows={r}", lambda r=r: project_param(
                g, "p", 0, k, out.zero_(), backend="cpp", method="fused", tile_rows=r), "", 1.0))
        for r in args.tile_rows:
            providers.append((f"cpp-tile rows={r}", lambda r=r: project_param(
                g, "p", 0, k, out.zero_(), backend="cpp", method="tile", tile_rows=r), "", 1.0))
    else:
        print("# icons_fast._C not built: C++ rows skipped")
    n_t = min(P, args.torch_rows)
    providers.append(("torch (hash path)", lambda: project_param(
        g[:, :n_t], "p", 0, k, out.zero_(), backend="torch"), f"timed on {n_t} rows, scaled to P", P / n_t))

    times = timed_interleaved(providers, args.repeats)
    rows = [(name, ts, note) for (name, _, note, _), ts in zip(providers, times)]
    base = statistics.median(rows[0][1])
    print(f"{'provider':<22} {'median ms':>10} {'p20 ms':>9} {'p80 ms':>9} {'/dense':>7} {'GFLOP/s':>8}  note")
    for name, ts, note in rows:
        ts = sorted(ts)
        med = statistics.median(ts)
        p20, p80 = ts[int(0.2 * (len(ts) - 1))], ts[int(round(0.8 * (len(ts) - 1)))]
        print(f"{name:<22} {med * 1e3:>10.1f} {p20 * 1e3:>9.1f} {p80 * 1e3:>9.1f} {med / base:>7.3f} "
              f"{flops / med / 1e9:>8.1f}  {note}")
    best = min((statistics.median(ts), n) for n, ts, _ in rows if n.startswith("cpp")) if has_cpu_ext() else None
    if best:
        print(f"# best C++: {best[1]}: {best[0] / base:.3f} x dense (goal <= 2)")


if __name__ == "__main__":
    main()
