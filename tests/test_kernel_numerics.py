"""The projection kernel's arithmetic, emulated on the CPU: what a GPU would compute.

``emulate_program`` reproduces one program of ``kernels/project.py`` step by
step: the 16-bit pieces ``g = g1 + g2 + ...`` (cast exactly as the kernel
casts), one tensor-core step per 16 rows and piece, the two-level sum
(chunks of ``CHUNK_ROWS`` rows into a fresh accumulator, chunks added in
fp32) and the final ``* 1/sqrt(k)``. Two things the interpreter cannot show
are checked here:

- tensor-core accumulation truncates: modelled as "each MMA step adds its 16
  exact products to the fp32 accumulator and rounds toward zero", the error
  of the realistic shape before (one chain per split) and after (chains of
  ``CHUNK_ROWS`` rows);
- bfloat16 pieces (the interpreter runs float16 ones): the split terms and
  the projection they give, against float64.

The emulator is pinned to the kernel by comparing it, with float16 pieces,
to the kernel under the interpreter.
"""
import math

import numpy as np
import pytest
import torch

from icons_fast.contract import rademacher_signs_ref
from icons_fast.kernels.project import (
    CHUNK_ROWS,
    CHUNK_ROWS_INTERPRET,
    PRECISIONS,
    rademacher_project,
    split_rows,
)
from icons_fast.ops.project import project_param_ref

MMA_K = 16  # rows per tensor-core step (m16n8k16 for 16-bit operands)
NAME = "base_model.model.layers.0.self_attn.q_proj.lora_A.default.weight"


def round_toward_zero_fp32(x: np.ndarray) -> np.ndarray:
    """float64 -> the fp32 value next to it toward zero (as float64): a truncating accumulate."""
    y = x.astype(np.float32)
    y = np.where(np.abs(y.astype(np.float64)) > np.abs(x), np.nextafter(y, np.float32(0)), y)
    return y.astype(np.float64)


def round_nearest_fp32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32).astype(np.float64)


