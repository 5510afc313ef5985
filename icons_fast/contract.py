"""The math contract every layer shares: projection signs, projection spec, Adam moments.

This module sits at the bottom of the layer order and imports nothing else
from ``icons_fast``: the Triton kernels (``icons_fast.kernels``), the C++
bindings' wrappers and the ops (``icons_fast.ops``), the features and the
compat layers all import it.

The projection matrix ``R`` is a counter-hash Rademacher matrix that is never
stored. Every backend (the torch oracle here, the C++ CPU op, the CUDA and
Triton kernels) computes exactly these signs, so features are bit-identical
across devices, batch sizes, block sizes, and unchanged when other LoRA
modules are added.

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
16-bit halves so no intermediate overflows int64. They are the sign oracle the
tests compare every backend against, bit for bit, and the "torch" backend of
the project op builds its sign tiles with them.

Two small frozen specs travel with the math: ``ProjectionSpec(seed, proj_dim)``
(which ``R``) and ``AdamMoments(exp_avg, exp_avg_sq, beta1, beta2, eps)`` (the
LESS preconditioning of design.md section 2.3,
``G = (b1*m + (1-b1)*g) / sqrt(b2*v + (1-b2)*g**2 + eps)``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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


def param_id(name: str | int) -> int:
    """The parameter id ``pid``: ``fnv1a32(name)`` for a name; an int id passes through (mod 2**32)."""
    return fnv1a32(name) if isinstance(name, str) else int(name) & MASK32


def param_hash(name: str | int, seed: int) -> int:
    """``h1 = fmix32((seed mod 2**32) ^ pid)``: the one scalar per parameter every backend starts from."""
    return fmix32_int((int(seed) & MASK32) ^ param_id(name))


def sign_value(proj_dim: int) -> float:
    """``1/sqrt(k)`` rounded once from float64 to float32: the magnitude of every float32 entry of ``R``."""
    return float(torch.tensor(1.0 / math.sqrt(proj_dim), dtype=torch.float64).to(torch.float32))


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


def _row_bases(pid: int, seed: int, row_start: int, n_rows: int, device) -> torch.Tensor:
    """``row_hash_base`` of rows ``row_start .. row_start+n_rows`` on ``device`` -> int64 [n].

    Indices past int64 (``>= 2**63``) are hashed one by one with Python ints
    (tiny tiles only; the tests pin them).
    """
    if row_start + n_rows <= 2**63:
        rows = torch.arange(n_rows, dtype=torch.int64, device=device) + row_start
        return row_hash_base(pid, seed, rows)
    h1 = fmix32_int((seed & MASK32) ^ pid)
    bases = []
    for i in range(row_start, row_start + n_rows):
        h = fmix32_int(h1 ^ (i >> 32)) if i >> 32 else h1
        bases.append(fmix32_int(h ^ (i & MASK32)))
    return torch.tensor(bases, dtype=torch.int64, device=device)


def rademacher_words_ref(
    pid: int, seed: int, row_start: int, n_rows: int, proj_dim: int, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Hash words ``h`` for rows ``row_start .. row_start+n_rows`` -> int64 [n_rows, ceil(k/32)].

    Bit ``b`` of word ``w`` is the sign bit of column ``32*w + b`` (1 means negative).
    """
    base = _row_bases(pid, seed, row_start, n_rows, device)  # [n]
    words = torch.arange((proj_dim + 31) // 32, dtype=torch.int64, device=device)  # [W]
    return fmix32(base[:, None] ^ words[None, :])  # [n, W]


def rademacher_signs_ref(
    name: str | int,
    seed: int,
    row_start: int,
    n_rows: int,
    proj_dim: int,
    dtype: torch.dtype = torch.float32,
    scaled: bool = True,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Rows ``row_start .. row_start+n_rows`` of parameter ``name``'s block of ``R``, built on ``device``.

    Returns ``Tensor[n_rows, proj_dim]`` with entries ``+-1/sqrt(proj_dim)``
    (``+-1`` when ``scaled=False``): the value is rounded once from float64 to
    ``dtype``, so every dtype holds the nearest value to the exact one. ``name``
    may be the parameter name or its precomputed ``fnv1a32`` id.
    """
    pid = param_id(name)
    words = rademacher_words_ref(pid, int(seed) & MASK32, row_start, n_rows, proj_dim, device)  # [n, W]
    bits = torch.arange(32, dtype=torch.int64, device=device)
    neg = ((words[:, :, None] >> bits) & 1).reshape(n_rows, -1)[:, :proj_dim].bool()  # [n, k]
    value = torch.tensor(1.0 / math.sqrt(proj_dim) if scaled else 1.0, dtype=torch.float64).to(dtype).to(device)
    return torch.where(neg, -value, value)


@dataclass(frozen=True)
class ProjectionSpec:
    """Which ``R``: ``seed`` (taken mod 2**32 by every backend) and ``proj_dim`` (k >= 1)."""

    seed: int
    proj_dim: int

    def __post_init__(self):
        if int(self.proj_dim) < 1:
            raise ValueError(f"proj_dim k must be >= 1, got {self.proj_dim}")


@dataclass(frozen=True)
class AdamMoments:
    """One parameter's Adam state for LESS preconditioning (no bias correction, eps inside the root).

    ``exp_avg`` (m) and ``exp_avg_sq`` (v) hold the parameter's ``numel``
    elements (any shape; flattened row-major like the gradient)::

        G = (beta1*m + (1-beta1)*g) / sqrt(beta2*v + (1-beta2)*g**2 + eps)

    ``1-beta1`` and ``1-beta2`` are formed in float64 (``one_minus_beta1``,
    ``one_minus_beta2``) and each backend rounds them once to its dtype.
    """

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        if self.exp_avg.numel() != self.exp_avg_sq.numel():
            raise ValueError(
                f"exp_avg has {self.exp_avg.numel()} elements but exp_avg_sq {self.exp_avg_sq.numel()}; "
                "they must come from the same parameter"
            )

    @property
    def one_minus_beta1(self) -> float:
        """``1 - beta1`` formed in float64 (every backend multiplies by this one value; in fp32
        ``1 - fp32(0.999)`` would be 1.3e-5 relative off)."""
        return 1.0 - float(self.beta1)

    @property
    def one_minus_beta2(self) -> float:
        """``1 - beta2`` formed in float64 (see ``one_minus_beta1``)."""
        return 1.0 - float(self.beta2)

    def flat(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m, v)`` flattened to ``[numel]`` (on ``device`` when given)."""
        m, v = self.exp_avg.reshape(-1), self.exp_avg_sq.reshape(-1)
        if device is not None:
            m, v = m.to(device), v.to(device)
        return m, v
