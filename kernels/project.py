"""Triton projection of per-sample gradients onto the counter-hash Rademacher matrix.

For one parameter with flattened per-sample gradients ``G: [B, P]`` this computes::

    out[b, j] += sum_i G'[b, i] * R[row_start + i, j]          (j < k)

where ``R`` is the parameter's block of the projection contract
(``icons_fast.contract``) and ``G'`` is ``G`` or, with Adam
moments ``(m, v)`` of ``P`` elements (LESS preconditioning, no bias correction)::

    G' = (b1*m + (1-b1)*G) / sqrt(b2*v + (1-b2)*G**2 + eps)

R is never stored: each program generates its sign tiles in registers.
The plain-torch reference is ``icons_fast.ops.project.project_param_ref``;
``icons_fast.ops.project.project_param`` checks inputs and dispatches here.

Work split. Program ``(kk, s, bb)`` owns columns ``[kk*BLOCK_K, +BLOCK_K)``,
gradient rows ``[s*rows_per_split, +rows_per_split)`` and samples
``[bb*BLOCK_B, +BLOCK_B)``. It walks its rows in chunks of ``CHUNK_P`` rows,
each chunk in BLOCK_P steps: load the gradient tile ``[BLOCK_B, BLOCK_P]``
(fp32, Adam applied on the fly), make the sign tile ``[BLOCK_P, BLOCK_K]``,
and accumulate ``[BLOCK_B, BLOCK_K]`` in fp32 with ``tl.dot``. The column
tile is the fastest grid axis, so programs reading the same gradient rows run
together and share them through L2. Each split writes its own slice of a
partial buffer ``[n_split, B, k]`` that torch sums afterwards: deterministic,
unlike atomics. Row indices are int64 (a parameter may hold up to 2**32
elements, ``check_row_range``).

Precision. Tensor cores take 16-bit operands; the signs (+-1) are exact in
them, the fp32 gradient is not. The tile is therefore split into
``N_TERMS`` 16-bit pieces ``g = g1 + g2 + ...`` (each piece is the rounding
of what the previous ones left, exact in fp32), one ``tl.dot`` per piece.
bfloat16 keeps 8 mantissa bits per piece: 1 term ~ 2e-3 relative error,
2 terms ~ 3e-6, 3 terms exact pieces.

Accumulation. Each tensor-core step (16 rows of one piece) adds its exact
products to the fp32 accumulator and, on A100/H100, truncates the result
rather than rounding it. Error model: one step = round toward zero to fp32,
so one chain of ``L`` steps loses up to ~``L`` half-ulps, biased toward zero.
One chain per split would be ``rows_per_split / 16 * N_TERMS`` steps: 4688 at
B = 16, k = 5120 on 132 SMs (37504 rows per split, ``split_rows``). So the
kernel sums in two levels: ``tl.dot`` accumulates at most ``CHUNK_P`` =
``CHUNK_ROWS`` = 512 rows (64 steps with bf16x2) into a fresh accumulator,
and chunks are added in fp32 with rounding to nearest. Modelled relative
error of one program at that shape (``tests/test_kernel_numerics.py``,
16 samples x 16 columns, against fp64):

    ==========  ===========  ==============  ==============  ===========
    precision   one chain    512-row chunks  pieces alone    fp32 torch
    ==========  ===========  ==============  ==============  ===========
    bf16x2      6.1e-5       2.7e-6          2.6e-6          4.3e-7
    bf16x3      1.2e-4       1.7e-6          0 (exact)       4.3e-7
    ==========  ===========  ==============  ==============  ===========

so fp32 inputs stay inside the realistic GPU test's 1e-5, and 16-bit inputs
keep "within 2x of the torch reference in that dtype against fp64".

Triton's CPU interpreter computes bf16 ``tl.dot`` wrongly (numpy has no
bfloat16), so under ``TRITON_INTERPRET=1`` the pieces are float16 (11
mantissa bits; same code, different rounding step); the bf16 arithmetic is
checked by emulation in ``tests/test_kernel_numerics.py``.

Adam. ``1 - beta1`` and ``1 - beta2`` arrive as arguments formed in float64
on the host (``AdamMoments.one_minus_beta*``), as the torch reference uses
them: compiled, ``1.0 - beta2`` of the fp32 argument 0.999 is 1.3e-5
relative off. (The interpreter forms scalar arithmetic in float64 and
cannot show that difference; the test of it bites on a GPU.)

Compilation. ``h1`` is declared ``tl.int32`` (bits of the uint32,
``param_hash_i32``) and ``row_start`` ``tl.int64``: an undeclared int is
typed by its value, and every name or offset crossing 2**31 would compile
the kernel again. The autotune set is pruned of configurations that spill
registers at sm_90 (``benchmarks/triton_compile_time.py`` measures spills and
compile time).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from icons_fast.contract import AdamMoments

from .rademacher import check_row_range, param_hash_i32, row_hash, sign_tile

PRECISIONS = {"bf16": 1, "bf16x2": 2, "bf16x3": 3}
MAX_BLOCK_B = 64  # samples per program; more samples use more programs (grid axis 2)
ROW_ALIGN = 128  # rows_per_split is a multiple of every autotuned BLOCK_P
CHUNK_ROWS = 512  # rows per tensor-core accumulation chain (see "Precision"); a multiple of every BLOCK_P
CHUNK_ROWS_INTERPRET = 64  # two BLOCK_P=32 tiles: small test shapes still cross chunk boundaries


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Sizes are not specialized on (divisibility by 16, == 1): odd test shapes reuse the compiled
# kernels; rows_per_split (a multiple of 128) and stride_gb stay specialized for aligned loads.
@triton.jit(do_not_specialize=["h1", "row_start", "n_samples", "n_rows", "proj_dim"])
def _project_kernel(
    g_ptr,  # [B, P] float32 (any float), row stride stride_gb, unit column stride
    m_ptr,  # [P] Adam exp_avg (unused without ADAM)
    v_ptr,  # [P] Adam exp_avg_sq
    part_ptr,  # [n_split, B, k] float32 partial sums
    n_samples,
    n_rows,
    proj_dim,
    rows_per_split,
    h1: tl.int32,  # fmix32(seed ^ pid) as a signed int32 (bit pattern of the uint32), one type for every name
    row_start: tl.int64,  # element index of G's column 0 inside the parameter
    stride_gb,
    beta1,
    beta2,
    one_minus_beta1,  # 1 - beta1 formed in float64 on the host (fp32 1 - beta2 is 1.3e-5 off at 0.999)
    one_minus_beta2,
    eps,
    inv_sqrt_k,
    ADAM: tl.constexpr,
    N_TERMS: tl.constexpr,
    MMA_DTYPE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK_P: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2)
    col_start = pid_k * BLOCK_K
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < n_samples
    g_rows = g_ptr + offs_b.to(tl.int64)[:, None] * stride_gb  # [BB, 1] sample row pointers
    # row indices in int64: pid_s * rows_per_split passes 2**31 for parameters of >= 2**31 elements
    p_begin = pid_s.to(tl.int64) * rows_per_split
    p_end = tl.minimum(p_begin + rows_per_split, n_rows)

    # Two-level sum: tl.dot accumulates at most CHUNK_P rows into a fresh
    # accumulator (tensor cores truncate each accumulate), chunks add in fp32.
    acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
    for c0 in range(p_begin, p_end, CHUNK_P):
        c_end = tl.minimum(c0 + CHUNK_P, p_end)
        chunk = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
        for p0 in range(c0, c_end, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
            p_ok = offs_p < c_end
            g = tl.load(g_rows + offs_p[None, :], mask=b_ok[:, None] & p_ok[None, :], other=0.0).to(tl.float32)
            if ADAM:
                m = tl.load(m_ptr + offs_p, mask=p_ok, other=0.0).to(tl.float32)[None, :]
                v = tl.load(v_ptr + offs_p, mask=p_ok, other=0.0).to(tl.float32)[None, :]
                # masked entries: g = m = v = 0 -> 0 / sqrt(eps) = 0, nothing leaks
                g = (beta1 * m + one_minus_beta1 * g) / tl.sqrt(beta2 * v + one_minus_beta2 * g * g + eps)
            signs = sign_tile(row_hash(h1, offs_p + row_start), col_start, BLOCK_P, BLOCK_K, MMA_DTYPE)
            # g = g1 + g2 + ... in 16-bit pieces; each tl.dot is exact in the signs
            rest = g
            for _t in tl.static_range(N_TERMS):
                piece = rest.to(MMA_DTYPE)
                chunk = tl.dot(piece, signs, chunk)
                rest = rest - piece.to(tl.float32)
        acc += chunk

    offs_k = col_start + tl.arange(0, BLOCK_K)
    part = part_ptr + (pid_s.to(tl.int64) * n_samples + offs_b[:, None]) * proj_dim + offs_k[None, :]
    tl.store(part, acc * inv_sqrt_k, mask=b_ok[:, None] & (offs_k[None, :] < proj_dim))


def autotune_configs() -> list[triton.Config]:
    """Every configuration the autotuner may try (``prune_configs`` drops some per call)."""
    configs = []
    for bp in (32, 64, 128):
        for bk in (64, 128, 256):
            for warps in (4, 8):
                configs.append(triton.Config({"BLOCK_P": bp, "BLOCK_K": bk}, num_warps=warps, num_stages=3))
    return configs


# (BLOCK_P, BLOCK_K, num_warps) kept per BLOCK_B: those that compiled at sm_90 without register
# spills and below 250 of the 255 registers a thread may hold (at the cap, small code changes
# flip a configuration between 0 and ~100 B of spills). Measured with Adam, bf16x2 and fp32
# gradients by benchmarks/triton_compile_time.py --all (triton 3.9); the dropped ones spilled
# up to 7 KB per thread, and dropping them also saves their compile time.
NO_SPILL = {
    16: {(bp, bk, w) for bp in (32, 64) for bk in (64, 128, 256) for w in (4, 8)} - {(64, 256, 4)}
    | {(128, 64, 4), (128, 64, 8), (128, 128, 8), (128, 256, 8)},
    32: {(32, 64, 4), (32, 64, 8), (32, 128, 4), (32, 128, 8), (32, 256, 8), (64, 64, 8), (64, 128, 8),
         (64, 256, 8), (128, 64, 8)},
    64: {(32, 64, 4), (32, 64, 8), (32, 128, 8), (64, 64, 8)},
}


def prune_configs(configs: list[triton.Config], named_args, **kwargs) -> list[triton.Config]:
    """The configurations worth compiling for this call's ``BLOCK_B``: those in ``NO_SPILL``."""
    keep = NO_SPILL[kwargs["BLOCK_B"]]
    return [c for c in configs if (c.kwargs["BLOCK_P"], c.kwargs["BLOCK_K"], c.num_warps) in keep]


