"""The segment-reduce op (the "influence" op of ``ops.backend``): fused per-segment influence reductions.

Column: ``csrc/influence*.{cpp,cu}`` (``icons_fast._C``) below, this module
(input checks, dispatch through ``ops.backend``'s registry, the plain-torch
reference ``segment_reduce_ref``) in the middle, ``select.influence`` above.
The two levels share the word "influence" but not the job: this op reduces one
block of dot products per segment; ``select.influence`` builds task scores
from feature stores on top of it.

For train features ``x`` ``[N, k]`` and target features ``t`` ``[M, k]``
concatenated over tasks / subtasks, with segment offsets ``o`` ``[S+1]``
(segment ``s`` = target rows ``o[s]:o[s+1]``)::

    out[i, s] += weight * R_{j in [o[s], o[s+1])} <x_i, t_j>

    R = mean              (1/|s|) * sum_j
        max               max_j
        topm (m)          mean of the min(m, |s|) largest
        count (threshold) #{j : <x_i, t_j> > threshold}   (strictly greater)

Several checkpoints ``c`` with weights ``w_c`` are several calls into the same
``out`` (``weight=w_c``). Int8 train features carry a per-row fp32 ``scale``
(``x_i = scale_i * q_i``).

Backends (registered below; "auto" measures them, see "Dispatch"):

- ``"blas"``: CPU. Per block of ``block_rows`` train rows: convert the rows to
  fp32 into a reused buffer, one fp32 GEMM through torch (MKL / oneDNN) into a
  reused score buffer, transposed (``[M, block_rows]``: one target's scores of
  the block's rows are contiguous, so the fold vectorises across rows), then
  the C++ fold (``_C.influence_segment_fold_t_cpu``) reduces that block per
  segment. The
  GEMM is the machine's own; what this op adds is the fused reduction and
  memory independent of N (two buffers, ``block_rows x (k + M)`` floats, at
  most ``BLAS_BUFFER_BYTES``).
- ``"blas-bf16"``: as "blas" with the GEMM in bf16 (inputs rounded to bf16,
  fp32 accumulation, bf16 scores), for fp16 / bf16 train features and the
  mean / max / top-m reductions only, within the error budget below. Fast
  where the CPU has a bf16 matrix unit (AMX); slower than fp32 elsewhere, so
  measured dispatch only takes it where it wins.
- ``"cpp"``: CPU, C++ OpenMP blocked kernel with its own AVX2 micro-kernel;
  never forms the ``N x M`` product (a ``[block_rows, 256]`` tile per thread),
  memory independent of N.
- ``"cuda"``: the CUDA kernel (tensor cores for fp16/bf16 train features),
  on the current stream; top-m limited to ``m <= 32``.
- ``"torch"``: plain torch over blocks of ``block_rows`` train rows
  (``segment_reduce_ref`` per block).

Tensors cross into C++ as raw addresses, shapes and dtype codes, so the
extension does not depend on the torch build. ``segment_reduce_ref`` is the
plain-torch reference that tests compare against.

Dispatch: ``backend="auto"`` (and no ``ICONS_FAST_BACKEND_INFLUENCE`` /
``ICONS_FAST_BACKEND``) times every available backend of the device (the
CPU ones, or "cuda" and "torch" on a GPU) once per (train dtype, reduction,
k class, M class) on the first ``TUNE_ROWS`` rows into a scratch accumulator
and keeps the fastest that is not slower than "torch"
(``ops.backend.measured_backend``, cached on disk per machine by
``ops.autotune``). Calls of less work (``2 N M k``) than
``autotune.MIN_FLOPS`` take the first available backend of the preference
order without timing. Top-m with ``m > CUDA_MAX_TOPM`` runs on "torch" on a
GPU (the CUDA kernel keeps at most that many).

Error budget of "blas-bf16" (held by ``tests/test_influence_ext.py`` against
fp64): each input is rounded to bf16 (relative error <= 2^-9 per element),
products are accumulated in fp32 and the score is rounded to bf16 (<= 2^-9
relative), so every dot product obeys::

    |s_bf16(x, t) - <x, t>| <= BF16_SCORE_BUDGET * ||x|| * ||t||,   BF16_SCORE_BUDGET = 2^-7

(the worst case is ~3 * 2^-9 = 2^-7.4 by Cauchy-Schwarz; typical errors are
much smaller because rounding errors of the k products cancel). mean, max and the top-m mean are
1-Lipschitz in the largest element error, so the reduced score obeys the same
bound with the largest ``||t||`` of its segment. count is a step function of
the scores, so it never runs in bf16. The budget also requires that the top
20% of train rows per task (the selection budget of the paper) overlaps the
fp64 selection by at least ``BF16_MIN_OVERLAP``.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from icons_fast.ops import autotune
from icons_fast.ops.backend import (
    BackendUnavailable, cpu_ext, implementation, measured_backend, register, requested_backend,
)

log = logging.getLogger(__name__)

REDUCTIONS = ("mean", "max", "topm", "count")
TRAIN_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.int8: "i8"}
TARGET_DTYPES = {torch.float32: "f32", torch.float16: "f16"}
# blas: 2048 rows per block. With the score block transposed ([M, rows], the fold reading one
# target's scores of all rows contiguously), top-m at k = 1024, M = 2,000 on a Xeon (2 threads, 5
# interleaved rounds) took 0.95 / 0.94 / 1.06x the plain GEMM's time at 1024 / 2048 / 4096 rows,
# max 0.90 / 0.93 / 0.95x: a [M, 4096] block (32 MiB) no longer stays in cache for the fold, and
# fewer rows cost MKL efficiency and a fork/join of the thread pool per block
# (benchmarks/RESULTS.md section 11). BLAS_BUFFER_BYTES caps it for large M + k.
DEFAULT_BLOCK_ROWS = {"cpp": 144, "torch": 4096, "cuda": 64, "blas": 2048, "blas-bf16": 2048}
BLAS_BUFFER_BYTES = 64 << 20  # blas: at most this much for the row buffer + score buffer (fp32)
CUDA_MAX_TOPM = 32
BF16_SCORE_BUDGET = 2.0**-7  # |score error| / (||x|| ||t||), see the module docstring
BF16_MIN_OVERLAP = 0.95  # top-20% selection overlap with fp64, per task
BF16_REDUCTIONS = ("mean", "max", "topm")
BF16_TRAIN_DTYPES = (torch.float16, torch.bfloat16)
TUNE_ROWS = 4096  # train rows the measured dispatch times each backend on (a full block of each)


def offsets_from_sizes(sizes: Sequence[int]) -> torch.Tensor:
    """Segment sizes ``[S]`` -> offsets ``[S+1]`` (int64): ``[0, s0, s0+s1, ...]``."""
    sizes_t = torch.as_tensor(list(sizes), dtype=torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes_t, 0)])


# R of the module docstring on one segment's scores seg [n, |s|] -> [n]
_REDUCERS = {
    "mean": lambda seg, m, threshold: seg.mean(1),
    "max": lambda seg, m, threshold: seg.amax(1),
    "topm": lambda seg, m, threshold: seg.topk(min(m, seg.shape[1]), dim=1).values.mean(1),
    "count": lambda seg, m, threshold: (seg > threshold).sum(1).to(seg.dtype),
}


def segment_reduce_ref(train, targets_cat, offsets, reduction: str, m: int | None = None,
                       threshold: float | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch reference: upcast to fp32, materialise ``train @ targets_cat.T``, reduce per segment.

    Args: as ``segment_reduce``. Returns ``R(train @ targets_cat.T)`` ``[N, S]`` fp32
    (``segment_reduce`` adds ``weight`` times it into ``out``).
    """
    offs = [int(v) for v in torch.as_tensor(offsets).tolist()]
    x = train.float()
    if scale is not None:
        x = x * scale.float()[:, None]
    prod = x @ targets_cat.float().T  # [N, M] fp32
    reduce = _REDUCERS[reduction]
    return torch.stack([reduce(prod[:, lo:hi], m, threshold) for lo, hi in zip(offs[:-1], offs[1:])], 1)


