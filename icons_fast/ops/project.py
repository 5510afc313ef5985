"""The project op: ``out += G' @ R_p[row_start:row_start+n, :k]`` for one parameter ``p``.

Column: ``kernels/project.py`` (Triton) and ``icons_fast._C`` (C++) below,
this module (input checks, dispatch through ``ops.backend``'s registry, the
plain-torch reference ``project_param_ref``) in the middle, callers above
(``features.projection.RademacherProjector``, ``ops.lora_grad``).

The matrix is the projection contract of ``icons_fast.contract``:
``R[i, j] = +-1/sqrt(k)`` from a counter hash of (seed, parameter id, element
index ``i``, column ``j``), never stored. ``G'`` is ``G`` or, with the
parameter's ``AdamMoments``, the LESS direction ``adam_precondition_ref(G)``.
Backends (registered below; "auto" measures them, see "Dispatch"):

- ``"cpp"`` (CPU tensors): ``icons_fast._C``. ``method="fused"`` runs
  ``project_accumulate`` (a four-Russians product that never materialises
  ``R``: one table lookup per 8 rows per column instead of 8 multiply-adds);
  ``method="tile"`` fills a float32 sign tile in C++ and multiplies it with
  ``torch.addmm`` (BLAS), tile by tile. ``"auto"`` is "fused" (measured
  faster on every shape in ``benchmarks/bench_projection.py``).
- ``"torch"`` (any device): the contract's torch sign oracle
  (``rademacher_signs_ref``) builds each tile on the tensors' device,
  multiplied with ``torch.addmm``.
- ``"triton"`` (CUDA, or the CPU under ``TRITON_INTERPRET=1``):
  ``icons_fast.kernels.project.rademacher_project``, sign tiles generated on
  chip, Adam applied on the fly, multiplied on tensor cores.

Every path accumulates in float32 and adds into ``out``, so a model's
projection is a sum of per-parameter calls.

Dispatch: ``backend="auto"`` (and no ``ICONS_FAST_BACKEND_PROJECT`` /
``ICONS_FAST_BACKEND``) times the available backends of the device ("cpp"
and "torch" on the CPU, "triton" and "torch" on a GPU; never the Triton
interpreter) once per shape class (``shape_class``: dtype, batch, the first
``TUNE_ELEMENTS`` elements, k, Adam or not) on ``g[:, :TUNE_ELEMENTS]`` into a
scratch ``out``, and keeps the fastest that is not slower than "torch"
(``ops.backend.measured_backend``, cached on disk per machine). Calls of
less work (``2 B n k``) than ``autotune.MIN_FLOPS`` take the first available
backend of the preference order without timing.
"""

from __future__ import annotations

import logging

import torch

from icons_fast.contract import MASK32, AdamMoments, param_id, rademacher_signs_ref, sign_value
from icons_fast.ops import autotune
from icons_fast.ops.backend import cpu_ext, implementation, measured_backend, register, resolve_backend

log = logging.getLogger(__name__)

_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Rows per call of the fused kernel / per sign tile. Chosen by measurement
# (benchmarks/bench_projection.py, [16, 312320] -> 5120 on 2 EPYC cores): the
# fused kernel is flat from ~32K rows (fewer calls = fewer OpenMP fork/joins,
# which cost most on a busy CPU); BLAS on a [tile, 5120] tile is 2x faster at
# 128 rows (2.6 MB, near L2) than at 1024 rows (21 MB).
DEFAULT_ROWS = {"fused": 32768, "tile": 128, "torch": 1024}
# Elements (columns of g, rows of R) the measured dispatch times each backend on: four tiles of the torch
# backend; 2 B 4096 k flops (0.7 GFLOP at B = 16, k = 5120) keeps the timing of a shape class short.
TUNE_ELEMENTS = 4096


def _check_tile_args(row_start: int, n_rows: int, k: int) -> None:
    if k < 1:
        raise ValueError(f"proj_dim k must be >= 1, got {k}")
    if n_rows < 0 or row_start < 0 or row_start + n_rows > 2**64:
        raise ValueError(f"rows [{row_start}, {row_start + n_rows}) must lie in [0, 2**64)")


# ------------------------------------------------------------------ reference
def adam_precondition_ref(g: torch.Tensor, adam: AdamMoments) -> torch.Tensor:
    """LESS Adam direction ``(b1*m + (1-b1)*g) / sqrt(b2*v + (1-b2)*g**2 + eps)`` in g's dtype.

    g: ``[B, *shape]`` per-sample gradients of one parameter (``shape`` its
    own shape, or ``[P]`` flattened); the moments hold ``prod(shape)``
    elements and broadcast over the batch. The Triton kernel applies the same
    formula on the fly; this is the one torch form of it.
    """
    m = adam.exp_avg.reshape(g.shape[1:]).to(g.device, g.dtype)
    v = adam.exp_avg_sq.reshape(g.shape[1:]).to(g.device, g.dtype)
    b1, b2 = adam.beta1, adam.beta2
    c1, c2 = adam.one_minus_beta1, adam.one_minus_beta2  # float64 on the host, as the kernel gets them
    return (b1 * m + c1 * g) / torch.sqrt(b2 * v + c2 * g * g + adam.eps)


