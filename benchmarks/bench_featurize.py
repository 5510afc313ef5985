"""Featurize throughput: ours vs the LoRA forward+backward floor vs the LESS/ICONS-style baseline.

One process, one model, the same synthetic samples and lengths for every
provider (see ``icons_fast.bench.featurize``):

- ``floor``: LoRA forward + ``loss.backward()`` on ``B`` samples.
- ``ours``: ``GradientExtractor.featurize`` (Adam preconditioning, projection to k).
- ``less-style (B=1)``: one sample per step + ``.grad`` concat + Adam + TRAK projection every 16.
- ``less-style grads only``: that loop without the projection.

Printed: one row per provider (median / p20 / p80 s per call, samples/s, ratio to
the floor, TFLOP/s from the analytic FLOPs), then ``eta = ours / floor`` and
``ours / less-style`` per batch size. ``--batch 1 4 8`` scans batch sizes on one
model (the baseline runs once, at the first).

    python benchmarks/bench_featurize.py --config-name small                       # CPU
    python benchmarks/bench_featurize.py --config-name llava-7b-shape --layers 8 --device cuda
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import env_info, format_table, make_row, measure_interleaved, out_dir, set_ratios, synchronizer, write_csv, write_json  # noqa: E402,I001

import argparse  # noqa: E402
import dataclasses  # noqa: E402

import torch  # noqa: E402


def main() -> None:
    from icons_fast.bench.featurize import featurize_providers
    from icons_fast.bench.models import BENCH_CONFIGS, build_bench_model, get_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-name", default="small", choices=sorted(BENCH_CONFIGS))
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--batch", type=int, nargs="*", help="featurize batch size(s) (default from the config)")
    ap.add_argument("--seq", type=int)
    ap.add_argument("--layers", type=int, help="llava-7b-shape: decoder layers (default 32)")
    ap.add_argument("--proj-dim", type=int)
    ap.add_argument("--backend", default="auto", help="gradient backend of ours: auto | torch | triton")
    ap.add_argument("--baseline", default="auto", choices=["auto", "trak", "dense", "ours", "none"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--csv", help="default: $OUT (or benchmarks/out)/featurize_<config>.csv")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    if args.config_name == "llava-7b-shape" and dev.type != "cuda":
        raise SystemExit("llava-7b-shape has ~7B parameters: run it on a GPU (--device cuda)")
    cfg = get_config(args.config_name, seq=args.seq, layers=args.layers, proj_dim=args.proj_dim)
    batches = args.batch or [cfg.batch]
    env = env_info(dev)
    sync = synchronizer(dev)
    print(f"# bench_featurize  {env['date']}  {env['device']}  torch {env['torch']}  triton {env['triton']}  "
          f"transformers {env['transformers']}  peft {env['peft']}  config {cfg}")
    model = build_bench_model(cfg, dev)
    if dev.type == "cuda":
        print(f"# model on GPU: {torch.cuda.memory_allocated(dev) / 2**30:.1f} GiB allocated")
    rows, summary = [], []
    for i, B in enumerate(batches):
        c = dataclasses.replace(cfg, batch=B)
        provs = featurize_providers(model, c, backend=args.backend, baseline=args.baseline if i == 0 else "none")
        times = measure_interleaved([p["fn"] for p in provs], args.repeats, warmup=1, sync=sync)
        r = [make_row("featurize", p["name"], f"{c.name} B={B}", ts, p["items"], "samples", env, p["flops"],
                      note=p["note"]) for p, ts in zip(provs, times)]
        set_ratios(r, r[0]["provider"])
        rows += r
        less = next((x for x in rows if x["provider"] == "less-style (B=1)"), None)
        summary.append(f"B={B}: eta = ours / floor = {r[1]['ratio']:.3f}"
                       + (f"; ours / less-style = {r[1]['rate'] / less['rate']:.1f}x" if less else ""))
        if dev.type == "cuda":
            summary[-1] += f"; peak GPU memory {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB"
        del provs
    print(format_table(rows))
    print("\n".join("# " + s for s in summary))
    path = args.csv or os.path.join(out_dir(), f"featurize_{cfg.name}.csv")
    write_csv(rows, path)
    if args.json:
        write_json(rows, args.json, meta={"config": dataclasses.asdict(cfg), "batches": batches})
    print(f"# rows: {path}")


if __name__ == "__main__":
    main()
