"""Measured dispatch: "auto" picks the backend that measured fastest on this machine.

The first time an op runs with ``backend="auto"`` on a given (device, dtype,
shape class), ``pick`` times every available backend of the op on a sample of
the real inputs (``rounds`` interleaved rounds after one warm-up call each, the
median per backend), takes the fastest, logs one line and stores the choice on
disk, so later calls and later processes on the same machine skip the timing.

Rules:

- The reference backend ("torch") is always timed, and a backend whose median
  is slower than the reference's is never picked: on a machine where a fast
  path loses to its own reference, the reference runs.
- The cache file is ``<cache dir>/autotune.json`` (the cache directory is
  ``$ICONS_FAST_CACHE``, default ``~/.cache/icons_fast``, the same place the
  built-in models are cached). Its entries are grouped under a machine key
  (CPU model and ISA, GPU name, torch and icons-fast versions, the compiled
  extension's build), so a new machine, GPU, library version or extension
  build measures again.
- Forcing a backend (``ICONS_FAST_BACKEND_<OP>=name``, ``ICONS_FAST_BACKEND``,
  or an explicit ``backend=``) skips the timing (``ops.backend.requested_backend``).
- Calls with less work than ``MIN_FLOPS`` are not worth a timing: the ops
  take the first available backend of the preference order for them
  (``ops.backend.measured_backend``, the one place the ops reach ``pick`` from).

The clock is an argument (``clock``) so tests can inject timings.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable

import torch

from icons_fast.fileio import atomic_json, cache_dir

log = logging.getLogger(__name__)

REFERENCE = "torch"
ROUNDS = 3
MIN_FLOPS = 2e9  # below this much work per call (the op's nominal flops) "auto" times nothing
# Re-entrant: timing the torch backend of lora_grad calls the project op, whose "auto" may be measured in turn.
_LOCK = threading.RLock()
_MEMORY: dict[str, dict] = {}  # path -> loaded cache file (this process)
_SAID: set[tuple[str, str]] = set()  # (path, entry) whose cached choice was logged in this process


def cache_path() -> str:
    """The measured-dispatch cache file, ``<cache_dir()>/autotune.json``."""
    return os.path.join(cache_dir(), "autotune.json")


def _cpuinfo(field: str) -> str | None:
    """The value of the first ``field`` line of /proc/cpuinfo (None where there is none or no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    name = _cpuinfo("model name")
    return name if name is not None else (platform.processor() or "unknown CPU")


@functools.lru_cache(maxsize=None)
def cpu_isa() -> str:
    """The widest vector / matrix ISA the CPU reports: "AMX" > "AVX-512" (+BF16) > "AVX2" > "baseline"."""
    flags = set((_cpuinfo("flags") or "").split())
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512f" in flags:
        return "AVX-512 (BF16)" if "avx512_bf16" in flags else "AVX-512"
    if "avx2" in flags:
        return "AVX2"
    return "baseline"


@functools.lru_cache(maxsize=None)
def _package_version() -> str:
    # (importlib.metadata, not icons_fast.__version__: ops sit below the package's public layer)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("icons-fast")
    except PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=None)
