"""TRAK compatibility: our Rademacher projector wherever TRAK (or LESS) takes a projector.

TRAK (``pip install traker``, import name ``trak``) accepts any subclass of
``trak.projectors.AbstractProjector``: ``__init__(grad_dim, proj_dim, seed,
proj_type, device)``, ``project(grads, model_id) -> Tensor[B, proj_dim]`` and
``free_memory()``. ``TRAKProjector`` is that subclass (a plain class with the
same interface when TRAK is not installed, ``HAS_TRAK`` says which) around
``RademacherProjector``. What it adds over TRAK's own projectors:

- the matrix is the projection contract's (design section 2.4): the same on
  every GPU, batch size and backend, never stored (TRAK's ``CudaProjector``
  depends on the GPU's SM count and its ``BasicProjector`` stores blocks);
- flat ``Tensor[B, grad_dim]`` and dict ``{name: Tensor[B, ...]}`` inputs
  (TRAK's ``FunctionalGradientComputer`` hands over a dict), fp16 / bf16 /
  fp32 / fp64; with ``param_shapes`` the two give the same features.

Scale. TRAK's Rademacher matrices have entries ``+-1`` and LESS uses them as
is; the contract has ``+-1/sqrt(k)``. ``scale="trak"`` (default) multiplies by
``sqrt(k)`` so magnitudes (and TRAK's ``lambda_reg``, fp16 range) are what
TRAK users expect; ``scale="contract"`` returns icons-fast's features exactly.
TRAK's scores (``lambda_reg=0``) come out multiplied by ``k`` under "trak"
relative to "contract" (TRAK rescales ``(X^T X)^-1`` by its mean absolute
entry, so scores go with the square of the projection's scale); their
ranking, and so any selection, is the same.

Usage::

    proj = TRAKProjector(grad_dim=n_params, proj_dim=2048, seed=0, device="cuda")
    traker = TRAKer(model, task="image_classification", train_set_size=N, projector=proj)
    # LESS: use TRAKProjector where collect_grad_reps picks CudaProjector / BasicProjector

``block_size`` and ``max_batch_size`` (the keyword arguments LESS and TRAK
pass to their own projectors) are accepted and ignored: our kernels choose
their own tiles, and any batch size works.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from icons_fast.features.projection import RademacherProjector

try:  # optional dependency: the class works the same without it
    from trak.projectors import AbstractProjector as _Base
    from trak.projectors import ProjectionType as _ProjectionType

    HAS_TRAK = True
except ImportError:  # pragma: no cover - depends on the environment
    _Base, _ProjectionType = object, None
    HAS_TRAK = False

SCALES = ("trak", "contract")
_IGNORED_TRAK_KWARGS = ("block_size", "max_batch_size")


class TRAKProjector(_Base):
    """``RademacherProjector`` behind TRAK's ``AbstractProjector`` interface.

    Arguments:
        grad_dim: ``P``, gradient entries per sample.
        proj_dim: ``k``.
        seed: projection seed; ``model_id`` in ``project`` shifts it
            (``seed + 10_000 * model_id`` mod 2**32, so checkpoints get independent matrices).
        proj_type: "rademacher" or TRAK's ``ProjectionType.rademacher`` ("normal" raises).
        device: where the projection runs and the output lives.
        dtype: output dtype (accumulation is float32).
        scale: "trak" (entries ``+-1``, default) or "contract" (``+-1/sqrt(k)``).
        param_shapes: ordered ``{name: numel or shape}``; splits flat inputs so flat
            and dict inputs give the same features.
        backend, block_rows: passed to ``RademacherProjector``.
        block_size, max_batch_size: accepted for TRAK/LESS call sites, ignored.
    """

    def __init__(self, grad_dim: int, proj_dim: int, seed: int = 0, proj_type="rademacher",
                 device="cpu", dtype: torch.dtype = torch.float32, scale: str = "trak",
                 param_shapes: Mapping | None = None, backend: str = "auto", block_rows: int | None = None,
                 **kwargs):
        unknown = sorted(set(kwargs) - set(_IGNORED_TRAK_KWARGS))
        if unknown:
            raise TypeError(f"TRAKProjector got unexpected keyword arguments {unknown}; "
                            f"TRAK's {list(_IGNORED_TRAK_KWARGS)} are accepted and ignored")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        self._inner = RademacherProjector(grad_dim, proj_dim, seed=seed, proj_type=proj_type, device=device,
                                          dtype=torch.float32, param_shapes=param_shapes, backend=backend,
                                          block_rows=block_rows)
        # the attributes TRAK's AbstractProjector.__init__ sets (TRAKer reads proj_dim and proj_type)
        self.grad_dim = self._inner.grad_dim
        self.proj_dim = self._inner.proj_dim
        self.seed = self._inner.seed
        self.proj_type = _ProjectionType.rademacher if HAS_TRAK else "rademacher"
        self.device = self._inner.device
        self.dtype = dtype
        self.scale = scale
        self._factor = math.sqrt(self.proj_dim) if scale == "trak" else 1.0

    @property
    def backend(self) -> str:
        """The projection backend asked for: "auto" (measured per shape class by the project op) or the forced name."""
        return self._inner.backend

    def describe_backend(self) -> str:
        """The request and what ran it so far, e.g. "auto (ran: project cpp)" (``RademacherProjector.describe_backend``)."""
        return self._inner.describe_backend()

    def project(self, grads, model_id: int = 0) -> torch.Tensor:
        """``Tensor[B, proj_dim]`` in ``dtype`` from ``Tensor[B, grad_dim]`` or ``{name: Tensor[B, ...]}``.

        ``= factor * sum_p G_p @ R_p`` with ``R`` the contract's matrix for seed
        ``seed + 10_000 * model_id``; ``factor = sqrt(k)`` for scale "trak", 1 for "contract".
        """
        out = self._inner.project(grads, model_id=int(model_id))  # float32
        if self._factor != 1.0:
            out.mul_(self._factor)
        return out.to(self.dtype)

    def free_memory(self) -> None:
        """Nothing is cached (``R`` is never stored); TRAK calls this before finalizing."""
        self._inner.free_memory()

    def __repr__(self) -> str:
        return (f"TRAKProjector(grad_dim={self.grad_dim}, proj_dim={self.proj_dim}, seed={self.seed}, "
                f"scale={self.scale!r}, device={str(self.device)!r}, dtype={self.dtype}, backend={self.backend!r})")
