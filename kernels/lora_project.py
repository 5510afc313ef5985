"""Per-sample LoRA gradients (+Adam) projected onto the Rademacher contract, one module at a time.

A PEFT LoRA linear computes ``y = W x + s * B(A x)`` with ``A: [r, d_in]``
(``...lora_A.default.weight``), ``B: [d_out, r]`` (``...lora_B.default.weight``)
and ``s = alpha / r``. For sample ``b`` with inputs ``X[b]: [T, d_in]``,
output gradients ``D[b] = dL/dy: [T, d_out]`` and token mask ``M[b]: [T]``::

    U[b] = X[b] A^T                          [T, r]
    V[b] = D[b] B                            [T, r]
    grad_B[b] = s * sum_t M[b,t] D[b,t] U[b,t]^T = s * D[b]^T U[b]     [d_out, r]
    grad_A[b] = s * sum_t M[b,t] V[b,t] X[b,t]^T = s * V[b]^T X[b]     [r, d_in]

Masked rows of X and D may hold anything (NaN, inf): they are replaced by
zeros with ``torch.where`` before any product, because ``0 * NaN`` is NaN.

Step 1 (batched GEMMs, cuBLAS): the module's per-sample gradients in fp32.
``U`` and ``V`` stay in the input dtype, exactly as the model's own forward /
backward at that dtype rounds them; the two weight-gradient GEMMs accumulate
and return fp32. Step 2 (``kernels.project.rademacher_project``, Triton):
Adam on the fly and the projection with on-chip sign tiles. Only the one
module's ``[B, P_A]`` and ``[B, P_B]`` gradients are ever in memory.
"""
from __future__ import annotations

import torch

from .project import adam_precondition_ref, rademacher_project, rademacher_project_ref

Adam = tuple[torch.Tensor, torch.Tensor]


def _bmm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched ``a @ b`` accumulated and returned in fp32 for 16-bit inputs (no fp32 copies of them)."""
    if a.dtype == torch.float32 or a.dtype == torch.float64:
        return torch.bmm(a, b)
    if a.is_cuda:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # torch without the fp32-output GEMM
            return torch.bmm(a.float(), b.float())
    # CPU: upcasting is what an fp32-output GEMM does (products of 16-bit values are exact in fp32)
    return torch.bmm(a.float(), b.float())


def _check_inputs(X, D, A, B, mask, adam_A, adam_B):
    if X.dim() != 3 or D.dim() != 3 or X.shape[:2] != D.shape[:2]:
        raise ValueError(f"X must be [B, T, d_in] and D [B, T, d_out]; got {tuple(X.shape)} and {tuple(D.shape)}")
    n, t, d_in = X.shape
    d_out = D.shape[2]
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != d_in or B.shape[0] != d_out or A.shape[0] != B.shape[1]:
        raise ValueError(
            f"LoRA shapes disagree: A {tuple(A.shape)} must be [r, {d_in}], B {tuple(B.shape)} must be [{d_out}, r]"
        )
    if mask is not None and tuple(mask.shape) != (n, t):
        raise ValueError(f"mask must be [B, T] = [{n}, {t}], got {tuple(mask.shape)}")
    for label, adam, param in (("adam_A", adam_A, A), ("adam_B", adam_B, B)):
        if adam is not None and (adam[0].numel() != param.numel() or adam[1].numel() != param.numel()):
            raise ValueError(f"{label} moments must have the shape of the parameter {tuple(param.shape)}")
    if len({X.device, D.device, A.device, B.device}) != 1:
        raise ValueError(f"X, D, A, B must share a device; got {X.device}, {D.device}, {A.device}, {B.device}")


def _masked(X: torch.Tensor, D: torch.Tensor, mask: torch.Tensor | None):
    """Zero the padded tokens of X and D by selection (a NaN times 0 would still be NaN)."""
    if mask is None:
        return X, D
    keep = (mask != 0).to(X.device)[:, :, None]  # [B, T, 1]
    return torch.where(keep, X, torch.zeros((), dtype=X.dtype, device=X.device)), torch.where(
        keep, D, torch.zeros((), dtype=D.dtype, device=D.device)
    )


def lora_grads(X, D, A, B, scale: float, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample LoRA gradients ``(grad_A [B, r, d_in], grad_B [B, d_out, r])`` in fp32 (step 1).

    X: ``[B, T, d_in]``, D: ``[B, T, d_out]`` (same 16/32-bit dtype), A: ``[r, d_in]``,
    B: ``[d_out, r]``, mask: ``[B, T]`` or None. Formulas in the module docstring.
    """
    _check_inputs(X, D, A, B, mask, None, None)
    if X.dtype != D.dtype:  # e.g. bf16 activations with fp32 output gradients: compute in the wider one
        common = torch.promote_types(X.dtype, D.dtype)
        X, D = X.to(common), D.to(common)
    Xm, Dm = _masked(X, D, mask)
    U = torch.matmul(Xm, A.to(X.dtype).t())  # [B, T, r] in the input dtype, as the model's forward has it
    V = torch.matmul(Dm, B.to(D.dtype))  # [B, T, r]
    grad_B = _bmm_f32(Dm.transpose(1, 2), U)  # [B, d_out, r]
    grad_A = _bmm_f32(V.transpose(1, 2), Xm)  # [B, r, d_in]
    return grad_A.mul_(scale), grad_B.mul_(scale)


