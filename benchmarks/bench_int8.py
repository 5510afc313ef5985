"""What int8 features do to the selection: overlap with the full-precision selection.

int8 features (per-row symmetric scale, ``icons_fast.features.store.quantize_int8``)
halve the disk and read bandwidth of fp16. This measures the cost in
selection quality: the ICONS 20% selected from int8 (and fp16) features,
compared with the one selected from the reference features, as
``|A ∩ B| / |A|``, plus the largest score error.

- random features: N train rows, T tasks of M targets each, drawn with a
  shared low-rank structure so that scores are not pure noise; reference fp32;
- a run directory (``--run-dir``, e.g. ``runs/demo``): its stored fp16 features
  are the reference and int8 is quantised from them.

    python benchmarks/bench_int8.py [--run-dir runs/demo] [--n 20000]
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from icons_fast.features.store import FeatureStore, quantize_int8
from icons_fast.select.influence import task_influence
from icons_fast.select.voting import consensus_select


def roundtrip(x: torch.Tensor, dtype: str) -> torch.Tensor:
    if dtype == "int8":
        q, s = quantize_int8(x)
        return q.float() * s[:, None]
    return x.to(getattr(torch, dtype)).float()


def compare(train: torch.Tensor, targets: dict, label: str, budget: float = 0.2) -> list[dict]:
    ref_scores, _ = task_influence(train.float(), targets)
    ref = set(consensus_select(ref_scores.numpy(), budget=budget).tolist())
    rows = []
    for dtype in ("float16", "int8"):
        scores, _ = task_influence(roundtrip(train.float(), dtype), {t: roundtrip(v.float(), dtype) for t, v in targets.items()})
        sel = set(consensus_select(scores.numpy(), budget=budget).tolist())
        rows.append({"features": label, "dtype": dtype, "n": train.shape[0], "k": train.shape[1],
                     "overlap": len(sel & ref) / len(ref), "max_score_err": float((scores - ref_scores).abs().max())})
    return rows


def random_case(n: int, k: int, tasks: int, m: int, seed: int = 0) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(16, k, generator=g)
    train = torch.randn(n, 16, generator=g) @ basis + 2.0 * torch.randn(n, k, generator=g)
    targets = {f"task{t}": torch.randn(m, 16, generator=g) @ basis + 2.0 * torch.randn(m, k, generator=g)
               for t in range(tasks)}
    return train, targets


def run_dir_case(run_dir: str) -> tuple[torch.Tensor, dict]:
    feats = os.path.join(run_dir, "features")
    ckpt = sorted(os.listdir(feats))[-1]
    split_dir = os.path.join(feats, ckpt)
    train = FeatureStore.open(os.path.join(split_dir, "train")).load()[2]
    targets = {d[len("target-"):]: FeatureStore.open(os.path.join(split_dir, d)).load()[2]
               for d in sorted(os.listdir(split_dir)) if d.startswith("target-")}
    return train, targets


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", help="a run directory with features (its fp16 features are the reference)")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--k", type=int, default=1024)
    args = ap.parse_args(argv)
    rows = compare(*random_case(args.n, args.k, tasks=5, m=50), label="random (ref fp32)")
    if args.run_dir:
        rows += compare(*run_dir_case(args.run_dir), label=f"{args.run_dir} (ref stored fp16)")
    print(f"{'features':<32s} {'dtype':<8s} {'n':>7s} {'k':>5s} {'overlap':>8s} {'max |score err|':>16s}")
    for r in rows:
        print(f"{r['features']:<32s} {r['dtype']:<8s} {r['n']:>7d} {r['k']:>5d} {r['overlap']:>8.4f} {r['max_score_err']:>16.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