def _check(train, targets_cat, offsets, reduction, m, threshold, out, scale):
    """Validate the arguments; return (offsets int64 CPU tensor, out)."""
    if not isinstance(train, torch.Tensor) or train.dim() != 2:
        raise ValueError(f"train must be a 2-D tensor [N, k]; got {getattr(train, 'shape', type(train))}")
    if not isinstance(targets_cat, torch.Tensor) or targets_cat.dim() != 2:
        raise ValueError(f"targets_cat must be a 2-D tensor [M, k]; got {getattr(targets_cat, 'shape', type(targets_cat))}")
    if train.dtype not in TRAIN_DTYPES:
        raise TypeError(f"train dtype {train.dtype} not supported; use one of {list(TRAIN_DTYPES)}")
    if targets_cat.dtype not in TARGET_DTYPES:
        raise TypeError(f"targets_cat dtype {targets_cat.dtype} not supported; use float32 or float16 (.float())")
    n, k = train.shape
    if targets_cat.shape[1] != k:
        raise ValueError(f"feature sizes differ: train k={k}, targets_cat k={targets_cat.shape[1]} (same projection?)")
    if targets_cat.shape[0] == 0 or k == 0:
        raise ValueError("targets_cat and k must be non-empty")
    if targets_cat.device != train.device:
        raise ValueError(f"train is on {train.device} but targets_cat on {targets_cat.device}; move one (.to(...))")
    for name, t in (("train", train), ("targets_cat", targets_cat)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be C-contiguous; pass {name}.contiguous()")
    if train.dtype == torch.int8:
        if scale is None:
            raise ValueError("int8 train features need scale: Tensor[N] fp32 (x_i = scale_i * q_i)")
        if scale.shape != (n,) or scale.dtype != torch.float32 or scale.device != train.device:
            raise ValueError(f"scale must be float32 [N={n}] on {train.device}; got {scale.dtype} {tuple(scale.shape)} on {scale.device}")
        if not scale.is_contiguous():
            raise ValueError("scale must be contiguous; pass scale.contiguous()")
    elif scale is not None:
        raise ValueError(f"scale is only for int8 train features (train is {train.dtype})")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; use one of {REDUCTIONS}")
    if reduction == "topm" and (m is None or int(m) < 1):
        raise ValueError("reduction 'topm' needs m >= 1 (the number of largest scores averaged)")
    if reduction == "count" and threshold is None:
        raise ValueError("reduction 'count' needs a threshold (counts scores > threshold)")
    offs = torch.as_tensor(offsets, dtype=torch.int64).detach().to("cpu").contiguous()
    if offs.dim() != 1 or offs.numel() < 2:
        raise ValueError(f"offsets must be 1-D [S+1] with S >= 1; got shape {tuple(offs.shape)}")
    mt = targets_cat.shape[0]
    if int(offs[0]) != 0 or int(offs[-1]) != mt:
        raise ValueError(f"offsets must start at 0 and end at M={mt}; got {int(offs[0])} .. {int(offs[-1])}")
    sizes = offs[1:] - offs[:-1]
    if bool((sizes <= 0).any()):
        bad = int(torch.nonzero(sizes <= 0)[0])
        raise ValueError(f"segment {bad} is empty or decreasing (offsets[{bad}:{bad + 2}] = {offs[bad:bad + 2].tolist()})")
    S = offs.numel() - 1
    if out is None:
        out = torch.zeros(n, S, dtype=torch.float32, device=train.device)
    elif out.shape != (n, S) or out.dtype != torch.float32 or out.device != train.device:
        raise ValueError(f"out must be float32 [N={n}, S={S}] on {train.device}; got {out.dtype} {tuple(out.shape)} on {out.device}")
    elif not out.is_contiguous():
        raise ValueError("out must be contiguous (it is written in place)")
    return offs, out


def segment_reduce(
    train: torch.Tensor,
    targets_cat: torch.Tensor,
    offsets,
    reduction: str,
    m: int | None = None,
    threshold: float | None = None,
    weight: float = 1.0,
    out: torch.Tensor | None = None,
    backend: str | None = "auto",
    block_rows: int | None = None,
    scale: torch.Tensor | None = None,
    num_threads: int = 0,
) -> torch.Tensor:
    """``out[i, s] += weight * R_{j in segment s} <train_i, targets_cat_j>``.

    Args:
        train: ``[N, k]`` fp32 / fp16 / bf16, or int8 with ``scale`` ``[N]`` fp32.
        targets_cat: ``[M, k]`` fp32 / fp16, all tasks' targets concatenated.
        offsets: ``[S+1]`` ints, ``0 = o[0] < o[1] < ... < o[S] = M``.
        reduction: "mean" | "max" | "topm" (needs ``m``) | "count" (needs ``threshold``).
        weight: multiplies the reduced scores before they are added to ``out``.
        out: ``[N, S]`` fp32 accumulator (zeros when None), on train's device.
        backend: "auto" | "blas" | "blas-bf16" | "cpp" | "cuda" | "torch" (module
            docstring; ``icons_fast.ops.backend`` for forcing one).
        block_rows: train rows per block (``DEFAULT_BLOCK_ROWS`` per backend);
            "cpp" and "torch" results do not depend on it.
        num_threads: OpenMP threads of the C++ loops (0 = OpenMP default; the
            BLAS uses torch's thread count).
    Returns:
        ``out`` ``[N, S]`` fp32.
    """
    offs, out = _check(train, targets_cat, offsets, reduction, m, threshold, out, scale)
    name = _choose(train, targets_cat, offs, reduction, m, threshold, scale, backend, block_rows)
    impl = implementation("influence", name, train.device)[1]
    if train.shape[0] == 0:
        return out
    rows = int(block_rows or DEFAULT_BLOCK_ROWS[name])
    if rows < 1:
        raise ValueError(f"block_rows must be >= 1; got {block_rows}")
    impl(train, targets_cat, offs, reduction, m, threshold, weight, out, scale, rows, num_threads)
    return out


def choose_backend(train, targets_cat, offsets, reduction: str, m: int | None = None, threshold: float | None = None,
                   scale: torch.Tensor | None = None, backend: str | None = "auto", block_rows: int | None = None) -> str:
    """The backend ``segment_reduce`` runs for these arguments (measuring it first when "auto" has not yet)."""
    offs, _ = _check(train, targets_cat, offsets, reduction, m, threshold, None, scale)
    return _choose(train, targets_cat, offs, reduction, m, threshold, scale, backend, block_rows)


def _choose(train, targets_cat, offs, reduction, m, threshold, scale, backend, block_rows) -> str:
    requested = requested_backend("influence", backend, train.device)
    excluded = _excluded(train, reduction, m)
    if requested == "blas-bf16" and "blas-bf16" in excluded:
        raise BackendUnavailable(
            f"backend 'blas-bf16' runs fp16/bf16 train features with {BF16_REDUCTIONS} only (its error budget); "
            f"got {train.dtype} train features and reduction {reduction!r}: use backend='blas'")
    if requested == "cuda" and "cuda" in excluded and train.device.type == "cuda":
        raise BackendUnavailable(f"the CUDA top-m reduction keeps at most m={CUDA_MAX_TOPM}; use backend='torch' for m={m}")
    if requested == "auto" and "cuda" in excluded and train.device.type == "cuda":
        log.info("icons_fast: influence top-m with m=%d > %d runs on the torch backend", m, CUDA_MAX_TOPM)
    n, k = train.shape
    rows = min(n, TUNE_ROWS)

    def run_sample(name):  # the first TUNE_ROWS rows into a scratch accumulator
        impl = implementation("influence", name, train.device)[1]
        scratch = torch.zeros(rows, offs.numel() - 1, device=train.device)
        sc = None if scale is None else scale[:rows]
        br = int(block_rows or DEFAULT_BLOCK_ROWS[name])
        impl(train[:rows], targets_cat, offs, reduction, m, threshold, 1.0, scratch, sc, br, 0)

    return measured_backend("influence", requested, train.device, shape_class(train, targets_cat, reduction),
                            2.0 * n * targets_cat.shape[0] * k, run_sample, excluded)


def _excluded(train, reduction, m) -> tuple[str, ...]:
    """Backends that cannot run these arguments: "blas-bf16" outside its error budget, "cuda" for top-m past
    ``CUDA_MAX_TOPM``. They are never candidates of "auto"; asking for one by name raises."""
    out = []
    if train.dtype not in BF16_TRAIN_DTYPES or reduction not in BF16_REDUCTIONS:
        out.append("blas-bf16")
    if reduction == "topm" and int(m) > CUDA_MAX_TOPM:
        out.append("cuda")
    return tuple(out)


def shape_class(train, targets_cat, reduction) -> str:
    """What a measured choice is keyed on besides the machine: dtype, reduction, k and M up to powers of two."""
    k, mt = train.shape[1], targets_cat.shape[0]
    return f"{TRAIN_DTYPES[train.dtype]} {reduction} k{autotune.pow2_class(k)} M{autotune.pow2_class(mt)}"


@register("influence", "torch")
def _segment_reduce_torch(train, targets_cat, offs, reduction, m, threshold, weight, out, scale, rows, num_threads):
    for i in range(0, train.shape[0], rows):
        sc = None if scale is None else scale[i : i + rows]
        block = segment_reduce_ref(train[i : i + rows], targets_cat, offs, reduction, m, threshold, sc)
        out[i : i + rows] += weight * block


def _native_args(ext, train, targets_cat, reduction, m, threshold, weight, out, scale):
    """The pointer/shape/dtype-code arguments the C++ and CUDA entry points share (before and after offsets)."""
    codes = ext.influence_codes()
    head = (
        train.data_ptr(), codes[TRAIN_DTYPES[train.dtype]], train.shape[0], train.shape[1],
        0 if scale is None else scale.data_ptr(),
        targets_cat.data_ptr(), codes[TARGET_DTYPES[targets_cat.dtype]], targets_cat.shape[0],
    )
    thr = float(threshold if threshold is not None else 0.0)
    tail = (codes[reduction], int(m or 0), thr, float(weight), out.data_ptr())
    return head, tail


@register("influence", "cpp")
def _segment_reduce_cpp(train, targets_cat, offs, reduction, m, threshold, weight, out, scale, rows, num_threads):
    ext = cpu_ext()
    head, tail = _native_args(ext, train, targets_cat, reduction, m, threshold, weight, out, scale)
    ext.influence_segment_reduce_cpu(*head, offs.data_ptr(), offs.numel() - 1, *tail, rows, int(num_threads), False)


@register("influence", "cuda")
def _segment_reduce_cuda(train, targets_cat, offs, reduction, m, threshold, weight, out, scale, rows, num_threads):
    # offsets on the device, the caller's current stream
    ext = cpu_ext()
    head, tail = _native_args(ext, train, targets_cat, reduction, m, threshold, weight, out, scale)
    try:
        with torch.cuda.device(train.device):  # the kernel launches on the current device
            offs_dev = offs.to(train.device)
            stream = torch.cuda.current_stream(train.device).cuda_stream
            ext.influence_segment_reduce_cuda(*head, offs_dev.data_ptr(), offs.numel() - 1, *tail, stream)
    except (RuntimeError, ValueError) as e:
        raise RuntimeError(
            f"{e}. Advice: check free GPU memory (torch.cuda.mem_get_info()), that the extension was built "
            "for this GPU's architecture (ICONS_FAST_CUDA_ARCHS), or rerun with backend='torch'."
        ) from e


def _segment_reduce_blas(train, targets_cat, offs, reduction, m, threshold, weight, out, scale, rows, num_threads,
                         gemm_dtype):
    """Row blocks: convert into a reused buffer, one GEMM into a reused score buffer, the C++ fold per block."""
    ext = cpu_ext()
    codes = ext.influence_codes()
    n, k = train.shape
    mt, S = targets_cat.shape[0], offs.numel() - 1
    rows = min(rows, n, max(1, BLAS_BUFFER_BYTES // (4 * (k + mt))))  # memory independent of N, bounded in M
    tg = targets_cat.to(gemm_dtype).contiguous()  # [M, k], converted once per call
    xbuf = torch.empty(rows, k, dtype=gemm_dtype)
    pbuf = torch.empty(mt * rows, dtype=gemm_dtype)  # the block's scores, transposed: [M, r]
    fbuf = pbuf if gemm_dtype == torch.float32 else torch.empty(mt * rows)  # fp32 scores for the fold
    thr = float(threshold if threshold is not None else 0.0)
    for i in range(0, n, rows):
        r = min(rows, n - i)
        if train.dtype == gemm_dtype:
            x = train[i : i + r]
        else:
            x = xbuf[:r]
            x.copy_(train[i : i + r])
            if scale is not None:
                x.mul_(scale[i : i + r, None])
        p = torch.mm(tg, x.T, out=pbuf[: mt * r].view(mt, r))
        if fbuf is not pbuf:
            p = fbuf[: mt * r].view(mt, r).copy_(p)
        ext.influence_segment_fold_t_cpu(p.data_ptr(), r, mt, r, offs.data_ptr(), S, codes[reduction], int(m or 0),
                                         thr, float(weight), out[i : i + r].data_ptr(), int(num_threads))


@register("influence", "blas")
def _segment_reduce_blas_f32(train, targets_cat, offs, reduction, m, threshold, weight, out, scale, rows, num_threads):
    _segment_reduce_blas(train, targets_cat, offs, reduction, m, threshold, weight, out, scale, rows, num_threads,
                         torch.float32)


@register("influence", "blas-bf16")
def _segment_reduce_blas_bf16(train, targets_cat, offs, reduction, m, threshold, weight, out, scale, rows,
                              num_threads):
    _segment_reduce_blas(train, targets_cat, offs, reduction, m, threshold, weight, out, scale, rows, num_threads,
                         torch.bfloat16)
