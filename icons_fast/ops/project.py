"""Thin wrappers over the project op: sign tiles and per-parameter projection.

The matrix is the projection contract of ``icons_fast.features.rademacher``:
``R[i, j] = +-1/sqrt(k)`` from a counter hash of (seed, parameter id, element
index ``i``, column ``j``), never stored. Backends (chosen by
``icons_fast.ops.backend.resolve_backend("project", ...)``):

- ``"cpp"`` (CPU tensors): ``icons_fast._C``. ``method="fused"`` runs
  ``project_accumulate`` (a four-Russians product that never materialises
  ``R``: one table lookup per 8 rows per column instead of 8 multiply-adds);
  ``method="tile"`` fills a float32 sign tile in C++ and multiplies it with
  ``torch.addmm`` (BLAS), tile by tile. ``"auto"`` is "fused" (measured
  faster on every shape in ``benchmarks/bench_projection.py``).
- ``"torch"`` (any device): the same hash chain in torch int64 arithmetic on
  the tensors' device, one tile at a time, multiplied with ``torch.addmm``.
- ``"triton"`` (CUDA, or the CPU under ``TRITON_INTERPRET=1``):
  ``icons_fast.kernels.project.rademacher_project``, sign tiles generated on
  chip and multiplied on tensor cores.

Every path accumulates in float32; ``project_param`` adds into ``out`` so a
model's projection is a sum of per-parameter calls.
"""
from __future__ import annotations

import logging
import math

import torch

from icons_fast.features.rademacher import MASK32, fmix32, fnv1a32, row_hash_base
from icons_fast.ops.backend import cpu_ext, resolve_backend

log = logging.getLogger("icons_fast")

_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Rows per call of the fused kernel / per sign tile. Chosen by measurement
# (benchmarks/bench_projection.py, [16, 312320] -> 5120 on 2 EPYC cores): the
# fused kernel is flat from ~32K rows (fewer calls = fewer OpenMP fork/joins,
# which cost most on a busy CPU); BLAS on a [tile, 5120] tile is 2x faster at
# 128 rows (2.6 MB, near L2) than at 1024 rows (21 MB).
DEFAULT_ROWS = {"fused": 32768, "tile": 128, "torch": 1024}

def param_id(name: str | int) -> int:
    """The parameter id ``pid``: ``fnv1a32(name)`` for a name, an int passes through (mod 2**32)."""
    return fnv1a32(name) if isinstance(name, str) else int(name) & MASK32


def _check_tile_args(row_start: int, n_rows: int, k: int) -> None:
    if k < 1:
        raise ValueError(f"proj_dim k must be >= 1, got {k}")
    if n_rows < 0 or row_start < 0 or row_start + n_rows > 2**64:
        raise ValueError(f"rows [{row_start}, {row_start + n_rows}) must lie in [0, 2**64)")


