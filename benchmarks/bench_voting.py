"""Consensus voting time: ``vote_counts`` and ``consensus_select`` on ``[N, T]`` influence scores.

Default: the LLaVA-665K pool (N = 665,298) and T = 10 tasks, 20% budget, the
default mean-rank tie-break, float32 scores (what ``icons-fast select`` runs).
Goal (issue 7): under 1 s. ``--n`` takes several sizes (e.g. Cambrian-7M's
7,000,000) to show the scaling; rows go to ``$OUT`` (or benchmarks/out).

    python benchmarks/bench_voting.py
    python benchmarks/bench_voting.py --n 665298 1000000 7000000 --repeats 3
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import env_info, format_table, make_row, measure_interleaved, out_dir, write_csv  # noqa: E402,I001

import argparse  # noqa: E402


def main() -> None:
    from icons_fast.bench.ops import LLAVA_665K, voting_providers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=[LLAVA_665K])
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--csv", help="default: $OUT (or benchmarks/out)/voting.csv")
    args = ap.parse_args()
    env = env_info("cpu")
    print(f"# bench_voting  {env['date']}  {env['device']}  numpy scores float32  T={args.tasks}  "
          f"budget {args.budget:.0%}  OMP_WAIT_POLICY={env['omp_wait_policy']}")
    rows = []
    for n in args.n:
        provs = voting_providers(n, args.tasks, args.budget)
        times = measure_interleaved([p["fn"] for p in provs], args.repeats)
        rows += [make_row("voting", p["name"], f"N={n} T={args.tasks}", ts, p["items"], p["unit"], env,
                          nbytes=p["bytes"], note=p["note"]) for p, ts in zip(provs, times)]
    print(format_table(rows))
    for r in rows:
        if r["provider"] == "consensus_select":
            print(f"# {r['config']}: consensus_select {r['median_s']:.3f} s (goal < 1 s at N = 665,298: "
                  f"{'met' if r['median_s'] < 1 else 'missed'})" if r["items"] == LLAVA_665K else
                  f"# {r['config']}: consensus_select {r['median_s']:.3f} s")
    path = args.csv or os.path.join(out_dir(), "voting.csv")
    write_csv(rows, path)
    print(f"# rows: {path}")


if __name__ == "__main__":
    main()
