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

Backends (registered below, chosen by ``resolve_backend("influence", ...)``):

- ``"cpp"``: CPU, C++ OpenMP blocked kernel; never forms the ``N x M``
  product (a ``[block_rows, 256]`` tile per thread), memory independent of N.
- ``"cuda"``: the CUDA kernel (tensor cores for fp16/bf16 train features),
  on the current stream; top-m limited to ``m <= 32``.
- ``"torch"``: plain torch over blocks of ``block_rows`` train rows
  (``segment_reduce_ref`` per block).

Tensors cross into C++ as raw addresses, shapes and dtype codes, so the
extension does not depend on the torch build. ``segment_reduce_ref`` is the
plain-torch reference that tests compare against.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from icons_fast.ops.backend import BackendUnavailable, cpu_ext, implementation, register

log = logging.getLogger(__name__)

REDUCTIONS = ("mean", "max", "topm", "count")
TRAIN_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.int8: "i8"}
TARGET_DTYPES = {torch.float32: "f32", torch.float16: "f16"}
DEFAULT_BLOCK_ROWS = {"cpp": 144, "torch": 4096, "cuda": 64}
CUDA_MAX_TOPM = 32


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
        backend: "auto" | "cpp" | "cuda" | "torch" (see ``icons_fast.ops.backend``).
        block_rows: train rows per block (cpp default 144, torch 4096); results
            do not depend on it.
        num_threads: OpenMP threads for "cpp" (0 = OpenMP default).
    Returns:
        ``out`` ``[N, S]`` fp32.
    """
    offs, out = _check(train, targets_cat, offsets, reduction, m, threshold, out, scale)
    explicit = backend not in (None, "auto")
    name, impl = implementation("influence", backend, train.device)
    if name == "cuda" and reduction == "topm" and int(m) > CUDA_MAX_TOPM:
        if explicit:
            raise BackendUnavailable(f"the CUDA top-m reduction keeps at most m={CUDA_MAX_TOPM}; use backend='torch' for m={m}")
        log.info("icons_fast: influence top-m with m=%d > %d runs on the torch backend", m, CUDA_MAX_TOPM)
        name, impl = implementation("influence", "torch", train.device)
    if train.shape[0] == 0:
        return out
    rows = int(block_rows or DEFAULT_BLOCK_ROWS[name])
    if rows < 1:
        raise ValueError(f"block_rows must be >= 1; got {block_rows}")
    impl(train, targets_cat, offs, reduction, m, threshold, weight, out, scale, rows, num_threads)
    return out


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