def signs_tile_torch(pid: int, seed: int, row_start: int, n_rows: int, k: int, device="cpu") -> torch.Tensor:
    """``R[row_start:row_start+n_rows, :k]`` (float32, ``+-1/sqrt(k)``) computed with torch on ``device``.

    Same values, bit for bit, as ``rademacher_signs_ref`` (which runs on the
    CPU only); this one builds the tile where it is used.
    """
    _check_tile_args(row_start, n_rows, k)
    if row_start + n_rows > 2**63:  # int64 cannot hold the index; the hash only needs i >> 32 and i & mask
        return _signs_tile_huge(pid, seed, row_start, n_rows, k, device)
    rows = torch.arange(n_rows, dtype=torch.int64, device=device) + row_start
    base = row_hash_base(pid, seed, rows)  # [n]
    words = fmix32(base[:, None] ^ torch.arange((k + 31) // 32, dtype=torch.int64, device=device))  # [n, W]
    return _expand(words, n_rows, k, device)


def _signs_tile_huge(pid, seed, row_start, n_rows, k, device) -> torch.Tensor:
    # Rows past 2**63: hash each row's high word separately (tiny tiles only; tests use it).
    from icons_fast.features.rademacher import fmix32_int

    h1 = fmix32_int((seed & MASK32) ^ pid)
    bases = []
    for i in range(row_start, row_start + n_rows):
        h = fmix32_int(h1 ^ (i >> 32)) if i >> 32 else h1
        bases.append(fmix32_int(h ^ (i & MASK32)))
    base = torch.tensor(bases, dtype=torch.int64, device=device)
    words = fmix32(base[:, None] ^ torch.arange((k + 31) // 32, dtype=torch.int64, device=device))
    return _expand(words, n_rows, k, device)


def _expand(words: torch.Tensor, n_rows: int, k: int, device) -> torch.Tensor:
    bits = torch.arange(32, dtype=torch.int64, device=device)
    neg = ((words[:, :, None] >> bits) & 1).reshape(n_rows, -1)[:, :k].bool()  # [n, k]
    value = torch.tensor(1.0 / math.sqrt(k), dtype=torch.float64).to(torch.float32).to(device)
    return torch.where(neg, -value, value)


def signs_tile(
    pid: str | int,
    seed: int,
    row_start: int,
    n_rows: int,
    k: int,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sign tile ``R[row_start:row_start+n_rows, 0:k]`` of one parameter, float32 ``+-1/sqrt(k)``.

    ``pid`` is the parameter name or its ``fnv1a32`` id; ``seed`` is taken
    mod 2**32; ``row_start`` may exceed 2**32 (element indices of huge
    parameters). ``backend`` "cpp" fills it in C++ (CPU), "torch" in torch.
    ``out``, when given, is a CPU float32 ``Tensor[n_rows, >=k]`` with unit
    column stride to fill in place (cpp only; the tile is ``out[:, :k]``).
    """
    _check_tile_args(row_start, n_rows, k)
    pid, seed = param_id(pid), int(seed) & MASK32
    device = out.device if out is not None else torch.device("cpu")
    name = resolve_backend("project", backend, device)
    if name != "cpp":
        tile = signs_tile_torch(pid, seed, row_start, n_rows, k, device)
        if out is not None:
            out[:, :k].copy_(tile)
            return out[:, :k]
        return tile
    ext = cpu_ext()
    if out is None:
        out = torch.empty(n_rows, k, dtype=torch.float32)
    _check_native(out, "out", (n_rows, None))
    if out.shape[1] < k:
        raise ValueError(f"out has {out.shape[1]} columns, needs at least k={k}")
    scale = float(torch.tensor(1.0 / math.sqrt(k), dtype=torch.float64).to(torch.float32))
    ext.rademacher_signs(out.data_ptr(), max(out.stride(0), k), pid, seed, row_start, n_rows, k, scale)
    return out[:, :k]


def _check_native(t: torch.Tensor, what: str, shape: tuple) -> None:
    """The C++ op reads raw float32 memory: CPU, float32, unit column stride, 2-D of ``shape``."""
    if t.device.type != "cpu":
        raise ValueError(f"{what} is on {t.device}; the C++ project op needs CPU tensors (use backend='torch' there)")
    if t.dtype != torch.float32:
        raise TypeError(f"{what} has dtype {t.dtype}; the C++ project op needs float32")
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1) or t.stride(0) < 0:
        raise ValueError(f"{what} must be 2-D with unit column stride (call .contiguous()); got stride {t.stride()}")
    for got, want in zip(t.shape, shape):
        if want is not None and got != want:
            raise ValueError(f"{what} has shape {tuple(t.shape)}, expected {shape}")


def project_param(
    g: torch.Tensor,
    pid: str | int,
    seed: int,
    k: int,
    out: torch.Tensor,
    backend: str = "auto",
    tile_rows: int | None = None,
    row_start: int = 0,
    method: str = "auto",
) -> torch.Tensor:
    """``out += g @ R_p[row_start:row_start+n, :k]`` for one parameter ``p``; returns ``out``.

    Arguments:
        g: ``Tensor[B, n]`` (float32/float16/bfloat16/float64), the parameter's
            per-sample gradients flattened row-major (element index = column).
        pid: parameter name or its ``fnv1a32`` id.
        seed: projection seed (mod 2**32).
        k: projection dimension (``R`` entries are ``+-1/sqrt(k)``).
        out: float32 ``Tensor[B, k]`` on ``g``'s device, accumulated into.
        backend: "auto" | "cpp" | "torch" | "triton" (see the module docstring).
        tile_rows: rows of ``R`` per step (None: ``DEFAULT_ROWS`` for the method).
        row_start: element index of ``g[:, 0]`` inside the parameter (for
            gradients that arrive in slices).
        method: cpp only: "fused" | "tile" | "auto" (= "fused").
    """
    if g.dim() != 2:
        raise ValueError(f"g must be Tensor[B, n] (one parameter, flattened per sample); got shape {tuple(g.shape)}")
    if g.dtype not in _INPUT_DTYPES:
        raise TypeError(f"g has dtype {g.dtype}; expected one of {_INPUT_DTYPES}")
    B, n = g.shape
    if out.shape != (B, k) or out.dtype != torch.float32 or out.device != g.device:
        raise ValueError(
            f"out must be float32 Tensor[{B}, {k}] on {g.device}; got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    _check_tile_args(row_start, n, k)
    if B == 0 or n == 0:
        return out
    pid, seed = param_id(pid), int(seed) & MASK32
    name = resolve_backend("project", backend, g.device)
    if name == "triton":
        from icons_fast.kernels.project import rademacher_project

        rademacher_project(g, pid, seed, k, row_start=row_start, out=out)
        return out
    if name == "cpp":
        if method not in ("auto", "fused", "tile"):
            raise ValueError(f"method must be 'auto', 'fused' or 'tile', got {method!r}")
        method = "fused" if method == "auto" else method
        _check_native(out, "out", (B, k))
    else:
        method = "torch"
    rows = int(tile_rows or DEFAULT_ROWS[method])
    if rows < 1:
        raise ValueError(f"tile_rows must be >= 1, got {tile_rows}")
    if method == "fused":
        _fused(g, pid, seed, k, out, rows, row_start)
    elif method == "tile":
        _tiled_cpp(g, pid, seed, k, out, rows, row_start)
    else:
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            tile = signs_tile_torch(pid, seed, row_start + r0, r1 - r0, k, g.device)
            out.addmm_(g[:, r0:r1].to(torch.float32), tile)
    return out


def _as_f32_rows(g: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """``g[:, r0:r1]`` as float32 with unit column stride (a view when it already is one)."""
    part = g[:, r0:r1]
    if part.dtype != torch.float32:
        part = part.to(torch.float32)
    if (part.shape[1] > 1 and part.stride(1) != 1) or (part.shape[0] > 1 and part.stride(0) < part.shape[1]):
        part = part.contiguous()
    return part


def _fused(g, pid, seed, k, out, rows, row_start) -> None:
    ext = cpu_ext()
    scale = float(torch.tensor(1.0 / math.sqrt(k), dtype=torch.float64).to(torch.float32))
    B, n = g.shape
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        part = _as_f32_rows(g, r0, r1)
        ld_g = part.stride(0) if B > 1 else r1 - r0
        ext.project_accumulate(
            out.data_ptr(), out.stride(0) if B > 1 else k, part.data_ptr(), ld_g, B, r1 - r0,
            pid, seed, row_start + r0, k, scale,
        )


def _tiled_cpp(g, pid, seed, k, out, rows, row_start) -> None:
    ext = cpu_ext()
    scale = float(torch.tensor(1.0 / math.sqrt(k), dtype=torch.float64).to(torch.float32))
    n = g.shape[1]
    buf = torch.empty(min(rows, n), k, dtype=torch.float32)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        tile = buf[: r1 - r0]
        ext.rademacher_signs(tile.data_ptr(), k, pid, seed, row_start + r0, r1 - r0, k, scale)
        out.addmm_(_as_f32_rows(g, r0, r1), tile)
