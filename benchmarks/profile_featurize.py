"""Profile featurize: a torch.profiler trace (Chrome / Perfetto JSON) with named ranges.

Ranges (``torch.profiler.record_function`` everywhere, plus NVTX ranges on CUDA
so Nsight Systems shows them too): ``data`` (batch made and moved to the
device), ``featurize`` (one ``GradientExtractor.featurize`` call, which itself
marks ``forward``, ``backward``, ``lora_grads`` and ``projection`` — or
``lora_grads + projection`` for the fused Triton kernel — per LoRA module),
``io`` (row normalisation and the feature shard write through ``FeatureStore``).

Open the trace in https://ui.perfetto.dev or chrome://tracing. The script also
prints the time per range and the top operators.

    python benchmarks/profile_featurize.py --config-name small                     # CPU
    python benchmarks/profile_featurize.py --config-name llava-7b-shape --layers 4 --batch 2 --device cuda
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import env_info, out_dir  # noqa: E402,I001

import argparse  # noqa: E402
import contextlib  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

TOP_RANGES = ("data", "featurize", "io")  # disjoint: their shares add up to 100%
INNER_RANGES = ("forward", "backward", "lora_grads", "projection", "lora_grads + projection")  # inside featurize


@contextlib.contextmanager
def rng(name: str, cuda: bool):
    """A profiler range, mirrored as an NVTX range on CUDA.

    On CUDA the range ends with a synchronize, so its CPU-side duration is the
    stage's real duration (otherwise it would measure only kernel launches).
    """
    if cuda:
        torch.cuda.nvtx.range_push(name)
    try:
        with record_function(name):
            yield
            if cuda:
                torch.cuda.synchronize()
    finally:
        if cuda:
            torch.cuda.nvtx.range_pop()


def featurize_step(extractor, model, cfg, store, step: int, dev: torch.device) -> None:
    """One batch through the featurize stages, each in its own range."""
    from icons_fast.bench.models import make_batch
    from icons_fast.features.store import normalize_rows

    cuda = dev.type == "cuda"
    with rng("data", cuda):
        batch = make_batch(model, cfg.batch, cfg.seq, seed=step, device=dev)
    with rng("featurize", cuda):
        g = extractor.featurize(batch)  # marks forward / backward / lora_grads / projection inside
    n = g.shape[0]
    with rng("io", cuda):
        f, norms = normalize_rows(g, "float16")
        start = step * cfg.batch
        idx = torch.arange(start, start + n).numpy()
        store.write_shard(start, start + n, idx, [f"s{i}" for i in idx], f.cpu(), norms)


def main() -> None:
    from icons_fast.bench.featurize import random_moments
    from icons_fast.bench.models import BENCH_CONFIGS, build_bench_model, get_config
    from icons_fast.features.extractor import GradientExtractor
    from icons_fast.features.store import FeatureStore

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-name", default="small", choices=sorted(BENCH_CONFIGS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--proj-dim", type=int)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--steps", type=int, default=2, help="profiled batches (after one warm-up batch)")
    ap.add_argument("--trace", help="default: $OUT (or benchmarks/out)/featurize_trace_<config>.json")
    ap.add_argument("--top", type=int, default=20, help="operators listed")
    args = ap.parse_args()
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    if args.config_name == "llava-7b-shape" and dev.type != "cuda":
        raise SystemExit("llava-7b-shape has ~7B parameters: profile it on a GPU (--device cuda)")
    cfg = get_config(args.config_name, batch=args.batch, seq=args.seq, layers=args.layers, proj_dim=args.proj_dim)
    env = env_info(dev)
    print(f"# profile_featurize  {env['date']}  {env['device']}  torch {env['torch']}  {cfg}")
    model = build_bench_model(cfg, dev)
    extractor = GradientExtractor(model, proj_dim=cfg.proj_dim, mode="adam", optimizer_state=random_moments(model),
                                  backend=args.backend)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with tempfile.TemporaryDirectory(prefix="icons_profile_") as tmp:
        store = FeatureStore(tmp, {"profile": True}, cfg.proj_dim)
        featurize_step(extractor, model, cfg, store, 0, dev)  # warm-up, unprofiled
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=activities, record_shapes=True, with_modules=True) as prof:
            for step in range(1, args.steps + 1):
                featurize_step(extractor, model, cfg, store, step, dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    trace = args.trace or os.path.join(out_dir(), f"featurize_trace_{cfg.name}.json")
    prof.export_chrome_trace(trace)
    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    print(f"# {args.steps} batches of {cfg.batch} in {wall:.2f} s under the profiler "
          f"({args.steps * cfg.batch / wall:.2f} samples/s, profiler overhead included)")
    print(f"{'range':<26}{'ms total':>12}{'share':>8}")
    tot = sum(by_name[r].cpu_time_total for r in TOP_RANGES if r in by_name) or 1.0
    for r in TOP_RANGES + INNER_RANGES:
        if r in by_name:
            t = by_name[r].cpu_time_total
            label = r if r in TOP_RANGES else f"  {r}"
            print(f"{label:<26}{t / 1e3:>12.1f}{100 * t / tot:>7.1f}%")
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=args.top))
    print(f"# trace: {trace}  (open in https://ui.perfetto.dev)")


if __name__ == "__main__":
    main()
