"""Shared helpers of the benchmark scripts: timing, environment, result rows.

The implementations live in ``icons_fast.bench.timing`` (so ``icons-fast bench``
works from an installed package); this module re-exports them for the scripts
in ``benchmarks/`` and sets the OpenMP wait policy.

Why ``OMP_WAIT_POLICY=PASSIVE``: with the default (spinning) policy, idle OpenMP
threads busy-wait; on a shared or oversubscribed CPU a spinning pool steals the
core its partner needs and every parallel region (BLAS ones included) slows
5-30x. It must be set before torch loads its OpenMP runtime, i.e. before
``import torch``: import this module first (an explicit setting wins).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from icons_fast.bench.timing import (  # noqa: E402
    ROW_FIELDS,
    cpu_name,
    device_name,
    env_info,
    format_table,
    make_row,
    measure,
    measure_interleaved,
    quantiles,
    set_ratios,
    synchronizer,
    write_csv,
    write_json,
)

__all__ = ["ROW_FIELDS", "cpu_name", "device_name", "env_info", "format_table", "make_row", "measure",
           "measure_interleaved", "quantiles", "set_ratios", "synchronizer", "write_csv", "write_json"]


def out_dir() -> str:
    """Where benchmark outputs go: ``$OUT`` when set, else ``benchmarks/out/``."""
    d = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(d, exist_ok=True)
    return d