def lora_grad_project(
    X: torch.Tensor,
    D: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    a_name: str,
    b_name: str,
    seed: int,
    proj_dim: int,
    mask: torch.Tensor | None = None,
    adam_A: Adam | None = None,
    adam_B: Adam | None = None,
    out: torch.Tensor | None = None,
    adam_betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    precision: str = "bf16x2",
) -> torch.Tensor:
    """Projected per-sample gradient of one LoRA module: ``out[b] += R_A^T G_A[b] + R_B^T G_B[b]``.

    Arguments:
        X: ``[B, T, d_in]`` module inputs; D: ``[B, T, d_out]`` output gradients (bf16/fp16/fp32).
        A: ``[r, d_in]``, B: ``[d_out, r]`` LoRA weights; scale: ``alpha / r``.
        a_name, b_name: the parameters' names (they key the sign blocks R_A, R_B).
        seed, proj_dim: projection seed and k.
        mask: ``[B, T]``, nonzero for real tokens (padded rows of X, D may hold garbage).
        adam_A, adam_B: ``(exp_avg, exp_avg_sq)`` of each parameter, for the LESS
            Adam direction; None for plain gradients.
        out: ``[B, k]`` float32 to accumulate into (the extractor sums modules); new when None.
        precision: see ``rademacher_project``.
    Return:
        ``out``: ``Tensor[B, k]`` float32.
    """
    _check_inputs(X, D, A, B, mask, adam_A, adam_B)
    n = X.shape[0]
    grad_A, grad_B = lora_grads(X, D, A, B, scale, mask)
    common = dict(adam_betas=adam_betas, adam_eps=adam_eps, precision=precision)
    out = rademacher_project(grad_A.reshape(n, -1), a_name, seed, proj_dim, adam=adam_A, out=out, **common)
    del grad_A
    return rademacher_project(grad_B.reshape(n, -1), b_name, seed, proj_dim, adam=adam_B, out=out, **common)


def lora_grads_ref(X, D, A, B, scale: float, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch per-sample LoRA gradients by einsum over tokens, in X's dtype: ``(grad_A, grad_B)``."""
    n, t, _ = X.shape
    keep = torch.ones(n, t, dtype=torch.bool, device=X.device) if mask is None else (mask != 0).to(X.device)
    zero = torch.zeros((), dtype=X.dtype, device=X.device)
    Xm = torch.where(keep[:, :, None], X, zero)
    Dm = torch.where(keep[:, :, None], D.to(X.dtype), zero)
    A, B = A.to(X.dtype), B.to(X.dtype)
    U = torch.einsum("btd,rd->btr", Xm, A)  # A x_t
    V = torch.einsum("bto,or->btr", Dm, B)  # B^T d_t
    grad_B = scale * torch.einsum("bto,btr->bor", Dm, U)
    grad_A = scale * torch.einsum("btr,btd->brd", V, Xm)
    return grad_A, grad_B


def lora_grad_project_ref(
    X: torch.Tensor,
    D: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    a_name: str,
    b_name: str,
    seed: int,
    proj_dim: int,
    mask: torch.Tensor | None = None,
    adam_A: Adam | None = None,
    adam_B: Adam | None = None,
    out: torch.Tensor | None = None,
    adam_betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
) -> torch.Tensor:
    """Plain-torch ``lora_grad_project``: every step in X's dtype (einsum grads, Adam,
    ``@ rademacher_signs_ref`` blocks), result added to ``out`` as float32 ``[B, k]``."""
    n = X.shape[0]
    grad_A, grad_B = lora_grads_ref(X, D, A, B, scale, mask)
    result = torch.zeros(n, proj_dim, dtype=torch.float32, device=X.device)
    for name, g, adam in ((a_name, grad_A, adam_A), (b_name, grad_B, adam_B)):
        g = g.reshape(n, -1)
        if adam is not None:
            g = adam_precondition_ref(g, adam[0].reshape(1, -1), adam[1].reshape(1, -1), adam_betas, adam_eps)
        rademacher_project_ref(g, name, seed, proj_dim, out=result)
    if out is None:
        return result
    out += result
    return out
