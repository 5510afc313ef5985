"""The lora_grad op: per-sample LoRA gradients of one site (+Adam), projected onto the contract.

A PEFT LoRA linear computes ``y = W x + s * B(A x)`` with ``A: [r, d_in]``
(``...lora_A.default.weight``), ``B: [d_out, r]`` (``...lora_B.default.weight``)
and ``s = alpha / r``. For sample ``b`` with inputs ``X[b]: [T, d_in]``,
output gradients ``D[b] = dL/dy: [T, d_out]`` and token mask ``M[b]: [T]``::

    U[b] = X[b] A^T                          [T, r]
    V[b] = D[b] B                            [T, r]
    grad_B[b] = s * sum_t M[b,t] D[b,t] U[b,t]^T = s * D[b]^T U[b]     [d_out, r]
    grad_A[b] = s * sum_t M[b,t] V[b,t] X[b,t]^T = s * V[b]^T X[b]     [r, d_in]

then, per parameter, ``out[b] += R^T G'[b]`` with ``G'`` the gradient or its
LESS Adam direction (``ops.project``). Masked rows of X and D may hold
anything (NaN, inf): they are replaced by zeros with ``torch.where`` before
any product, because ``0 * NaN`` is NaN.

Column: cuBLAS batched GEMMs and the Triton projection kernel
(``kernels/project.py``, reached through ``ops.project.project_param``) below;
this module (input checks, dispatch through ``ops.backend``'s registry, the
reference) in the middle; ``features.extractor.GradientExtractor`` above, one
call per LoRA site. Backends:

- ``"triton"``: step 1 ``lora_grads`` (batched GEMMs; ``U`` and ``V`` stay in
  the input dtype, exactly as the model's own forward / backward at that dtype
  rounds them; the weight-gradient GEMMs accumulate and return fp32); step 2
  the project op's Triton kernel, Adam on the fly. Only one site's
  ``[B, P_A]`` and ``[B, P_B]`` gradients are ever in memory.
- ``"torch"``: step 1 the reference formula on fp32 copies of the inputs
  (``per_sample_lora_grads``), Adam by ``adam_precondition_ref``; step 2 the
  project op on the fastest project backend of the device (C++ on the CPU).

Dispatch: ``backend="auto"`` (and no ``ICONS_FAST_BACKEND_LORA_GRAD`` /
``ICONS_FAST_BACKEND``) times the available backends of the device
("triton" and "torch" on a GPU; the CPU has "torch" only) once per shape
class (``shape_class``) on the first ``TUNE_SAMPLES`` samples into a scratch
``out``, and keeps the fastest that is not slower than "torch"
(``ops.backend.measured_backend``, cached on disk per machine). Calls of
less work than ``autotune.MIN_FLOPS`` take the first available backend of
the preference order without timing.

References: ``lora_grads_ref`` (the formula, in X's dtype) and
``lora_grad_project_ref`` (+ ``adam_precondition_ref`` + ``project_param_ref``,
every step in X's dtype).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from icons_fast.contract import AdamMoments, ProjectionSpec
from icons_fast.ops import autotune
from icons_fast.ops.backend import implementation, measured_backend, register
from icons_fast.ops.project import adam_precondition_ref, project_param, project_param_ref

# (A's moments, B's moments), or None for plain gradients
LoraAdam = tuple[AdamMoments, AdamMoments]
TUNE_SAMPLES = 4  # samples the measured dispatch times each backend on


@dataclass(frozen=True)
class LoraParams:
    """One LoRA site: ``A [r, d_in]``, ``B [d_out, r]``, ``scale = alpha / r``, and the
    parameter names that key the sign blocks ``R_A``, ``R_B``."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    a_name: str
    b_name: str


def _check_inputs(X, D, A, B, mask) -> None:
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
    if len({X.device, D.device, A.device, B.device}) != 1:
        raise ValueError(f"X, D, A, B must share a device; got {X.device}, {D.device}, {A.device}, {B.device}")


def _check_adam(site: LoraParams, adam: LoraAdam | None) -> None:
    if adam is None:
        return
    for label, moments, param in (("A", adam[0], site.A), ("B", adam[1], site.B)):
        if moments.exp_avg.numel() != param.numel():
            raise ValueError(f"Adam moments of {label} must have the shape of the parameter {tuple(param.shape)}")


