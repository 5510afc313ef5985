"""Featurize on the CPU in bf16 vs fp32 (``--dtype bfloat16`` vs the default): speed and feature agreement.

The same built-in model (``small`` by default, or ``tiny``) with the same LoRA
weights in float64 (the reference), float32 and bfloat16 (weights and
activations, what ``--dtype`` sets); the same synthetic samples. Printed:

- speed: median seconds per featurize call on one batch, fp32 and bf16 side by
  side (interleaved rounds), and the ratio;
- agreement with float64: cosine of each sample's projected gradient (median
  and minimum), and the overlap of the 20% selection when ``--pool`` samples are
  ranked by their mean cosine to ``--targets`` target samples (the influence
  score of the pipeline's "mean" aggregate, features of the same precision).

The default ``--dtype`` of the pipeline stays what this measurement supports;
results are recorded in benchmarks/RESULTS.md.

    python benchmarks/bench_featurize_dtype.py                  # small, ~8 min on 2 busy cores
    python benchmarks/bench_featurize_dtype.py --config-name tiny
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from icons_fast.bench import timing  # noqa: E402
from icons_fast.bench.models import BENCH_CONFIGS, build_bench_model, get_config, make_batch  # noqa: E402
from icons_fast.features.extractor import GradientExtractor  # noqa: E402

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def features(model, n: int, batch: int, seq: int, proj_dim: int, seed: int) -> torch.Tensor:
    """``[n, proj_dim]`` fp32 projected gradients of ``n`` synthetic samples (batches of ``batch``)."""
    ext = GradientExtractor(model, proj_dim=proj_dim, seed=0, mode="sgd", backend="torch")
    out = []
    for b0 in range(0, n, batch):
        out.append(ext.featurize(make_batch(model, min(batch, n - b0), seq, seed=seed + b0)).float())
    return torch.cat(out)


def selection(pool: torch.Tensor, targets: torch.Tensor, budget: float = 0.2) -> set[int]:
    """Indices of the top ``budget`` of the pool by mean cosine to the targets."""
    p = torch.nn.functional.normalize(pool.double(), dim=1)
    t = torch.nn.functional.normalize(targets.double(), dim=1)
    score = (p @ t.T).mean(1)
    return set(score.topk(max(1, int(budget * len(score)))).indices.tolist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-name", default="small", choices=[c for c in BENCH_CONFIGS if c != "llava-7b-shape"])
    ap.add_argument("--pool", type=int, default=100, help="pool samples (selection overlap)")
    ap.add_argument("--targets", type=int, default=10, help="target samples")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    args = ap.parse_args()
    cfg = get_config(args.config_name, dtype="float32")
    base = build_bench_model(cfg, "cpu")
    models = {name: (base if dt == torch.float32 else copy.deepcopy(base).to(dt)) for name, dt in DTYPES.items()}
    env = timing.env_info("cpu")
    load = os.getloadavg()
    print(f"# bench_featurize_dtype  {datetime.date.today()}  {env['device']}  torch {env['torch']}  "
          f"threads {env['threads']}  load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"# config {cfg.name}: seq {cfg.seq}, LoRA r {cfg.lora_r}, k {cfg.proj_dim}, batch {cfg.batch}")

    # speed: one batch, fp32 and bf16 interleaved
    exts = {name: GradientExtractor(models[name], proj_dim=cfg.proj_dim, seed=0, mode="sgd")
            for name in ("float32", "bfloat16")}
    batches = {name: make_batch(models[name], cfg.batch, cfg.seq, seed=1) for name in exts}
    times = timing.measure_interleaved([lambda n=name: exts[n].featurize(batches[n]) for name in exts],
                                       args.repeats, warmup=1)
    med = {name: statistics.median(ts) for name, ts in zip(exts, times)}
    for name in exts:
        print(f"{name:<9} featurize {med[name]:.3f} s per batch of {cfg.batch}  "
              f"({cfg.batch / med[name]:.1f} samples/s)")
    print(f"bf16 / fp32 time: {med['bfloat16'] / med['float32']:.2f}  (backend {exts['float32'].describe_backend()})")

    # agreement with float64
    feats = {name: (features(m, args.pool, cfg.batch, cfg.seq, cfg.proj_dim, seed=100),
                    features(m, args.targets, cfg.batch, cfg.seq, cfg.proj_dim, seed=10_000))
             for name, m in models.items()}
    ref_sel = selection(*feats["float64"])
    for name in ("float32", "bfloat16"):
        cos = torch.nn.functional.cosine_similarity(feats[name][0].double(), feats["float64"][0].double(), dim=1)
        overlap = len(selection(*feats[name]) & ref_sel) / len(ref_sel)
        print(f"{name:<9} vs float64: feature cosine median {cos.median():.5f} min {cos.min():.5f}; "
              f"20% selection overlap {overlap:.2f} ({args.pool} pool, {args.targets} targets)")


if __name__ == "__main__":
    main()
