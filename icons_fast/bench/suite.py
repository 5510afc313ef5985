"""``icons-fast bench``: every provider side by side in one process, one table, CSV/JSON rows.

Suites (``--suites``, default all):

- ``featurize``: floor / ours / less-style / less-style grads only on the chosen
  model config; ``eta = ours / floor`` and ``ours / less-style`` are printed.
- ``projection``: ours vs stored dense matrix vs TRAK.
- ``influence``: segment_reduce ("auto" and every backend) vs the plain GEMMs
  of the same shape and the torch references; ``vs_gemm`` = time over the GEMM
  at the same precision, ``vs_ref`` = time over the blocked torch reference.
- ``voting``: vote_counts and consensus_select at N = 665,298, T = 10.

``--quick`` runs all of them at tiny sizes (CI: well under a minute on 2 cores).
"""
from __future__ import annotations

import logging
import os

import torch

from icons_fast.bench import timing
from icons_fast.bench.args import QUICK_REPEATS, REPEATS, SUITES
from icons_fast.bench.models import build_bench_model, get_config
from icons_fast.bench.ops import LLAVA_665K, influence_providers, projection_providers, voting_providers

log = logging.getLogger(__name__)

# (B, P, k) of the projection suite; (N, k, M, T) of the influence suite
SIZES = {
    "quick": dict(projection=(16, 20_000, 1024), influence=(4_000, 1024, 500, 10), voting=(LLAVA_665K, 10)),
    "cpu": dict(projection=(16, 73_984, 5120), influence=(50_000, 1024, 2_000, 10), voting=(LLAVA_665K, 10)),
    "cuda": dict(projection=(16, 2_097_152, 5120), influence=(1_000_000, 1024, 2_000, 10), voting=(LLAVA_665K, 10)),
}


def _run_suite(suite: str, config: str, provs: list[dict], repeats: int, env: dict, sync, warmup: int = 1) -> list[dict]:
    times = timing.measure_interleaved([p["fn"] for p in provs], repeats, warmup=warmup, sync=sync)
    return [timing.make_row(suite, p["name"], config, ts, p["items"], p.get("unit", "samples"), env,
                            p.get("flops"), p.get("bytes"), p.get("note", "")) for p, ts in zip(provs, times)]


def run_influence_suite(provs: list[dict], config: str, repeats: int, env: dict, sync) -> list[dict]:
    """The influence rows of ``provs`` (``bench.ops.influence_providers``), timed in interleaved rounds, with
    ``vs_gemm`` / ``vs_ref``: time over the provider's plain GEMM row / reference row (< 1 = faster)."""
    rows = _run_suite("influence", config, provs, repeats, env, sync)
    by_name = {p["name"]: p for p in provs}
    timing.set_time_ratios(rows, "vs_gemm", lambda row: by_name[row["provider"]].get("gemm"))
    timing.set_time_ratios(rows, "vs_ref", lambda row: by_name[row["provider"]].get("ref"))
    return rows


def run_bench(suites=SUITES, config_name: str | None = None, quick: bool = False, device: str = "auto",
              repeats: int | None = None, batch: int | None = None, proj_dim: int | None = None,
              layers: int | None = None, seq: int | None = None, baseline: str = "auto",
              backend: str = "auto") -> list[dict]:
    """Run the chosen suites and return their rows (see ``icons_fast.bench.timing`` for the fields).

    The environment line is logged (INFO) before the first suite; ``environment_line``,
    ``timing.format_table`` and ``summary`` turn the rows into what ``icons-fast bench`` prints.
    """
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown suites {unknown}; choose from {SUITES}")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if config_name is None:
        config_name = "tiny" if quick else ("llava-7b-shape" if dev.type == "cuda" else "small")
    if config_name == "llava-7b-shape" and dev.type != "cuda":
        raise ValueError("llava-7b-shape has ~7B parameters: run it on a GPU (--device cuda), or use --config-name small")
    repeats = repeats or (QUICK_REPEATS if quick else REPEATS)
    sizes = SIZES["quick" if quick else ("cuda" if dev.type == "cuda" else "cpu")]
    env = timing.env_info(dev)
    sync = timing.synchronizer(dev)
    log.info("# icons-fast bench  %s", environment_line(env))
    rows: list[dict] = []
    if "featurize" in suites:
        from icons_fast.bench.featurize import featurize_providers

        cfg = get_config(config_name, batch=batch, proj_dim=proj_dim, layers=layers, seq=seq)
        model = build_bench_model(cfg, dev)
        provs = featurize_providers(model, cfg, backend=backend, baseline=baseline)
        r = _run_suite("featurize", cfg.name, provs, repeats, env, sync)
        timing.set_ratios(r, r[0]["provider"])  # ratio to the floor: eta for "ours"
        rows += r
        del model, provs
    if "projection" in suites:
        B, P, k = sizes["projection"]
        r = _run_suite("projection", f"B={B} P={P} k={k}", projection_providers(B, P, k, dev), repeats, env, sync)
        timing.set_ratios(r, "dense (stored R)")
        rows += r
    if "influence" in suites:
        n, k, m, t = sizes["influence"]
        r = run_influence_suite(influence_providers(n, k, m, t, dev), f"N={n} k={k} M={m} T={t}", repeats, env, sync)
        timing.set_ratios(r, "torch materialise max")
        rows += r
    if "voting" in suites:
        n, t = sizes["voting"]
        r = _run_suite("voting", f"N={n} T={t}", voting_providers(n, t), repeats, env, sync)
        rows += r
    return rows


def environment_line(env: dict) -> str:
    """Date, device and versions of a bench run (``timing.env_info``) on one line."""
    return (f"{env['date']}  {env['device']}  torch {env['torch']}  triton {env['triton']}  "
            f"transformers {env['transformers']}  threads {env['threads']}  "
            f"OMP_WAIT_POLICY={env['omp_wait_policy'] or '-'}")


def summary(rows: list[dict]) -> list[str]:
    """The headline ratios of ``run_bench``'s rows: per featurize config, eta = ours / floor and ours / less-style."""
    lines = []
    for config in dict.fromkeys(r["config"] for r in rows if r["suite"] == "featurize"):
        r = [x for x in rows if x["suite"] == "featurize" and x["config"] == config]
        ours = next(x for x in r if x["provider"].startswith("ours"))
        less = next((x for x in r if x["provider"] == "less-style (B=1)"), None)
        lines.append(f"# featurize {config}: eta = ours / floor = {ours['ratio']:.3f}"
                     + (f"; ours / less-style = {ours['rate'] / less['rate']:.1f}x" if less else ""))
    return lines


def cmd_bench(args) -> int:
    """Entry point of ``icons-fast bench`` (wired in ``icons_fast.cli``)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # only effective before OpenMP starts; scripts set it first
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    rows = run_bench(suites, args.config_name, args.quick, getattr(args, "device", None) or "auto", args.repeats,
                     getattr(args, "batch_size", None), getattr(args, "proj_dim", None), args.layers, args.seq,
                     args.baseline, getattr(args, "backend", None) or "auto")
    header = [f"# icons-fast bench  {environment_line(rows[0])}"] if rows else []  # rows carry env_info's fields
    print("\n".join(header + [timing.format_table(rows)] + summary(rows)))
    settings = {k: v for k, v in vars(args).items() if k != "func" and isinstance(v, (str, int, float, bool, type(None)))}
    if args.csv:
        timing.write_csv(rows, args.csv)
        log.info("rows written to %s", args.csv)
    if args.json:
        timing.write_json(rows, args.json, meta=settings)
        log.info("rows written to %s", args.json)
    return 0