# Tuned per (row count, k, samples-per-program) on a GPU; fixed small blocks under the interpreter.
_project_kernel_tuned = triton.autotune(
    configs=autotune_configs(), key=["n_rows", "proj_dim", "BLOCK_B", "ADAM", "N_TERMS"],
    prune_configs_by={"early_config_prune": prune_configs},
)(_project_kernel)


def target_programs(device: torch.device) -> int:
    """Programs the grid should hold: ~4 per SM on a GPU, 2 under the interpreter."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def split_rows(n_rows: int, n_k_tiles: int, n_b_tiles: int, target: int, splits: int | None = None) -> int:
    """Rows per split (a multiple of ``ROW_ALIGN``) so that ``n_k_tiles * n_b_tiles * splits``
    programs reach ``target``; ``splits`` forces the number of splits instead.

    Each split's rows are one program's sum; with 132 SMs, B = 16 and k = 5120
    (40 column tiles) a 524288-row LoRA parameter gets 14 splits of 37504 rows.
    """
    if splits is None:
        splits = max(1, -(-target // (n_k_tiles * n_b_tiles)))
    splits = max(1, min(splits, -(-n_rows // ROW_ALIGN)))
    return -(-(-(-n_rows // splits)) // ROW_ALIGN) * ROW_ALIGN


def _adam_scalars(adam: AdamMoments | None) -> tuple[float, float, float, float, float]:
    """``(beta1, beta2, 1 - beta1, 1 - beta2, eps)`` for the kernel, the differences formed in
    float64 (``AdamMoments.one_minus_beta*``) and rounded once to fp32 at launch; unread without Adam."""
    if adam is None:
        return 0.0, 0.0, 0.0, 0.0, 1.0
    return (float(adam.beta1), float(adam.beta2), adam.one_minus_beta1, adam.one_minus_beta2, float(adam.eps))


def rademacher_project(
    G: torch.Tensor,
    name: str | int,
    seed: int,
    proj_dim: int,
    row_start: int = 0,
    adam: AdamMoments | None = None,
    out: torch.Tensor | None = None,
    precision: str = "bf16x2",
    split_p: int | None = None,
) -> torch.Tensor:
    """``out[b] += R^T G'[b]`` for one parameter, with R generated on chip (Triton).

    Arguments:
        G: ``[B, P]`` per-sample gradients (rows are samples, columns the
            parameter's elements ``row_start .. row_start+P`` in row-major order);
            any float dtype, unit column stride.
        name: parameter name (or its ``fnv1a32`` id); seed: projection seed.
        proj_dim: k. adam: the parameter's ``AdamMoments`` (``P`` elements each, sliced to
            ``row_start .. row_start+P`` by the caller), or None for plain gradients.
        out: ``[B, k]`` float32 to accumulate into; a new zeroed one when None.
        precision: "bf16x2" (default, ~4e-6 relative), "bf16x3" (~fp32), "bf16" (~2e-3).
        split_p: number of row splits (default: sized to fill the GPU).
    Return:
        ``out``: ``Tensor[B, k]`` float32.
    """
    if G.dim() != 2:
        raise ValueError(f"G must be [B, P], got shape {tuple(G.shape)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} unknown; choose one of {sorted(PRECISIONS)}")
    n_samples, n_rows = G.shape
    check_row_range(row_start, n_rows)
    if G.stride(1) != 1:
        G = G.contiguous()
    if out is None:
        out = torch.zeros(n_samples, proj_dim, dtype=torch.float32, device=G.device)
    elif out.shape != (n_samples, proj_dim) or out.dtype != torch.float32 or out.device != G.device:
        raise ValueError(
            f"out must be float32 [{n_samples}, {proj_dim}] on {G.device}; got {out.dtype} "
            f"{tuple(out.shape)} on {out.device}"
        )
    if n_samples == 0 or n_rows == 0 or proj_dim == 0:
        return out
    if adam is not None:
        m, v = adam.flat(G.device)
        if m.numel() != n_rows:
            raise ValueError(f"Adam moments must have {n_rows} elements each, got {m.numel()}")
        m, v = m.contiguous(), v.contiguous()
    else:
        m = v = G  # never read (ADAM=False)

    interpret = _interpreting()
    block_b = min(MAX_BLOCK_B, max(16, triton.next_power_of_2(n_samples)))
    n_b_tiles = triton.cdiv(n_samples, block_b)
    n_k_tiles_est = triton.cdiv(proj_dim, 32 if interpret else 128)
    rows_per_split = split_rows(n_rows, n_k_tiles_est, n_b_tiles, target_programs(G.device), split_p)
    splits = triton.cdiv(n_rows, rows_per_split)
    partial = torch.empty(splits, n_samples, proj_dim, dtype=torch.float32, device=G.device)

    args = (
        G, m, v, partial, n_samples, n_rows, proj_dim, rows_per_split, param_hash_i32(name, seed), row_start,
        G.stride(0), *_adam_scalars(adam), 1.0 / math.sqrt(proj_dim),
    )
    meta = dict(ADAM=adam is not None, N_TERMS=PRECISIONS[precision], BLOCK_B=block_b)
    if interpret:
        # numpy has no bfloat16: the interpreter's bf16 tl.dot is wrong, float16 pieces are exact
        grid = (triton.cdiv(proj_dim, 32), splits, n_b_tiles)
        _project_kernel[grid](*args, MMA_DTYPE=tl.float16, BLOCK_P=32, BLOCK_K=32, CHUNK_P=CHUNK_ROWS_INTERPRET,
                              **meta)
    else:
        def grid(cfg):
            return (triton.cdiv(proj_dim, cfg["BLOCK_K"]), splits, n_b_tiles)

        _project_kernel_tuned[grid](*args, MMA_DTYPE=tl.bfloat16, CHUNK_P=CHUNK_ROWS, **meta)
    out += partial.sum(dim=0)
    return out