def project_param_ref(g: torch.Tensor, pid: str | int, seed: int, k: int, row_start: int = 0,
                      adam: AdamMoments | None = None, out=None, chunk_rows: int = 4096) -> torch.Tensor:
    """Plain-torch ``project_param``: Adam in g's dtype, then ``G' @ R`` with R from
    ``rademacher_signs_ref`` in g's dtype, ``chunk_rows`` rows of R at a time.

    Returns ``[B, k]`` in float32 (float64 for float64 ``g``), added into ``out`` when given.
    """
    n_samples, n_rows = g.shape
    if adam is not None:
        g = adam_precondition_ref(g, adam)
    result = torch.zeros(n_samples, k, dtype=g.dtype, device=g.device)
    for r0 in range(0, n_rows, chunk_rows):
        n = min(chunk_rows, n_rows - r0)
        R = rademacher_signs_ref(pid, seed, row_start + r0, n, k, dtype=g.dtype, device=g.device)
        result += g[:, r0:r0 + n] @ R
    if out is None:
        return result.to(torch.promote_types(result.dtype, torch.float32))
    out += result.to(out.dtype)
    return out


# ------------------------------------------------------------------ sign tiles
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
    parameters). ``backend`` "cpp" fills it in C++ (CPU); any other backend
    builds it with the contract's torch oracle on ``out``'s device. ``out``,
    when given, is a float32 ``Tensor[n_rows, >=k]`` with unit column stride
    to fill in place (the tile is ``out[:, :k]``).
    """
    _check_tile_args(row_start, n_rows, k)
    pid, seed = param_id(pid), int(seed) & MASK32
    device = out.device if out is not None else torch.device("cpu")
    if resolve_backend("project", backend, device) != "cpp":
        tile = rademacher_signs_ref(pid, seed, row_start, n_rows, k, device=device)
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
    ext.rademacher_signs(out.data_ptr(), max(out.stride(0), k), pid, seed, row_start, n_rows, k, sign_value(k))
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


# ------------------------------------------------------------------ the op
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
    adam: AdamMoments | None = None,
) -> torch.Tensor:
    """``out += G' @ R_p[row_start:row_start+n, :k]`` for one parameter ``p``; returns ``out``.

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
        adam: the ``AdamMoments`` of exactly ``g``'s ``n`` elements, or None
            (``G' = G``).
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
    if adam is not None and adam.exp_avg.numel() != n:
        raise ValueError(f"Adam moments have {adam.exp_avg.numel()} elements but g has {n} per sample")
    if tile_rows and int(tile_rows) < 1:  # None or 0: the method's default
        raise ValueError(f"tile_rows must be >= 1, got {tile_rows}")
    if B == 0 or n == 0:
        return out
    pid, seed = param_id(pid), int(seed) & MASK32
    cols = min(n, TUNE_ELEMENTS)

    def run_sample(name):  # the first TUNE_ELEMENTS elements into a scratch out
        part = None if adam is None else AdamMoments(
            adam.exp_avg.reshape(-1)[:cols], adam.exp_avg_sq.reshape(-1)[:cols], adam.beta1, adam.beta2, adam.eps)
        scratch = torch.zeros(B, k, dtype=torch.float32, device=g.device)
        implementation("project", name, g.device)[1](g[:, :cols], pid, seed, k, scratch, tile_rows=tile_rows,
                                                     row_start=row_start, method=method, adam=part)

    name = measured_backend("project", backend, g.device, shape_class(g, k, adam), 2.0 * B * n * k, run_sample)
    impl = implementation("project", name, g.device)[1]
    impl(g, pid, seed, k, out, tile_rows=tile_rows, row_start=row_start, method=method, adam=adam)
    return out


def shape_class(g: torch.Tensor, k: int, adam: AdamMoments | None) -> str:
    """What a measured choice is keyed on besides the machine: g's dtype, B, the timed elements and k
    up to powers of two, and whether Adam is applied (every n past ``TUNE_ELEMENTS`` times the same sample)."""
    B, n = g.shape
    pow2 = autotune.pow2_class
    return (f"{str(g.dtype).removeprefix('torch.')} B{pow2(B)} n{pow2(min(n, TUNE_ELEMENTS))} k{pow2(k)}"
            f"{' adam' if adam is not None else ''}")


@register("project", "triton")
def _project_triton(g, pid, seed, k, out, tile_rows, row_start, method, adam) -> None:
    from icons_fast.kernels.project import rademacher_project

    rademacher_project(g, pid, seed, k, row_start=row_start, adam=adam, out=out)


@register("project", "torch")
def _project_torch(g, pid, seed, k, out, tile_rows, row_start, method, adam) -> None:
    if adam is not None:
        g = adam_precondition_ref(g, adam)
    rows = int(tile_rows or DEFAULT_ROWS["torch"])
    n = g.shape[1]
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        tile = rademacher_signs_ref(pid, seed, row_start + r0, r1 - r0, k, device=g.device)
        out.addmm_(g[:, r0:r1].to(torch.float32), tile)


@register("project", "cpp")
def _project_cpp(g, pid, seed, k, out, tile_rows, row_start, method, adam) -> None:
    if method not in ("auto", "fused", "tile"):
        raise ValueError(f"method must be 'auto', 'fused' or 'tile', got {method!r}")
    method = "fused" if method == "auto" else method
    _check_native(out, "out", tuple(out.shape))
    if adam is not None:
        g = adam_precondition_ref(g, adam)
    rows = int(tile_rows or DEFAULT_ROWS[method])
    (_fused if method == "fused" else _tiled_cpp)(g, pid, seed, k, out, rows, row_start)


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
    B, n = g.shape
    scale = sign_value(k)
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
    n = g.shape[1]
    scale = sign_value(k)
    buf = torch.empty(min(rows, n), k, dtype=torch.float32)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        tile = buf[: r1 - r0]
        ext.rademacher_signs(tile.data_ptr(), k, pid, seed, row_start + r0, r1 - r0, k, scale)
        out.addmm_(_as_f32_rows(g, r0, r1), tile)