def _masked(X: torch.Tensor, D: torch.Tensor, mask: torch.Tensor | None):
    """Zero the padded tokens of X and D by selection (a NaN times 0 would still be NaN)."""
    if mask is None:
        return X, D
    keep = (mask != 0).to(X.device)[:, :, None]  # [B, T, 1]
    return torch.where(keep, X, torch.zeros((), dtype=X.dtype, device=X.device)), torch.where(
        keep, D, torch.zeros((), dtype=D.dtype, device=D.device)
    )


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


# ------------------------------------------------------------------ step 1
def lora_grads(X, D, A, B, scale: float, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample LoRA gradients ``(grad_A [B, r, d_in], grad_B [B, d_out, r])`` in fp32, by batched GEMMs.

    X: ``[B, T, d_in]``, D: ``[B, T, d_out]`` (same 16/32-bit dtype), A: ``[r, d_in]``,
    B: ``[d_out, r]``, mask: ``[B, T]`` or None. Formulas in the module docstring.
    """
    _check_inputs(X, D, A, B, mask)
    if X.dtype != D.dtype:  # e.g. bf16 activations with fp32 output gradients: compute in the wider one
        common = torch.promote_types(X.dtype, D.dtype)
        X, D = X.to(common), D.to(common)
    Xm, Dm = _masked(X, D, mask)
    U = torch.matmul(Xm, A.to(X.dtype).t())  # [B, T, r] in the input dtype, as the model's forward has it
    V = torch.matmul(Dm, B.to(D.dtype))  # [B, T, r]
    grad_B = _bmm_f32(Dm.transpose(1, 2), U)  # [B, d_out, r]
    grad_A = _bmm_f32(V.transpose(1, 2), Xm)  # [B, r, d_in]
    return grad_A.mul_(scale), grad_B.mul_(scale)


def lora_grads_ref(X, D, A, B, scale: float, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch per-sample LoRA gradients by einsum over tokens, in X's dtype: ``(grad_A, grad_B)``."""
    n, t, _ = X.shape
    keep = torch.ones(n, t, dtype=torch.bool, device=X.device) if mask is None else (mask != 0).to(X.device)
    zero = torch.zeros((), dtype=X.dtype, device=X.device)
    Xm = torch.where(keep[:, :, None], X, zero)
    Dm = torch.where(keep[:, :, None], D.to(X.dtype), zero)
    A, B = A.to(X.dtype), B.to(X.dtype)
    U = Xm @ A.t()  # [B, T, r]: A x_t
    V = Dm @ B  # [B, T, r]: B^T d_t
    grad_B = scale * torch.einsum("bto,btr->bor", Dm, U)
    grad_A = scale * torch.einsum("btr,btd->brd", V, Xm)
    return grad_A, grad_B


def per_sample_lora_grads(
    X: torch.Tensor, D: torch.Tensor, site: LoraParams, mask: torch.Tensor | None = None, adam: LoraAdam | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G_A [B, r, d_in], G_B [B, d_out, r])`` fp32: the reference formula on fp32 copies, then Adam.

    The "torch" backend's step 1, and the raw per-sample gradients the
    extractor returns when it does not project.
    """
    _check_inputs(X, D, site.A, site.B, mask)
    _check_adam(site, adam)
    f32 = torch.float32
    gA, gB = lora_grads_ref(X.to(f32), D.to(f32), site.A.to(f32), site.B.to(f32), site.scale, mask)
    if adam is not None:
        gA, gB = adam_precondition_ref(gA, adam[0]), adam_precondition_ref(gB, adam[1])
    return gA, gB


# ------------------------------------------------------------------ the op
def lora_grad_project(
    X: torch.Tensor,
    D: torch.Tensor,
    site: LoraParams,
    spec: ProjectionSpec,
    mask: torch.Tensor | None = None,
    adam: LoraAdam | None = None,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Projected per-sample gradient of one LoRA site: ``out[b] += R_A^T G_A[b] + R_B^T G_B[b]``.

    Arguments:
        X: ``[B, T, d_in]`` site inputs; D: ``[B, T, d_out]`` output gradients (bf16/fp16/fp32).
        site: the site's weights, scale and parameter names (``LoraParams``).
        spec: projection seed and k.
        mask: ``[B, T]``, nonzero for real tokens (padded rows of X, D may hold garbage).
        adam: ``(A's AdamMoments, B's AdamMoments)`` for the LESS direction; None for plain gradients.
        out: ``[B, k]`` float32 to accumulate into (the extractor sums sites); new when None.
        backend: "auto" | "triton" | "torch" (see the module docstring).
    Return:
        ``out``: ``Tensor[B, k]`` float32.
    """
    _check_inputs(X, D, site.A, site.B, mask)
    _check_adam(site, adam)
    n, k = X.shape[0], spec.proj_dim
    if out is None:
        out = torch.zeros(n, k, dtype=torch.float32, device=X.device)
    elif out.shape != (n, k) or out.dtype != torch.float32 or out.device != X.device:
        raise ValueError(
            f"out must be float32 [{n}, {k}] on {X.device}; got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    b = min(n, TUNE_SAMPLES)

    def run_sample(name):  # the first TUNE_SAMPLES samples into a scratch out
        scratch = torch.zeros(b, k, dtype=torch.float32, device=X.device)
        implementation("lora_grad", name, X.device)[1](X[:b], D[:b], site, spec, None if mask is None else mask[:b],
                                                       adam, scratch)

    t, d_in, d_out, r = X.shape[1], X.shape[2], D.shape[2], site.A.shape[0]
    work = 2.0 * n * r * (d_in + d_out) * (2 * t + k)  # U, V, the two weight gradients, their projections
    name = measured_backend("lora_grad", backend, X.device, shape_class(X, D, site, spec, adam), work, run_sample)
    implementation("lora_grad", name, X.device)[1](X, D, site, spec, mask, adam, out)
    return out


def shape_class(X: torch.Tensor, D: torch.Tensor, site: LoraParams, spec: ProjectionSpec,
                adam: LoraAdam | None) -> str:
    """What a measured choice is keyed on besides the machine: the dtypes of X and D, the timed samples, T,
    d_in, d_out, r and k up to powers of two, and whether Adam is applied."""
    pow2 = autotune.pow2_class
    dtypes = "/".join(str(t.dtype).removeprefix("torch.") for t in (X, D))
    b, t, d_in = X.shape
    return (f"{dtypes} B{pow2(min(b, TUNE_SAMPLES))} T{pow2(t)} d{pow2(d_in)}x{pow2(D.shape[2])} "
            f"r{pow2(site.A.shape[0])} k{pow2(spec.proj_dim)}{' adam' if adam is not None else ''}")


@register("lora_grad", "triton")
def _lora_grad_triton(X, D, site: LoraParams, spec: ProjectionSpec, mask, adam, out) -> None:
    n = X.shape[0]
    adam_A, adam_B = adam if adam is not None else (None, None)
    with record_function("lora_grads + projection"):  # the profiler's range names (benchmarks/profile_featurize.py)
        grad_A, grad_B = lora_grads(X, D, site.A, site.B, site.scale, mask)
        project_param(grad_A.reshape(n, -1), site.a_name, spec.seed, spec.proj_dim, out, backend="triton", adam=adam_A)
        del grad_A
        project_param(grad_B.reshape(n, -1), site.b_name, spec.seed, spec.proj_dim, out, backend="triton", adam=adam_B)


@register("lora_grad", "torch")
def _lora_grad_torch(X, D, site: LoraParams, spec: ProjectionSpec, mask, adam, out) -> None:
    n = X.shape[0]
    with record_function("lora_grads"):
        grads = per_sample_lora_grads(X, D, site, mask, adam)
    with record_function("projection"):
        for name, g in zip((site.a_name, site.b_name), grads):
            project_param(g.reshape(n, -1), name, spec.seed, spec.proj_dim, out)


def lora_grad_project_ref(X: torch.Tensor, D: torch.Tensor, site: LoraParams, spec: ProjectionSpec,
                          mask=None, adam: LoraAdam | None = None, out=None) -> torch.Tensor:
    """Plain-torch ``lora_grad_project``: every step in X's dtype (einsum grads, Adam,
    ``project_param_ref``), result added to ``out`` as float32 ``[B, k]``."""
    n = X.shape[0]
    grad_A, grad_B = lora_grads_ref(X, D, site.A, site.B, site.scale, mask)
    adam_A, adam_B = adam if adam is not None else (None, None)
    result = torch.zeros(n, spec.proj_dim, dtype=torch.float32, device=X.device)
    for name, g, moments in ((site.a_name, grad_A, adam_A), (site.b_name, grad_B, adam_B)):
        project_param_ref(g.reshape(n, -1), name, spec.seed, spec.proj_dim, adam=moments, out=result)
    if out is None:
        return result
    out += result
    return out