def _extension_build() -> str:
    """First 12 hex digits of the compiled extension's sha256 ("none" without one).

    The package version does not move when the C++ code is rebuilt (an editable
    install, a new compiler), but the speeds it measured do.
    """
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec("icons_fast._C")
    if spec is None or not spec.origin or not os.path.exists(spec.origin):
        return "none"
    with open(spec.origin, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def _gpu_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "no GPU"


def machine_key(device: str | torch.device = "cpu") -> str:
    """What a measured choice depends on besides the shape: CPU model and ISA, GPU, torch and icons-fast versions,
    and the build of the compiled extension."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    gpu = _gpu_name(dev)
    return (f"{cpu_name()} [{cpu_isa()}] | {gpu} | torch {torch.__version__} | icons-fast {_package_version()} "
            f"(extension {_extension_build()})")


def pow2_class(v: int) -> int:
    """The power of two at or above ``v`` (shape classes: 1000 and 1024 share one entry)."""
    return 1 << max(0, math.ceil(math.log2(max(1, int(v)))))


def _load(path: str) -> dict:
    if path not in _MEMORY:
        try:
            with open(path) as f:
                _MEMORY[path] = json.load(f)
        except FileNotFoundError:
            _MEMORY[path] = {}
        except (OSError, ValueError) as e:  # unreadable or corrupt: measure again, rewrite it
            log.warning("ignoring the measured-dispatch cache %s (%s); it will be rewritten", path, e)
            _MEMORY[path] = {}
    return _MEMORY[path]


def _store(path: str, data: dict) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_json(path, data, indent=1, sort_keys=True)
    except OSError as e:  # a read-only cache only costs a re-measurement next process
        log.warning("could not write the measured-dispatch cache %s (%s); choices are kept in memory only", path, e)


def time_backends(candidates: dict[str, Callable[[], object]], rounds: int = ROUNDS,
                  clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each candidate: one warm-up call each, then ``rounds`` interleaved rounds.

    A candidate that raises is left out (logged); interleaving makes a change
    of load on a shared machine hit every candidate alike.
    """
    alive = {}
    for name, fn in candidates.items():
        try:
            fn()
            alive[name] = fn
        except Exception as e:  # noqa: BLE001 - a failing backend is not a candidate
            log.warning("backend %r failed while being timed (%s); not a candidate", name, e)
    times: dict[str, list[float]] = {name: [] for name in alive}
    for _ in range(rounds):
        for name, fn in alive.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def choose(medians: dict[str, float], reference: str = REFERENCE) -> str:
    """The fastest backend that is not slower than ``reference`` (the reference itself on ties or when alone)."""
    if reference not in medians:
        raise ValueError(f"the reference backend {reference!r} was not timed (timed: {sorted(medians)})")
    ref = medians[reference]
    best = reference
    for name, t in medians.items():
        if t <= ref and t < medians[best]:
            best = name
    return best


def pick(op: str, device: str | torch.device, shape_class: str, candidates: dict[str, Callable[[], object]],
         reference: str = REFERENCE, rounds: int = ROUNDS, clock: Callable[[], float] = time.perf_counter,
         path: str | None = None) -> str:
    """The backend of ``op`` to use for inputs of ``shape_class`` on ``device``, measured once and cached.

    Args:
        op: the op's registry name ("influence", ...).
        shape_class: what the choice depends on besides the machine, e.g.
            ``"f16 max k1024 M2048"`` (callers bucket sizes with ``pow2_class``).
        candidates: backend name -> a call of that backend on a sample of the
            inputs (must include ``reference``). Only called on a cache miss.
        path: the cache file (``cache_path()`` when None).
    Returns the chosen backend name. A cached choice that is no longer a
    candidate (e.g. the extension is not built any more) is measured again.
    """
    path = path or cache_path()
    dev = torch.device(device)
    machine = machine_key(dev)
    entry = f"{op} | {dev.type} | {shape_class}"
    with _LOCK:
        data = _load(path)
        hit = data.get(machine, {}).get(entry)
        if hit and hit.get("backend") in candidates:
            if (path, entry) not in _SAID:  # once per process, not at every call
                _SAID.add((path, entry))
                log.info("icons_fast: %s on %s (%s) uses backend %r (measured earlier on this machine; %s)",
                         op, dev.type, shape_class, hit["backend"], path)
            return hit["backend"]
        medians = time_backends(candidates, rounds, clock)
        name = choose(medians, reference)
        data.setdefault(machine, {})[entry] = {"backend": name, "median_s": medians}
        _store(path, data)
    _SAID.add((path, entry))
    timed = ", ".join(f"{b} {t * 1e3:.1f} ms" for b, t in sorted(medians.items(), key=lambda kv: kv[1]))
    log.info("icons_fast: %s on %s (%s) uses backend %r (measured: %s; cached in %s)",
             op, dev.type, shape_class, name, timed, path)
    return name


def forget(path: str | None = None) -> None:
    """Drop this process's copy of the cache file (tests; after editing the file by hand)."""
    _MEMORY.pop(path or cache_path(), None)
