"""The projection contract: a counter-hash Rademacher matrix that is never stored.

Every backend (this torch reference, the C++ CPU op, the Triton kernels)
computes exactly these signs, so features are bit-identical across devices,
batch sizes, block sizes, and unchanged when other LoRA modules are added.

For parameter ``name`` (as in ``model.named_parameters()``), element index
``i`` inside that parameter (row-major, ``0 <= i < numel``) and column
``j`` (``0 <= j < k``)::

    pid = fnv1a32(utf8(name))
    h1  = fmix32(seed ^ pid)
    h1  = fmix32(h1 ^ (i >> 32))          # only when i >= 2**32
    h   = fmix32(fmix32(h1 ^ (i & 0xffffffff)) ^ (j // 32))
    R[i, j] = +1/sqrt(k)  if bit (j % 32) of h is 0  else  -1/sqrt(k)

``fmix32`` is the murmur3 32-bit finaliser; all arithmetic is modulo 2**32.
The ``seed`` is taken modulo 2**32. One hash serves 32 consecutive columns.

The torch functions here hold uint32 values in int64 tensors and multiply in
16-bit halves so no intermediate overflows int64.
"""
from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35
FNV_OFFSET = 0x811C9DC5
FNV_PRIME = 0x01000193


def fnv1a32(name: str) -> int:
    """FNV-1a 32-bit hash of ``name``'s UTF-8 bytes (the parameter id ``pid``)."""
    h = FNV_OFFSET
    for byte in name.encode("utf-8"):
        h ^= byte
        h = (h * FNV_PRIME) & MASK32
    return h


def fmix32_int(h: int) -> int:
    """murmur3 fmix32 on a Python int (used for golden values and scalar seeds)."""
    h &= MASK32
    h ^= h >> 16
    h = (h * FMIX_C1) & MASK32
    h ^= h >> 13
    h = (h * FMIX_C2) & MASK32
    h ^= h >> 16
    return h


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2**32 for int64 ``h`` in [0, 2**32), without int64 overflow."""
    lo = h * (c & 0xFFFF)  # < 2**48
    hi = ((h * (c >> 16)) & 0xFFFF) << 16  # only the low 16 bits survive the shift mod 2**32
    return (lo + hi) & MASK32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3 fmix32, elementwise on an int64 tensor of uint32 values."""
    h = h ^ (h >> 16)
    h = _mul32(h, FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, FMIX_C2)
    return h ^ (h >> 16)


def row_hash_base(pid: int, seed: int, rows: torch.Tensor) -> torch.Tensor:
    """``fmix32(h1 ^ (i & mask))`` for element indices ``rows`` (int64 [n]) -> int64 [n]."""
    h1 = fmix32_int((seed & MASK32) ^ pid)
    base = torch.full_like(rows, h1)
    high = rows >> 32
    if bool((high != 0).any()):
        base = torch.where(high != 0, fmix32(base ^ high), base)
    return fmix32(base ^ (rows & MASK32))


def rademacher_words_ref(pid: int, seed: int, row_start: int, n_rows: int, proj_dim: int) -> torch.Tensor:
    """Hash words ``h`` for rows ``row_start .. row_start+n_rows`` -> int64 [n_rows, ceil(k/32)].

    Bit ``b`` of word ``w`` is the sign bit of column ``32*w + b`` (1 means negative).
    """
    rows = torch.arange(row_start, row_start + n_rows, dtype=torch.int64)
    base = row_hash_base(pid, seed, rows)  # [n]
    words = torch.arange((proj_dim + 31) // 32, dtype=torch.int64)  # [W]
    return fmix32(base[:, None] ^ words[None, :])  # [n, W]


def rademacher_signs_ref(
    name: str | int,
    seed: int,
    row_start: int,
    n_rows: int,
    proj_dim: int,
    dtype: torch.dtype = torch.float32,
    scaled: bool = True,
) -> torch.Tensor:
    """Rows ``row_start .. row_start+n_rows`` of parameter ``name``'s block of ``R``.

    Returns ``Tensor[n_rows, proj_dim]`` with entries ``+-1/sqrt(proj_dim)``
    (``+-1`` when ``scaled=False``). ``name`` may be the parameter name or
    its precomputed ``fnv1a32`` id.
    """
    pid = fnv1a32(name) if isinstance(name, str) else int(name)
    words = rademacher_words_ref(pid, seed, row_start, n_rows, proj_dim)  # [n, W]
    bits = torch.arange(32, dtype=torch.int64)
    neg = (words[:, :, None] >> bits) & 1  # [n, W, 32]
    neg = neg.reshape(n_rows, -1)[:, :proj_dim]
    value = 1.0 / math.sqrt(proj_dim) if scaled else 1.0
    return ((1 - 2 * neg).to(torch.float64) * value).to(dtype)
