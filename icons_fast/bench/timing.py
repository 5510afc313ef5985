"""Timing, environment and result rows shared by every benchmark.

A benchmark row is a flat dict (one CSV line / one JSON object)::

    suite, provider, config, device, median_s, p20_s, p80_s, repeats,
    items, unit, rate (items per second), ratio, ratio_to,
    flops (per call, analytic), tflops, gbps, note,
    date, host, torch, triton, transformers, peft, omp_wait_policy, threads

``median_s`` / ``p20_s`` / ``p80_s`` are seconds per timed call over ``repeats``
calls after ``warmup`` untimed ones, with the device synchronised around every
call. ``rate = items / median_s`` (items: samples, rows, ...). ``ratio`` is this
row's rate over the rate of the row named in ``ratio_to`` (so > 1 = faster).
Op suites that compare against the machine's GEMM also fill ``vs_gemm`` (this
row's time over the time of the plain GEMM at the same precision: 1.0 = as
fast as the BLAS alone) and ``vs_ref`` (this row's time over the reference
path's: < 1 = faster than the reference).
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, Sequence

import torch

from icons_fast.ops.autotune import cpu_isa, cpu_name

ROW_FIELDS = [
    "suite", "provider", "config", "device", "median_s", "p20_s", "p80_s", "repeats", "items", "unit", "rate",
    "ratio", "ratio_to", "vs_gemm", "vs_ref", "flops", "tflops", "bytes", "gbps", "note", "date", "host", "torch", "triton",
    "transformers", "peft", "omp_wait_policy", "threads",
]


def device_name(device: str | torch.device) -> str:
    """``"NVIDIA H100 80GB HBM3"`` for a CUDA device, ``"<cpu model> (N cores, ISA)"`` for the CPU
    (ISA: AMX / AVX-512 / AVX2, ``ops.autotune.cpu_isa``)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{cpu_name()} ({os.cpu_count()} cores, {cpu_isa()})"


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "?"))
    except Exception:  # noqa: BLE001 - an absent or broken package is reported, not raised
        return "absent"


def env_info(device: str | torch.device = "cpu") -> dict:
    """Fields every row carries: date, host, device name and library versions."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "threads": torch.get_num_threads(),
    }


def synchronizer(device: str | torch.device) -> Callable[[], None]:
    """``torch.cuda.synchronize`` for a CUDA device, a no-op otherwise."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def quantiles(times: Sequence[float]) -> tuple[float, float, float]:
    """``(median, p20, p80)`` of ``times`` (nearest-rank p20/p80, as Liger's utils report them)."""
    ts = sorted(times)
    n = len(ts)
    if n == 0:
        raise ValueError("no timings to summarise")
    return statistics.median(ts), ts[int(0.2 * (n - 1))], ts[int(round(0.8 * (n - 1)))]


def measure(fn: Callable[[], object], repeats: int, warmup: int = 1, sync: Callable[[], None] = lambda: None
            ) -> list[float]:
    """Seconds per call of ``fn``: ``warmup`` untimed calls, then ``repeats`` timed ones, synchronised."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def measure_interleaved(fns: Sequence[Callable[[], object]], repeats: int, warmup: int = 1,
                        sync: Callable[[], None] = lambda: None) -> list[list[float]]:
    """Like ``measure`` for several providers, one round of every provider per repeat.

    On a shared machine the load changes over time; interleaving makes a load
    change hit every provider alike, so the ratios stay fair.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync()
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            sync()
            out[i].append(time.perf_counter() - t)
    return out


def make_row(suite: str, provider: str, config: str, times: Sequence[float], items: float, unit: str,
             env: dict, flops: float | None = None, nbytes: float | None = None, note: str = "") -> dict:
    """One result row from the timings of one provider (see the module docstring)."""
    med, p20, p80 = quantiles(times)
    row = {f: "" for f in ROW_FIELDS}
    row.update(env)
    row.update(suite=suite, provider=provider, config=config, median_s=med, p20_s=p20, p80_s=p80,
               repeats=len(times), items=items, unit=unit, rate=items / med if med > 0 else float("inf"), note=note)
    if flops:
        row["flops"] = flops
        row["tflops"] = flops / med / 1e12
    if nbytes:
        row["bytes"] = nbytes
        row["gbps"] = nbytes / med / 1e9
    return row


def set_ratios(rows: list[dict], reference: str, providers: Sequence[str] | None = None) -> None:
    """``ratio = rate / rate(reference)`` for the rows of ``providers`` (all rows of the suite when None)."""
    ref = [r for r in rows if r["provider"] == reference]
    if not ref:
        return
    base = ref[0]["rate"]
    for r in rows:
        if providers is None or r["provider"] in providers:
            r["ratio"] = r["rate"] / base
            r["ratio_to"] = reference


def set_time_ratios(rows: list[dict], field: str, reference_of: Callable[[dict], str | None]) -> None:
    """``row[field] = median_s / median_s(reference_of(row))`` (a time ratio: < 1 = faster than that row)."""
    by_name = {r["provider"]: r for r in rows}
    for r in rows:
        ref = by_name.get(reference_of(r) or "")
        if ref is not None:
            r[field] = r["median_s"] / ref["median_s"]


def _fmt(v, digits=3) -> str:
    if v == "" or v is None:
        return ""
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width text table of the rows (the columns a reader compares)."""
    cols = [("suite", 10), ("provider", 36), ("median_s", 10), ("p20_s", 9), ("p80_s", 9), ("rate", 10),
            ("unit", 9), ("ratio", 8), ("ratio_to", 20), ("vs_gemm", 8), ("vs_ref", 7), ("tflops", 8), ("gbps", 7)]
    lines = [" ".join(f"{name:<{w}}" for name, w in cols) + " note"]
    for r in rows:
        cells = []
        for name, w in cols:
            v = r.get(name, "")
            txt = _fmt(v, 4 if name in ("ratio", "vs_gemm", "vs_ref") else 3)
            cells.append(f"{txt:<{w}}"[: max(w, len(txt))])
        lines.append(" ".join(cells) + " " + str(r.get("note", "")))
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], path: str) -> None:
    """Write rows as CSV (columns ``ROW_FIELDS``), creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROW_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def write_json(rows: Sequence[dict], path: str, meta: dict | None = None) -> None:
    """Write ``{"meta": ..., "rows": [...]}`` as JSON, creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta or {}, "rows": list(rows)}, f, indent=1, default=str)
