"""Issue 8: memory bound of streaming influence + voting at N = 1,000,000 samples.

1. Writes simulated features for ``N`` samples at ``k`` (fp16, L2-normalised rows,
   ~``2 N k`` bytes: 2 GB at the defaults) shard by shard through ``FeatureStore``
   into a temporary directory (the same atomic shard + manifest-entry writes a
   featurize run makes). Only one shard is in memory at a time.
2. Runs, in a child process, what ``icons-fast influence`` + ``select`` do on that
   store: ``stream_task_influence`` over ``FeatureStore.iter_blocks`` (every shard's
   sha256 checked as it is read) for ``T`` tasks of ``M`` targets each, then
   ``vote_counts`` + ``consensus_select`` (20% budget) on the ``[N, T]`` scores.
   The child also recomputes the scores of a slice of rows with the float64
   reference (``task_influence_ref``) as a correctness check.
3. Reports the child's peak resident memory
   (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, Linux KiB) against the goal
   (< 4 GB), and the time per stage.

Memory model: one shard's indices/norms/ids (a few MB) + one block of features
(``block * k * 2`` bytes fp16 and the fp32 copy: 64K rows -> 384 MB) + the scores
``N * T * 4`` bytes (40 MB) + the per-entry id lists (``N`` short strings). No
term grows with ``N * k``.

    python benchmarks/bench_scale.py                    # N = 1,000,000, k = 1024 (~2 GB, a few minutes)
    python benchmarks/bench_scale.py --n 100000 --keep  # smaller; keep the store
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/common.py

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import env_info, write_json  # noqa: E402

GOAL_BYTES = 4 * 10**9


def fingerprint(n: int, k: int) -> dict:
    return {"simulated": True, "n_samples": n, "proj_dim": k, "seed": 0}


def write_store(root: str, n: int, k: int, shard_size: int, seed: int = 0) -> dict:
    """Write ``n`` random unit fp16 rows in shards of ``shard_size``; returns timing and size."""
    from icons_fast.features.store import FeatureStore, normalize_rows, shard_ranges

    store = FeatureStore(root, fingerprint(n, k), k, dtype="float16")
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    nbytes = 0
    for start, end in tqdm(shard_ranges(n, shard_size), desc="write shards", unit="shard"):
        g = torch.randn(end - start, k, generator=gen)  # [rows, k] fp32, one shard only
        f, norms = normalize_rows(g, "float16")
        idx = np.arange(start, end, dtype=np.int64)
        entry = store.write_shard(start, end, idx, [f"s{i}" for i in range(start, end)], f, norms)
        nbytes += entry["bytes"]
    store.finalize()
    return {"write_s": time.perf_counter() - t0, "bytes_on_disk": nbytes}


def make_targets(k: int, tasks: int, per_task: int, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {f"task{t}": torch.randn(per_task, k, generator=gen) for t in range(tasks)}


def child(args) -> dict:
    """Streaming influence + voting on the store at ``args.dir`` (runs in its own process)."""
    from icons_fast.features.store import FeatureStore
    from icons_fast.select.influence import stream_task_influence, task_influence_ref
    from icons_fast.select.voting import consensus_select, vote_counts

    store = FeatureStore.open(args.dir)
    targets = make_targets(store.proj_dim, args.tasks, args.targets_per_task)
    t0 = time.perf_counter()
    blocks = ((idx, feats) for idx, _ids, feats, _norms in store.iter_blocks(args.block_size, verify=True))
    scores, rows, names = stream_task_influence(blocks, targets, args.aggregate, progress=True)
    t1 = time.perf_counter()
    votes = vote_counts(scores, 20.0)
    selected = consensus_select(scores, 0.2)
    t2 = time.perf_counter()
    # correctness on a slice: the float64 brute force of the first block's rows
    idx, _ids, feats, _ = next(store.iter_blocks(args.check_rows, verify=False))
    ref, _ = task_influence_ref(feats, targets, args.aggregate)
    err = float((torch.from_numpy(scores[: len(idx)]).double() - ref).abs().max())
    return {
        "rows": int(rows.shape[0]), "rows_in_order": bool((np.diff(rows) > 0).all()), "tasks": names,
        "influence_s": t1 - t0, "voting_s": t2 - t1, "selected": int(selected.shape[0]),
        "max_votes": int(votes.max()), "check_rows": int(len(idx)), "check_max_abs_err": err,
        "child_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--shard-size", type=int, default=16384)
    ap.add_argument("--block-size", type=int, default=65536, help="train rows per influence block")
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--targets-per-task", type=int, default=100)
    ap.add_argument("--aggregate", default="mean", help="mean | max | topm:<m>")
    ap.add_argument("--check-rows", type=int, default=2000, help="rows checked against the float64 reference")
    ap.add_argument("--dir", help="store directory (default: a new temporary directory, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the store")
    ap.add_argument("--reuse", action="store_true", help="skip writing when --dir already holds the store")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    env = env_info("cpu")
    tmp = args.dir or tempfile.mkdtemp(prefix="icons_scale_")
    print(f"# bench_scale  {env['date']}  {env['device']}  torch {env['torch']}  N={args.n:,} k={args.k} fp16  "
          f"shards of {args.shard_size}  blocks of {args.block_size}  {args.tasks} tasks x {args.targets_per_task} "
          f"targets ({args.aggregate})  dir={tmp}")
    try:
        if args.reuse and os.path.exists(os.path.join(tmp, "manifest.json")):
            wr = {"write_s": None, "bytes_on_disk": sum(os.path.getsize(os.path.join(tmp, f))
                                                         for f in os.listdir(tmp) if f.endswith(".safetensors"))}
        else:
            wr = write_store(tmp, args.n, args.k, args.shard_size)
        parent_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--dir", tmp, "--block-size", str(args.block_size),
               "--tasks", str(args.tasks), "--targets-per-task", str(args.targets_per_task),
               "--aggregate", args.aggregate, "--check-rows", str(args.check_rows)]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if res.returncode != 0:
            raise SystemExit(f"the influence child failed with exit code {res.returncode}")
        out = json.loads(res.stdout.strip().splitlines()[-1])
        out["child_wall_s"] = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {**env, "n": args.n, "k": args.k, "shard_size": args.shard_size, "block_size": args.block_size,
              "aggregate": args.aggregate, **wr, **out, "peak_rss_children_bytes": peak,
              "writer_peak_rss_bytes": parent_rss, "goal_bytes": GOAL_BYTES, "meets_goal": peak < GOAL_BYTES}
    ws = f"{wr['write_s']:.1f} s" if wr["write_s"] is not None else "reused"
    print(f"features on disk        {wr['bytes_on_disk'] / 1e9:8.2f} GB   (write {ws})")
    print(f"influence (streamed)    {out['influence_s']:8.1f} s    {out['rows']:,} rows in order: {out['rows_in_order']}")
    print(f"voting (votes + select) {out['voting_s']:8.2f} s    {out['selected']:,} selected")
    print(f"float64 check           max |err| {out['check_max_abs_err']:.2e} on {out['check_rows']} rows")
    print(f"peak RSS, child         {peak / 1e9:8.2f} GB   goal < {GOAL_BYTES / 1e9:.0f} GB: "
          f"{'met' if result['meets_goal'] else 'MISSED'}   (writer process peak {parent_rss / 1e9:.2f} GB)")
    if args.json:
        write_json([result], args.json, meta=vars(args))


if __name__ == "__main__":
    main()