def split_pieces(g: torch.Tensor, n_terms: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """The kernel's pieces: ``piece = rest.to(dtype); rest = rest - piece.to(fp32)`` from fp32 ``g``."""
    rest, pieces = g.to(torch.float32), []
    for _ in range(n_terms):
        piece = rest.to(dtype)  # round to nearest even, as cvt.rn on the GPU
        pieces.append(piece)
        rest = rest - piece.to(torch.float32)
    return pieces


def emulate_program(g: torch.Tensor, signs: torch.Tensor, n_terms: int, dtype: torch.dtype,
                    chunk_rows: int | None, truncate: bool, block_p: int = 128) -> np.ndarray:
    """One program's unscaled sum ``sum_i g[:, i] * signs[i, :]`` computed as the kernel computes it.

    g: ``[B, P]`` fp32; signs: ``[P, C]`` +-1. Tiles of ``block_p`` rows; per
    tile, per piece, ``block_p / 16`` MMA steps, each adding 16 exact products
    to the chunk accumulator and rounding (toward zero when ``truncate``, else
    to nearest). Every ``chunk_rows`` rows (None: never) the chunk is added
    to the outer accumulator in fp32 and restarted from zero.
    Returns float64 ``[B, C]`` holding fp32 values.
    """
    n_rows = g.shape[1]
    pieces = [p.double().numpy() for p in split_pieces(g, n_terms, dtype)]
    s = signs.double().numpy()
    mma_round = round_toward_zero_fp32 if truncate else round_nearest_fp32
    acc = np.zeros((g.shape[0], s.shape[1]))
    chunk = np.zeros_like(acc)
    for p0 in range(0, n_rows, block_p):
        if chunk_rows and p0 and p0 % chunk_rows == 0:
            acc, chunk = round_nearest_fp32(acc + chunk), np.zeros_like(acc)
        for piece in pieces:
            for k0 in range(p0, min(n_rows, p0 + block_p), MMA_K):
                chunk = mma_round(chunk + piece[:, k0:k0 + MMA_K] @ s[k0:k0 + MMA_K])
    return round_nearest_fp32(acc + chunk)


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def test_emulator_reproduces_the_interpreted_kernel():
    """With float16 pieces and rounding to nearest the emulator is the kernel under the interpreter."""
    g = torch.randn(5, 300, generator=torch.Generator().manual_seed(4))
    k = 40
    got = rademacher_project(g, NAME, 2, k, precision="bf16x2", split_p=1)
    signs = rademacher_signs_ref(NAME, 2, 0, 300, k, dtype=torch.float64, scaled=False)
    emulated = emulate_program(g, signs, 2, torch.float16, CHUNK_ROWS_INTERPRET, truncate=False, block_p=32)
    emulated = round_nearest_fp32(emulated * np.float32(1 / math.sqrt(k)))
    assert rel_err(got.numpy(), emulated) < 1e-6  # the sum order inside a tile step differs, nothing else


def test_truncating_accumulation_realistic_shape():
    """Error of one program at ``test_lora_grad_project_realistic_shape``'s shape on a 132-SM GPU.

    B = 16, k = 5120 (40 column tiles of 128), a 524288-row LoRA parameter:
    ``split_rows`` gives 37504 rows per program, 2 x 2344 MMA steps with bf16x2.
    Columns are independent, so 16 of them stand for all 5120. Model figures
    (recorded in ``kernels/project.py``): one chain 6.1e-5, chains of 512
    rows 3.1e-6, the bf16x2 pieces alone 3.0e-6, fp32 torch 4e-7.
    """
    rows = split_rows(128 * 4096, 5120 // 128, 1, 4 * 132)
    assert rows == 37504
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(16, rows, generator=gen)
    signs = torch.randint(0, 2, (rows, 16), generator=gen).double() * 2 - 1
    exact = g.double().numpy() @ signs.numpy()
    n_terms = PRECISIONS["bf16x2"]
    one_chain = rel_err(emulate_program(g, signs, n_terms, torch.bfloat16, None, truncate=True), exact)
    chunked = rel_err(emulate_program(g, signs, n_terms, torch.bfloat16, CHUNK_ROWS, truncate=True), exact)
    pieces_only = rel_err(sum(p.double() for p in split_pieces(g, n_terms, torch.bfloat16)).numpy() @ signs.numpy(),
                          exact)
    assert one_chain > 3e-5  # the failure the realistic GPU test (tolerance 1e-5) would have hit
    assert chunked < 5e-6 and chunked < 1.2 * pieces_only  # truncation now small next to the bf16x2 pieces


@pytest.mark.parametrize("precision, tol", [("bf16", 3e-3), ("bf16x2", 1e-5), ("bf16x3", 3e-6)])
def test_bf16_pieces_projection(precision, tol):
    """The compiled kernel's bf16 path, emulated (truncating MMA, chunks, scaling) against float64.

    Same shapes and tolerances as ``test_kernels.test_project_precision_modes``
    except bf16x3, which the truncation model holds at ~2e-6 instead of fp32's ~1e-7.
    """
    k, n_terms = 45, PRECISIONS[precision]
    g = torch.randn(4, 2000, generator=torch.Generator().manual_seed(1))
    signs = rademacher_signs_ref(NAME, 1, 0, 2000, k, dtype=torch.float64, scaled=False)
    got = emulate_program(g, signs, n_terms, torch.bfloat16, CHUNK_ROWS, truncate=True)
    got = round_nearest_fp32(got * np.float32(1 / math.sqrt(k)))
    assert rel_err(got, project_param_ref(g.double(), NAME, 1, k).numpy()) < tol


@pytest.mark.parametrize("n_terms", [1, 2, 3])
def test_bf16_split_terms(n_terms):
    """Each bf16 piece halves the error 8 bits further, and ``rest - piece`` is exact in fp32."""
    g = torch.randn(64, 257, generator=torch.Generator().manual_seed(n_terms)) * torch.logspace(-20, 20, 257)
    pieces = split_pieces(g, n_terms, torch.bfloat16)
    residual = g.double() - sum(p.double() for p in pieces)
    assert (residual.abs() <= 2.0 ** (-8 * n_terms) * g.double().abs()).all()
    rest = g
    for piece in pieces:  # the fp32 subtraction in the kernel loses nothing
        exact = rest.double() - piece.double()
        rest = rest - piece.to(torch.float32)
        assert torch.equal(rest.double(), exact)
