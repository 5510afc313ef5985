"""Triton generator of the projection contract's Rademacher signs, on chip.

The contract (``icons_fast.contract``, torch oracle
``rademacher_signs_ref``): for parameter id ``pid = fnv1a32(name)``, element
index ``i`` (row-major inside the parameter, ``i < 2**32`` here) and column
``j``::

    h1 = fmix32(seed ^ pid)                       # one scalar per parameter (host side, contract.param_hash)
    base_i = fmix32(h1 ^ i)                       # one word per row        [BLOCK_P]
    h = fmix32(base_i ^ (j // 32))                # one word per 32 columns [BLOCK_P, BLOCK_K // 32]
    R[i, j] = (+1 if bit (j % 32) of h == 0 else -1) / sqrt(k)

The device functions below compute tiles of these signs in registers so the
projection kernel never reads R from memory. All arithmetic is uint32, which
wraps modulo 2**32 exactly like the reference.

``rademacher_signs`` is a standalone launcher over ``_signs_kernel``; it is
what the tests compare bit for bit with ``rademacher_signs_ref``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from icons_fast.contract import param_hash

FMIX_C1 = tl.constexpr(0x85EBCA6B)
FMIX_C2 = tl.constexpr(0xC2B2AE35)


@triton.jit
def fmix32(h):
    """murmur3 fmix32 on a uint32 tensor (multiplications wrap modulo 2**32)."""
    h = h ^ (h >> 16)
    h = h * FMIX_C1
    h = h ^ (h >> 13)
    h = h * FMIX_C2
    return h ^ (h >> 16)


@triton.jit
def row_hash(h1, rows):
    """``fmix32(h1 ^ i)`` for element indices ``rows`` (any int type, values < 2**32) -> uint32.

    ``h1 = fmix32(seed ^ pid)`` comes from the host as a signed int32 holding
    the uint32's bits (``param_hash_i32``); the bitcast restores the uint32.
    """
    return fmix32(h1.to(tl.uint32, bitcast=True) ^ rows.to(tl.uint32))


@triton.jit
def sign_bits_tile(base, col_start, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """Sign bits of columns ``col_start .. col_start + BLOCK_K`` for rows with hashes ``base``.

    base: uint32 [BLOCK_P] (from ``row_hash``); col_start: a multiple of 32; BLOCK_K a power of 2 >= 32.
    Returns uint32 [BLOCK_P, BLOCK_K], 1 where the sign is negative.
    One fmix32 per 32 columns: the word tile [BLOCK_P, BLOCK_K // 32] is
    hashed once and broadcast to its 32 columns before the bit shift.
    """
    tl.static_assert(BLOCK_K % 32 == 0, "BLOCK_K must be a multiple of 32")
    N_WORDS: tl.constexpr = BLOCK_K // 32
    words = (col_start // 32 + tl.arange(0, N_WORDS)).to(tl.uint32)  # [W]
    h = fmix32(base[:, None] ^ words[None, :])  # [P, W]
    h = tl.reshape(tl.broadcast_to(h[:, :, None], (BLOCK_P, N_WORDS, 32)), (BLOCK_P, BLOCK_K))
    shift = (tl.arange(0, BLOCK_K) % 32).to(tl.uint32)  # [K]: column j reads bit j % 32
    return (h >> shift[None, :]) & 1


@triton.jit
def sign_tile(base, col_start, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr):
    """Unscaled signs (+1 / -1) as ``DTYPE`` [BLOCK_P, BLOCK_K]; see ``sign_bits_tile``."""
    neg = sign_bits_tile(base, col_start, BLOCK_P, BLOCK_K)
    return tl.where(neg == 0, 1.0, -1.0).to(DTYPE)


@triton.jit(do_not_specialize=["h1", "row_start"])
def _signs_kernel(
    out_ptr,  # int8 [n_rows, proj_dim]: +1 / -1
    h1: tl.int32,  # param_hash_i32
    row_start: tl.int64,
    n_rows,
    proj_dim,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # local row
    col_start = pid_k * BLOCK_K
    offs_k = col_start + tl.arange(0, BLOCK_K)
    rows = offs_p.to(tl.int64) + row_start  # element index inside the parameter
    base = row_hash(h1, rows)
    neg = sign_bits_tile(base, col_start, BLOCK_P, BLOCK_K)
    signs = (1 - 2 * neg.to(tl.int32)).to(tl.int8)
    ptrs = out_ptr + offs_p.to(tl.int64)[:, None] * proj_dim + offs_k[None, :]
    tl.store(ptrs, signs, mask=(offs_p[:, None] < n_rows) & (offs_k[None, :] < proj_dim))


def param_hash_i32(name: str | int, seed: int) -> int:
    """``param_hash(name, seed)`` as the signed int32 with the same 32 bits, the kernels' ``h1`` argument.

    Triton types a Python int argument i32 below 2**31 and i64 above; half of
    all names would compile a second i64 variant of every kernel. The kernels
    declare ``h1: tl.int32`` and bitcast it back to uint32 (``row_hash``).
    """
    h1 = param_hash(name, seed)
    return h1 - 2**32 if h1 >= 2**31 else h1


def check_row_range(row_start: int, n_rows: int) -> None:
    """The Triton path hashes element indices as uint32: refuse indices >= 2**32."""
    if row_start < 0 or n_rows < 0 or row_start + n_rows > 2**32:
        raise ValueError(
            f"element indices {row_start}..{row_start + n_rows} leave [0, 2**32); the Triton kernels "
            "hash indices as uint32 (use the C++ or torch project backend for larger parameters)"
        )


def rademacher_signs(
    name: str | int,
    seed: int,
    row_start: int,
    n_rows: int,
    proj_dim: int,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.float32,
    scaled: bool = True,
) -> torch.Tensor:
    """Rows ``row_start .. row_start + n_rows`` of parameter ``name``'s block of R, made by Triton.

    Same arguments and result as ``rademacher_signs_ref`` (``Tensor[n_rows, proj_dim]``,
    entries ``+-1/sqrt(proj_dim)``, or ``+-1`` when ``scaled=False``), plus ``device``.
    The scaling is done in float64 then cast, as the reference does, so the
    values are bit-identical.
    """
    check_row_range(row_start, n_rows)
    out = torch.empty(n_rows, proj_dim, dtype=torch.int8, device=device)
    if n_rows == 0 or proj_dim == 0:
        return out.to(dtype)
    block_p, block_k = 32, 64
    grid = (triton.cdiv(n_rows, block_p), triton.cdiv(proj_dim, block_k))
    _signs_kernel[grid](out, param_hash_i32(name, seed), row_start, n_rows, proj_dim, BLOCK_P=block_p, BLOCK_K=block_k)
    value = 1.0 / math.sqrt(proj_dim) if scaled else 1.0
    return (out.to(torch.float64) * value).to(dtype)
